"""The caption grammar of a model's training scenes: the words augmentation keeps true of a photo.

A model pretrained on scenes described in a fixed grammar ("a blue circle on the left on a white
background") learns a concept best from captions in that grammar; when training moves, shrinks or
pairs or recolours a concept (``training.augment``) its caption must follow. A model's grammar comes with its
registry entry (``models.registry.caption_grammar``); a model trained on free captions has none, and
its captions are never rewritten.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class CaptionGrammar:
    """Position, size and colour words of a scene grammar.

    ``positions``: position word -> where an object so placed stands, centre (x, y) as fractions of the
    image; ``phrases``: position word -> the phrase captions say ("on the left"); ``sizes``: size word ->
    object width as a fraction of the image (a caption with no size word shows the largest);
    ``pairs``: where the two objects of a two-object caption stand, in the order the caption names them;
    ``colours``: colour word -> the 8-bit RGB an object of that colour is drawn in (empty: colours are
    never rewritten).
    """

    positions: Mapping[str, tuple[float, float]]
    phrases: Mapping[str, str]
    sizes: Mapping[str, float]
    pairs: tuple[tuple[str, str], ...]
    colours: Mapping[str, tuple[int, int, int]] = field(default_factory=dict)

    def nearest_position(self, centre: tuple[float, float]) -> str:
        """The position word whose centre is nearest ``centre`` (x, y fractions)."""
        return min(
            self.positions,
            key=lambda p: (self.positions[p][0] - centre[0]) ** 2 + (self.positions[p][1] - centre[1]) ** 2,
        )

    def size_word(self, extent: float) -> str:
        """The size word for an object ``extent`` (fraction of the image) wide: the nearest listed size."""
        words = sorted(self.sizes, key=self.sizes.get)
        for smaller, larger in zip(words, words[1:], strict=False):
            if extent < (self.sizes[smaller] + self.sizes[larger]) / 2:
                return smaller
        return words[-1]
