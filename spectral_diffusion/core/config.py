"""What the package is configured by: which layers get adapters, and what identifies a concept."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from spectral_diffusion.core import slots
from spectral_diffusion.core.tokens import validate_token
from spectral_diffusion.errors import ConfigError

if TYPE_CHECKING:
    import torch

VARIANTS = ("additive", "rotational")

UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
UNET_FEED_FORWARD = ("ff.net.0.proj", "ff.net.2")
UNET_PROJECTIONS = ("proj_in", "proj_out")
TEXT_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
TEXT_FEED_FORWARD = ("fc1", "fc2")

TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")
TOKENIZER_OF = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}


@dataclass(frozen=True)
class TargetConfig:
    """Which layers get adapters: module-path suffixes for the UNet and for every text encoder."""

    unet: tuple[str, ...] = UNET_ATTENTION
    text_encoder: tuple[str, ...] = TEXT_ATTENTION

    def __post_init__(self):
        known_unet = set(UNET_ATTENTION + UNET_FEED_FORWARD + UNET_PROJECTIONS)
        known_text = set(TEXT_ATTENTION + TEXT_FEED_FORWARD)
        bad = sorted(set(self.unet) - known_unet) + sorted(set(self.text_encoder) - known_text)
        if bad:
            raise ConfigError(
                f"unknown adapter targets {bad}; UNet targets: {sorted(known_unet)}, "
                f"text encoder targets: {sorted(known_text)}"
            )
        if not self.unet and not self.text_encoder:
            raise ConfigError("at least one adapter target is needed")

    @classmethod
    def preset(cls, name: str) -> TargetConfig:
        """``attention`` (default), ``attention+ff``, or ``all`` (attention, feed-forward, proj_in/out)."""
        if name == "attention":
            return cls()
        if name == "attention+ff":
            return cls(UNET_ATTENTION + UNET_FEED_FORWARD, TEXT_ATTENTION + TEXT_FEED_FORWARD)
        if name == "all":
            return cls(UNET_ATTENTION + UNET_FEED_FORWARD + UNET_PROJECTIONS, TEXT_ATTENTION + TEXT_FEED_FORWARD)
        raise ConfigError(f"unknown target preset {name!r}; use attention, attention+ff or all")

    def to_json(self) -> dict:
        return {"unet": list(self.unet), "text_encoder": list(self.text_encoder)}

    @classmethod
    def from_json(cls, data: Mapping) -> TargetConfig:
        return cls(tuple(data.get("unet", ())), tuple(data.get("text_encoder", ())))


@dataclass
class ConceptInfo:
    """What identifies a loaded concept: its slot and rank, variant and trigger tokens."""

    name: str
    slot: int
    rank: int
    variant: str
    tokens: list[str] = field(default_factory=list)
    class_word: str = ""

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ConfigError(f"unknown variant {self.variant!r}; use one of {VARIANTS}")
        if self.rank < 1:
            raise ConfigError(f"rank must be at least 1, got {self.rank}")
        if self.slot < 0:
            raise ConfigError(f"slot must be 0 or more, got {self.slot}")
        for token in self.tokens:
            validate_token(token)

    @property
    def columns(self) -> range:
        return slots.columns(self.slot, self.rank)


@dataclass(frozen=True)
class StoredConcept:
    """A concept as stored, ready to install: what ``SpectralAdapters.load_concepts`` takes.

    ``layer_tensors[key]`` holds the slot's base triplets ``U, s, V`` and the trainable tensors of the
    variant; ``token_vectors[component]`` the trigger tokens' embeddings; ``tolerance`` is the bound of
    the base-model check (``compatibility_tolerance`` of the dtype the triplets were stored in).
    """

    info: ConceptInfo
    layer_tensors: Mapping[str, Mapping[str, torch.Tensor]]
    token_vectors: Mapping[str, torch.Tensor]
    tolerance: float


class ConceptInfoView:
    """Read-only attributes of ``self.info`` (a ``ConceptInfo``), for records that hold one."""

    info: ConceptInfo

    name = property(lambda self: self.info.name)
    tokens = property(lambda self: self.info.tokens)
    slot = property(lambda self: self.info.slot)
    rank = property(lambda self: self.info.rank)
    variant = property(lambda self: self.info.variant)
    class_word = property(lambda self: self.info.class_word)
    columns = property(lambda self: self.info.columns)

    @property
    def token(self) -> str:
        """The first trigger token (concepts normally have exactly one)."""
        return self.tokens[0] if self.tokens else ""
