"""Per-sample products of a batch of row sets with vectors, in the layouts BLAS runs fast.

On CPU, torch's batched matrix-vector product (B, k, N) @ (B, N, 1) runs about ten times
slower than the same numbers as a row-vector product (B, 1, N) @ (B, N, k), and any batched
product with fewer than 400 multiply-adds per sample (k * N < 400, e.g. a 3-step history of
width 128) takes an unblocked loop several times slower than a broadcast multiply-and-sum.
Such a short combination of a large batch is faster still as one fused multiply-add per row:
the multiply-and-sum writes and reads back a (B, k, N) temporary, which at B * N = 32768
(mnist_dense's batch of 256) costs more than k - 1 extra kernels. Every solver that keeps
per-sample histories (Anderson, Broyden, GMRES) keeps them in `history` buffers and goes
through these two helpers.
"""

from __future__ import annotations

import torch

SMALL_PRODUCT = 400  # multiply-adds per sample below which torch's CPU bmm is unblocked
SHORT_ROW = 32  # below this row length the bmm is faster all the same
# Output elements per row of a short combination from which a chain of fused multiply-adds
# beats the multiply-and-sum (measured on CPU at k <= 5: B * N = 32768 wins to k = 3,
# 16384 to k = 5, 8192 to k = 2; a single row always).
CHAIN_ELEMENTS = 8192


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
        if not matrix:
            return (rows * x[:, None]).sum(2)
        if x.shape[1] == 1:
            return (rows * x).sum(2)[:, None]
        return (x[:, :, None] * rows[:, None]).sum(3)
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
    beta * base (B, N) when base is given: (B, N). Coefficients (B, m, k) give m combinations
    at once, (B, m, N), with a base of that shape."""
    matrix = coefficients.dim() == 3
    c = coefficients if matrix else coefficients[:, None, :]
    base = base if base is None or matrix else base[:, None]
    if _small(c.shape[1], rows):
        short = _chain if _chains(c, rows) else _multiply_and_sum
        product = short(c, rows, base, alpha, beta)
    elif base is None:
        product = torch.bmm(c, rows)
        product = product if alpha == 1 else alpha * product
    else:
        product = torch.baddbmm(base, c, rows, beta=beta, alpha=alpha)
    return product if matrix else product[:, 0]


def _chains(c: torch.Tensor, rows: torch.Tensor) -> bool:
    """Whether a short combination is faster as a chain of multiply-adds (see CHAIN_ELEMENTS)."""
    k = rows.shape[1]
    return k == 1 or k * CHAIN_ELEMENTS <= c.shape[0] * c.shape[1] * rows.shape[2]


def _multiply_and_sum(
    c: torch.Tensor, rows: torch.Tensor, base: torch.Tensor | None, alpha: float, beta: float
) -> torch.Tensor:
    """alpha * c (B, m, k) times rows (B, k, N) plus beta * base (B, m, N), by a broadcast
    product and a sum over k."""
    product = (c[..., None] * rows[:, None]).sum(2)
    if base is None:
        return product if alpha == 1 else alpha * product
    if beta == 1:
        return torch.add(base, product, alpha=alpha)
    return torch.add(product if alpha == 1 else alpha * product, base, alpha=beta)


def _chain(
    c: torch.Tensor, rows: torch.Tensor, base: torch.Tensor | None, alpha: float, beta: float
) -> torch.Tensor:
    """alpha * c (B, m, k) times rows (B, k, N) plus beta * base (B, m, N), one fused
    multiply-add per row of `rows`."""
    if base is None:
        product = c[:, :, :1] * rows[:, :1] if alpha == 1 else alpha * c[:, :, :1] * rows[:, :1]
    else:
        start = base if beta == 1 else beta * base
        product = torch.addcmul(start, c[:, :, :1], rows[:, :1], value=alpha)
    for i in range(1, rows.shape[1]):
        product.addcmul_(c[:, :, i : i + 1], rows[:, i : i + 1], value=alpha)
    return product


def history(like: torch.Tensor, rows: int) -> torch.Tensor:
    """An empty buffer of `rows` vectors per sample, (B, rows, N) for like (B, N), stored row by
    row: row k of every sample is one contiguous block, so that a product over the first rows
    reads a few blocks, not a piece of every sample's whole buffer. GMRES's solve at
    mnist_dense's batch of 256 took 7% less, Anderson's and Broyden's time per evaluation at
    width 512 and batch 64 about 4% less on a CPU, where the scattered rows evicted the
    operator's own data."""
    batch, dim = like.shape
    return like.new_empty(rows, batch, dim).transpose(0, 1)


def put(buffer: torch.Tensor, index: int, row: torch.Tensor) -> torch.Tensor:
    """buffer (B, k, N) with row (B, N) at position index: in place, unless autograd records
    the solve (adjoint="unrolled"), where it writes a copy so that saved tensors stay valid
    (select_scatter takes the index as a number: an index tensor made on the host is a
    blocking copy to the device, which waits for its queued work on every write)."""
    if torch.is_grad_enabled() and (buffer.requires_grad or row.requires_grad):
        return buffer.select_scatter(row, 1, index)
    buffer[:, index] = row
    return buffer
