"""Native tree-scan kernels: just-in-time builds of ``kernels/`` and autograd wrappers around them.

The C++ (CPU) and CUDA extensions are compiled on first use with ``torch.utils.cpp_extension.load`` and
cached (``$TORCH_EXTENSIONS_DIR``, else ``~/.cache/grootl/kernels``); ``grootl build-kernels`` builds them
ahead of time. A build that fails warns once with the compiler's last lines and the pure-PyTorch path is
used instead; ``GROOTL_NATIVE=0`` turns the native kernels off.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import sys
import sysconfig
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from grootl.cli import help_text
from grootl.tree.graph import CHAIN, DISTANCES, Tree, heavy_last_preorder, scan_order, stack_bound, work_dtype
from grootl.tree.validation import check_scan_inputs, check_tree_inputs

KERNELS = Path(__file__).resolve().parents[1] / "kernels"
CPU_SOURCES = ("cpu.cpp",)
CUDA_SOURCES = ("cuda_bind.cpp", "cuda.cu")
_modules: dict[str, ModuleType | None] = {}
# glibc declares its vectorised exp (libmvec) only under __FAST_MATH__: defining it alone lets the compiler
# vectorise the scan's exp loops (~1.7x) without -ffast-math's reassociation, so float sums (and the tree
# build) keep their exact order.
_VECTOR_EXP = ["-D__FAST_MATH__"] if sys.platform.startswith("linux") else []
# The kernels use C++20 (std::atomic_ref): torch >= 2.13 builds extensions as C++20 anyway, older ones as C++17.
_CXX20 = ["/std:c++20"] if sys.platform == "win32" else ["-std=c++20"]


def enabled() -> bool:
    """False when ``GROOTL_NATIVE=0`` (or ``false``/``off``/``no``)."""
    return os.environ.get("GROOTL_NATIVE", "1").strip().lower() not in ("0", "false", "off", "no")


def cache_dir() -> Path:
    """Where builds are cached: per torch and Python version, under TORCH_EXTENSIONS_DIR or ~/.cache/grootl."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "grootl" / "kernels"
    tag = f"torch{torch.__version__.replace('+', '_')}-py{sys.version_info.major}{sys.version_info.minor}"
    return Path(root) / tag


def _cuda_include_paths() -> list[str]:
    """CUDA headers shipped in pip wheels (``nvidia/cu*/include``), which a cu13 torch build needs."""
    site = Path(sysconfig.get_paths()["purelib"]) / "nvidia"
    return [str(p) for p in sorted(site.glob("cu*/include")) if p.is_dir()]


