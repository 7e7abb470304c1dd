"""Argument checks for the tree API: a bad call raises ``ValueError`` naming the argument and shapes."""

from __future__ import annotations

import torch
from torch import Tensor


def _shape(x) -> str:
    return "x".join(map(str, x.shape)) if isinstance(x, Tensor) else type(x).__name__


def _require(ok: bool, message) -> None:
    """Raise ValueError(message) unless ok; message may be a callable, so that it is formed only when needed
    (cheap, and traceable by torch.compile)."""
    if not ok:
        raise ValueError(message() if callable(message) else message)


class NonFiniteInputError(ValueError):
    """An input of the tree API holds NaN or inf (in training: the activations diverged)."""


def _check_finite(**tensors: Tensor) -> None:
    finite = [torch.isfinite(x).all() for x in tensors.values()]
    if bool(torch.stack(finite).all()):  # one host sync for all of them
        return
    name, x = next((name, x) for (name, x), ok in zip(tensors.items(), finite) if not ok)
    raise NonFiniteInputError(f"{name} contains NaN or inf (shape {_shape(x)})")


def _check_floating(name: str, x) -> None:
    _require(isinstance(x, Tensor), lambda: f"{name} must be a tensor, got {type(x).__name__}")
    _require(x.is_floating_point(), lambda: f"{name} must be a floating tensor, got {x.dtype}")


def _check_device(name: str, x: Tensor, u: Tensor, u_name: str = "u") -> None:
    _require(x.device == u.device,
             lambda: f"{name} is on {x.device} but {u_name} is on {u.device}; put all inputs on one device")


def check_tensors(dims: int, ref_name: str, **tensors) -> None:
    """Each of ``tensors`` a floating ``dims``-D tensor on the device of the one named ``ref_name``."""
    ref = tensors[ref_name]
    for name, x in tensors.items():
        _require(isinstance(x, Tensor) and x.dim() == dims, lambda: f"{name} must be a {dims}-D tensor, got shape {_shape(x)}")
        _check_floating(name, x)
        _check_device(name, x, ref, ref_name)


def check_features(u: Tensor, delta: Tensor, B: Tensor) -> tuple[int, int, int, int]:
    """u, delta (batch, D, L) and B (batch, N, L), floating, on one device; returns (batch, D, N, L)."""
    check_tensors(3, "u", u=u, delta=delta, B=B)
    _require(u.shape == delta.shape,
             lambda: f"u and delta must have the same shape (batch, D, L); got u {_shape(u)}, delta {_shape(delta)}")
    batch, d, length = u.shape
    _require(
        B.shape[0] == batch and B.shape[2] == length,
        lambda: f"B must be (batch, N, L) = ({batch}, N, {length}) to match u {_shape(u)}; got {_shape(B)}",
    )
    _require(length >= 1, lambda: f"sequences must have at least one position; got u {_shape(u)}")
    return batch, d, B.shape[1], length


def check_grouped_features(a: Tensor, b: Tensor) -> tuple[int, int, int, int]:
    """a (batch, G, C, L) and b (batch, G, N, L), floating, on one device; returns (batch, G, N, L)."""
    check_tensors(4, "a", a=a, b=b)
    batch, groups, _, length = a.shape
    _require(b.shape[:2] == (batch, groups) and b.shape[3] == length,
             lambda: f"b must be (batch, G, N, L) = ({batch}, {groups}, N, {length}) to match a {_shape(a)}; "
                     f"got {_shape(b)}")
    _require(length >= 1 and groups >= 1, lambda: f"a must have at least one group and one position; got {_shape(a)}")
    return batch, groups, b.shape[2], length


def _check_lengths(name: str, x, batch: int, length: int, device, check_range: bool) -> Tensor:
    if not isinstance(x, Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"{name} must be a (batch,) tensor of ints; got {x!r}") from err
    _require(
        x.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8),
        lambda: f"{name} must hold integers; got dtype {x.dtype}",
    )
    _require(x.shape == (batch,), lambda: f"{name} must have shape ({batch},) (one per row); got {_shape(x)}")
    x = x.to(device=device, dtype=torch.long)
    if batch and check_range:
        lo, hi = int(x.min()), int(x.max())
        _require(lo >= 0 and hi <= length, lambda: f"{name} must lie in [0, L={length}]; got values from {lo} to {hi}")
    return x


