"""A compiled CPU kernel for the fused E-step (``estep_cpu.cc``), called through XLA's FFI.

XLA's CPU backend does not fuse the elementwise column products of the design into the reduction
against the responsibilities, so the XLA formulation of the E-step writes and re-reads a
(P (P + 1) / 2, rows) temporary. ``estep_cpu.cc`` accumulates every product in cache instead
(measured in ``benchmarks/em_iteration.py``). It is built on first use with the system's C++
compiler, against the FFI headers that jaxlib ships, into a per-user cache; when no compiler is
found or the build fails, a warning says so once and the XLA formulation is used (same results).

Environment:
  CONCEPTSHIFT_CPU_KERNEL: "0" turns the kernel off (the XLA formulation everywhere).
  CONCEPTSHIFT_CACHE: the cache folder (default ``$XDG_CACHE_HOME/conceptshift`` or
    ``~/.cache/conceptshift``).
  CXX: the compiler (default: c++, g++ or clang++, the first found).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = Path(__file__).with_name("estep_cpu.cc")
TARGETS = {np.dtype(np.float32): "conceptshift_estep_f32", np.dtype(np.float64): "conceptshift_estep_f64"}
SYMBOLS = {"conceptshift_estep_f32": "ConceptshiftEstepF32", "conceptshift_estep_f64": "ConceptshiftEstepF64"}
FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno"]

_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool, "error": str, "path": Path
_enabled_override: list[bool] = []


class KernelBuildError(RuntimeError):
    """The CPU kernel could not be compiled or loaded."""


def _compiler() -> str | None:
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx)
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _cache_dir() -> Path:
    root = os.environ.get("CONCEPTSHIFT_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "conceptshift"


def _cpu_signature() -> str:
    """What -march=native depends on: a library built on one CPU is not loaded on another."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
        model = next((ln for ln in text.splitlines() if ln.startswith("model name")), "")
        return flags + model
    except OSError:
        return platform.processor()


def library_path(cxx: str) -> Path:
    """The cached library for this source, compiler, jaxlib, flags and CPU."""
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        "\n".join([SOURCE.read_text(), version, jax.__version__, " ".join(FLAGS), platform.machine(),
                   _cpu_signature()]).encode()
    ).hexdigest()[:16]
    return _cache_dir() / "kernels" / f"estep_cpu-{key}.so"


def build(force: bool = False) -> Path:
    """Compiles ``estep_cpu.cc`` into the cache (if absent, or ``force``) and returns its path.
    Concurrent builds (pytest workers) each write a private file and rename it into place."""
    cxx = _compiler()
    if cxx is None:
        raise KernelBuildError("no C++ compiler found (set CXX, or install g++ or clang++)")
    out = library_path(cxx)
    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise KernelBuildError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    os.replace(tmp, out)
    return out


def _load() -> bool:
    with _lock:
        if "ok" in _state:
            return bool(_state["ok"])
        try:
            path = build()
            lib = ctypes.cdll.LoadLibrary(str(path))
            for target, symbol in SYMBOLS.items():
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                            platform="cpu")
            _state.update(ok=True, path=path, lib=lib)
        except (KernelBuildError, OSError, AttributeError) as err:
            _state.update(ok=False, error=str(err))
            warnings.warn(f"conceptshift: the compiled CPU E-step is unavailable, using the XLA "
                          f"formulation instead ({str(err).splitlines()[0]})", stacklevel=3)
        return bool(_state["ok"])


def enabled() -> bool:
    """Whether fits trace the compiled kernel for their CPU lowering (read at trace time)."""
    if _enabled_override:
        want = _enabled_override[-1]
    else:
        flag = os.environ.get("CONCEPTSHIFT_CPU_KERNEL", "1").strip().lower()
        want = flag not in ("0", "false", "no", "off")
    return want and _load()


@contextlib.contextmanager
def use_cpu_kernel(on: bool, clear_caches: bool = True):
    """Within the block, fits trace the compiled CPU kernel (``True``) or the XLA formulation
    (``False``). Compiled functions are traced once per shape, so JAX's caches are cleared on entry
    and exit (for comparisons in tests and benchmarks); ``clear_caches=False`` when the caller
    traces afresh anyway (``jax.make_jaxpr``, a new ``jax.jit`` wrapper)."""
    _enabled_override.append(bool(on))
    if clear_caches:
        jax.clear_caches()
    try:
        yield
    finally:
        _enabled_override.pop()
        if clear_caches:
            jax.clear_caches()


def estep(A, Y, W, Z, B, C, S, X0=None):
    """The fused E-step on the CPU (see ``estep_cpu.cc`` for the arguments; ``X0`` (D,): A is x
    (D, N) and the design is [1, x - X0]). Returns (ll (), nk (K,), s_q (P (P + 1) / 2, K),
    s_pe (P, K, H), s_ee (K, H))."""
    if not _load():
        raise KernelBuildError(f"the compiled CPU E-step is unavailable ({_state.get('error')})")
    dtype = np.dtype(A.dtype)
    P = A.shape[0] + (0 if X0 is None else 1)
    K, H = C.shape[0], C.shape[1]
    if X0 is None:
        X0 = jnp.zeros((0,), dtype)
    out = (
        jax.ShapeDtypeStruct((), dtype),
        jax.ShapeDtypeStruct((K,), dtype),
        jax.ShapeDtypeStruct((P * (P + 1) // 2, K), dtype),
        jax.ShapeDtypeStruct((P, K, H), dtype),
        jax.ShapeDtypeStruct((K, H), dtype),
    )
    call = jax.ffi.ffi_call(TARGETS[dtype], out, vmap_method="sequential")
    return _no_derivative(call, *(jnp.asarray(a, dtype) for a in (A, Y, W, Z, B, C, S, X0)))


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _no_derivative(call, *args):
    """``call(*args)`` with a derivative rule that says, by name, that there is none (instead of
    JAX's missing-rule error from inside the FFI call)."""
    return call(*args)


def _no_derivative_fwd(call, *args):
    return call(*args), None


def _no_derivative_bwd(call, res, g):
    raise TypeError("the compiled CPU E-step (conceptshift._kernels) has no derivative: "
                    "differentiate through a fit with estep='xla' (fit_em) or "
                    "CONCEPTSHIFT_CPU_KERNEL=0")


_no_derivative.defvjp(_no_derivative_fwd, _no_derivative_bwd)


def supports(dtype) -> bool:
    return np.dtype(dtype) in TARGETS
