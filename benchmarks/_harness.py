"""What every benchmark script shares: timing of compiled functions, the machine's roofline, the
machine description, and writing results.

Timing: compile and run are measured apart (``lower().compile()``, then a warm-up call, then
``repeats`` timed calls each ending in ``block_until_ready``); the median and spread are reported.
Roofline: the read bandwidth (a reduction over a 256 MiB array) and the GEMM throughput (2048^3
float32 products) are measured in the same run, through JAX, so that a kernel's time can be
reported as a multiple of max(bytes / bandwidth, flops / peak).
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from conceptshift.files import write_json_atomic

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("jax", "jaxlib", "numpy", "numpyro", "optax", "scikit-learn", "hmmlearn"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    dev = jax.devices()[0]
    return {
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": getattr(dev, "device_kind", str(dev)),
        "x64": bool(jax.config.jax_enable_x64),
        "versions": versions,
    }


def summary(times: list[float], per: float = 1.0) -> dict:
    t = [v / per for v in times]
    q = np.percentile(t, [25, 75])
    return {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t),
            "iqr_s": float(q[1] - q[0]), "repeats": len(t)}


def time_jitted(fn, args: tuple, repeats: int, per: float = 1.0, check=None) -> dict:
    """Compile ``jax.jit(fn)`` for ``args``, warm up once, then time ``repeats`` calls.
    Times are divided by ``per`` (e.g. the number of EM iterations inside one call); ``check`` is
    called with the warm-up call's output (e.g. to confirm that ``per`` iterations ran)."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    out = jax.block_until_ready(compiled(*args))
    if check is not None:
        check(out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return {"compile_s": compile_s, **summary(times, per)}


def time_marginal(make_fn, args: tuple, short: int, long: int, repeats: int, check=None) -> dict:
    """The cost of one more iteration of an iterative program: ``make_fn(k)`` runs k iterations.
    Both programs are compiled, warmed up (``check(k, output)`` is called on the warm-up outputs)
    and timed in alternation; each pair gives (t_long - t_short) / (long - short), so work done
    once per call (data layout, the final E-step) cancels. ``setup_s`` is the rest of a call:
    t_short less ``short`` iterations."""
    fns = {}
    compile_s = 0.0
    for k in (short, long):
        t0 = time.perf_counter()
        fns[k] = jax.jit(make_fn(k)).lower(*args).compile()
        compile_s += time.perf_counter() - t0
        out = jax.block_until_ready(fns[k](*args))
        if check is not None:
            check(k, out)
    per, setup = [], []
    for _ in range(repeats):
        t = {}
        for k in (short, long):
            t0 = time.perf_counter()
            jax.block_until_ready(fns[k](*args))
            t[k] = time.perf_counter() - t0
        per.append((t[long] - t[short]) / (long - short))
        setup.append(t[short] - short * per[-1])
    return {"compile_s": compile_s, **summary(per), "setup_s": statistics.median(setup),
            "method": f"marginal: (fit of {long} iterations - fit of {short}) / {long - short}"}


def time_python(fn, repeats: int, per: float = 1.0, warmup: bool = True) -> dict:
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return summary(times, per)


def roofline(quick: bool = False, big: bool = False) -> dict:
    """Read bandwidth (bytes/s) and GEMM throughput (flop/s) of the default device, through JAX.
    ``big`` (accelerators): a 1 GiB array and 8192^3 products, so that launch latency is negligible.
    Products run at ``Precision.HIGHEST``, the precision the package's kernels ask for (on a GPU
    the default would be TF32)."""
    n = (1 << 22) if quick else (1 << 28) if big else (1 << 26)  # float32 elements
    a = jnp.ones((n,), jnp.float32)
    bw = time_jitted(lambda v: jnp.sum(v), (a,), 3 if quick else 10)
    del a
    m = 256 if quick else 8192 if big else 2048
    b = jnp.ones((m, m), jnp.float32)
    mm = time_jitted(lambda u, v: jnp.matmul(u, v, precision=jax.lax.Precision.HIGHEST), (b, b),
                     3 if quick else 10)
    return {
        "read_bandwidth_Bps": 4 * n / bw["min_s"],
        "gemm_flops": 2 * m**3 / mm["min_s"],
        "bandwidth_array_bytes": 4 * n,
        "gemm_size": m,
        "method": "best of repeats: jnp.sum over a float32 array; float32 square matmul at "
                  "Precision.HIGHEST",
    }


def roofline_multiple(seconds: float, flops: float, nbytes: float, roof: dict) -> dict:
    bound = max(nbytes / roof["read_bandwidth_Bps"], flops / roof["gemm_flops"])
    return {"flops": flops, "bytes": nbytes, "roofline_s": bound, "x_roofline": seconds / bound,
            "bound": "memory" if nbytes / roof["read_bandwidth_Bps"] >= flops / roof["gemm_flops"]
            else "compute"}


def write(name: str, result: dict, out: Path | None) -> Path:
    out = Path(out) if out is not None else RESULTS / f"{name}.json"
    write_json_atomic(out, result)
    print(f"written: {out}")
    return out
