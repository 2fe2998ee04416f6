"""The baseline, not the product: the paper's reference way of running a spectral adapter.

The reference implementation of Spectral Adapter_A keeps the *full* SVD of every adapted weight
(U: m x q, S: q, V: n x q with q = min(m, n)), makes the top-r blocks trainable, and rebuilds the dense
weight ``W = [U_r + A, U_rest] diag([s_r + c, s_rest]) [V_r + B, V_rest]^T`` in every forward call,
so every call (and its backward) costs O(m n q) instead of O(tokens (m + n) r).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ReferenceSpectralLinear(nn.Module):
    """``nn.Linear`` replaced by a full-SVD parameterisation rebuilt at every call."""

    def __init__(self, base: nn.Linear, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, rank: int):
        super().__init__()
        r = rank
        self.rank = r
        self.register_buffer("U_top", U[:, :r].float().contiguous())
        self.register_buffer("U_rest", U[:, r:].float().contiguous())
        self.register_buffer("s_top", S[:r].float().contiguous())
        self.register_buffer("s_rest", S[r:].float().contiguous())
        self.register_buffer("V_top", V[:, :r].float().contiguous())
        self.register_buffer("V_rest", V[:, r:].float().contiguous())
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        self.A = nn.Parameter(torch.zeros(U.shape[0], r))
        self.B = nn.Parameter(torch.zeros(V.shape[0], r))
        self.c = nn.Parameter(torch.zeros(r))

    @classmethod
    def from_linear(cls, base: nn.Linear, rank: int) -> ReferenceSpectralLinear:
        U, S, Vh = torch.linalg.svd(base.weight.detach().float(), full_matrices=False)
        return cls(base, U, S, Vh.T, rank)

    def trainable(self) -> list[nn.Parameter]:
        return [self.A, self.B, self.c]

    def weight(self) -> torch.Tensor:
        U = torch.cat([self.U_top + self.A, self.U_rest], dim=1)
        s = torch.cat([self.s_top + self.c, self.s_rest])
        V = torch.cat([self.V_top + self.B, self.V_rest], dim=1)
        return (U * s) @ V.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """What the reference checkpoints per layer: the full U, S, V plus the trainable blocks."""
        return {
            "U": torch.cat([self.U_top + self.A, self.U_rest], dim=1).detach(),
            "S": torch.cat([self.s_top + self.c, self.s_rest]).detach(),
            "V": torch.cat([self.V_top + self.B, self.V_rest], dim=1).detach(),
        }
