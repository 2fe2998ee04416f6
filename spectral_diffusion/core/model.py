"""Patch a diffusers UNet and CLIP text encoders with spectral layers and manage concepts in them.

``SpectralAdapters`` is the one object that knows every patched layer of a pipeline: it computes (and
caches) their top singular triplets, installs concepts into slots, switches them on and off, merges
them, and gives back the original modules on ``unpatch``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from spectral_diffusion.core import compatibility, slots
from spectral_diffusion.core.compatibility import COMPATIBILITY_TOLERANCE
from spectral_diffusion.core.config import TEXT_COMPONENTS, TOKENIZER_OF, ConceptInfo, StoredConcept, TargetConfig
from spectral_diffusion.core.layers import SpectralLayer
from spectral_diffusion.core.routing import Router, token_kind_of
from spectral_diffusion.core.svd import SvdCache, Triplets, compute_spectrum, weights_fingerprint
from spectral_diffusion.core.tokens import ConceptTokenEmbedding, add_tokens, check_tokens_free
from spectral_diffusion.errors import BaseModelMismatchError, ConceptNotFoundError, SlotConflictError

logger = logging.getLogger(__name__)

SPECTRUM_MIN_K = 64


def _adaptable(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1


def find_targets(model: nn.Module, suffixes: tuple[str, ...]) -> list[str]:
    """Module paths of the Linear / 1x1 Conv2d layers whose path ends with one of ``suffixes``."""
    paths = []
    for path, module in model.named_modules():
        if isinstance(module, SpectralLayer):
            continue
        if any(path == s or path.endswith("." + s) for s in suffixes) and _adaptable(module):
            paths.append(path)
    return paths


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


class SpectralAdapters:
    """All spectral layers and trigger-token embeddings of one pipeline, and the concepts in them."""

    def __init__(
        self,
        components: Mapping[str, nn.Module],
        tokenizers: Mapping[str, object] | None = None,
        targets: TargetConfig | None = None,
        svd_cache: SvdCache | None = None,
    ):
        self.components = {name: module for name, module in components.items() if module is not None}
        self.tokenizers = {name: tok for name, tok in (tokenizers or {}).items() if tok is not None}
        self.targets = targets or TargetConfig()
        self.svd_cache = svd_cache or SvdCache(None)
        self.layers: dict[str, SpectralLayer] = {}
        self.embeddings: dict[str, ConceptTokenEmbedding] = {}
        self.concepts: dict[str, ConceptInfo] = {}
        self._spectrum: dict[str, Triplets] = {}
        self.router = Router()  # shared by every layer; inactive until routed() / text_only()
        self._patch()
        self.fingerprint = weights_fingerprint((key, layer.weight_matrix) for key, layer in self.layers.items())

    @classmethod
    def from_pipeline(cls, pipe, targets: TargetConfig | None = None, svd_cache: SvdCache | None = None):
        components = {"unet": pipe.unet}
        tokenizers = {}
        for name in TEXT_COMPONENTS:
            if getattr(pipe, name, None) is not None:
                components[name] = getattr(pipe, name)
                tokenizers[TOKENIZER_OF[name]] = getattr(pipe, TOKENIZER_OF[name])
        return cls(components, tokenizers, targets, svd_cache)

    # ----- patching -------------------------------------------------------------------------------

    def _patch(self) -> None:
        for component, model in self.components.items():
            suffixes = self.targets.unet if component == "unet" else self.targets.text_encoder
            for path in find_targets(model, suffixes):
                key = f"{component}.{path}"
                layer = SpectralLayer(model.get_submodule(path), self.router, token_kind_of(key))
                _set_submodule(model, path, layer)
                self.layers[key] = layer
            if component in TEXT_COMPONENTS:
                wrapper = ConceptTokenEmbedding(model.get_input_embeddings())
                model.set_input_embeddings(wrapper)
                self.embeddings[component] = wrapper
            model.requires_grad_(False)
        counts = {c: sum(k.startswith(c + ".") for k in self.layers) for c in self.components}
        logger.info("patched %d layers: %s", len(self.layers), counts)
        if not self.layers:
            raise ValueError(f"no layer matched the adapter targets {self.targets.to_json()}")

    def report(self) -> dict[str, list[str]]:
        """Patched module paths per component."""
        out: dict[str, list[str]] = {name: [] for name in self.components}
        for key in self.layers:
            component, _, path = key.partition(".")
            out[component].append(path)
        return out

    def unpatch(self) -> None:
        """Unmerge everything and put the original modules back."""
        self.unmerge()
        for key, layer in self.layers.items():
            component, _, path = key.partition(".")
            _set_submodule(self.components[component], path, layer.base_layer)
        for component, wrapper in self.embeddings.items():
            self.components[component].set_input_embeddings(wrapper.base_layer)
        self.layers.clear()
        self.embeddings.clear()
        self.concepts.clear()

    # ----- spectrum -------------------------------------------------------------------------------

    @property
    def smallest_dim(self) -> int:
        """min(m, n) over the patched layers: the most singular-vector columns a slot can reach."""
        return min(min(layer.out_features, layer.in_features) for layer in self.layers.values())

    def usable_dim(self, progress=None) -> int:
        """Leading singular-vector columns every patched layer can give a slot: ``smallest_dim`` less
        any degenerate tail (``Triplets.usable``), judged on the spectrum a first concept computes anyway
        (all columns of models whose smallest layer is at most ``SPECTRUM_MIN_K`` wide, e.g. the
        built-in ones, and at least that many elsewhere). Columns beyond the computed spectrum count as
        usable; ``new_concept`` checks a slot's own columns when it computes them."""
        smallest = self.smallest_dim
        usable = smallest
        for trip in self.spectrum(min(smallest, SPECTRUM_MIN_K), progress).values():
            if trip.usable < trip.k:
                usable = min(usable, trip.usable)
        return usable

    def capacity(self, rank: int, progress=None) -> int:
        """Number of slots of this rank every patched layer can hold with non-degenerate singular values
        (computes the model's spectrum on first use, like a first concept)."""
        return slots.capacity(self.usable_dim(progress), rank)

    def structural_capacity(self, rank: int) -> int:
        """Slots of this rank the layer sizes allow (no SVD: degenerate columns not excluded)."""
        return slots.capacity(self.smallest_dim, rank)

    def spectrum(self, k: int, progress=None) -> dict[str, Triplets]:
        """Top-``k`` triplets of every patched base weight (computed once, cached on disk)."""
        have = min((t.k for t in self._spectrum.values()), default=0)
        smallest = self.smallest_dim
        if not self._spectrum or have < min(k, smallest):
            with self._unmerged():
                weights = {key: layer.weight_matrix for key, layer in self.layers.items()}
                want = max(k, min(SPECTRUM_MIN_K, smallest))
                self._spectrum = compute_spectrum(weights, want, self.fingerprint, self.svd_cache, progress)
        return self._spectrum

    @contextmanager
    def _unmerged(self) -> Iterator[None]:
        merged = {key: list(layer.merged) for key, layer in self.layers.items() if layer.merged}
        for key, names in merged.items():
            self.layers[key].unmerge(names)
        try:
            yield
        finally:
            for key, names in merged.items():
                self.layers[key].merge(names)

    # ----- concepts -------------------------------------------------------------------------------

    def concept(self, name: str) -> ConceptInfo:
        if name not in self.concepts:
            raise ConceptNotFoundError(f"concept {name!r} is not loaded; loaded: {sorted(self.concepts)}")
        return self.concepts[name]

    def _check_slot(self, info: ConceptInfo) -> None:
        if info.name in self.concepts:
            raise SlotConflictError(f"a concept named {info.name!r} is already loaded")
        slot_capacity = self.structural_capacity(info.rank)  # no SVD: loading verifies stored triplets
        problem = slots.slot_problem(info.slot, info.rank, slot_capacity)
        if problem:
            raise SlotConflictError(problem if slot_capacity < 1 else f"{problem}; use a free slot or a smaller rank")
        for other in self.concepts.values():
            if slots.overlap(info.columns, other.columns):
                raise SlotConflictError(
                    f"concept {info.name!r} (slot {info.slot}, rank {info.rank}) overlaps concept "
                    f"{other.name!r} (slot {other.slot}, rank {other.rank}); they cannot be active together"
                )
        check_tokens_free(info.tokens, {f"concept {other.name!r}": other.tokens for other in self.concepts.values()})

    def new_concept(self, info: ConceptInfo, progress=None) -> None:
        """Install a fresh, zero-initialised concept (its output equals the base model's)."""
        self._check_slot(info)
        spectrum = self.spectrum((info.slot + 1) * info.rank, progress)
        start, stop = info.columns.start, info.columns.stop
        self._check_degenerate(info, spectrum)
        layer_triplets = {key: spectrum[key].block(start, stop) for key in self.layers}
        token_vectors = {}
        for component, wrapper in self.embeddings.items():
            tokenizer = self.tokenizers[TOKENIZER_OF[component]]
            token_vectors[component] = wrapper.init_vectors(tokenizer, info.class_word, len(info.tokens))
        self._install(info, layer_triplets, {}, token_vectors)

    def _check_degenerate(self, info: ConceptInfo, spectrum: Mapping[str, Triplets]) -> None:
        """Refuse a slot whose columns reach a degenerate singular value of some layer."""
        stop = info.columns.stop
        short = {key: trip.usable for key, trip in spectrum.items() if key in self.layers and trip.usable < stop}
        if not short:
            return
        key = min(short, key=short.get)
        usable = min(short.values())
        capacity = slots.capacity(usable, info.rank)
        choice = f"slots 0-{capacity - 1} are usable" if capacity else f"no slot of rank {info.rank} is usable"
        raise SlotConflictError(
            f"slot {info.slot} at rank {info.rank} is unusable on this model: layer {key} has only {usable} "
            f"non-degenerate singular values and the slot needs columns {info.columns.start}-{stop - 1}; "
            f"{choice} (let the library choose, or use a smaller rank)"
        )

    def load_concept(
        self,
        info: ConceptInfo,
        layer_tensors: Mapping[str, Mapping[str, torch.Tensor]],
        token_vectors: Mapping[str, torch.Tensor],
        model_name: str = "this base model",
        tolerance: float = COMPATIBILITY_TOLERANCE,
    ) -> None:
        """Install a concept from stored tensors, after checking everything; on error nothing changes.

        ``layer_tensors[key]`` holds the slot's base triplets ``U, s, V`` and the trainable tensors of
        the variant; ``token_vectors[component]`` the trigger tokens' embeddings. ``tolerance`` is the
        compatibility bound (``compatibility_tolerance`` of the dtype the triplets were stored in).
        """
        self.load_concepts([StoredConcept(info, layer_tensors, token_vectors, tolerance)], model_name)

    def load_concepts(self, concepts: Iterable[StoredConcept], model_name: str = "this base model") -> None:
        """``load_concept`` for several stored concepts at once.

        All of them are checked against the base weights in one pass per layer (one product of the
        weight with their stacked V), then installed in order; on any error none stays installed.
        """
        concepts = list(concepts)
        for concept in concepts:  # against the loaded concepts, before the costly check
            self._check_slot(concept.info)
            compatibility.check_layer_set(self.layers, concept.layer_tensors, model_name)
        triplets = compatibility.compatible_triplets(self.layers, concepts, model_name)
        installed = []
        try:
            for concept, found in zip(concepts, triplets, strict=True):
                info, token_vectors = concept.info, concept.token_vectors
                self._check_slot(info)  # again: against the ones installed just before it
                missing_tokens = sorted(set(self.embeddings) - set(token_vectors)) if info.tokens else []
                if missing_tokens:
                    raise BaseModelMismatchError(f"the adapter has no token embeddings for {missing_tokens}")
                self._install(info, found, concept.layer_tensors, token_vectors)
                installed.append(info.name)
        except Exception:
            for name in installed:
                self.remove_concept(name)
            raise

    def _install(self, info, triplets, layer_tensors, token_vectors) -> None:
        token_ids = {}
        for component in self.embeddings:
            if info.tokens:
                vectors = token_vectors[component]
                if vectors.shape[0] != len(info.tokens):
                    raise BaseModelMismatchError(
                        f"{component} has {vectors.shape[0]} token embeddings for {len(info.tokens)} tokens"
                    )
                width = self.embeddings[component].embedding_dim
                if vectors.shape[1] != width:
                    raise BaseModelMismatchError(
                        f"{component} token embeddings are {vectors.shape[1]}-dimensional but the model's "
                        f"are {width}: the adapter was made for another model"
                    )
        for component in self.embeddings:
            tokenizer = self.tokenizers[TOKENIZER_OF[component]]
            token_ids[component] = add_tokens(tokenizer, info.tokens) if info.tokens else []
        for key, layer in self.layers.items():
            adapter = layer.add_concept(info.name, triplets[key], info.variant, info.slot)
            adapter.requires_grad_(False)  # frozen until trainable_parameters() asks for it
            if key in layer_tensors:
                with torch.no_grad():
                    for pname in adapter.trainable_names():
                        getattr(adapter, pname).copy_(layer_tensors[key][pname].float())
        for component, wrapper in self.embeddings.items():
            if info.tokens:
                wrapper.add_concept(info.name, token_ids[component], token_vectors[component])
                wrapper.vectors[info.name].requires_grad_(False)
        self.concepts[info.name] = info

    def remove_concept(self, name: str) -> None:
        self.concept(name)
        for layer in self.layers.values():
            layer.remove_concept(name)
        for wrapper in self.embeddings.values():
            if name in wrapper.vectors:
                wrapper.remove_concept(name)
        del self.concepts[name]

    def set_strength(self, name: str, strength: float) -> None:
        self.concept(name)
        for layer in self.layers.values():
            layer.set_strength(name, strength)

    def set_enabled(self, name: str, enabled: bool) -> None:
        """Switch a concept's slot on or off (its token still embeds; its weights stop applying)."""
        self.concept(name)
        for layer in self.layers.values():
            if name in layer.merged:
                layer.unmerge([name])
            layer.concept(name).enabled = enabled

    def strength(self, name: str) -> float:
        self.concept(name)
        return next(iter(self.layers.values())).concept(name).strength

    def merge(self, names: list[str] | None = None) -> None:
        """Bake concepts (default: all loaded) into the base weights for base-model speed."""
        for name in names or []:
            self.concept(name)
        for layer in self.layers.values():
            layer.merge(names)

    def unmerge(self, names: list[str] | None = None) -> None:
        for layer in self.layers.values():
            layer.unmerge(names)

    @property
    def merged(self) -> bool:
        return any(layer.merged for layer in self.layers.values())

    # ----- routing (regional composition) ---------------------------------------------------------

    @contextmanager
    def routed(self, masks: Mapping[str, torch.Tensor], latent_size: tuple[int, int] | None = None) -> Iterator[None]:
        """Confine each concept's delta in image-token layers to its soft latent-grid mask.

        ``masks``: concept name -> (H, W) mask on the latent grid (``latent_size`` defaults to the
        masks' size); live concepts without a mask act nowhere on image tokens. Text-side layers keep
        what ``text_only`` says (default: every concept). Merged concepts are unmerged meanwhile (a
        baked delta cannot be routed). The previous state comes back on exit, also on errors.
        """
        for name in masks:
            self.concept(name)
        previous = (self.router.masks, self.router.latent_size)
        with self._unmerged():
            self.router.set_masks(masks, latent_size)
            try:
                yield
            finally:
                self.router.set_masks(*previous)

    @contextmanager
    def text_only(self, names) -> Iterator[None]:
        """Switch text-side layers (text encoders, cross-attention keys/values) to the concepts
        ``names`` (an empty set: the base model's; ``None``: every live concept) until exit."""
        names = None if names is None else frozenset(names)
        for name in names or ():
            self.concept(name)
        previous = self.router.text_concepts
        with self._unmerged():
            self.router.set_text_concepts(names)
            try:
                yield
            finally:
                self.router.set_text_concepts(previous)

    # ----- tensors --------------------------------------------------------------------------------

    def concept_layer_tensors(self, name: str) -> dict[str, dict[str, torch.Tensor]]:
        """Per layer: the slot's base triplets and the concept's trainable tensors (detached copies)."""
        self.concept(name)
        out = {}
        for key, layer in self.layers.items():
            adapter = layer.concept(name)
            tensors = {"U": adapter.U, "s": adapter.s, "V": adapter.V}
            tensors.update({p: getattr(adapter, p) for p in adapter.trainable_names()})
            out[key] = {k: v.detach().float().cpu().contiguous().clone() for k, v in tensors.items()}
        return out

    def concept_token_vectors(self, name: str) -> dict[str, torch.Tensor]:
        self.concept(name)
        return {
            component: wrapper.vectors[name].detach().float().cpu().clone()
            for component, wrapper in self.embeddings.items()
            if name in wrapper.vectors
        }

    def delta_weights(self, name: str) -> dict[str, torch.Tensor]:
        """Explicit m x n updates of a concept per layer (strength not applied)."""
        self.concept(name)
        return {key: layer.get_delta_weight(name) for key, layer in self.layers.items()}

    def lora_factors(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Exact ``dW = L R^T`` factors of a concept per layer (strength not applied)."""
        self.concept(name)
        return {key: layer.concept(name).exact_factors() for key, layer in self.layers.items()}

    def trainable_parameters(self, name: str) -> dict[str, list[nn.Parameter]]:
        """The concept's parameters grouped for separate learning rates; all set to require grad."""
        self.concept(name)
        groups: dict[str, list[nn.Parameter]] = {"unet": [], "text_encoder": [], "embeddings": []}
        for key, layer in self.layers.items():
            group = "unet" if key.startswith("unet.") else "text_encoder"
            adapter = layer.concept(name)
            groups[group].extend(getattr(adapter, p) for p in adapter.trainable_names())
        for wrapper in self.embeddings.values():
            if name in wrapper.vectors:
                groups["embeddings"].append(wrapper.vectors[name])
        for params in groups.values():
            for param in params:
                param.requires_grad_(True)
        return groups
