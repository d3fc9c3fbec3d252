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
SHORT_ROW = 32  # below this row length the bmm is faster all the same


def _small(rows_out: int, rows: torch.Tensor) -> bool:
    """Whether a product giving rows_out rows from rows (B, k, N) hits the slow small-bmm loop
    (rows shorter than SHORT_ROW sum too slowly for the multiply-and-sum to win)."""
    _, k, n = rows.shape
    return rows.device.type == "cpu" and n >= SHORT_ROW and rows_out * k * n < SMALL_PRODUCT


def dots(rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Inner products of each sample's rows (B, k, N) with its vector x (B, N): (B, k). Vectors
    (B, m, N) give (B, m, k), with no views to make for a caller that keeps them that way."""
    matrix = x.dim() == 3
    if _small(x.shape[1] if matrix else 1, rows):
        return (x[:, :, None] * rows[:, None]).sum(3) if matrix else (rows * x[:, None]).sum(2)
    product = torch.bmm(x if matrix else x[:, None], rows.transpose(1, 2))
    return product if matrix else product[:, 0]


def combine(
    coefficients: torch.Tensor,
    rows: torch.Tensor,
    base: torch.Tensor | None = None,
    alpha: float = 1.0,
    beta: float = 1.0,
) -> torch.Tensor:
    """alpha * each sample's combination of its rows (B, k, N) with coefficients (B, k), plus
    beta * base (B, N) when base is given, in one fused kernel: (B, N). Coefficients (B, m, k)
    give m combinations at once, (B, m, N), with a base of that shape."""
    matrix = coefficients.dim() == 3
    c = coefficients if matrix else coefficients[:, None, :]
    base = base if base is None or matrix else base[:, None]
    if _small(c.shape[1], rows):
        product = (c[..., None] * rows[:, None]).sum(2)
        if base is None:
            product = product if alpha == 1 else alpha * product
        elif beta == 1:
            product = torch.add(base, product, alpha=alpha)
        else:
            product = torch.add(product if alpha == 1 else alpha * product, base, alpha=beta)
    elif base is None:
        product = torch.bmm(c, rows)
        product = product if alpha == 1 else alpha * product
    else:
        product = torch.baddbmm(base, c, rows, beta=beta, alpha=alpha)
    return product if matrix else product[:, 0]


def put(buffer: torch.Tensor, index: int, row: torch.Tensor) -> torch.Tensor:
    """buffer (B, k, N) with row (B, N) at position index: in place, unless autograd records
    the solve (adjoint="unrolled"), where it writes a copy so that saved tensors stay valid."""
    if torch.is_grad_enabled() and (buffer.requires_grad or row.requires_grad):
        position = torch.tensor([index], device=buffer.device)
        return buffer.index_copy(1, position, row[:, None])
    buffer[:, index] = row
    return buffer