def check_tree_inputs(
    u, delta, B, context_lens, k, distance, start, check_values: bool = True
) -> tuple[Tensor, Tensor | None]:
    """:func:`grootl.tree.build_tree`'s arguments. Shapes, types and settings always; with ``check_values`` also
    what needs the values (finite inputs, lengths in [0, L], start <= context_lens): a pass over the inputs and, on
    CUDA, a host sync (skipped while torch.compile traces: a graph holds no host syncs). Returns context_lens and
    start as (batch,) long tensors."""
    batch, _, _, length = check_features(u, delta, B)
    return _check_build(k, distance, context_lens, start, batch, length, check_values, u=u, delta=delta, B=B)


def check_grouped_tree_inputs(
    a, b, context_lens, k, distance, start, check_values: bool = True
) -> tuple[Tensor, Tensor | None]:
    """:func:`grootl.tree.graph.build_grouped_tree`'s arguments, checked as :func:`check_tree_inputs` checks
    build_tree's."""
    batch, _, _, length = check_grouped_features(a, b)
    return _check_build(k, distance, context_lens, start, batch, length, check_values, a=a, b=b)


def _check_build(k, distance, context_lens, start, batch: int, length: int, check_values: bool,
                 **features: Tensor) -> tuple[Tensor, Tensor | None]:
    """What every tree build checks beyond its features' shapes: settings, finite features, the prompt."""
    check_values = check_values and not torch.compiler.is_compiling()
    check_tree_settings(k, distance)
    if check_values:
        _check_finite(**features)
    device = next(iter(features.values())).device
    return check_prompt(context_lens, start, batch, length, device, check_values)


def check_tree_settings(k, distance) -> None:
    """The build's settings: k neighbours and the distance."""
    from grootl.tree.graph import DISTANCES

    _require(isinstance(k, int) and k >= 1, lambda: f"k must be a positive int; got {k!r}")
    _require(distance in DISTANCES, lambda: f"distance must be one of {DISTANCES}; got {distance!r}")


def check_prompt(context_lens, start, batch: int, length: int, device, check_values: bool) -> tuple[Tensor, Tensor | None]:
    """context_lens and the optional start as (batch,) long tensors on ``device``; with ``check_values`` also in
    [0, L] and start <= context_lens (a host sync on CUDA)."""
    context_lens = _check_lengths("context_lens", context_lens, batch, length, device, check_values)
    if start is not None:
        start = _check_lengths("start", start, batch, length, device, check_values)
        if batch and check_values:
            bad = (start > context_lens) & (context_lens > 0)
            if bool(bad.any()):
                b = int(bad.nonzero()[0, 0])
                raise ValueError(f"start must not exceed context_lens (the prompt ends after the left padding); "
                                 f"row {b} has start {int(start[b])} > context_lens {int(context_lens[b])}")
    return context_lens, start


def check_scan_inputs(u, delta, A, B, C, tree, check_values: bool = True) -> None:
    """Shapes and types always; with ``check_values`` also finite inputs (a pass over them, a host sync on CUDA;
    skipped while torch.compile traces)."""
    check_values = check_values and not torch.compiler.is_compiling()
    batch, d, n, length = check_features(u, delta, B)
    _require(isinstance(A, Tensor) and A.shape == (d, n), lambda: f"A must be (D, N) = ({d}, {n}); got {_shape(A)}")
    _require(isinstance(C, Tensor) and C.shape == B.shape, lambda: f"C must have B's shape {_shape(B)}; got {_shape(C)}")
    for name, x in (("A", A), ("C", C)):
        _check_floating(name, x)
        _check_device(name, x, u)
    check_tree_shape(tree, batch, length, u)
    if check_values:
        _check_finite(u=u, delta=delta, A=A, B=B, C=C)


def check_tree_shape(tree, batch: int, length: int, u: Tensor, u_name: str = "u") -> None:
    """A Tree for (batch, L) with int64 parent and order on u's device."""
    from grootl.tree.graph import Tree

    _require(isinstance(tree, Tree), lambda: f"tree must be a grootl.tree.Tree; got {type(tree).__name__}")
    _require(
        tree.parent.shape == (batch, length) and tree.order.shape == (batch, length),
        lambda: f"tree must be for (batch, L) = ({batch}, {length}); got parent {_shape(tree.parent)}, order {_shape(tree.order)}",
    )
    for name, x in (("tree.parent", tree.parent), ("tree.order", tree.order)):
        _require(x.dtype == torch.int64, lambda: f"{name} must hold int64; got {x.dtype}")
        _check_device(name, x, u, u_name)
