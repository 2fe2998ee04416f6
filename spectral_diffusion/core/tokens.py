"""Trigger tokens: new tokenizer entries whose input embeddings belong to one concept each.

The text encoder's embedding table is wrapped rather than resized: its rows stay frozen and
bit-identical, and each concept keeps its own small float32 table for its tokens. Only those rows
receive gradients, and loading or dropping a concept never touches the base table.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from spectral_diffusion.core import slots
from spectral_diffusion.core.names import NAME_PATTERN
from spectral_diffusion.errors import ConceptNotFoundError, SpectralDiffusionError

# a trigger token is a concept name in angle brackets, so every valid name's default token <name> is valid
TOKEN_BODY = f"<{NAME_PATTERN}>"
TOKEN_PATTERN = re.compile(f"^{TOKEN_BODY}$")


class TokenError(SpectralDiffusionError, ValueError):
    """A trigger token is malformed, already a word of the tokenizer, or owned by another concept."""


def validate_token(token: str) -> str:
    if not TOKEN_PATTERN.match(token):
        raise TokenError(
            f"trigger token {token!r} is not valid: use lowercase letters, digits, '-' or '_' inside "
            "angle brackets, e.g. <my-dog>"
        )
    return token


def default_token(name: str) -> str:
    return validate_token(f"<{name}>")


def check_tokens_free(tokens: Iterable[str], owners: Mapping[str, Iterable[str]]) -> None:
    """Refuse a trigger token another concept already uses (``slots.token_clash``); ``owners`` maps a
    description of each other concept ("concept 'dog'") to its tokens."""
    found = slots.token_clash(tokens, owners)
    if found:
        token, owner = found
        raise TokenError(f"trigger token {token} is already used by {owner}; pick another token")


def add_tokens(tokenizer, tokens: list[str]) -> list[int]:
    """Add trigger tokens (idempotent) and return their ids; refuse ones that are ordinary words."""
    ids = []
    for token in tokens:
        validate_token(token)
        before = tokenizer.convert_tokens_to_ids(token)
        if before is not None and before != tokenizer.unk_token_id and token not in tokenizer.get_added_vocab():
            raise TokenError(f"{token!r} is already a word of the tokenizer; pick another trigger token")
        tokenizer.add_tokens([token])
        ids.append(tokenizer.convert_tokens_to_ids(token))
        pieces = tokenizer(token, add_special_tokens=False).input_ids
        if pieces != [ids[-1]]:
            raise TokenError(f"the tokenizer splits {token!r} into {len(pieces)} pieces; pick another token")
    return ids


class ConceptTokenEmbedding(nn.Module):
    """An ``nn.Embedding`` (kept as ``base_layer``) plus per-concept rows for ids past its table."""

    def __init__(self, base_layer: nn.Embedding):
        super().__init__()
        self.base_layer = base_layer
        self.vectors = nn.ParameterDict()
        self.token_ids: dict[str, list[int]] = {}

    @property
    def weight(self) -> torch.Tensor:  # transformers reads get_input_embeddings().weight
        return self.base_layer.weight

    @property
    def num_embeddings(self) -> int:
        return self.base_layer.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base_layer.embedding_dim

    def add_concept(self, name: str, token_ids: list[int], vectors: torch.Tensor) -> None:
        if name in self.vectors:
            raise ValueError(f"concept {name!r} already has token embeddings")
        if vectors.shape != (len(token_ids), self.embedding_dim):
            raise ValueError(
                f"token embeddings of shape {tuple(vectors.shape)} do not fit {len(token_ids)} tokens "
                f"of dimension {self.embedding_dim}"
            )
        shared = slots.token_clash(token_ids, self.token_ids)
        if shared:
            raise TokenError(f"concept {name!r} would share a trigger token with concept {shared[1]!r}")
        if any(token_id < self.num_embeddings for token_id in token_ids):
            raise TokenError("trigger tokens must be new tokens, not words of the base vocabulary")
        device = self.base_layer.weight.device
        self.vectors[name] = nn.Parameter(vectors.detach().to(device=device, dtype=torch.float32).clone())
        self.token_ids[name] = list(token_ids)

    def remove_concept(self, name: str) -> None:
        if name not in self.vectors:
            raise ConceptNotFoundError(f"concept {name!r} has no token embeddings here")
        del self.vectors[name]
        del self.token_ids[name]

    def init_vectors(self, tokenizer, class_word: str | None, count: int) -> torch.Tensor:
        """Start vectors: the mean embedding of the class word's tokens, else of the whole table."""
        table = self.base_layer.weight.detach().to(torch.float32)
        ids = tokenizer(class_word, add_special_tokens=False).input_ids if class_word else []
        ids = [i for i in ids if i < self.num_embeddings]
        start = table[ids].mean(dim=0) if ids else table.mean(dim=0)
        return start.unsqueeze(0).repeat(count, 1)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        extra = input_ids >= self.num_embeddings
        out = self.base_layer(input_ids.masked_fill(extra, 0))
        if not bool(extra.any()):
            return out
        covered = torch.zeros_like(extra)
        for name, ids in self.token_ids.items():
            for row, token_id in enumerate(ids):
                hit = input_ids == token_id
                if bool(hit.any()):
                    vector = self.vectors[name][row].to(out.dtype)
                    out = torch.where(hit.unsqueeze(-1), vector, out)
                    covered |= hit
        missing = extra & ~covered
        if bool(missing.any()):
            unknown = sorted({int(i) for i in input_ids[missing]})
            raise ConceptNotFoundError(
                f"token ids {unknown} belong to no loaded concept; load the concept or remove its "
                "trigger token from the prompt"
            )
        return out
