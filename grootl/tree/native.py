"""Native tree-scan kernels: just-in-time builds of ``kernels/`` and autograd wrappers around them.

The C++ (CPU) and CUDA extensions are compiled on first use with ``torch.utils.cpp_extension.load`` and
cached (``$TORCH_EXTENSIONS_DIR``, else ``~/.cache/grootl/kernels``); ``grootl build-kernels`` builds them
ahead of time. A build that fails warns once with the compiler's last lines and the pure-PyTorch path is
used instead; ``GROOTL_NATIVE=0`` turns the native kernels off.
"""

from __future__ import annotations

import argparse
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
from torch.autograd.function import once_differentiable

from grootl.tree.graph import CHAIN, DISTANCES, Tree, scan_order, stack_bound, work_dtype
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
    """One name (and cache folder) per kind and kernel sources (headers included): installs with the same sources
    share a build, and a changed source gets a fresh one."""
    digest = hashlib.sha1()
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
    return cpp_extension.load(
        name=name,
        sources=[str(KERNELS / s) for s in CUDA_SOURCES],
        extra_cflags=["-O3", *_CXX20],
        # IEEE sqrt and division (nvcc's default) and unfused products in the build (grootl::mul): edge
        # weights round as on the CPU, so the device tree equals the CPU tree
        extra_cuda_cflags=["-O3", "-lineinfo", "-std=c++20"],
        extra_include_paths=[str(KERNELS), *_cuda_include_paths()],
        build_directory=str(build),
        with_cuda=True,
        verbose=verbose,
    )


def _error_tail(err: BaseException, lines: int = 25) -> str:
    """The last lines of a build error (torch puts the compiler's output in the message)."""
    return "\n".join(str(err).strip().splitlines()[-lines:])


def load(kind: str) -> ModuleType | None:
    """The ``cpu`` or ``cuda`` extension, built on first call; None when disabled or the build failed
    (warned once, with the compiler's error)."""
    if not enabled():
        return None
    if kind not in _modules:
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


def available(device: torch.device | str = "cpu") -> bool:
    """Whether a native kernel serves tensors on ``device`` (builds it on first call)."""
    return _module_for(torch.device(device)) is not None


def serves_scan(device: torch.device | str, n_state: int) -> bool:
    """Whether a native scan kernel serves ``n_state`` (N) states on ``device`` (CUDA: N <= 128)."""
    ext = _module_for(torch.device(device))
    return ext is not None and n_state <= ext.max_state()


def _same_device(u: Tensor, **others: Tensor) -> None:
    for name, x in others.items():
        if x.device != u.device:
            raise ValueError(f"{name} is on {x.device} but u is on {u.device}; put all inputs on one device")


