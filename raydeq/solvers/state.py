"""Flat (B, N) views of single or multiscale states, so every solver works on one matrix."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import wraps

import torch

State = torch.Tensor | Sequence[torch.Tensor]


@dataclass(frozen=True)
class Structure:
    """Shapes and dtype of the tensors that make up a state, and the list or tuple type that
    holds them (None for one tensor), to map between it and its flat (B, N) form."""

    shapes: tuple[torch.Size, ...]
    is_tensor: bool
    dtype: torch.dtype
    container: type | None = None

    @staticmethod
    def of(z: State) -> Structure:
        """Read the structure of `z`, checking that it is a batch of floating tensors."""
        tensors = (
            (z,) if isinstance(z, torch.Tensor) else tuple(z) if isinstance(z, list | tuple) else ()
        )
        if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
            raise TypeError(
                f"z0 must be a tensor (B, ...) or a non-empty list/tuple of tensors, got {type(z)}"
            )
        for t in tensors:
            if t.dim() < 1 or not t.is_floating_point():
                raise TypeError(
                    f"each state tensor must be floating point with a batch dimension, "
                    f"got shape {tuple(t.shape)} and dtype {t.dtype}"
                )
        for t in tensors:
            valued("z0", t)
        batch = {t.shape[0] for t in tensors}
        if len(batch) != 1:
            raise ValueError(f"all state tensors must share the batch size, got {sorted(batch)}")
        if len({(t.dtype, t.device) for t in tensors}) != 1:
            parts = ", ".join(f"{t.dtype} on {t.device}" for t in tensors)
            raise TypeError(
                f"all state tensors must share one dtype and one device, got {parts} (in "
                "order); make every part in one dtype on one device (t.to(z[0]))"
            )
        shapes = tuple(t.shape for t in tensors)
        if sum(s[1:].numel() for s in shapes) == 0:
            raise ValueError(
                f"z0 has no features to solve for: shapes {[tuple(s) for s in shapes]}"
            )
        is_tensor = isinstance(z, torch.Tensor)
        return Structure(shapes, is_tensor, tensors[0].dtype, None if is_tensor else type(z))

    @property
    def is_matrix(self) -> bool:
        """Whether the state is one (B, N) tensor, its own flat form."""
        return self.is_tensor and len(self.shapes[0]) == 2

    def flatten(self, z: State) -> torch.Tensor:
        """Concatenate the tensors of `z` into one (B, N) matrix (a view for a single tensor)."""
        tensors = (z,) if isinstance(z, torch.Tensor) else z
        if not isinstance(tensors, list | tuple) or not all(
            isinstance(t, torch.Tensor) for t in tensors
        ):
            raise TypeError(
                f"f must return a state like z0 (a tensor or a list/tuple of tensors), got "
                f"{type(z).__name__}"
            )
        shapes = tuple(t.shape for t in tensors)
        if shapes != self.shapes:
            raise ValueError(
                f"f must return a state of the shapes of z0 {[tuple(s) for s in self.shapes]}, "
                f"got {[tuple(s) for s in shapes]}"
            )
        flat = [t.reshape(t.shape[0], math.prod(t.shape[1:])) for t in tensors]
        return flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)

    def unflatten(self, z: torch.Tensor) -> State:
        """Split a (B, N) matrix back into tensors of the recorded shapes, in the recorded
        container (a named tuple's by its _make)."""
        if self.is_tensor:
            return z.view(self.shapes[0])
        sizes = [s[1:].numel() for s in self.shapes]
        parts = [p.reshape(s) for p, s in zip(z.split(sizes, dim=1), self.shapes, strict=True)]
        return contained(self.container, parts)


def valued(name: str, t: torch.Tensor) -> None:
    """Raise a ValueError naming `name` for a tensor on the 'meta' device, which holds shapes
    but no values: a solve reads its residuals, and would fail at its first read with
    torch's "Tensor.item() cannot be called on meta tensors" or deeper."""
    if t.device.type == "meta":
        raise ValueError(
            f"{name} of shape {tuple(t.shape)} is on the 'meta' device, which holds no values "
            "to solve for; give it on a CPU or GPU (an equilibrium z* has the shapes of z0)"
        )


# torch.func transforms a solve cannot run under, by the names a user calls them.
TRANSFORMS = {
    "Vmap": "vmap",
    "Grad": "grad (vjp, jacrev, hessian)",
    "Jvp": "jvp (jacfwd)",
    "Functionalize": "functionalize",
}
# Why a solve cannot be traced into a graph, and what to run where it cannot be exported.
HOST_READS = "its solver reads each sample's residual on the host to decide how many steps to take"
RUN_INSTEAD = "run the module itself (raydeq.training.load_model builds a trained run's)"


def untransformed(what: str) -> None:
    """Raise a RuntimeError naming `what` (solve, a layer) when called within a torch.func
    transform, an export or a trace: a solver reads each sample's residual on the host to stop
    it (vmap fails in .item(), export on a data-dependent guard, make_fx on a tracing tensor,
    functionalize in the adjoint's requires_grad_(), and a trace fixes the step
    count at the example's, right for that input alone), and an adjoint runs autograd itself
    (grad fails in requires_grad_()), all deep inside the solve."""
    # make_fx traces under a proxy dispatch mode (torch.func.linearize too, whose trace of a
    # solve failed at the first host read, "trying to get value out of a tracing tensor").
    proxy = torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY)
    if torch.compiler.is_exporting() or torch.jit.is_tracing() or proxy is not None:
        raise RuntimeError(
            f"{what} cannot be exported or traced (torch.export, torch.onnx.export, "
            "torch.jit.trace, make_fx, torch.func.linearize): "
            f"{HOST_READS}, which a traced graph would fix at the example's "
            f"count; {RUN_INSTEAD}, compiled with torch.compile where speed matters"
        )
    interpreter = torch._C._functorch.peek_interpreter_stack()
    name = interpreter and TRANSFORMS.get(interpreter.key().name)
    if name:
        raise RuntimeError(
            f"{what} cannot run under torch.func.{name}: its solver reads each sample's "
            "residual on the host to stop it, and its backward runs autograd itself; call it "
            "on the whole batch (each sample is solved on its own) and differentiate with "
            "loss.backward(), torch.autograd.grad or torch.autograd.functional.jacobian"
        )


