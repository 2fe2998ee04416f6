"""Regional layouts: which concept goes where in the image, with which prompt.

A layout is a context prompt (the whole image, and everything outside every box) plus up to
``MAX_REGIONS`` regions, each a box ``(x0, y0, x1, y1)`` in fractions of the image (x right, y down),
an optional concept and an optional region prompt (default: the context prompt). Users write it as
JSON (``Layout.from_json``) or, on the command line, one ``NAME:x0,y0,x1,y1:PROMPT`` per region
(``parse_region``). ``region_masks`` turns the boxes into soft masks on the latent grid.

The automatic layouts (``auto_layout``, ``preset_layout``) also write the region prompts: when the prompt
names its concepts in separate clauses ("a red <heart> on the left and a yellow <moon> on the right"),
each concept's region gets its own clause (``concept_clauses``).
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from spectral_diffusion.errors import LayoutError

MAX_REGIONS = 8
FEATHER_PIXELS = 2  # latent pixels of linear ramp at a box's inner edges
PRESETS = {
    "left-right": [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)],
    "top-bottom": [(0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0)],
    "thirds": [(0.0, 0.0, 1 / 3, 1.0), (1 / 3, 0.0, 2 / 3, 1.0), (2 / 3, 0.0, 1.0, 1.0)],
    "grid": [(0.0, 0.0, 0.5, 0.5), (0.5, 0.0, 1.0, 0.5), (0.0, 0.5, 0.5, 1.0), (0.5, 0.5, 1.0, 1.0)],
}
# Where a prompt may be cut between two concepts' clauses: " and ", a comma, a semicolon (", and" is one cut).
CLAUSE_SEPARATOR = re.compile(r"\s*[,;]\s*and\s+|\s+and\s+|\s*[,;]\s*")
# What sets the scene apart from the first or last concept's clause ("<dog> ... and <cat> ..., in a park").
SCENE_SEPARATOR = re.compile(r"\s*[,;]\s*")
_LAYOUT_KEYS = ("prompt", "negative", "regions")
_REGION_KEYS = ("concept", "box", "prompt", "negative")


def _check_text(value, what: str, optional: bool) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise LayoutError(f"{what} must be text, got {type(value).__name__}")


def _check_box(box, where: str) -> tuple[float, float, float, float]:
    if isinstance(box, (str, bytes)) or not isinstance(box, Sequence) or len(box) != 4:
        raise LayoutError(f"{where}: a box is four numbers [x0, y0, x1, y1] (fractions of the image), got {box!r}")
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in box):
        raise LayoutError(f"{where}: box values must be finite numbers, got {list(box)!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if min(x0, y0, x1, y1) < 0 or max(x0, y0, x1, y1) > 1:
        raise LayoutError(f"{where}: box {list(box)} leaves the image; use fractions between 0 and 1")
    if not (x0 < x1 and y0 < y1):
        raise LayoutError(f"{where}: box {list(box)} is empty; it needs x0 < x1 and y0 < y1")
    return x0, y0, x1, y1


@dataclass(frozen=True)
class Region:
    """One box of the image: its concept (None: a prompt only) and its prompt (None: the context's)."""

    concept: str | None
    box: tuple[float, float, float, float]
    prompt: str | None = None
    negative: str | None = None

    def __post_init__(self):
        if self.concept is not None and (not isinstance(self.concept, str) or not self.concept.strip()):
            raise LayoutError(f"a region's concept must be a concept name or null, got {self.concept!r}")
        where = f"region {self.concept!r}" if self.concept else "a region"
        object.__setattr__(self, "box", _check_box(self.box, where))
        _check_text(self.prompt, f"the prompt of {where}", optional=True)
        _check_text(self.negative, f"the negative prompt of {where}", optional=True)

    def to_json(self) -> dict:
        out: dict = {"concept": self.concept, "box": list(self.box)}
        if self.prompt is not None:
            out["prompt"] = self.prompt
        if self.negative is not None:
            out["negative"] = self.negative
        return out


@dataclass(frozen=True)
class Layout:
    """A context prompt and its regions (at most ``MAX_REGIONS``, each concept at most once)."""

    prompt: str
    regions: tuple[Region, ...] = field(default_factory=tuple)
    negative: str = ""

    def __post_init__(self):
        _check_text(self.prompt, "the layout's prompt", optional=False)
        _check_text(self.negative, "the layout's negative prompt", optional=False)
        if isinstance(self.regions, (str, bytes, Mapping)) or not isinstance(self.regions, Sequence):
            raise LayoutError(f"a layout's regions must be a list, got {type(self.regions).__name__}")
        regions = tuple(self.regions)
        if not regions:
            raise LayoutError("a layout needs at least one region; without regions use a plain prompt")
        if len(regions) > MAX_REGIONS:
            raise LayoutError(f"a layout has at most {MAX_REGIONS} regions, got {len(regions)}; merge some")
        if not all(isinstance(region, Region) for region in regions):
            raise LayoutError("a layout's regions must be Region objects")
        named = [region.concept for region in regions if region.concept is not None]
        twice = sorted({name for name in named if named.count(name) > 1})
        if twice:
            raise LayoutError(f"concept {twice[0]!r} is named by more than one region; give each concept one box")
        object.__setattr__(self, "regions", regions)

    @property
    def concepts(self) -> list[str]:
        """The concepts placed by the layout, in region order."""
        return [region.concept for region in self.regions if region.concept is not None]

    def region_prompt(self, region: Region) -> str:
        return self.prompt if region.prompt is None else region.prompt

    def region_negative(self, region: Region) -> str:
        return self.negative if region.negative is None else region.negative

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "negative": self.negative, "regions": [r.to_json() for r in self.regions]}

    @classmethod
    def from_json(cls, data: Mapping | str | bytes) -> Layout:
        """A layout from its JSON object, or from JSON text."""
        if isinstance(data, (str, bytes)):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as exc:
                raise LayoutError(f"the layout is not valid JSON ({exc}); see the layout format in the docs") from None
        if not isinstance(data, Mapping):
            raise LayoutError(f"a layout is a JSON object with {list(_LAYOUT_KEYS)}, got {type(data).__name__}")
        _reject_unknown(data, _LAYOUT_KEYS, "the layout")
        if "prompt" not in data:
            raise LayoutError('the layout has no "prompt"; add the prompt of the whole image')
        raw_regions = data.get("regions")
        if not isinstance(raw_regions, list):
            raise LayoutError('the layout needs "regions": a list of {"concept", "box", "prompt"} objects')
        regions = [_region_from_json(item, i) for i, item in enumerate(raw_regions)]
        return cls(prompt=data["prompt"], regions=tuple(regions), negative=data.get("negative", ""))


