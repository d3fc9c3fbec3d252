"""Per-sample products of row sets against einsum, on every path the helpers choose."""

import pytest
import torch

from raydeq.solvers.batched import combine, dots

# (batch, rows k, width N): bmm (k * N >= 400), multiply-and-sum (a short combination of a
# small batch), a chain of multiply-adds (a short combination of a large batch, or one row),
# and rows narrower than 32 (bmm all the same).
SHAPES = [(3, 8, 64), (4, 3, 64), (256, 3, 128), (5, 1, 64), (6, 5, 16)]


# How the rows' buffer is stored: each sample's rows together, or each row of every sample
# together (the solvers' `history` buffers), which the rows see as a transposed view.
LAYOUTS = ["per_sample", "per_row"]


def rows_and_vectors(
    batch: int, k: int, n: int, m: int, layout: str = "per_sample"
) -> tuple[torch.Tensor, ...]:
    """Rows (B, k, N) as a slice of a longer basis (as GMRES passes them), m vectors (B, m, N)
    and m coefficient sets (B, m, k)."""
    g = torch.Generator().manual_seed(batch * 100 + k)
    basis = torch.randn(batch, k + 2, n, generator=g, dtype=torch.float64)
    if layout == "per_row":
        basis = basis.transpose(0, 1).contiguous().transpose(0, 1)
    x = torch.randn(batch, m, n, generator=g, dtype=torch.float64)
    c = torch.randn(batch, m, k, generator=g, dtype=torch.float64)
    return basis[:, :k], x, c


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("m", [None, 1, 2])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_dots_match_einsum(shape, m, layout):
    rows, x, _ = rows_and_vectors(*shape, m or 1, layout)
    expected = torch.einsum("bkn,bmn->bmk", rows, x)
    if m is None:
        torch.testing.assert_close(dots(rows, x[:, 0]), expected[:, 0])
    else:
        torch.testing.assert_close(dots(rows, x), expected)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("m", [None, 1, 2])
@pytest.mark.parametrize(
    "with_base, alpha, beta",
    [(False, 1.0, 1.0), (False, -0.5, 1.0), (True, -1.0, 1.0), (True, 2.0, -3.0)],
)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_combine_matches_einsum(shape, m, with_base, alpha, beta, layout):
    rows, base, c = rows_and_vectors(*shape, m or 1, layout)
    expected = alpha * torch.einsum("bmk,bkn->bmn", c, rows)
    if with_base:
        expected = expected + beta * base
    kwargs = {"base": base if m else base[:, 0]} if with_base else {}
    out = combine(c if m else c[:, 0], rows, alpha=alpha, beta=beta, **kwargs)
    torch.testing.assert_close(out, expected if m else expected[:, 0])
    if with_base:
        assert out.data_ptr() != base.data_ptr(), "the base must not be overwritten"


@pytest.mark.parametrize("shape", [(5, 1, 64), (4, 3, 64)])
def test_combine_differentiates_like_einsum(shape):
    """The chain's in-place multiply-adds keep autograd's graph (adjoint="unrolled")."""
    rows, base, c = rows_and_vectors(*shape, 1)
    inputs = (c[:, 0].requires_grad_(), rows.clone().requires_grad_(), base[:, 0].requires_grad_())
    assert torch.autograd.gradcheck(
        lambda c, rows, base: combine(c, rows, base=base, alpha=-1.0, beta=2.0), inputs
    )
