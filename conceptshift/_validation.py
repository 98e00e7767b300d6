"""Input checks at the public boundary: clear errors before anything is traced or compiled."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

MAX_INT = 2**31 - 1  # counts and sizes given by users fit int32
MAX_SEED = 2**32 - 1  # JAX keeps 32 bits of a seed without x64: larger seeds would collide


class UnrepresentableFitError(ValueError):
    """A fit whose parameters overflow the working precision on the data's own scale. ``problem``
    is what happened, without the advice (callers such as the CLI give their own)."""

    def __init__(self, problem: str, advice: str):
        super().__init__(f"{problem}; {advice}")
        self.problem = problem


class DiscreteResponseWarning(UserWarning):
    """A family with Gaussian responses given responses that look discrete (0/1 labels, a few
    classes or counts): its density is not a probability of those values."""


class PrecisionWarning(UserWarning):
    """Fitted parameters that keep only part of their precision on the data's own scale;
    ``problem`` as in :class:`UnrepresentableFitError`."""

    def __init__(self, problem: str, advice: str):
        super().__init__(f"{problem}. {advice}")
        self.problem = problem


class OptimumWarning(UserWarning):
    """Only one of several EM restarts reached the best log-likelihood found: a higher optimum
    may exist that no restart reached (run more restarts)."""


def is_traced(value) -> bool:
    return isinstance(value, jax.core.Tracer)


def float_dtype():
    """The default floating dtype: float64 under ``JAX_ENABLE_X64``, else float32."""
    return jnp.zeros((), dtype=float).dtype


@jax.jit
def _count_non_finite(a):
    return jnp.sum(~jnp.isfinite(a))


def _range_error(name: str, big: float, dtype) -> ValueError:
    return ValueError(
        f"{name} has values up to {big:.3g} in magnitude, beyond the range of {np.dtype(dtype).name} "
        f"(max {float(np.finfo(dtype).max):.3g}); rescale {name}"
        + (" or enable float64 (JAX_ENABLE_X64=1)" if np.dtype(dtype) != np.float64 else "")
    )


def as_float_array(name: str, value, *, ndim: int | tuple[int, ...], allow_nan: bool = False,
                   host: bool = False):
    """Converts ``value`` to a floating JAX array of the default dtype, checking rank and finiteness
    in that dtype (a float64 value beyond float32's range is refused, not turned into inf).

    Under tracing (jit/vmap) only the static facts (rank, dtype kind) are checked. ``host=True``:
    array-likes that are not JAX arrays come back as float64 numpy arrays (still checked against
    the working precision's range), so that the caller can standardise them before rounding.
    """
    ndims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if value is None:
        raise TypeError(f"{name} must be an array, got None")
    if isinstance(value, jax.Array) and not is_traced(value):
        # device arrays (possibly sharded over several devices or hosts) are checked where they live
        if not (jnp.issubdtype(value.dtype, jnp.number) or jnp.issubdtype(value.dtype, jnp.bool_)):
            raise TypeError(f"{name} must hold numbers, got dtype {value.dtype}")
        if jnp.issubdtype(value.dtype, jnp.complexfloating):
            raise TypeError(f"{name} must be real, got dtype {value.dtype}")
        if value.ndim not in ndims:
            raise ValueError(f"{name} must have ndim in {ndims}, got shape {value.shape}")
        value = value.astype(float_dtype())
        if not allow_nan and value.size:
            bad = int(_count_non_finite(value))
            if bad:
                raise ValueError(f"{name} has {bad} non-finite value(s) (NaN or inf)")
        return value
    if not is_traced(value):
        try:
            arr = np.asarray(value)
        except Exception as err:  # pragma: no cover - numpy's own message is good enough
            raise TypeError(f"{name} must be array-like, got {type(value).__name__}") from err
        if arr.dtype == object or not (
            np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.bool_)
        ):
            raise TypeError(f"{name} must hold numbers, got dtype {arr.dtype}")
        if np.iscomplexobj(arr):
            raise TypeError(f"{name} must be real, got dtype {arr.dtype}")
        if arr.ndim not in ndims:
            raise ValueError(f"{name} must have ndim in {ndims}, got shape {arr.shape}")
        if not allow_nan and arr.size and not np.all(np.isfinite(arr)):
            bad = int(np.sum(~np.isfinite(arr)))
            raise ValueError(f"{name} has {bad} non-finite value(s) (NaN or inf)")
        if not allow_nan and arr.size:
            big = float(np.max(np.abs(arr)))
            if big > float(np.finfo(float_dtype()).max):
                raise _range_error(name, big, float_dtype())
        if host:
            return np.asarray(arr, dtype=np.float64)
        return jnp.asarray(arr, dtype=float_dtype())
    if value.ndim not in ndims:
        raise ValueError(f"{name} must have ndim in {ndims}, got shape {value.shape}")
    if not jnp.issubdtype(value.dtype, jnp.floating):
        value = value.astype(float_dtype())
    return value


def check_int(name: str, value, *, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_float(name: str, value, *, positive: bool = False, nonnegative: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if nonnegative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_key(name: str, key):
    """Accepts a typed PRNG key or a raw uint32 key of shape (2,)."""
    if is_traced(key):
        return key
    if isinstance(key, numbers.Integral):
        raise TypeError(f"{name} must be a jax.random key (e.g. jax.random.key({key})), got int")
    arr = key
    if not hasattr(arr, "dtype"):
        raise TypeError(f"{name} must be a jax.random key, got {type(key).__name__}")
    if jnp.issubdtype(arr.dtype, jax.dtypes.prng_key):
        if arr.shape != ():
            raise ValueError(f"{name} must be a single key, got a key array of shape {arr.shape}")
        return arr
    if arr.dtype != jnp.uint32 or arr.shape != (2,):
        raise TypeError(
            f"{name} must be a jax.random key, got array of dtype {arr.dtype} and shape {arr.shape}"
        )
    return arr