def _reject_unknown(data: Mapping, allowed: tuple[str, ...], what: str) -> None:
    unknown = sorted(str(key) for key in data if key not in allowed)
    if unknown:
        raise LayoutError(f"{what} has unknown keys {unknown}; allowed: {list(allowed)}")


def _region_from_json(item, index: int) -> Region:
    if not isinstance(item, Mapping):
        raise LayoutError(f"region {index + 1} must be an object with {list(_REGION_KEYS)}, got {item!r}")
    _reject_unknown(item, _REGION_KEYS, f"region {index + 1}")
    if "box" not in item:
        raise LayoutError(f'region {index + 1} has no "box"; give [x0, y0, x1, y1] as fractions of the image')
    return Region(item.get("concept"), item["box"], item.get("prompt"), item.get("negative"))


def parse_region(text: str) -> Region:
    """A region from the CLI form ``NAME:x0,y0,x1,y1[:PROMPT]`` (empty NAME: no concept)."""
    if not isinstance(text, str):
        raise LayoutError(f"a region is text NAME:x0,y0,x1,y1:PROMPT, got {type(text).__name__}")
    parts = text.split(":", 2)  # the prompt may itself contain colons
    if len(parts) < 2:
        raise LayoutError(f"region {text!r} is not NAME:x0,y0,x1,y1:PROMPT, e.g. dog:0,0,0.5,1:a photo of <dog>")
    name, box_text = parts[0].strip(), parts[1]
    values = box_text.split(",")
    try:
        box = [float(v) for v in values]
    except ValueError:
        box = None
    if box is None or len(box) != 4:
        raise LayoutError(f"region {text!r}: the box {box_text!r} must be four numbers x0,y0,x1,y1, e.g. 0,0,0.5,1")
    prompt = parts[2] if len(parts) == 3 and parts[2].strip() else None
    return Region(name or None, tuple(box), prompt)