def _extension_name(kind: str) -> str:
    """One name (and cache folder) per kind, kernel sources (headers included) and install (the sources' folder and
    the interpreter): a changed source gets a fresh build, and two installs never rebuild over each other (torch
    recompiles when a build's command, which holds their paths, changes)."""
    digest = hashlib.sha1(f"{KERNELS.resolve()}\0{sys.executable}\0".encode())
    for path in sorted(KERNELS.iterdir()):
        if path.suffix in (".h", ".cpp", ".cu"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return f"grootl_tree_{kind}_{digest.hexdigest()[:8]}"


def _cpp_extension() -> ModuleType:
    """``torch.utils.cpp_extension``, imported without its notice that a CUDA toolkit but no CUDA runtime
    was found: that is a CPU machine's normal state (a CUDA build then says what it lacks itself)."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    if not torch.cuda.is_available():
        log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


def _compile(kind: str, verbose: bool = False) -> ModuleType:
    """Build (or load from the cache) the ``cpu`` or ``cuda`` extension; raises on failure."""
    cpp_extension = _cpp_extension()
    name = _extension_name(kind)
    build = cache_dir() / name
    build.mkdir(parents=True, exist_ok=True)
    if kind == "cpu":
        return cpp_extension.load(
            name=name,
            sources=[str(KERNELS / s) for s in CPU_SOURCES],
            extra_cflags=["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", *_VECTOR_EXP, *_CXX20],
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(KERNELS)],
            build_directory=str(build),
            verbose=verbose,
        )
    archs = cuda_arch_list()
    if archs != os.environ.get("TORCH_CUDA_ARCH_LIST"):
        print(f"grootl: no GPU visible and TORCH_CUDA_ARCH_LIST unset: compiling the CUDA kernels for {archs} "
              "(set TORCH_CUDA_ARCH_LIST to choose)", file=sys.stderr, flush=True)
    with _environ(TORCH_CUDA_ARCH_LIST=archs):
        return cpp_extension.load(
            name=name,
            sources=[str(KERNELS / s) for s in CUDA_SOURCES],
            extra_cflags=["-O3", *_CXX20],
            # IEEE sqrt and division (nvcc's default) and unfused products in the build (grootl::mul): edge
            # weights round as on the CPU, so the device tree equals the CPU tree; the build's phases are
            # __host__ __device__ lambdas launched over the grid (--extended-lambda)
            extra_cuda_cflags=["-O3", "-lineinfo", "-std=c++20", "--extended-lambda"],
            extra_include_paths=[str(KERNELS), *_cuda_include_paths()],
            build_directory=str(build),
            with_cuda=True,
            verbose=verbose,
        )


# compute capabilities compiled for when no GPU is visible to ask (torch's own lookup then fails): Ampere and Ada
# (8.0 code runs on 8.x), Hopper, Blackwell, and PTX for newer GPUs
DEFAULT_CUDA_ARCHS = "8.0;9.0;10.0;12.0+PTX"


def cuda_arch_list() -> str | None:
    """$TORCH_CUDA_ARCH_LIST when set; None (torch asks the visible GPUs) when a GPU is visible; else the
    defaults."""
    given = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if given or torch.cuda.is_available():
        return given
    return DEFAULT_CUDA_ARCHS


@contextlib.contextmanager
def _environ(**values: str | None):
    """Set (or, for None, leave) environment variables for the block."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _is_built(kind: str) -> bool:
    build = cache_dir() / _extension_name(kind)
    return any(build.glob(f"{_extension_name(kind)}*.so")) or any(build.glob(f"{_extension_name(kind)}*.pyd"))


def _error_tail(err: BaseException, lines: int = 25) -> str:
    """The last lines of a build error (torch puts the compiler's output in the message)."""
    return "\n".join(str(err).strip().splitlines()[-lines:])


def load(kind: str) -> ModuleType | None:
    """The ``cpu`` or ``cuda`` extension, built on first call; None when disabled or the build failed
    (warned once, with the compiler's error)."""
    if not enabled():
        return None
    if kind not in _modules:
        if not _is_built(kind):
            print(f"grootl: compiling the native {kind} kernels once (about {'1-2' if kind == 'cpu' else '2-10'} "
                  f"minutes; cached in {cache_dir()})", file=sys.stderr, flush=True)
        try:
            _modules[kind] = _compile(kind)
        except Exception as err:  # noqa: BLE001 - any build failure means: fall back, say why
            _modules[kind] = None
            warnings.warn(
                f"grootl: could not build the native {kind} tree-scan kernels, using the PyTorch path "
                f"instead (set GROOTL_NATIVE=0 to skip the build). Compiler output:\n{_error_tail(err)}",
                RuntimeWarning,
                stacklevel=2,
            )
    return _modules[kind]


def _module_for(device: torch.device) -> ModuleType | None:
    if device.type == "cpu":
        return load("cpu")
    if device.type == "cuda":
        return load("cuda")
    return None


@torch.compiler.assume_constant_result  # decided once when tracing: no extension call in the graph
def available(device: torch.device | str = "cpu") -> bool:
    """Whether a native kernel serves tensors on ``device`` (builds it on first call)."""
    return _module_for(torch.device(device)) is not None


@torch.compiler.assume_constant_result
def serves_scan(device: torch.device | str, n_state: int) -> bool:
    """Whether a native scan kernel serves ``n_state`` (N) states on ``device`` (CUDA: N <= 128)."""
    ext = _module_for(torch.device(device))
    return ext is not None and n_state <= ext.max_state()


def _alloc(*shape: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every kernel output comes from here (the tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _scan_dtype(u: Tensor, B: Tensor, C: Tensor) -> torch.dtype:
    """The kernels' dtype for u (x), B and C: their shared one, else the accumulation dtype. delta (dt) and A are
    always passed in the accumulation dtype, so bf16 activations beside a float32 delta (the models' autocast
    case) reach the kernels without copies."""
    return u.dtype if B.dtype == C.dtype == u.dtype else work_dtype(u)


_HAS_CHILDREN, _LAST_CHILD = 1, 2  # a plan's flag bits (kHasChildren, kLastChild in kernels/tree_scan.h)


# The kernels as torch custom ops (``torch.ops.grootl.*``) with fake implementations, so torch.compile
# (fullgraph) and torch.export trace through them. Inputs come converted and contiguous; outputs are allocated
# here. Scratch is sized from L alone (a heavy-last order's stacks hold at most stack_bound(L) entries), so no
# op reads a plan back to the host.


def _kernel(device: torch.device) -> ModuleType:
    ext = _module_for(device)
    if ext is None:
        raise RuntimeError(f"no native tree kernel for {device} tensors (GROOTL_NATIVE=0 or build failed)")
    return ext


def _plan_shapes(ext: ModuleType, batch: int, length: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """flags (by preorder step), checkpoint offsets, stack sizes per row."""
    chunks = -(-length // ext.chunk_size())
    return [((batch, length), torch.uint8), ((batch, chunks + 1), torch.int32), ((batch, 3), torch.int32)]


def _bounds(ext: ModuleType, length: int) -> list[int]:
    """Largest forward stack, backward stack and checkpoint entries of any row of length L."""
    return [stack_bound(length), stack_bound(length), -(-length // ext.chunk_size()) * stack_bound(length)]


def _chunked(ext: ModuleType, span: int) -> bool:
    """Whether the sequence-parallel (chunked) scan kernels serve a tree whose edges join positions at most ``span``
    apart (the CUDA extension's, for span <= its max_span(): built trees with k <= 3, the chain); else the kernels
    that walk a row per channel serve it."""
    return hasattr(ext, "forward_chunked") and span <= ext.max_span()


def _build_shapes(ext: ModuleType, batch: int, length: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """A build's outputs: parent, order (the heavy-last preorder) and the tree's plan (flags, ckpt_offset, sizes)."""
    return [((batch, length), torch.long)] * 2 + _plan_shapes(ext, batch, length)


def _build_outputs(ext: ModuleType, batch: int, length: int, device: torch.device) -> list[Tensor]:
    return [_alloc(*shape, dtype=dt, device=device) for shape, dt in _build_shapes(ext, batch, length)]


def _fake_outputs(like: Tensor, batch: int, length: int) -> tuple[Tensor, ...]:
    return tuple(like.new_empty(shape, dtype=dt) for shape, dt in _build_shapes(_kernel(like.device), batch, length))


@torch.library.custom_op("grootl::build_tree", mutates_args=())
def _build_op(u: Tensor, delta: Tensor, B: Tensor, context_lens: Tensor, start: Tensor, k: int, distance: int
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """parent, order (the heavy-last preorder) and the tree's plan (flags, ckpt_offset, sizes)."""
    ext = _kernel(u.device)
    out = _build_outputs(ext, u.shape[0], u.shape[2], u.device)
    ext.build_tree(u, delta, B, context_lens, start, k, distance, *out)
    return tuple(out)


@_build_op.register_fake
def _(u, delta, B, context_lens, start, k, distance):
    return _fake_outputs(u, u.shape[0], u.shape[2])


@torch.library.custom_op("grootl::build_grouped_tree", mutates_args=())
def _build_grouped_op(a: Tensor, b: Tensor, context_lens: Tensor, start: Tensor, k: int, distance: int
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """As grootl::build_tree, from grouped features a (batch, G, C, L), b (batch, G, N, L)."""
    ext = _kernel(a.device)
    out = _build_outputs(ext, a.shape[0], a.shape[3], a.device)
    ext.build_grouped_tree(a, b, context_lens, start, k, distance, *out)
    return tuple(out)


@_build_grouped_op.register_fake
def _(a, b, context_lens, start, k, distance):
    return _fake_outputs(a, a.shape[0], a.shape[3])


@torch.library.custom_op("grootl::plan", mutates_args=())
def _plan_op(parent: Tensor, order: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The plan (flags, ckpt_offset, sizes) of a tree in this order; raises ValueError on a bad tree."""
    ext = _kernel(parent.device)
    plan = [_alloc(*shape, dtype=dt, device=parent.device) for shape, dt in _plan_shapes(ext, *parent.shape)]
    try:
        ext.plan(parent, order, *plan)
    except RuntimeError as err:
        raise ValueError(str(err).splitlines()[0]) from None
    return tuple(plan)


@_plan_op.register_fake
def _(parent, order):
    return tuple(parent.new_empty(shape, dtype=dt) for shape, dt in _plan_shapes(_kernel(parent.device), *parent.shape))


@torch.library.custom_op("grootl::tree_scan", mutates_args=())
def _scan_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, parent: Tensor, order: Tensor,
             flags: Tensor, ckpt_offset: Tensor, sizes: Tensor, span: int) -> tuple[Tensor, Tensor]:
    """y (batch, D, L) and the root's state (batch, D, N). B, C as (batch, L, N); A in the accumulation dtype;
    span: the longest edge of the tree (picks the kernel, see _chunked)."""
    ext = _kernel(u.device)
    (batch, dim, length), n = u.shape, A.shape[1]
    y = _alloc(batch, dim, length, dtype=u.dtype, device=u.device)
    root = _alloc(batch, dim, n, dtype=A.dtype, device=u.device)
    if _chunked(ext, span):
        ext.forward_chunked(u, delta, A, B, C, parent, order, y, root)
    else:
        ext.forward(u, delta, A, B, C, parent, order, flags, _bounds(ext, length)[0], y, root)
    return y, root


@_scan_op.register_fake
def _(u, delta, A, B, C, parent, order, flags, ckpt_offset, sizes, span):
    return torch.empty_like(u), A.new_empty(u.shape[0], u.shape[1], A.shape[1])


def _backward_outputs(ext: ModuleType, u: Tensor, A: Tensor) -> tuple[Tensor, ...]:
    """A scan backward's outputs: du; d_delta and dA per (row, channel) in the accumulation dtype; dB, dC as
    partial sums per channel group (batch, groups, L, N)."""
    (batch, dim, length), n, dev, acc = u.shape, A.shape[1], u.device, A.dtype
    groups = -(-dim // ext.channel_group(n))
    return (_alloc(batch, dim, length, dtype=u.dtype, device=dev), _alloc(batch, dim, length, dtype=acc, device=dev),
            _alloc(batch, dim, n, dtype=acc, device=dev),
            *(_alloc(batch, groups, length, n, dtype=acc, device=dev) for _ in range(2)))


def _backward_fakes(u: Tensor, A: Tensor) -> tuple[Tensor, ...]:
    """_backward_outputs' shapes and dtypes, for tracing."""
    (batch, dim, length), n = u.shape, A.shape[1]
    groups = -(-dim // _kernel(u.device).channel_group(n))
    parts = (A.new_empty(batch, groups, length, n) for _ in range(2))
    return torch.empty_like(u), A.new_empty(u.shape), A.new_empty(batch, dim, n), *parts


def _summed_grads(delta: Tensor, B: Tensor, C: Tensor, du, d_delta, dA, dB, dC) -> tuple[Tensor, ...]:
    """Gradients of (u, delta, A, B, C) from a scan backward's outputs: partial sums summed, input dtypes."""
    return du, d_delta.to(delta.dtype), dA.sum(0), dB.sum(1).to(B.dtype), dC.sum(1).to(C.dtype)


@torch.library.custom_op("grootl::tree_scan_backward", mutates_args=())
def _scan_backward_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, parent: Tensor, order: Tensor,
                      flags: Tensor, ckpt_offset: Tensor, sizes: Tensor, span: int, gy: Tensor, g_root: Tensor | None
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """du; d_delta and dA per (row, channel) in the accumulation dtype; dB, dC as partial sums per channel group."""
    ext = _kernel(u.device)
    grads = _backward_outputs(ext, u, A)
    if _chunked(ext, span):
        ext.backward_chunked(u, delta, A, B, C, parent, order, gy, g_root, *grads)
    else:
        ext.backward(u, delta, A, B, C, parent, order, flags, ckpt_offset, sizes, _bounds(ext, u.shape[2]), gy,
                     g_root, *grads)
    return grads


@_scan_backward_op.register_fake
def _(u, delta, A, B, C, parent, order, flags, ckpt_offset, sizes, span, gy, g_root):
    return _backward_fakes(u, A)


def _scan_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:-1])
    ctx.span = inputs[-1]


def _tree_scan_backward(backward_op, summed_grads):
    """The autograd backward of a tree-scan op from its backward op and the sum of that op's partials. The backward
    op has no derivative of its own: a second derivative raises instead of silently missing terms."""

    def backward(ctx, gy, g_root):
        u, delta, A, B, C, *plan = ctx.saved_tensors
        gy = torch.zeros_like(u) if gy is None else gy.to(u.dtype).contiguous()
        g_root = None if g_root is None else g_root.to(A.dtype).contiguous()
        grads = backward_op(u, delta, A, B, C, *plan, ctx.span, gy, g_root)
        return *summed_grads(delta, B, C, *grads), *([None] * 6)

    return backward


torch.library.register_autograd("grootl::tree_scan", _tree_scan_backward(torch.ops.grootl.tree_scan_backward,
                                                                         _summed_grads), setup_context=_scan_setup)


# The Mamba-2 layout: x (batch, L, H, P), dt (batch, L, H), A (H,) in the accumulation dtype, B, C (batch, L, G, N);
# one tree per row for all heads, the scalar decay exp(dt * A) formed once per (row, t, head).


@torch.library.custom_op("grootl::mamba2_tree_scan", mutates_args=())
def _mamba2_scan_op(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, parent: Tensor, order: Tensor,
                    flags: Tensor, ckpt_offset: Tensor, sizes: Tensor, span: int) -> tuple[Tensor, Tensor]:
    """y (batch, L, H, P) and the root's state (batch, H, P, N)."""
    ext = _kernel(x.device)
    batch, length, heads, head_dim = x.shape
    y = _alloc(batch, length, heads, head_dim, dtype=x.dtype, device=x.device)
    root = _alloc(batch, heads, head_dim, B.shape[3], dtype=A.dtype, device=x.device)
    if _chunked(ext, span):
        ext.mamba2_forward_chunked(x, dt, A, B, C, parent, order, y, root)
    else:
        ext.mamba2_forward(x, dt, A, B, C, parent, order, flags, _bounds(ext, length)[0], y, root)
    return y, root


@_mamba2_scan_op.register_fake
def _(x, dt, A, B, C, parent, order, flags, ckpt_offset, sizes, span):
    return torch.empty_like(x), A.new_empty(x.shape[0], x.shape[2], x.shape[3], B.shape[3])


def _mamba2_backward_shapes(ext: ModuleType, x: Tensor, B: Tensor) -> list[tuple[int, ...]]:
    """dx; d_dt (batch, parts, L, H) and dA (batch, parts, H) as partial sums; dB, dC (batch, G, parts, L, N): the
    extension says how many partials each needs (the CPU's sum d_dt and dA over a head's channels in place)."""
    batch, length, heads, head_dim = x.shape
    groups, n = B.shape[2], B.shape[3]
    bc_parts, dt_parts = ext.mamba2_parts(heads // groups, head_dim, n)
    return [tuple(x.shape), (batch, dt_parts, length, heads), (batch, dt_parts, heads),
            *[(batch, groups, bc_parts, length, n)] * 2]


@torch.library.custom_op("grootl::mamba2_tree_scan_backward", mutates_args=())
def _mamba2_scan_backward_op(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, parent: Tensor, order: Tensor,
                             flags: Tensor, ckpt_offset: Tensor, sizes: Tensor, span: int, gy: Tensor,
                             g_root: Tensor | None
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dx; d_dt, dA, dB, dC as partial sums in the accumulation dtype (see _mamba2_backward_shapes)."""
    ext = _kernel(x.device)
    shapes = _mamba2_backward_shapes(ext, x, B)
    grads = (_alloc(*shapes[0], dtype=x.dtype, device=x.device),
             *(_alloc(*shape, dtype=A.dtype, device=x.device) for shape in shapes[1:]))
    if _chunked(ext, span):
        ext.mamba2_backward_chunked(x, dt, A, B, C, parent, order, gy, g_root, *grads)
        return grads
    ext.mamba2_backward(x, dt, A, B, C, parent, order, flags, ckpt_offset, sizes, _bounds(ext, x.shape[1]), gy,
                        g_root, *grads)
    return grads


@_mamba2_scan_backward_op.register_fake
def _(x, dt, A, B, C, parent, order, flags, ckpt_offset, sizes, span, gy, g_root):
    parts = _mamba2_backward_shapes(_kernel(x.device), x, B)[1:]
    return torch.empty_like(x), *(A.new_empty(shape) for shape in parts)


def _mamba2_summed_grads(dt: Tensor, B: Tensor, C: Tensor, dx, d_dt, dA, dB, dC) -> tuple[Tensor, ...]:
    """Gradients of (x, dt, A, B, C) from the Mamba-2 backward's outputs: partial sums summed, input dtypes."""
    dB, dC = (part.sum(2).transpose(1, 2) for part in (dB, dC))  # (batch, G, L, N) -> B's layout
    return dx, d_dt.sum(1).to(dt.dtype), dA.sum((0, 1)), dB.to(B.dtype), dC.to(C.dtype)


torch.library.register_autograd(
    "grootl::mamba2_tree_scan",
    _tree_scan_backward(torch.ops.grootl.mamba2_tree_scan_backward, _mamba2_summed_grads), setup_context=_scan_setup)


@torch.library.custom_op("grootl::chain_tree_scan", mutates_args=())
def _chain_tree_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, parent: Tensor, order: Tensor,
                   modulation: float) -> tuple[Tensor, Tensor]:
    """y = chain + modulation * tree (batch, D, L) and the state h[L-1] + modulation * H[L-1] (batch, D, N)."""
    ext = _kernel(u.device)
    (batch, dim, length), n = u.shape, A.shape[1]
    y = _alloc(batch, dim, length, dtype=u.dtype, device=u.device)
    state = _alloc(batch, dim, n, dtype=A.dtype, device=u.device)
    ext.chain_tree_forward(u, delta, A, B, C, parent, order, modulation, y, state)
    return y, state


@_chain_tree_op.register_fake
def _(u, delta, A, B, C, parent, order, modulation):
    return torch.empty_like(u), A.new_empty(u.shape[0], u.shape[1], A.shape[1])


@torch.library.custom_op("grootl::chain_tree_scan_backward", mutates_args=())
def _chain_tree_backward_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, parent: Tensor, order: Tensor,
                            modulation: float, gy: Tensor, g_state: Tensor | None
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """As tree_scan_backward, for grootl::chain_tree_scan."""
    ext = _kernel(u.device)
    grads = _backward_outputs(ext, u, A)
    ext.chain_tree_backward(u, delta, A, B, C, parent, order, modulation, gy, g_state, *grads)
    return grads


@_chain_tree_backward_op.register_fake
def _(u, delta, A, B, C, parent, order, modulation, gy, g_state):
    return _backward_fakes(u, A)


def _chain_tree_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:7])
    ctx.modulation = inputs[7]


def _chain_tree_backward(ctx, gy, g_state):
    u, delta, A, B, C, parent, order = ctx.saved_tensors
    gy = torch.zeros_like(u) if gy is None else gy.to(u.dtype).contiguous()
    g_state = None if g_state is None else g_state.to(A.dtype).contiguous()
    grads = torch.ops.grootl.chain_tree_scan_backward(u, delta, A, B, C, parent, order, ctx.modulation, gy, g_state)
    return *_summed_grads(delta, B, C, *grads), None, None, None


torch.library.register_autograd("grootl::chain_tree_scan", _chain_tree_backward, setup_context=_chain_tree_setup)


class _Plan:
    """A tree's row plans for the scan kernels: its heavy-last order, flags by preorder step, checkpoint offsets
    and stack sizes per row."""

    def __init__(self, parent: Tensor, order: Tensor, flags: Tensor, ckpt_offset: Tensor, sizes: Tensor, span: int):
        self.parent, self.order, self.flags, self.ckpt_offset, self.sizes = parent, order, flags, ckpt_offset, sizes
        self.span = span  # longest edge |v - parent[v]| over the rows (an upper bound)

    def tensors(self) -> tuple[Tensor, ...]:
        return self.parent, self.order, self.flags, self.ckpt_offset, self.sizes

    @classmethod
    def checked(cls, parent: Tensor, order: Tensor) -> "_Plan":
        """The plan of a tree with this order; a tree that is not rooted at L-1 or whose order is no DFS
        preorder raises ValueError. Its span is read back (a second sync after the check's, once per tree: the tree
        remembers its plan), except while compiling: then the tree may have any span."""
        parent, order = parent.contiguous(), order.contiguous()
        plan = torch.ops.grootl.plan(parent, order)
        length = parent.shape[-1]
        if torch.compiler.is_compiling() or length < 2:
            return cls(parent, order, *plan, span=length)
        edges = (parent[:, :-1] - torch.arange(length - 1, device=parent.device)).abs()
        return cls(parent, order, *plan, span=int(edges.max()))

    @classmethod
    def chain(cls, ext: ModuleType, tree: Tree) -> "_Plan":
        """The plan of Tree.chain in closed form (no kernel): every node but the root has one child, so each
        stack holds one entry; each chunk but the last checkpoints one."""
        (batch, length), dev = tree.parent.shape, tree.parent.device
        chunks = -(-length // ext.chunk_size())
        step = torch.arange(length, device=dev)
        flags = (step < length - 1).to(torch.uint8) * _HAS_CHILDREN + (step > 0).to(torch.uint8) * _LAST_CHILD
        ckpt_offset = torch.arange(chunks + 1, device=dev).clamp(max=chunks - 1).to(torch.int32)
        sizes = torch.tensor([int(length > 1), int(length > 1), chunks - 1], dtype=torch.int32, device=dev)
        return cls(tree.parent.contiguous(), tree.order.contiguous(),
                   *(x.expand(batch, -1).contiguous() for x in (flags, ckpt_offset, sizes)), span=1)

    @classmethod
    def of(cls, ext: ModuleType, tree: Tree, device: torch.device) -> "_Plan":
        """The plan for scans on ``device``: the one the tree's build made, the chain's, or one of the heavy-last
        order derived from ``tree.parent`` (checked; remembered on the tree while it stays unedited). While
        compiling, always the derived one (no checks, no caching: nothing leaves the graph)."""
        if torch.compiler.is_compiling():
            return cls.checked(tree.parent, heavy_last_preorder(tree.parent))
        stamp = tree.plan()
        if stamp is not None and isinstance(stamp.payload, _Plan) and stamp.payload.parent.device == device:
            return stamp.payload
        if stamp is not None and stamp.payload is CHAIN and tree.parent.device == device:
            return cls.chain(ext, tree)
        order = scan_order(tree)
        plan = cls.checked(tree.parent, order)
        tree.remember(order, plan)
        return plan


def _states_last(x: Tensor, dt: torch.dtype) -> Tensor:
    """(batch, N, L) -> contiguous (batch, L, N): the kernels read a position's N states together."""
    return x.to(dt).transpose(1, 2).contiguous()


def tree_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, tree: Tree, return_root_state: bool = False,
              *, check_values: bool = True):
    """:func:`grootl.tree.tree_scan` on the native kernel of the tensors' device; same arguments and results.
    Raises RuntimeError when no kernel is available there (see :func:`available`)."""
    check_scan_inputs(u, delta, A, B, C, tree, check_values)
    return _tree_scan(u, delta, A, B, C, tree, return_root_state)


def _tree_scan(u, delta, A, B, C, tree: Tree, return_root_state: bool):
    """:func:`tree_scan` on checked inputs (the dispatch in grootl.tree.scan lands here)."""
    plan = _Plan.of(_kernel(u.device), tree, u.device)
    dt, acc = _scan_dtype(u, B, C), work_dtype(u)
    y, root = torch.ops.grootl.tree_scan(u.to(dt).contiguous(), delta.to(acc).contiguous(), A.to(acc).contiguous(),
                                         _states_last(B, dt), _states_last(C, dt), *plan.tensors(), plan.span)
    y = y.to(u.dtype)
    return (y, root) if return_root_state else y


def _mamba2_tree_scan(x, dt, A, B, C, tree: Tree, return_root_state: bool):
    """:func:`grootl.tree.mamba2.tree_scan` on checked inputs, on the native kernel of the tensors' device (its
    dispatch lands here)."""
    plan = _Plan.of(_kernel(x.device), tree, x.device)
    dtype, acc = _scan_dtype(x, B, C), work_dtype(x)
    y, root = torch.ops.grootl.mamba2_tree_scan(x.to(dtype).contiguous(), dt.to(acc).contiguous(),
                                                A.to(acc).contiguous(),
                                                *(t.to(dtype).contiguous() for t in (B, C)), *plan.tensors(), plan.span)
    y = y.to(x.dtype)
    return (y, root) if return_root_state else y


@torch.compiler.assume_constant_result
def serves_chain_tree(device: torch.device | str) -> bool:
    """Whether a native kernel runs the chain and the tree scan in one call on ``device`` (the CPU's does)."""
    ext = _module_for(torch.device(device))
    return ext is not None and hasattr(ext, "chain_tree_forward")


def _chain_tree_scan(u, delta, A, B, C, tree: Tree, modulation: float, return_last_state: bool):
    """:func:`grootl.tree.chain_tree_scan` on checked inputs (its dispatch lands here); with modulation 0 the
    kernel reads no tree (``chain_scan``)."""
    if modulation != 0:  # the plan checks the tree and gives a DFS preorder
        plan = _Plan.of(_kernel(u.device), tree, u.device)
        parent, order = plan.parent, plan.order
    else:  # unread by the kernel
        parent, order = tree.parent.contiguous(), tree.order.contiguous()
    dt, acc = _scan_dtype(u, B, C), work_dtype(u)
    y, state = torch.ops.grootl.chain_tree_scan(u.to(dt).contiguous(), delta.to(acc).contiguous(),
                                                A.to(acc).contiguous(), _states_last(B, dt), _states_last(C, dt),
                                                parent, order, float(modulation))
    y = y.to(u.dtype)
    return (y, state) if return_last_state else y


def build_tree(
    u: Tensor,
    delta: Tensor,
    B: Tensor,
    context_lens: Tensor,
    k: int = 3,
    distance: str = "cosine",
    start: Tensor | None = None,
    *,
    check_values: bool = True,
) -> Tree:
    """:func:`grootl.tree.build_tree` on the native kernel of the tensors' device (no host sync on CUDA
    with ``check_values=False``)."""
    context_lens, start = check_tree_inputs(u, delta, B, context_lens, k, distance, start, check_values)
    return _build_tree(u, delta, B, context_lens, k, distance, start)


def _build_tree(u, delta, B, context_lens: Tensor, k: int, distance: str, start: Tensor | None) -> Tree:
    """:func:`build_tree` on checked inputs (the dispatch in grootl.tree.graph lands here)."""
    dt, acc = _scan_dtype(u, B, B), work_dtype(u)
    return _built(torch.ops.grootl.build_tree(u.detach().to(dt).contiguous(), delta.detach().to(acc).contiguous(),
                                              B.detach().to(dt).contiguous(), *_prompt(context_lens, start), k,
                                              DISTANCES.index(distance)), k)


def _build_grouped_tree(a: Tensor, b: Tensor, context_lens: Tensor, k: int, distance: str, start: Tensor | None
                        ) -> Tree:
    """:func:`grootl.tree.graph.build_grouped_tree` on checked inputs, on the native kernel of the tensors' device."""
    dt = a.dtype if b.dtype == a.dtype else work_dtype(a)
    return _built(torch.ops.grootl.build_grouped_tree(*(x.detach().to(dt).contiguous() for x in (a, b)),
                                                      *_prompt(context_lens, start), k, DISTANCES.index(distance)), k)


def _prompt(context_lens: Tensor, start: Tensor | None) -> tuple[Tensor, Tensor]:
    """context_lens and start (zeros when None) as the build ops take them."""
    return context_lens.contiguous(), (torch.zeros_like(context_lens) if start is None else start).contiguous()


def _built(outputs: tuple[Tensor, ...], k: int) -> Tree:
    """The Tree of a build op's outputs, carrying their plan (its edges join positions at most k apart)."""
    plan = _Plan(*outputs, span=k)
    tree = Tree(plan.parent, plan.order)
    if not torch.compiler.is_compiling():
        tree.remember(plan.order, plan)
    return tree


def main(argv: list[str] | None = None) -> int:
    """``grootl build-kernels``: compile the native kernels now and report where they are cached."""
    parser = argparse.ArgumentParser(prog="grootl build-kernels", description=help_text(main.__doc__))
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--cpu-only", action="store_true", help="build only the C++ CPU kernels")
    which.add_argument("--cuda-only", action="store_true", help="build only the CUDA kernels (needs nvcc)")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = parser.parse_args(argv)
    CUDA_HOME = _cpp_extension().CUDA_HOME  # noqa: N806 - torch's name
    kinds = ["cpu"] if args.cpu_only else ["cuda"] if args.cuda_only else ["cpu"] + (["cuda"] if CUDA_HOME else [])
    if not args.cpu_only and not CUDA_HOME:
        print("no CUDA toolkit found (set CUDA_HOME): skipping the CUDA kernels", file=sys.stderr)
        if args.cuda_only:
            return 1
    failed = False
    for kind in kinds:
        print(f"building the {kind} kernels in {cache_dir() / _extension_name(kind)} ...", flush=True)
        try:
            _modules[kind] = _compile(kind, verbose=args.verbose)
            print(f"  ok: {_modules[kind].__file__}")
        except Exception as err:  # noqa: BLE001 - report any build failure and carry on
            failed = True
            print(f"  FAILED:\n{_error_tail(err, 60)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