def _alloc(*shape: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every kernel output comes from here (the tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _scan_dtype(u: Tensor, delta: Tensor, B: Tensor, C: Tensor) -> torch.dtype:
    """One input dtype for the kernel: the shared one, else the accumulation dtype."""
    return u.dtype if delta.dtype == B.dtype == C.dtype == u.dtype else work_dtype(u)


_HAS_CHILDREN, _LAST_CHILD = 1, 2  # a plan's flag bits (kHasChildren, kLastChild in kernels/tree_scan.h)


class _Plan:
    """A tree's row plans for the scan kernels: its heavy-last order, flags by preorder step, checkpoint offsets
    and stack sizes per row. The scratch is sized from L alone (``bounds``), so no scan reads the plan back."""

    def __init__(self, parent: Tensor, order: Tensor, flags: Tensor, ckpt_offset: Tensor, sizes: Tensor):
        self.parent, self.order, self.flags, self.ckpt_offset, self.sizes = parent, order, flags, ckpt_offset, sizes

    @classmethod
    def empty(cls, ext: ModuleType, parent: Tensor, order: Tensor) -> "_Plan":
        batch, length = parent.shape
        dev = parent.device
        return cls(parent, order, _alloc(batch, length, dtype=torch.uint8, device=dev),
                   _alloc(batch, -(-length // ext.chunk_size()) + 1, dtype=torch.int32, device=dev),
                   _alloc(batch, 3, dtype=torch.int32, device=dev))

    @classmethod
    def checked(cls, ext: ModuleType, parent: Tensor, order: Tensor) -> "_Plan":
        """The plan of a tree with this order; a tree that is not rooted at L-1 or whose order is no DFS
        preorder raises."""
        plan = cls.empty(ext, parent.contiguous(), order.contiguous())
        try:
            ext.plan(plan.parent, plan.order, plan.flags, plan.ckpt_offset, plan.sizes)
        except RuntimeError as err:
            raise ValueError(str(err).splitlines()[0]) from None
        return plan

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
                   *(x.expand(batch, -1).contiguous() for x in (flags, ckpt_offset, sizes)))

    @classmethod
    def of(cls, ext: ModuleType, tree: Tree, device: torch.device) -> "_Plan":
        """The plan for scans on ``device``: the one the tree's build made, the chain's, or one of the heavy-last
        order derived from ``tree.parent`` (checked; remembered on the tree while it stays unedited)."""
        stamp = tree.plan()
        if stamp is not None and isinstance(stamp.payload, _Plan) and stamp.payload.parent.device == device:
            return stamp.payload
        if stamp is not None and stamp.payload is CHAIN and tree.parent.device == device:
            return cls.chain(ext, tree)
        order = scan_order(tree)
        plan = cls.checked(ext, tree.parent, order)
        tree.remember(order, plan)
        return plan

    def bounds(self, chunk: int) -> list[int]:
        """Largest forward stack, backward stack and checkpoint entries any row can need: a heavy-last order's
        stacks hold at most stack_bound(L) entries."""
        length = self.parent.shape[1]
        return [stack_bound(length), stack_bound(length), -(-length // chunk) * stack_bound(length)]


def _states_last(x: Tensor, dt: torch.dtype) -> Tensor:
    """(batch, N, L) -> contiguous (batch, L, N): the kernels read a position's N states together."""
    return x.to(dt).transpose(1, 2).contiguous()


class _NativeTreeScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, ext, plan: _Plan, want_root: bool):
        dt, acc = _scan_dtype(u, delta, B, C), work_dtype(u)
        u_, delta_ = (x.to(dt).contiguous() for x in (u, delta))
        B_, C_ = _states_last(B, dt), _states_last(C, dt)
        Af = A.to(acc).contiguous()
        batch, dim, length = u.shape
        y = _alloc(batch, dim, length, dtype=dt, device=u.device)
        root = _alloc(batch, dim, A.shape[1], dtype=acc, device=u.device) if want_root else None
        ext.forward(u_, delta_, Af, B_, C_, plan.parent, plan.order, plan.flags, plan.bounds(ext.chunk_size())[0], y,
                    root)
        ctx.save_for_backward(u_, delta_, B_, C_, Af)
        ctx.ext, ctx.plan = ext, plan
        ctx.dtypes = (u.dtype, delta.dtype, A.dtype, B.dtype, C.dtype)
        return y.to(u.dtype), root

    @staticmethod
    @once_differentiable  # a second derivative raises instead of silently missing terms
    def backward(ctx, gy, g_root):
        u, delta, B, C, Af = ctx.saved_tensors
        ext, plan = ctx.ext, ctx.plan
        batch, dim, length = u.shape
        n, dev, acc = B.shape[2], u.device, Af.dtype
        groups = -(-dim // ext.channel_group(n))
        gy = torch.zeros_like(u) if gy is None else gy.to(u.dtype).contiguous()
        g_root = None if g_root is None else g_root.to(acc).contiguous()
        du = _alloc(batch, dim, length, dtype=u.dtype, device=dev)
        d_delta = _alloc(batch, dim, length, dtype=acc, device=dev)
        dA = _alloc(batch, dim, n, dtype=acc, device=dev)
        dB = _alloc(batch, groups, length, n, dtype=acc, device=dev)
        dC = _alloc(batch, groups, length, n, dtype=acc, device=dev)
        ext.backward(u, delta, Af, B, C, plan.parent, plan.order, plan.flags, plan.ckpt_offset, plan.sizes,
                     plan.bounds(ext.chunk_size()), gy, g_root, du, d_delta, dA, dB, dC)
        t_u, t_delta, t_A, t_B, t_C = ctx.dtypes
        dB, dC = (x.sum(1).transpose(1, 2) for x in (dB, dC))
        return du.to(t_u), d_delta.to(t_delta), dA.sum(0).to(t_A), dB.to(t_B), dC.to(t_C), None, None, None


def tree_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, tree: Tree, return_root_state: bool = False,
              *, check_values: bool = True):
    """:func:`grootl.tree.tree_scan` on the native kernel of the tensors' device; same arguments and results.
    Raises RuntimeError when no kernel is available there (see :func:`available`)."""
    check_scan_inputs(u, delta, A, B, C, tree, check_values)
    return _tree_scan(u, delta, A, B, C, tree, return_root_state)


@torch.compiler.disable  # an opaque extension call: one clean graph break under torch.compile
def _tree_scan(u, delta, A, B, C, tree: Tree, return_root_state: bool):
    """:func:`tree_scan` on checked inputs (the dispatch in grootl.tree.scan lands here)."""
    ext = _module_for(u.device)
    if ext is None:
        raise RuntimeError(f"no native tree-scan kernel for {u.device} tensors (GROOTL_NATIVE=0 or build failed)")
    _same_device(u, delta=delta, A=A, B=B, C=C, **{"tree.parent": tree.parent, "tree.order": tree.order})
    y, root = _NativeTreeScan.apply(u, delta, A, B, C, ext, _Plan.of(ext, tree, u.device), return_root_state)
    return (y, root) if return_root_state else y


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


@torch.compiler.disable
def _build_tree(u, delta, B, context_lens: Tensor, k: int, distance: str, start: Tensor | None) -> Tree:
    """:func:`build_tree` on checked inputs (the dispatch in grootl.tree.graph lands here)."""
    ext = _module_for(u.device)
    if ext is None:
        raise RuntimeError(f"no native tree-build kernel for {u.device} tensors (GROOTL_NATIVE=0 or build failed)")
    _same_device(u, delta=delta, B=B)
    dt = _scan_dtype(u, delta, B, B)
    batch, _, length = u.shape
    plan = _Plan.empty(ext, *(_alloc(batch, length, dtype=torch.long, device=u.device) for _ in range(2)))
    start = torch.zeros_like(context_lens) if start is None else start
    with torch.no_grad():
        ext.build_tree(*(x.detach().to(dt).contiguous() for x in (u, delta, B)), context_lens.contiguous(),
                       start.contiguous(), k, DISTANCES.index(distance), plan.parent, plan.order, plan.flags,
                       plan.ckpt_offset, plan.sizes)
    tree = Tree(plan.parent, plan.order)
    tree.remember(plan.order, plan)
    return tree


def main(argv: list[str] | None = None) -> int:
    """``grootl build-kernels``: compile the native kernels now and report where they are cached."""
    parser = argparse.ArgumentParser(prog="grootl build-kernels", description=main.__doc__)
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
