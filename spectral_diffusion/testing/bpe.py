"""The built-in CLIP-format BPE tokenizer, trained from a fixed word list (no download).

The built-in models need a tokenizer that behaves like SD's ``CLIPTokenizer`` (same file format,
special tokens and max length) without fetching CLIP's 49k-token vocabulary, so a small one is
trained here, deterministically, from common prompt words.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from functools import lru_cache
from itertools import pairwise
from pathlib import Path

# Tokens per prompt, as SD's CLIP text encoders (also their number of position embeddings).
MAX_LENGTH = 77

# Common prompt words; each becomes a single BPE token.  Letters only, because CLIP's
# pre-tokenizer splits on everything else.  Order and duplicates do not matter.
_WORDS = """
a an the of in on at to and or with without from by for near next behind under over
above below beside between inside outside into onto around top bottom left right front
back middle center is are this that it its his her their my your our style photo
photograph picture image painting drawing sketch illustration render rendering portrait
landscape closeup close up shot view scene art artwork digital oil watercolor pencil
charcoal ink cartoon anime comic realistic photorealistic cinematic dramatic lighting
light soft hard sunlight shadow shadows studio natural golden hour high quality detailed
highly sharp focus blurry blur bokeh masterpiece best worst low resolution dog dogs
puppy cat cats kitten mug cup bottle vase teapot bowl plate chair table sofa couch bed
lamp clock book books car bike bicycle boat house building tree trees flower flowers
plant grass bird fish horse cow sheep rabbit bear lion tiger fox wolf duck person people
man woman boy girl child baby face hand hands eyes hair hat shirt dress jacket shoes toy
teddy robot ball box bag backpack sunglasses glasses candle sculpture statue red green
blue yellow orange purple pink brown black white gray grey silver gold golden beige cyan
magenta violet teal navy turquoise colorful colourful dark bright pale pastel vivid neon
circle circles square squares triangle triangles star stars rectangle hexagon diamond
heart oval shape shapes round flat line lines dot dots stripe stripes striped spotted
checkered pattern grid wooden wood metal metallic glass plastic stone marble ceramic
paper fabric fur furry fluffy leather smooth rough shiny glossy matte wet dry soft
velvet knitted woven rusty polished transparent small big large tiny huge little tall
short long wide thin thick giant miniature background backgrounds room kitchen bedroom
garden park forest beach ocean sea lake river mountain mountains sky clouds cloud city
street road field desert snow rain night day sunset sunrise morning evening water wall
floor window door space moon sun planet underwater jungle village castle sitting
standing lying running jumping walking sleeping eating playing swimming flying holding
wearing looking smiling one two three four five many several some group pair very new
old young cute happy sad beautiful ugly vintage modern retro futuristic abstract simple
minimalist dotted cross ring
"""


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable unicode map (BPE never sees whitespace)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes), strict=True))


def tokenizer_words() -> list[str]:
    """The word list that the built-in tokenizer turns into single tokens."""
    return sorted(set(_WORDS.split()))


def _word_symbols(word: str, byte_map: dict[int, str]) -> tuple[str, ...]:
    """A word as CLIP's BPE first sees it: a symbol per byte, ``</w>`` on the last."""
    symbols = [byte_map[b] for b in word.encode("utf-8")]
    symbols[-1] += "</w>"
    return tuple(symbols)


def _merge_pair(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """``word`` with every occurrence of ``pair`` merged, left to right."""
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _bpe(word: tuple[str, ...], ranks: dict[tuple[str, str], int]) -> tuple[str, ...]:
    """CLIP's BPE encoding: repeatedly merge the lowest-ranked adjacent pair present."""
    while len(word) > 1:
        best = min(pairwise(word), key=lambda pair: ranks.get(pair, len(ranks)))
        if best not in ranks:
            break
        word = _merge_pair(word, best)
    return word


def _train_merges(words: list[tuple[str, ...]]) -> list[tuple[str, str]]:
    """Plain BPE training: merge the most frequent pair (ties: the smallest pair) until
    every word is whole.

    Shared sub-words ("ing</w>", "er") fall out naturally and keep unknown words short.
    """
    merges: list[tuple[str, str]] = []
    current = list(words)
    while True:
        counts = Counter(pair for w in current for pair in pairwise(w))
        if not counts:
            return merges
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges.append(pair)
        current = [_merge_pair(w, pair) for w in current]


def _repair_merges(words: list[tuple[str, ...]], merges: list[tuple[str, str]]) -> None:
    """Append merges until CLIP's rank-order encoding makes every word one token.

    Training merges pair by pair across all words, while encoding picks the lowest rank
    within one word; rarely the two disagree, so leftover pieces get explicit merges.
    """
    while True:
        ranks = {pair: i for i, pair in enumerate(merges)}
        broken = [pieces for w in words if len(pieces := _bpe(w, ranks)) > 1]
        if not broken:
            return
        for pieces in broken:
            head = pieces[0]
            for piece in pieces[1:]:
                if (head, piece) not in ranks:
                    ranks[(head, piece)] = len(merges)
                    merges.append((head, piece))
                head += piece


def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Copies of the built-in vocabulary and merges (callers may modify them)."""
    vocab, merges = _clip_vocab_and_merges()
    return dict(vocab), list(merges)


@lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A small, deterministic CLIP-format BPE vocabulary (vocab.json contents, merges).

    Layout follows CLIP's: the 256 byte symbols, the same with ``</w>``, one entry per
    merge, then ``<|startoftext|>`` and ``<|endoftext|>`` last.  Any text still
    tokenizes (it falls back to byte symbols); the listed words are single tokens.
    """
    byte_map = _bytes_to_unicode()
    symbols = list(byte_map.values())
    words = [_word_symbols(w, byte_map) for w in tokenizer_words()]
    merges = _train_merges(words)
    _repair_merges(words, merges)
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def write_clip_vocab(folder: str | os.PathLike) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` (CLIP's file format) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _clip_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def build_tokenizer():
    """A ``CLIPTokenizer`` over the built-in vocabulary.

    Max length 77 and pad token ``<|endoftext|>``, as SD's tokenizer.
    """
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="sd-tokenizer-") as tmp:
        write_clip_vocab(tmp)
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=MAX_LENGTH, pad_token="<|endoftext|>")
