"""Is an adapter made for this base model? The check from its stored slot triplets.

An adapter stores its slot's base triplets (U_k, s_k, V_k); ``||U_k^T W V_k - diag(s_k)|| / ||s_k||``
small means it was trained on this model. All concepts of a fusion are checked in one pass over each
weight (one product ``W [V_1 ... V_c]``), not once per concept.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from spectral_diffusion.core.config import StoredConcept
from spectral_diffusion.core.svd import Triplets
from spectral_diffusion.errors import BaseModelMismatchError

COMPATIBILITY_TOLERANCE = 1e-2


def compatibility_tolerance(dtype: torch.dtype) -> float:
    """The check's bound for triplets stored in ``dtype``: rounding them to float16 moves U^T W V by
    about 2 * 2^-11 relative (measured ~1e-3), so half-precision triplets get 8 units of it on top."""
    if dtype in (torch.float32, torch.float64):
        return COMPATIBILITY_TOLERANCE
    return COMPATIBILITY_TOLERANCE + 8 * torch.finfo(dtype).eps


def check_layer_set(layers, layer_tensors: Mapping[str, object], model_name: str) -> None:
    missing = sorted(set(layers) - set(layer_tensors))
    extra = sorted(set(layer_tensors) - set(layers))
    if missing or extra:
        raise BaseModelMismatchError(
            f"the adapter's layers do not match {model_name} with these targets: "
            f"{len(missing)} missing (e.g. {missing[:2]}), {len(extra)} unknown (e.g. {extra[:2]})"
        )


def compatible_triplets(layers, concepts: Sequence[StoredConcept], model_name: str) -> list[dict[str, Triplets]]:
    """Per concept its float32 triplets per layer, once every one passed the base-model check."""
    found: list[dict[str, Triplets]] = [{} for _ in concepts]
    with torch.no_grad():
        for key, layer in layers.items():
            trips = []
            for concept, out in zip(concepts, found, strict=True):
                tensors = concept.layer_tensors[key]
                trip = Triplets(tensors["U"].float(), tensors["s"].float(), tensors["V"].float())
                _check_shape(layer, key, trip, concept.info.rank, model_name)
                out[key] = trip
                trips.append(trip)
            # one pass over the weight for all concepts: W [V_1 ... V_c], then U_i^T (W V_i) each
            weight_v = layer.weight_matrix.float() @ torch.cat([trip.V for trip in trips], dim=1)
            start = 0
            for concept, trip in zip(concepts, trips, strict=True):
                projected = trip.U.T @ weight_v[:, start : start + trip.k]
                start += trip.k
                _check_projection(key, layer, trip, projected, concept.tolerance, model_name)
    return found


def _check_shape(layer, key: str, trip: Triplets, rank: int, model_name: str) -> None:
    m, n = layer.out_features, layer.in_features
    if trip.U.shape != (m, rank) or trip.V.shape != (n, rank) or trip.s.shape != (rank,):
        raise BaseModelMismatchError(
            f"layer {key} of {model_name} is {m} x {n} but the adapter's slot there is "
            f"U{tuple(trip.U.shape)} V{tuple(trip.V.shape)} at rank {rank}: it was made for another model"
        )


def _check_projection(key, layer, trip: Triplets, projected, tolerance: float, model_name: str) -> None:
    for name, strength in layer.merged.items():  # measure against the unmerged base weight
        left, right = layer.concept(name).exact_factors()
        projected = projected - strength * (trip.U.T @ left) @ (right.T @ trip.V)
    error = torch.linalg.norm(projected - torch.diag(trip.s)) / torch.linalg.norm(trip.s).clamp_min(1e-12)
    if not torch.isfinite(error):
        raise BaseModelMismatchError(
            f"the adapter's slot at layer {key} cannot be checked against {model_name}: its singular "
            "vectors are degenerate (U^T W V is not finite): it was trained by an earlier version into a "
            "slot whose singular values that version's SVD had lost; train the concept again"
        )
    if error > tolerance:
        raise BaseModelMismatchError(
            f"the adapter was trained on another base model: at layer {key} its singular vectors do not "
            f"match {model_name} (relative error {float(error):.3g} > {tolerance:.3g}); load it "
            "into the model it was trained on"
        )