def concept_overlaps(layout: Layout) -> list[tuple[str, str, float]]:
    """Pairs of concept regions whose boxes overlap: (first, second, shared area as a fraction of the
    image), in region order. Boxes that only touch do not overlap; prompt-only regions are not counted.

    Where two concept boxes overlap, both concepts' slots act there and the two regions' prompts are
    blended (their weights scaled to sum to 1); that is rarely what was meant, so the generation
    request warns about every such pair (docs/design.md section 11)."""
    placed = [region for region in layout.regions if region.concept is not None]
    found = []
    for i, first in enumerate(placed):
        for second in placed[i + 1 :]:
            width = min(first.box[2], second.box[2]) - max(first.box[0], second.box[0])
            height = min(first.box[3], second.box[3]) - max(first.box[1], second.box[1])
            if width > 0 and height > 0:
                found.append((first.concept, second.concept, width * height))
    return found


def preset_boxes(name: str, count: int) -> list[tuple[float, float, float, float]]:
    """The first ``count`` boxes of a preset (reading order): left-right, top-bottom, thirds, grid."""
    if name not in PRESETS:
        raise LayoutError(f"unknown layout preset {name!r}; use one of {list(PRESETS)}")
    boxes = PRESETS[name]
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= len(boxes):
        raise LayoutError(f"preset {name!r} has room for 1 to {len(boxes)} regions, not {count!r}; pick another preset")
    return list(boxes[:count])


def auto_layout(prompt: str, concepts_with_tokens: Mapping[str, Sequence[str]], negative: str = "") -> Layout:
    """Concepts side by side in equal columns, left to right in the order their trigger tokens first
    appear in ``prompt``; each region's prompt is its concept's clause (``concept_clauses``)."""
    spans = _token_spans(prompt, concepts_with_tokens)
    count = len(spans)
    boxes = [(i / count, 0.0, (i + 1) / count, 1.0) for i in range(count)]
    return _automatic(prompt, spans, boxes, negative)


def preset_layout(
    preset: str, prompt: str, concepts_with_tokens: Mapping[str, Sequence[str]], negative: str = ""
) -> Layout:
    """The preset's boxes given to the concepts in the order their trigger tokens appear in ``prompt``;
    each region's prompt is its concept's clause (``concept_clauses``)."""
    spans = _token_spans(prompt, concepts_with_tokens)
    return _automatic(prompt, spans, preset_boxes(preset, len(spans)), negative)


def _automatic(prompt: str, spans: dict[str, tuple[int, int]], boxes: Sequence, negative: str) -> Layout:
    clauses = concept_clauses(prompt, list(spans.values())) or [None] * len(spans)
    regions = (Region(name, box, clause) for name, box, clause in zip(spans, boxes, clauses, strict=True))
    return Layout(prompt, tuple(regions), negative)


def concept_clauses(prompt: str, spans: Sequence[tuple[int, int]]) -> list[str] | None:
    """The prompt cut into one region prompt per concept, or None where it cannot be (fewer than two
    concepts, or two concepts' tokens with no separator between them, as in "<dog> next to <cat>").

    ``spans``: each concept's (start, end) trigger-token position in ``prompt``, in prompt order. The cut
    between two concepts is the last separator (``CLAUSE_SEPARATOR``) between their tokens, so "a photo
    of <dog>, <cat> and <owl> on a sofa" gives "a photo of <dog>", "<cat>" and "<owl> on a sofa".

    The scene is shared (``_scene_parts``): text set off by a comma or semicolon before the first token
    or after the last one goes into every region's prompt, so "<dog> on the left and <cat> on the right,
    in a park" gives "<dog> on the left, in a park" and "<cat> on the right, in a park". Measured on
    builtin:toy (docs/fusion-quality.md): a region that reads its own clause draws its concept more often
    than one that reads the whole prompt, where the other concepts are named too; a region whose clause
    lacks the scene words draws another background.
    """
    if len(spans) < 2:
        return None
    cuts = []
    for (_, end), (start, _) in itertools.pairwise(spans):
        separators = list(CLAUSE_SEPARATOR.finditer(prompt, end, start))
        if not separators:
            return None
        cuts.append(separators[-1])
    head, begin, finish, tail = _scene_parts(prompt, spans[0][0], spans[-1][1])
    clauses = []
    for cut in cuts:
        clauses.append(prompt[begin : cut.start()].strip())
        begin = cut.end()
    clauses.append(prompt[begin:finish].strip())
    return [head + clause + tail for clause in clauses]


