"""A DEQ-like test problem with a known spectrum, counted evaluations and exact references.

f(z) = W tanh(z) + x with W symmetric: `slow` eigenvalues spread just below `slow_eig` and the
rest uniform in [0, fast_max], so the Jacobian W diag(1 - tanh(z)^2) at the fixed point has a
few eigenvalues near slow_eig and many small ones, as a trained DEQ layer does. The Jacobian is
explicit, so the fixed point (Newton) and the implicit gradient (dense solves) are exact.
They are computed in float64 on the problem's device, or on the CPU where the device has no
float64 (MPS).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Counter:
    """Evaluations of f and vector-Jacobian products through f, whoever calls them."""

    nfe: int = 0
    nvjp: int = 0

    def reset(self) -> None:
        """Start counting from zero."""
        self.nfe = self.nvjp = 0


class _Tap(torch.autograd.Function):
    """Identity on f's output whose backward counts one vector-Jacobian product: every
    backward through f passes it, the one to W and x alone included (an implicit adjoint's
    last product, which a tap on f's input missed)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, out: Tensor, counter: Counter) -> Tensor:
        ctx.counter = counter
        return out.view_as(out)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        ctx.counter.nvjp += 1
        return grad, None


@dataclass(frozen=True)
class Spectrum:
    """Shape of the problem: state width, batch, and the eigenvalues of W."""

    dim: int
    batch: int
    slow: int = 4
    slow_eig: float = 0.97
    fast_max: float = 0.3
    input_scale: float = 0.02


class SpectralProblem:
    """f(z) = W tanh(z) + x for a batch of inputs x; W and x are leaves that can require grad."""

    def __init__(
        self,
        spec: Spectrum,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(spec.dim, spec.dim, generator=g, dtype=torch.float64))
        fast = spec.fast_max * torch.rand(spec.dim - spec.slow, generator=g, dtype=torch.float64)
        slow = spec.slow_eig - 0.02 * torch.rand(spec.slow, generator=g, dtype=torch.float64)
        eig = torch.cat([slow, fast])
        w = ((q * eig) @ q.T).to(dtype)
        x = spec.input_scale * torch.randn(spec.batch, spec.dim, generator=g, dtype=torch.float64)
        x = x.to(dtype)
        self.spec = spec
        self.weight = w.to(device)
        self.x = x.to(device)
        # W and x as `dtype` holds them, copied in float64 for the exact references: converted
        # on the CPU, as a device without float64 (MPS) refuses W.double().
        self.exact_weight = w.to(torch.float64, copy=True)
        self.exact_x = x.to(torch.float64, copy=True)
        self.counter = Counter()

    def f(self, z: Tensor) -> Tensor:
        """One counted evaluation of f at z (B, dim)."""
        self.counter.nfe += 1
        return _Tap.apply(torch.tanh(z) @ self.weight.T + self.x, self.counter)

    def z0(self) -> Tensor:
        """The zero initial state."""
        return torch.zeros_like(self.x)

    def residual(self, z: Tensor) -> Tensor:
        """True residual per sample: RMS of f(z) - z over the features (not counted)."""
        with torch.no_grad():
            r = torch.tanh(z) @ self.weight.T + self.x - z
        return r.pow(2).mean(1).sqrt()

    def exact_fixed_point(self, iterations: int = 30) -> Tensor:
        """z* on the problem's device, in its dtype (`newton`)."""
        return self.newton(iterations).to(self.x.dtype).to(self.x.device)

    def newton(self, iterations: int = 30) -> Tensor:
        """z* in float64 by Newton's method with dense per-sample solves, to rounding error, on
        `reference_device`."""
        where = reference_device(self.x.device)
        w, x = self.exact_weight.to(where), self.exact_x.to(where)
        z = torch.zeros_like(x)
        eye = torch.eye(self.spec.dim, dtype=z.dtype, device=z.device)
        with torch.no_grad():
            for _ in range(iterations):
                r = torch.tanh(z) @ w.T + x - z
                if float(r.abs().max()) <= 1e-12:
                    break
                z = z - solve_each(jacobian(w, z) - eye, r)
        return z

    def exact_gradient(self, cotangent: Tensor) -> tuple[Tensor, Tensor]:
        """(dL/dW, dL/dx) for L = sum(cotangent * z*), by the implicit function theorem, in
        float64 on `reference_device`."""
        z = self.newton()
        w = self.exact_weight.to(z.device)
        eye = torch.eye(self.spec.dim, dtype=z.dtype, device=z.device)
        a = (eye - jacobian(w, z)).transpose(1, 2)
        g = solve_each(a, cotangent.detach().to(z.device).double())
        return g.T @ torch.tanh(z), g

    def spectral_radius(self, samples: int = 4) -> float:
        """Largest |eigenvalue| of J_f(z*) over the first few samples of the batch."""
        z = self.newton()[:samples]
        jacobians = jacobian(self.exact_weight.to(z.device), z).cpu()
        return max(float(torch.linalg.eigvals(j).abs().max()) for j in jacobians)


def jacobian(w: Tensor, z: Tensor) -> Tensor:
    """J_f(z) per sample (B, dim, dim) for f(z) = W tanh(z) + x: W diag(1 - tanh(z)^2)."""
    return w[None] * (1 - torch.tanh(z).pow(2))[:, None, :]


def has_float64(device: torch.device) -> bool:
    """Whether `device` computes in float64: MPS has no float64 and refuses to make a tensor of
    it."""
    try:
        return float(torch.ones(2, dtype=torch.float64, device=device).sum()) == 2
    except (RuntimeError, TypeError):
        return False


def reference_device(device: torch.device) -> torch.device:
    """Where the exact references of a problem on `device` are computed in float64: there, or
    on the CPU where it has no float64."""
    return device if has_float64(device) else torch.device("cpu")


def solve_each(a: Tensor, b: Tensor) -> Tensor:
    """Solve a[i] x[i] = b[i] for a (B, N, N) and b (B, N), one sample at a time.

    On CPU the batched LAPACK path of torch.linalg.solve returns wrong solutions for N >= 256
    with more than one thread on some MKL builds, so CPU solves go one sample at a time.
    """
    if a.device.type != "cpu":
        return torch.linalg.solve(a, b)
    return torch.stack([torch.linalg.solve(ai, bi) for ai, bi in zip(a, b, strict=True)])


def gradient_error(grads: tuple[Tensor, Tensor], reference: tuple[Tensor, Tensor]) -> float:
    """Relative error ||g - g_ref|| / ||g_ref|| over (dL/dW, dL/dx) together."""
    diff = sum(
        float((a.to(b.device).double() - b.double()).pow(2).sum()) for a, b in zip(grads, reference)
    )
    norm = sum(float(b.double().pow(2).sum()) for b in reference)
    return (diff / norm) ** 0.5
