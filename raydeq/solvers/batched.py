"""Per-sample products of a batch of row sets with vectors, in the layouts BLAS runs fast.

On CPU, torch's batched matrix-vector product (B, k, N) @ (B, N, 1) runs about ten times
slower than the same numbers as a row-vector product (B, 1, N) @ (B, N, k), and any batched
product with fewer than 400 multiply-adds per sample (k * N < 400, e.g. a 3-step history of
width 128) takes an unblocked loop several times slower than a broadcast multiply-and-sum.
Every solver that keeps per-sample histories (VCAB3, Anderson, Broyden, GMRES) goes through
these two helpers.
"""

from __future__ import annotations

import torch

SMALL_PRODUCT = 400  # multiply-adds per sample below which torch's CPU bmm is unblocked


def _small(rows: torch.Tensor) -> bool:
    """Whether a product with these rows (B, k, N) would hit the slow small-bmm loop."""
    return rows.device.type == "cpu" and rows.shape[1] * rows.shape[2] < SMALL_PRODUCT


def dots(rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Inner products of each sample's rows (B, k, N) with its vector x (B, N): (B, k)."""
    if _small(rows):
        return (rows * x[:, None, :]).sum(2)
    return torch.bmm(x[:, None, :], rows.transpose(1, 2))[:, 0]


def combine(
    coefficients: torch.Tensor,
    rows: torch.Tensor,
    base: torch.Tensor | None = None,
    alpha: float = 1.0,
    beta: float = 1.0,
) -> torch.Tensor:
    """alpha * each sample's combination of its rows (B, k, N) with coefficients (B, k), plus
    beta * base (B, N) when base is given, in one fused kernel: (B, N)."""
    if _small(rows):
        product = (coefficients[:, :, None] * rows).sum(1)
        product = product if alpha == 1 else alpha * product
        return product if base is None else torch.add(product, base, alpha=beta)
    if base is None:
        product = torch.bmm(coefficients[:, None, :], rows)[:, 0]
        return product if alpha == 1 else alpha * product
    return torch.baddbmm(base[:, None], coefficients[:, None, :], rows, beta=beta, alpha=alpha)[
        :, 0
    ]


def put(buffer: torch.Tensor, index: int, row: torch.Tensor) -> torch.Tensor:
    """buffer (B, k, N) with row (B, N) at position index: in place, unless autograd records
    the solve (adjoint="unrolled"), where it writes a copy so that saved tensors stay valid."""
    if torch.is_grad_enabled() and (buffer.requires_grad or row.requires_grad):
        position = torch.tensor([index], device=buffer.device)
        return buffer.index_copy(1, position, row[:, None])
    buffer[:, index] = row
    return buffer