def _scene_parts(prompt: str, first: int, last: int) -> tuple[str, int, int, str]:
    """(head, where the clauses begin, where they end, tail): the head is the text before the last comma
    or semicolon ahead of the first token (with that separator), the tail the text after the first one
    behind the last token (unless it opens another clause: ", and ...")."""
    head, begin, finish, tail = "", 0, len(prompt), ""
    before = list(SCENE_SEPARATOR.finditer(prompt, 0, first))
    if before:
        begin = before[-1].end()
        if prompt[: before[-1].start()].strip():
            head = prompt[: before[-1].start()].strip() + before[-1].group().strip() + " "
    after = SCENE_SEPARATOR.search(prompt, last)
    if after and prompt[after.end() :].strip() and not re.match(r"and\b", prompt[after.end() :]):
        tail, finish = after.group().strip() + " " + prompt[after.end() :].strip(), after.start()
    return head, begin, finish, tail


def _token_spans(prompt: str, concepts_with_tokens: Mapping[str, Sequence[str]]) -> dict[str, tuple[int, int]]:
    """Concept name -> (start, end) of its trigger token's first appearance in ``prompt``, in prompt order."""
    _check_text(prompt, "the prompt", optional=False)
    if not concepts_with_tokens:
        raise LayoutError("an automatic layout needs at least one concept")
    spans = {}
    for name, tokens in concepts_with_tokens.items():
        found = [(prompt.find(token), token) for token in tokens if token and token in prompt]
        if not found:
            raise LayoutError(
                f"concept {name!r} has none of its trigger tokens {list(tokens)} in the prompt; "
                "add one to the prompt or place the concept with an explicit region"
            )
        start, token = min(found)
        spans[name] = (start, start + len(token))
    if len(spans) > MAX_REGIONS:
        raise LayoutError(f"a layout has at most {MAX_REGIONS} regions, got {len(spans)} concepts")
    return dict(sorted(spans.items(), key=lambda item: item[1]))


def _edge_ramp(size: int, lo: float, hi: float, feather: float) -> torch.Tensor:
    """Per pixel of one axis: 1 inside [lo, hi) (pixel units), a linear ramp inward at edges that are
    not the image border, exactly 0 outside. Pixel j is judged at its centre j + 0.5."""
    centres = torch.arange(size, dtype=torch.float32) + 0.5
    inside = ((centres >= lo) & (centres < hi)).to(torch.float32)
    ramp = min(float(feather), (hi - lo) / 2)  # keep the box's middle at 1 however narrow it is
    if ramp <= 0:
        return inside
    weight = torch.ones(size)
    if lo > 0:
        weight = torch.minimum(weight, (centres - lo) / ramp)
    if hi < size:
        weight = torch.minimum(weight, (hi - centres) / ramp)
    return weight.clamp(0, 1) * inside


def region_masks(layout: Layout, height: int, width: int, feather: float = FEATHER_PIXELS) -> list[torch.Tensor]:
    """One float32 (height, width) soft mask per region, on the LATENT grid, in region order."""
    if not isinstance(layout, Layout):
        raise LayoutError(f"region_masks needs a Layout, got {type(layout).__name__}")
    if isinstance(height, bool) or isinstance(width, bool) or not (int(height) >= 1 and int(width) >= 1):
        raise LayoutError(f"the latent size must be positive, got {height} x {width}")
    if not (isinstance(feather, (int, float)) and feather >= 0):
        raise LayoutError(f"feather must be 0 or more latent pixels, got {feather!r}")
    masks = []
    for region in layout.regions:
        x0, y0, x1, y1 = region.box
        columns = _edge_ramp(width, x0 * width, x1 * width, feather)
        rows = _edge_ramp(height, y0 * height, y1 * height, feather)
        masks.append(torch.minimum(rows[:, None], columns[None, :]))
    return masks