def outside_compiled_graphs(what: str, compiles: str) -> Callable[[Callable], Callable]:
    """A decorator running `what` (solve, a layer's forward) outside any torch.compile graph
    that encloses it: one graph break, whose reason says why and what compiles it instead,
    rather than one at each of the solver's host reads. A strict torch.export, which traces
    with dynamo, stops at that break, so the reason also says what runs instead."""
    reason = (
        f"{what} runs outside the enclosing torch.compile graph: {HOST_READS}, a graph break "
        f"at every step; {compiles}. For the same reason {what} cannot be exported or traced "
        f"(torch.export, torch.jit.trace): {RUN_INSTEAD}"
    )

    def decorate(fn: Callable) -> Callable:
        # torch.compiler.disable imports dynamo, inductor and sympy at once, which a program
        # that never compiles need not pay for; torch._disable_dynamo imports them at its
        # first call, made only once dynamo is loaded (nothing compiles before), and the two
        # marks are the ones torch.compiler.disable sets for dynamo to break the graph at
        # the call under that reason.
        eager = torch._disable_dynamo(fn)

        @wraps(fn)
        def run(*args: object, **kwargs: object) -> object:
            return (eager if "torch._dynamo" in sys.modules else fn)(*args, **kwargs)

        run._torchdynamo_disable = True
        run._torchdynamo_disable_msg = reason
        return run

    return decorate


def contained(container: type, tensors: list[torch.Tensor]) -> Sequence[torch.Tensor]:
    """tensors in `container`, a list, tuple or named tuple type (a named tuple's by its _make)."""
    return getattr(container, "_make", container)(tensors)


IN_PLACE = (
    "f changed its input in place (z.relu_(), z += x, z.mul_(...)): the state it is given is "
    "the solver's own iterate, which every later step reads; compute a new tensor instead "
    "(z = z.relu(), z = z + x)"
)


def _version(z: torch.Tensor) -> int | None:
    """z's count of in-place changes; None where none is kept (an inference tensor) or read
    (a step traced by torch.compile)."""
    if torch.compiler.is_compiling() or z.is_inference():
        return None
    return z._version


def flat_function(f: Callable[[State], State], structure: Structure) -> Callable:
    """Wrap f: state -> state as a function on flat (B, N) matrices of z's dtype, calling f
    on the state in the dtype it was given in.

    Casting f's output back to the state's dtype keeps the solver in float32 when f runs
    under autocast (mixed precision) or in half precision. A ValueError for an f that changes
    the state it is given in place, the solver's iterate.
    """

    def f_flat(z: torch.Tensor) -> torch.Tensor:
        given = z if z.dtype == structure.dtype else z.to(structure.dtype)
        version = _version(given)
        out = f(given if structure.is_matrix else structure.unflatten(given))
        if _version(given) != version:
            raise ValueError(IN_PLACE)
        # A (B, N) state needs no views: f's output is checked by shape alone.
        if not (structure.is_matrix and isinstance(out, torch.Tensor) and out.shape == z.shape):
            out = structure.flatten(out)
        return out if out.dtype == z.dtype else out.to(z.dtype)

    return f_flat
