"""approx_attn: I/O-aware exact and certified polynomial attention on any GPU wgpu reaches.

`attention` mirrors `torch.nn.functional.scaled_dot_product_attention` on NumPy arrays.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from typing import Any, NamedTuple

import numpy as np

from . import _core
from ._core import DeviceError, NoDeviceError

__all__ = [
    "POLY_KERNELS",
    "DeviceError",
    "NoDeviceError",
    "PolyState",
    "Report",
    "attention",
    "device_info",
    "empty_cache",
    "io_cost",
    "io_lower_bound",
    "list_adapters",
    "poly_attention",
]

_METHODS = ("auto", "exact", "poly")


@dataclasses.dataclass(frozen=True)
class Report:
    """What `attention(..., return_report=True)` ran and what it cost."""

    method: str
    adapter: str
    backend: str
    fast_memory_words: int
    io_words: int
    """Words (4 bytes) the plan that ran moves between storage buffers and workgroup memory."""
    io_reads: int
    io_writes: int
    elapsed_s: float
    """Wall time of the GPU call, from staged input to host output."""
    kernel_s: float | None
    """GPU time of the kernels from timestamp queries, where the adapter has them."""
    io_words_counted: int | None
    """Words counted by the shaders themselves (only with APPROX_ATTN_COUNT_IO=1)."""
    dispatches: int
    plan: str
    reason: str
    """Why this method ran (for ``auto``: the certificate and the predicted costs)."""
    predicted_cost: dict[str, float] | None = None
    """Predicted seconds per method (``auto`` only), from plan FLOP counts and measured rates."""
    degree: int | None = None
    rank: int | None = None
    beta: float | None = None
    """scale * max|q| * max|k - mean(k)|: every score lies in [-beta, beta]."""
    poly_eps: float | None = None
    """Certified max |P(x) e^-x - 1| on [-beta, beta]."""
    error_bound: float | None = None
    """Bound on max |O - O*| over all output entries, O* exact attention of the inputs as given:
    poly, the approximation part plus the rounding part (per column below); exact on tensor
    cores, the derived f16 rounding bound."""
    error_bound_per_column: tuple[float, ...] | None = None
    """Bound on max |O - O*| per output column: poly, ``approximation_bound_per_column +
    rounding_bound_per_column``."""
    approximation_bound_per_column: tuple[float, ...] | None = None
    """Poly: (poly_eps/(1-poly_eps) + f16_rounding) * value range per column, the part that
    ``eps`` bounds (and that ``auto`` decides on)."""
    rounding_bound_per_column: tuple[float, ...] | None = None
    """Poly: the float32 rounding part, worst case: the kernels' arithmetic (on values centred
    per column, so it scales with each column's range), the pre-pass's norms, the float32 output,
    and the conversions (float64 inputs and the scale to float32, a float16 output)."""
    f16_rounding: float | None = None
    """Bound on the tensor-core passes' f16 rounding relative to the value range (None: f32 path).
    Exact on tensor cores: eps, the bound on the relative change of each unnormalised attention
    weight; then |O - O*| <= (eps + S 2^-36)/(1 - eps) range(v) + 2^-11 max|v| + 2^-25 +
    (2 gamma_2S + 2^-24) max|v| per column, the last term the f32 sums over the keys
    (``error_bound_per_column``; derivation in src/exact/coop.rs)."""
    tensor_cores: bool = False
    """Whether the kernels that ran used cooperative matrices (tensor cores)."""
    storage: str = "float32"
    """Format of the inputs in the storage buffers the kernels read: "float16" where the exact
    kernel (f32 or on tensor cores) read them as f16 (half the words; ``storage=``), else
    "float32". Together with ``tensor_cores`` this names the path."""
    unit_roundoff: float | None = None
    """Unit roundoff u of that format (2^-24 for float32, 2^-11 for float16): storing x in it
    moves x by at most u|x|. Accumulation and the softmax are float32 on every path."""
    input_rounding: float | None = None
    """With float16 storage: bound on max |O - O*| that rounding the inputs to float16 adds
    (0.0 where they were float16 already); on tensor cores ``error_bound`` already includes it. Scores move by at most about 2u |scale| max|q|
    max|k|, so each weight by a factor e^(+-that); then (e^d - 1)/(2 - e^d) * range(v) +
    u max|v| per column (derivation in src/exact/storage.rs). The float32 sums and the final
    rounding of a float16 output (2^-11 |O|) are not included."""
    score_rounding: float | None = None
    """Exact on tensor cores: bound on the change of any score scale*q.k by the f16 rounding of
    q and k (at most about 2^-10 scale max|q| max|k|)."""
    schedule: str | None = None
    pass_s: tuple[tuple[str, float], ...] = ()
    """GPU seconds per pass (timestamps, where the adapter has them)."""
    gpu_allocated_bytes: int | None = None
    """Peak bytes wgpu's allocator held for the device, sampled after each dispatch of the call
    (inputs, outputs, intermediates; None where the backend does not report it)."""
    slices: int = 0
    """Slices of the inputs uploaded (each a block of rows of Q, K or V for one dispatch; an
    input kept on the device for the whole call counts once per block)."""
    host_to_device_bytes: int = 0
    """Bytes the call wrote to the device: input slices, parameters, small host results."""
    device_to_host_bytes: int = 0
    """Bytes the call read back: output slices, split statistics, pre-pass results, timings."""
    host_s: tuple[tuple[str, float], ...] = ()
    """Host wall-clock seconds per stage: ``upload`` (input slices into staging memory, V mapped
    on the way), ``wait`` (blocked on the device), ``submit`` (handing work to the driver, which
    may block while the device is busy), ``readback`` (results out of mapped memory into place),
    ``compute`` (host arithmetic over whole arrays: the streamed pre-pass, the value map's
    inverse). With ``elapsed_s`` and ``kernel_s`` they say where a call's time went; the stages
    overlap the kernels, not each other."""


def device_info() -> dict[str, Any]:
    """The adapter in use: name, backend, `fast_memory_words`, limits and optional features."""
    return dict(_core.device_info())


def list_adapters() -> list[tuple[str, str, str]]:
    """Every adapter wgpu can see, as (name, backend, device type)."""
    return list(_core.list_adapters())


def empty_cache() -> int:
    """Frees the host memory `attention` keeps between calls and returns its size in bytes.

    Calls keep the host copies of their inputs and the host-visible staging buffers of large
    transfers (up to four uploads and two readbacks, the largest seen) for the next call:
    allocating them afresh cost more than the copies themselves (on an H100, NumPy to NumPy at
    n = 262,144, E = 64 took 1.6 s that way and 0.5 s reusing them). Like
    `torch.cuda.empty_cache`, this gives that memory back; the next call allocates it again.
    It also drops the compiled kernels (at most 32 are kept, the least recently used going
    first); the next call compiles what it needs again (the allocator may keep their pages for
    reuse). The returned size counts the host copies and staging buffers only.
    """
    return int(_core.empty_cache())


class _ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type: a TypeError, as in PyTorch. Also a ValueError, which these
    checks raised before for some of them (``degree=2.0``, ``tensor_cores="yes"``), so code that
    caught ValueError keeps working (NumPy's AxisError is a ValueError and an IndexError alike)."""


def _type_error(name: str, what: str, val: Any) -> _ArgumentTypeError:
    return _ArgumentTypeError(f"{name} must be {what}, not {type(val).__name__} {val!r}")


def _check_bool(val: Any, name: str, *, none: bool = False) -> bool | None:
    """A real bool (or numpy.bool_); a string or a number is refused, as in PyTorch."""
    if none and val is None:
        return None
    if isinstance(val, (bool, np.bool_)):
        return bool(val)
    raise _type_error(name, "None or a bool" if none else "a bool", val)


_USIZE_MAX = 2 ** (8 * np.dtype(np.uintp).itemsize) - 1


def _check_int(val: Any, name: str, low: int) -> int:
    """An integer (Python or NumPy, not a bool) of at least `low` (0 or 1)."""
    if isinstance(val, bool) or not isinstance(val, (int, np.integer)):
        raise _type_error(name, "an integer", val)
    if val < low:
        kind = "a positive" if low == 1 else "a non-negative"
        raise ValueError(f"{name} must be {kind} integer, got {val!r}")
    if val > _USIZE_MAX:  # the binding takes sizes as usize
        raise OverflowError(f"{name}={val} is too large (at most {_USIZE_MAX:,})")
    return int(val)


def _check_number(val: Any, name: str) -> float:
    """A real number (Python or NumPy scalar, not a bool), as a Python float."""
    if isinstance(val, (bool, np.bool_)) or not isinstance(val, numbers.Real):
        raise _type_error(name, "a number", val)
    return float(val)


def _check_eps(val: Any) -> float:
    eps = _check_number(val, "eps")
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must be a number in (0, 1), got {val!r}")
    return eps


def _check_method(val: Any, allowed: tuple[str, ...]) -> str:
    if not isinstance(val, str):
        raise _type_error("method", "a str", val)
    if val not in allowed:
        raise ValueError(f"method must be one of {allowed}, got {val!r}")
    return val


def _as_float_array(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.name == "bfloat16":  # ml_dtypes: a NumPy extension type, not kind "f"
        raise TypeError(
            f"{name} has dtype bfloat16, which approx_attn does not take: NumPy has no native "
            "bfloat16 and the kernels have no bfloat16 path. Convert with .astype(np.float32) "
            "(exact) and back, or to float16 (rounds, and overflows beyond 65504)"
        )
    # Any byte order: big-endian float32/float64 is converted with the float32 copy below.
    if arr.dtype.kind != "f" or arr.dtype.itemsize not in (2, 4, 8):
        raise TypeError(
            f"{name} must be a floating-point array (float16, float32 or float64), got dtype {arr.dtype}"
        )
    if arr.ndim < 2:
        raise ValueError(
            f"{name} must have at least 2 dimensions (..., seq, dim), got shape {arr.shape}"
        )
    return arr


# Elements per slice of the finiteness check: its boolean temporary stays in cache, instead of
# one the size of the input (np.isfinite(x).all() on 0.5 GB took 0.46 s here, the slices 0.05 s).
_FINITE_CHECK_SLICE = 1 << 16


_F32_MAX = float(np.finfo(np.float32).max)


def _finite_in_float32(x: np.ndarray) -> np.ndarray:
    # float64 values beyond float32's range become Inf on the GPU: they count as Inf.
    if x.dtype.itemsize == 8:
        return np.abs(x) <= _F32_MAX  # False for NaN too
    return np.isfinite(x)


def _distinct(arr: np.ndarray) -> tuple[np.ndarray, int]:
    """The view of `arr` without its broadcast axes (stride 0), and how often each of its
    elements repeats in `arr`: a broadcast view is checked without expanding it."""
    index = tuple(0 if st == 0 and n > 1 else slice(None) for st, n in zip(arr.strides, arr.shape))
    rest = arr[index]
    return rest, arr.size // max(rest.size, 1)


def _slices(arr: np.ndarray):
    """`arr` in 1-D pieces of at most _FINITE_CHECK_SLICE elements, copying none larger."""
    if arr.flags.c_contiguous or arr.flags.f_contiguous:
        flat = arr.reshape(-1, order="C" if arr.flags.c_contiguous else "F")  # a view
        for i in range(0, flat.size, _FINITE_CHECK_SLICE):
            yield flat[i : i + _FINITE_CHECK_SLICE]
    else:  # strided: NumPy's buffered iterator copies one slice at a time, in memory order
        flags = ["external_loop", "buffered", "zerosize_ok"]
        yield from np.nditer(arr, flags=flags, order="K", buffersize=_FINITE_CHECK_SLICE)


def _native_f16(x: np.ndarray) -> bool:
    """Whether `x` is C-contiguous float16 in native byte order: its bits go to the binding."""
    return x.dtype == np.float16 and x.dtype.isnative and x.flags.c_contiguous


def _check_finite(arr: np.ndarray, name: str) -> None:
    rest, repeats = _distinct(arr)
    if _native_f16(rest):  # counted on the bits on several threads (NumPy's isfinite is slow)
        bad = repeats * _core._f16_nonfinite(rest.reshape(-1).view(np.uint16))
        if bad == 0:
            return
    elif all(_finite_in_float32(part).all() for part in _slices(rest)):
        return
    else:
        bad = repeats * sum(
            part.size - int(np.count_nonzero(_finite_in_float32(part))) for part in _slices(rest)
        )
    # The wording of the GPU pre-pass's check (src/lib.rs): float64 values beyond float32's
    # range become Inf in the conversion.
    raise ValueError(
        f"{name} contains {bad} NaN or Inf value(s) (after conversion to float32); pass "
        "check_finite=False to skip this check"
    )


class _HostMemoryError(MemoryError, ValueError):
    """The host copies a call needs exceed the memory available: a MemoryError, raised before the
    copies start. Also a ValueError, like the other problems too large to run."""


# Calls whose host copies need less than this skip the memory check (it reads /proc).
_HOST_CHECK_MIN_BYTES = 64 << 20


def _available_memory() -> int | None:
    """Bytes this process can still allocate: MemAvailable (or the free physical pages), capped by
    its cgroup v2 limit; None where neither is known."""
    avail = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            pass
    try:
        with open("/proc/self/cgroup", encoding="ascii") as f:
            path = next(line[3:].strip() for line in f if line.startswith("0::"))
        base = f"/sys/fs/cgroup{path}"
        with open(f"{base}/memory.max", encoding="ascii") as f:
            limit = f.read().strip()
        if limit != "max":
            with open(f"{base}/memory.current", encoding="ascii") as f:
                room = max(int(limit) - int(f.read()), 0)
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError, StopIteration):
        pass
    return avail


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _check_host_memory(need: int, what: str) -> None:
    """Raises _HostMemoryError when `need` bytes exceed the available memory (after giving back
    the copies and staging buffers kept from earlier calls, which count as used)."""
    if need < _HOST_CHECK_MIN_BYTES:
        return
    avail = _available_memory()
    if avail is None or need <= avail:
        return
    if _core.empty_cache() > 0:
        avail = _available_memory() or avail
        if need <= avail:
            return
    raise _HostMemoryError(
        f"{what} needs {_gib(need)} ({need:,} bytes) of host memory, but {_gib(avail)} is available"
    )


_F32_TINY = float(np.finfo(np.float32).tiny)  # smallest normal float32


def _fold_scale(q: np.ndarray, k: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray, float]:
    """For a scale float32 cannot hold (beyond its largest value, or below its smallest normal,
    where the GPU may flush it to zero): scale = m 2^e with m in [1, 2), and 2^a q, 2^b k in
    float64 (exact), a + b = e, balanced so that max|2^a m q| and max|2^b k| are about equal: the
    same scores, with every operand inside float32's range where the scores are. The kernel
    takes the float32 copies of these and the scale m. A ValueError where an operand would
    still leave float32's range (then so do the scores)."""
    m, e = math.frexp(scale)  # scale = m 2^e, 0.5 <= |m| < 1
    m, e = 2.0 * m, e - 1
    with np.errstate(over="ignore", invalid="ignore"):
        qa = float(np.abs(q).max()) if q.size else 0.0
        ka = float(np.abs(k).max()) if k.size else 0.0
    if qa == 0.0 or ka == 0.0:
        return q, k, 1.0  # every score is 0 whatever the scale
    if not (math.isfinite(qa) and math.isfinite(ka)):
        a = e  # NaN or Inf in an input: the finiteness checks report it
    else:
        a = round((e + math.log2(ka) - math.log2(abs(m) * qa)) / 2.0)
    b = e - a
    with np.errstate(over="ignore", invalid="ignore"):
        q2 = np.ldexp(np.asarray(q, dtype=np.float64), a)
        k2 = np.ldexp(np.asarray(k, dtype=np.float64), b)
        q2a, k2a = float(np.abs(q2).max()), float(np.abs(k2).max())
    if math.isfinite(qa) and math.isfinite(ka) and not (q2a <= _F32_MAX and k2a <= _F32_MAX):
        raise ValueError(
            f"the scores scale * q.k can overflow float32: scale = {scale!r} with max|q| = "
            f"{qa:.4e} and max|k| = {ka:.4e} needs operands up to {max(q2a, k2a):.4e} even "
            f"balanced, beyond float32's range ({_F32_MAX:.4e})"
        )
    return q2, k2, m


def _trusted() -> bool:
    # Benchmarks only: compile shaders without wgpu's runtime bounds checks (tests keep them on).
    return os.environ.get("APPROX_ATTN_TRUSTED_SHADERS", "") not in ("", "0")


def _count_io() -> bool:
    return os.environ.get("APPROX_ATTN_COUNT_IO", "") not in ("", "0")


class _Shapes(NamedTuple):
    lead_q: tuple[int, ...]
    lead_kv: tuple[int, ...]
    group: int
    L: int
    S: int
    E: int
    Ev: int
    units: int


def _shapes(q: np.ndarray, k: np.ndarray, v: np.ndarray, enable_gqa: bool) -> _Shapes:
    """The problem's sizes from query (..., L, E), key (..., S, E), value (..., S, Ev), with a
    ValueError for every mismatch (SDPA's rules; ``enable_gqa``: key/value heads divide query
    heads)."""
    if not (q.ndim == k.ndim == v.ndim):
        raise ValueError(
            "query, key and value must have the same number of dimensions, got shapes "
            f"query {q.shape}, key {k.shape}, value {v.shape}"
        )
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"key and value must have the same sequence length S, got key {k.shape} and value {v.shape}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"query and key must have the same head dimension E, got query {q.shape} and key {k.shape}"
        )
    if k.shape[:-2] != v.shape[:-2]:
        raise ValueError(
            f"key and value must have the same leading dimensions, got key {k.shape} and value {v.shape}"
        )
    lead_q, lead_kv = q.shape[:-2], k.shape[:-2]
    group = 1
    if enable_gqa and q.ndim >= 3:
        if lead_q[:-1] != lead_kv[:-1] or lead_kv[-1] == 0 or lead_q[-1] % lead_kv[-1] != 0:
            raise ValueError(
                "with enable_gqa the leading dimensions must match except the head dimension, "
                "and key/value heads must divide query heads; got query "
                f"{q.shape}, key {k.shape}, value {v.shape}"
            )
        group = lead_q[-1] // lead_kv[-1]
    elif lead_q != lead_kv:
        raise ValueError(
            "query, key and value must have the same leading dimensions (use enable_gqa=True to "
            f"share key/value heads), got query {q.shape}, key {k.shape}, value {v.shape}"
        )
    L, E = q.shape[-2], q.shape[-1]
    S, Ev = k.shape[-2], v.shape[-1]
    if S == 0:
        raise ValueError(f"key/value sequence length S must be at least 1, got key {k.shape}")
    if E == 0 or Ev == 0:
        raise ValueError(
            f"head dimensions must be at least 1, got query {q.shape} and value {v.shape}"
        )
    units = int(np.prod(lead_kv, dtype=np.int64)) if lead_kv else 1
    return _Shapes(lead_q, lead_kv, group, L, S, E, Ev, units)


_STORAGE = ("float16", "float32")


def _check_storage(val: Any) -> str | None:
    """None, or "float16"/"float32" (a NumPy dtype or type of those is taken too)."""
    if val is None:
        return None
    if isinstance(val, str):
        if val not in _STORAGE:
            raise ValueError(f"storage must be None, 'float16' or 'float32', got {val!r}")
        return val
    try:
        name = np.dtype(val).name
    except TypeError:
        raise _type_error("storage", "None, 'float16' or 'float32'", val) from None
    if name not in _STORAGE:
        raise ValueError(f"storage must be None, 'float16' or 'float32', got {val!r}")
    return name


def _float16_bits(
    arrays: tuple[np.ndarray, ...], flat32: list[np.ndarray], f16_inputs: bool
) -> tuple[np.ndarray, ...]:
    """The inputs as float16 bits (flat uint16, native order): their own where they are float16,
    else the float32 copies rounded to float16, refused where a finite value leaves float16's
    range."""
    if f16_inputs:
        return tuple(
            np.ascontiguousarray(x, dtype=np.float16).reshape(-1).view(np.uint16) for x in arrays
        )
    out = []
    for name, xf in zip(("query", "key", "value"), flat32):
        with np.errstate(over="ignore"):
            h = xf.astype(np.float16)
        beyond = int(np.count_nonzero(np.isinf(h) & np.isfinite(xf)))
        if beyond:
            raise ValueError(
                f"storage='float16': {name} has {beyond} value(s) beyond float16's range "
                "(|x| > 65504); use storage='float32'"
            )
        out.append(h.view(np.uint16))
    return tuple(out)


def _in_place(x: np.ndarray) -> bool:
    """Whether the binding reads `x` in place: C-contiguous float32 in native byte order."""
    return x.flags.c_contiguous and x.dtype == np.float32


def _float32_flat(*arrays: np.ndarray) -> list[np.ndarray]:
    """Contiguous flat float32 copies (views where they already are: the binding reads those in
    place) in (B, H, L, E) order, as the binding takes them; any strides are accepted. float64
    values beyond float32's range become Inf here; the finiteness checks report them.
    Contiguous float16 is converted by the binding, on several threads (the same values)."""
    out = []
    for x in arrays:
        if _native_f16(x):
            xf = np.empty(x.size, dtype=np.float32)
            _core._f16_to_f32(x.reshape(-1).view(np.uint16), xf)
        else:
            with np.errstate(over="ignore"):
                xf = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
        out.append(xf)
    return out


def _to_out_dtype(result: np.ndarray, out_dtype: np.dtype) -> np.ndarray:
    """The float32 `result` in the output's dtype; contiguous float32 to float16 by the binding,
    on several threads (the same bits as NumPy's cast: ties to even)."""
    if out_dtype != np.float16 or not (result.dtype == np.float32 and result.flags.c_contiguous):
        return result.astype(out_dtype, copy=False)
    h = np.empty(result.shape, dtype=np.float16)
    _core._f32_to_f16(result.reshape(-1), h.reshape(-1).view(np.uint16))
    return h


def _check_out(out: Any, shape: tuple[int, ...], inputs: tuple[np.ndarray, ...]) -> np.ndarray:
    """The caller's output array: float32 (native byte order), C-contiguous, writeable, of the
    output's shape and sharing no memory with the inputs (an ``np.memmap`` is one)."""
    if not isinstance(out, np.ndarray):
        raise _type_error("out", "a NumPy array (float32, C-contiguous)", out)
    if out.dtype != np.float32:
        raise TypeError(f"out must have dtype float32 (native byte order), got {out.dtype}")
    if out.shape != shape:
        raise ValueError(f"out must have the output's shape {shape}, got {out.shape}")
    if not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous")
    if not out.flags.writeable:
        raise ValueError("out must be writeable, got a read-only array")
    if any(np.may_share_memory(out, x) for x in inputs):
        raise ValueError("out must not share memory with query, key or value")
    return out


def _new_out(out: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """`out`, else a new float32 array of `shape`: the binding writes the output into it."""
    return np.empty(shape, dtype=np.float32) if out is None else out


def attention(
    query: Any,
    key: Any,
    value: Any,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    enable_gqa: bool = False,
    method: str = "auto",
    eps: float = 1e-3,
    degree: int | None = None,
    check_finite: bool = True,
    tensor_cores: bool | None = None,
    storage: str | None = None,
    return_report: bool = False,
    out: np.ndarray | None = None,
) -> np.ndarray | tuple[np.ndarray, Report]:
    """softmax(scale * query @ key^T) @ value, computed on the GPU.

    Shapes: query (..., L, E), key (..., S, E), value (..., S, Ev) -> output (..., L, Ev). Leading
    dimensions must match, except that with ``enable_gqa`` the head dimension (the one before L)
    of key/value may divide that of query. float16, float32 or float64 in, any strides; the GPU
    computes in float32 (float64 inputs are rounded to float32; float16 inputs run exact on tensor
    cores where the adapter has them, see ``tensor_cores``) and the output has the query's dtype.
    ``is_causal`` masks key j for query i when j > i (upper-left aligned, as in PyTorch).
    ``method``: "exact" or "auto".
    ``tensor_cores``: run on cooperative matrices (tensor cores: f16 operands, f32
    accumulation). Poly: both passes (causal poly: the masked block inside each chunk, its passes
    over the chunk states stay f32); the certificate then adds their f16 rounding bound
    (``Report.f16_rounding``) and the degree is chosen for what is left of eps. Exact: QK^T and
    PV, online softmax in f32; the report gives the derived f16 rounding bound
    (``Report.f16_rounding``, ``score_rounding``, ``error_bound_per_column``). ``None`` (default):
    precision follows the dtype, as in PyTorch: float16 inputs (all three) run exact on tensor
    cores where the adapter has them, float32 inputs keep the f32 kernel; poly uses them where
    their bound is at most eps/2. ``True`` requires them (NotImplementedError where the adapter
    has none); ``False`` keeps the portable f32 path. ``Report.tensor_cores`` says which ran.
    ``storage``: the format in which the exact kernel (f32 or on tensor cores) reads the inputs
    from GPU memory.
    ``None`` (default): precision follows the dtype, as in PyTorch: float16 inputs (all three)
    are stored as float16 (half the words uploaded and read; no shader-f16 feature needed, only
    ``unpack2x16float``: ``device_info()["f16_storage"]``, which Mesa's Vulkan drivers lack
    without shader f16; there, or with APPROX_ATTN_NO_F16_STORAGE=1, they are converted to
    float32 on the host and ``Report.reason`` says so), the rest as float32. ``"float16"`` rounds float32/float64 inputs to
    float16 for storage (``Report.input_rounding`` bounds what that adds); ``"float32"`` keeps
    float32. Accumulation and the softmax are float32 either way and the output has the query's
    dtype. The poly method reads float32 (float16 inputs are converted on the host);
    ``storage="float16"`` with ``method="poly"`` is a ValueError. ``Report.storage`` says which
    ran. bfloat16 arrays (ml_dtypes) are refused with a TypeError.
    ``out``: a float32 C-contiguous writeable array of the output's shape (an ``np.memmap``
    works) that receives the result and is returned (then the output is float32 whatever the
    query's dtype). Contiguous float32 inputs (``np.memmap`` too) are read in place, slice by
    slice; others are converted to one float32 copy first. Inputs and output beyond the device
    memory a call may use (``APPROX_ATTN_MAX_DEVICE_BYTES``; on CPU adapters half the available
    memory by default) stream through it in slices.
    """
    q = _as_float_array(query, "query")
    k = _as_float_array(key, "key")
    v = _as_float_array(value, "value")
    is_causal = _check_bool(is_causal, "is_causal")
    enable_gqa = _check_bool(enable_gqa, "enable_gqa")
    check_finite = _check_bool(check_finite, "check_finite")
    return_report = _check_bool(return_report, "return_report")
    tensor_cores = _check_bool(tensor_cores, "tensor_cores", none=True)
    storage = _check_storage(storage)
    method = _check_method(method, _METHODS)
    if method == "poly" and storage == "float16":
        raise ValueError(
            "storage='float16' applies to method='exact' only: the poly kernels read float32"
        )
    eps = _check_eps(eps)
    if degree is not None:
        if method != "poly":
            raise ValueError("degree= applies to method='poly' only")
        degree = _check_int(degree, "degree", 0)
    if scale is not None:
        scale = _check_number(scale, "scale")
        # Beyond float32's range the scale is folded into the inputs below (_fold_scale).
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale!r}")
    lead_q, _, group, L, S, E, Ev, units = _shapes(q, k, v, enable_gqa)
    if scale is None:
        scale = 1.0 / math.sqrt(E)
    out_dtype = q.dtype.newbyteorder("=")  # big-endian in, native out
    out_shape = lead_q + (L, Ev)
    if out is not None:
        out = _check_out(out, out_shape, (q, k, v))
        out_dtype = np.dtype(np.float32)
    # poly and auto (causal or not) run a GPU pre-pass over all three inputs that counts
    # their NaN and Inf values (after the float32 conversion): no second pass over them here
    # (on an H100 this one took about a quarter of a call's time at n = 262,144).
    gpu_checks_finite = method != "exact" and L > 0 and units > 0
    if check_finite and not gpu_checks_finite:
        for arr, name in ((q, "query"), (k, "key"), (v, "value")):
            _check_finite(arr, name)
    if L == 0 or units == 0:
        out = np.zeros(out_shape, dtype=out_dtype) if out is None else out
        if return_report:
            info = device_info()
            return out, Report(
                method="exact",
                adapter=info["adapter"],
                backend=info["backend"],
                fast_memory_words=info["fast_memory_words"],
                io_words=0,
                io_reads=0,
                io_writes=0,
                elapsed_s=0.0,
                kernel_s=None,
                io_words_counted=None,
                dispatches=0,
                plan="empty",
                reason="empty query: nothing to compute",
            )
        return out

    f16_inputs = q.dtype == k.dtype == v.dtype == np.float16
    scale_given = scale
    use_f16_storage = (
        storage == "float16" or (storage is None and f16_inputs)
    ) and method != "poly"
    inputs = (q, k, v)
    if scale != 0.0 and not _F32_TINY <= abs(scale) <= _F32_MAX:
        q, k, scale = _fold_scale(q, k, scale)
        use_f16_storage = storage == "float16"
    # The host memory below, counted before any allocation: a broadcast view of a few bytes
    # can stand for gigabytes once copied. Contiguous float32 inputs are read in place.
    out_size = math.prod(out_shape)
    need = 0 if out is not None else out_size * 4
    need += out_size * out_dtype.itemsize if out_dtype != np.float32 else 0
    for arr in (q, k, v):
        need += 0 if _in_place(arr) else arr.size * 4
        if use_f16_storage:  # the float16 bits (a copy unless they are already), then packed
            f16_view = arr.dtype == np.float16 and arr.flags.c_contiguous and arr.dtype.isnative
            need += (0 if f16_view else arr.size * 2) + arr.size // arr.shape[-1] * (
                (arr.shape[-1] + 1) // 2 * 4
            )
    _check_host_memory(
        need,
        f"attention on query {q.shape} {q.dtype}, key {k.shape} {k.dtype}, value {v.shape} "
        f"{v.dtype} (float32 copies of the inputs that are not float32 and contiguous, and the "
        f"output {out_shape})",
    )
    qf, kf, vf = _float32_flat(q, k, v)
    f16_storage, exact16 = None, False
    if use_f16_storage:
        exact16 = f16_inputs and q is inputs[0] and k is inputs[1]
        f16_storage = _float16_bits((q, k, v) if exact16 else (), [qf, kf, vf], exact16)
    result = _new_out(out, out_shape)
    try:
        rep = _core.attention(
            qf,
            kf,
            vf,
            result.reshape(-1),
            units,
            group,
            L,
            S,
            E,
            Ev,
            is_causal,
            scale,
            method,
            eps,
            degree,
            check_finite,
            _trusted(),
            _count_io(),
            tensor_cores,
            f16_inputs,
            f16_storage,
            f16_storage is not None and not exact16,
        )
    except ValueError as exc:
        if scale_given != scale and "can overflow float32" in str(exc):
            raise ValueError(
                f"{exc} (scale={scale_given!r} is beyond float32's normal range: it ran as "
                f"{scale!r} with its power of two folded into the query and key)"
            ) from None
        raise
    result = _to_out_dtype(result, out_dtype)
    if not return_report:
        return result
    report = _report(rep)
    if report.method == "poly":
        report = _conversion_rounding(report, inputs, scale_given, scale, out_dtype)
    return result, report


def _exact_attention_lse(
    query: Any,
    key: Any,
    value: Any,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    enable_gqa: bool = False,
) -> tuple[np.ndarray, np.ndarray, Report]:
    """Exact attention on the f32 kernel that also returns each output row's log-sum-exp,
    ``lse_i = ln sum_j exp(scale q_i.k_j)`` over the keys row i sees (shape (..., L), float32):
    partial outputs over disjoint key sets merge by it (ring attention, `distributed`).
    Twin: `reference.exact_attention_lse`. Returns (out float32, lse, Report). Unlike
    `attention` it does not rebalance extreme scores or map huge values: a non-finite output or
    log-sum-exp from finite inputs raises ValueError."""
    q = _as_float_array(query, "query")
    k = _as_float_array(key, "key")
    v = _as_float_array(value, "value")
    is_causal = _check_bool(is_causal, "is_causal")
    enable_gqa = _check_bool(enable_gqa, "enable_gqa")
    lead_q, _, group, L, S, E, Ev, units = _shapes(q, k, v, enable_gqa)
    if scale is None:
        scale = 1.0 / math.sqrt(E)
    scale = _check_number(scale, "scale")
    if not (math.isfinite(scale) and (scale == 0.0 or _F32_TINY <= abs(scale) <= _F32_MAX)):
        raise ValueError(f"scale must be a normal float32 number or 0, got {scale!r}")
    qf, kf, vf = _float32_flat(q, k, v)
    flat, lse, rep = _core.exact_attention_lse(
        qf, kf, vf, units, group, L, S, E, Ev, is_causal, scale, _count_io()
    )
    out = flat.reshape(lead_q + (L, Ev))
    lse = lse.reshape(lead_q + (L,))
    if not (np.isfinite(out).all() and np.isfinite(lse).all()):
        raise ValueError(
            "exact attention with log-sum-exp: a non-finite output or log-sum-exp (NaN or Inf in "
            "an input, or scores or value sums beyond float32's range)"
        )
    return out, lse, _report(rep)


def _tuple_or_none(x: Any) -> tuple[float, ...] | None:
    return tuple(float(y) for y in x) if x else None


def _conversion_rounding(
    rep: Report,
    inputs: tuple[np.ndarray, np.ndarray, np.ndarray],
    scale: float,
    scale_run: float,
    out_dtype: np.dtype,
) -> Report:
    """Adds to a poly report's rounding part what the conversions around the GPU call change,
    against exact attention of the inputs as given (the GPU's part covers its float32 inputs):

    * the scale rounded to float32 (or folded into float64 inputs) moves each score x by
      |scale_f32/scale - 1| |x - c| <= that times beta (c = scale q.mu: the softmax ignores it);
    * float64 Q, K (or any folded by a scale beyond float32's range) rounded to float32: every
      product q_l k_l moves by (2u + u^2) |q_l| |k_l|, each score by that times
      |scale| max|q_i| max|k_j| (Cauchy-Schwarz, uncentred norms);
    * with every score off by at most d, each weight is off by a factor within e^(+-d), so the
      output moves by at most (e^(2d) - 1) range(v) per column;
    * float64 V rounded to float32: a convex combination of values each off by u |v|, u max|v|;
    * a float16 output: the cast, 2^-11 max|v| + 2^-25 (|O| <= max|v|).
    """
    q, k, v = inputs
    if rep.error_bound_per_column is None or rep.rounding_bound_per_column is None:
        return rep
    u = 2.0**-24
    # scale_run: the scale after a fold into the inputs (a power of two, exact in float64).
    scale_f32 = float(np.float32(scale_run))
    d = abs(scale_run / scale_f32 - 1.0) * (rep.beta or 0.0) if scale_f32 != 0.0 else 0.0
    inputs_rounded = q.dtype.itemsize == 8 or k.dtype.itemsize == 8 or scale != scale_run
    if inputs_rounded and q.size and k.size:
        qn = float(np.sqrt(np.max(np.sum(np.square(q, dtype=np.float64), axis=-1))))
        kn = float(np.sqrt(np.max(np.sum(np.square(k, dtype=np.float64), axis=-1))))
        d += (2.0 * u + u * u) * abs(scale) * qn * kn * (1.0 + 1e-12)
    if d == 0.0 and v.dtype.itemsize != 8 and out_dtype.itemsize != 2:
        return rep
    # Per unit and column extremes, exact in the inputs' dtype (no float64 copy of V).
    vv = v.reshape(-1, v.shape[-2], v.shape[-1])
    hi, lo = vv.max(axis=-2).astype(np.float64), vv.min(axis=-2).astype(np.float64)
    extra = np.zeros(v.shape[-1])
    if d > 0.0:
        extra += math.expm1(2.0 * d) * (hi - lo).max(axis=0)
    vmax = np.maximum(np.abs(hi), np.abs(lo)).max(axis=0)
    if v.dtype.itemsize == 8:
        extra += u * vmax
    if out_dtype.itemsize == 2:
        extra += 2.0**-11 * vmax + 2.0**-25
    if not extra.any():
        return rep
    rounding = np.asarray(rep.rounding_bound_per_column) + extra
    total = np.asarray(rep.approximation_bound_per_column) + rounding
    return dataclasses.replace(
        rep,
        rounding_bound_per_column=tuple(rounding.tolist()),
        error_bound_per_column=tuple(total.tolist()),
        error_bound=float(total.max()),
    )


def _report(rep: dict[str, Any]) -> Report:
    predicted = None
    if rep.get("predicted_exact_s") is not None:
        predicted = {"exact": rep["predicted_exact_s"], "poly": rep["predicted_poly_s"]}
    per_col = rep.get("error_bound_per_column")
    return Report(
        method=rep["method"],
        adapter=rep["adapter"],
        backend=rep["backend"],
        fast_memory_words=rep["fast_memory_words"],
        io_words=rep["io_words"],
        io_reads=rep["io_reads"],
        io_writes=rep["io_writes"],
        elapsed_s=rep["elapsed_s"],
        kernel_s=rep["kernel_s"],
        io_words_counted=rep["io_words_counted"],
        dispatches=rep["dispatches"],
        plan=rep["plan"],
        reason=rep["reason"],
        predicted_cost=predicted,
        degree=rep.get("degree"),
        rank=rep.get("rank"),
        beta=rep.get("beta"),
        poly_eps=rep.get("poly_eps"),
        error_bound=max(per_col) if per_col else None,
        error_bound_per_column=tuple(per_col) if per_col else None,
        approximation_bound_per_column=_tuple_or_none(rep.get("approximation_bound_per_column")),
        rounding_bound_per_column=_tuple_or_none(rep.get("rounding_bound_per_column")),
        f16_rounding=rep.get("f16_rounding"),
        schedule=rep.get("schedule"),
        pass_s=tuple((str(n), float(t)) for n, t in rep.get("pass_s", [])),
        gpu_allocated_bytes=rep.get("gpu_allocated_bytes"),
        tensor_cores=bool(rep.get("tensor_cores", False)),
        score_rounding=rep.get("score_rounding"),
        storage=str(rep.get("storage", "float32")),
        unit_roundoff=rep.get("unit_roundoff"),
        input_rounding=rep.get("input_rounding"),
        slices=int(rep.get("slices", 0)),
        host_to_device_bytes=int(rep.get("host_to_device_bytes", 0)),
        device_to_host_bytes=int(rep.get("device_to_host_bytes", 0)),
        host_s=tuple((str(n), float(t)) for n, t in rep.get("host_s", [])),
    )


def io_cost(
    L: int,
    S: int,
    E: int,
    Ev: int | None = None,
    *,
    method: str,
    degree: int | None = None,
    eps: float | None = None,
    beta: float | None = None,
    fast_memory_words: int | None = None,
    is_causal: bool = False,
    heads: int = 1,
    kv_heads: int | None = None,
    storage: str = "float32",
) -> dict[str, Any]:
    """Words the plan that would run moves between storage buffers and workgroup memory.

    Returns ``{"method", "schedule", "degree", "rank", "fast_memory_words", "storage", "passes":
    [(name, reads, writes), ...], "reads", "writes", "total", "host_to_device",
    "device_to_host"}``: the last two are the third memory level, words between host and device
    memory (input slices uploaded, output slices read back; see docs/io-model.md).
    ``fast_memory_words`` defaults to the current adapter's (and its binding and device memory
    limits); any value may be given to study other GPUs (then the model is one dispatch, all on
    the device). For ``method="poly"`` give ``degree``, or ``eps`` and ``beta``.
    ``heads`` counts query heads; ``kv_heads`` (default: ``heads``) the key/value heads they
    share, as with ``enable_gqa``. ``storage`` ("float32" or "float16", method "exact" only):
    the format the exact kernel reads its inputs in, as ``attention(storage=...)``; a float16
    row of E values is ceil(E/2) words (the output is written as float32 either way).
    """
    L, S, E = _check_int(L, "L", 0), _check_int(S, "S", 1), _check_int(E, "E", 1)
    Ev = E if Ev is None else _check_int(Ev, "Ev", 1)
    heads = _check_int(heads, "heads", 1)
    kv_heads = heads if kv_heads is None else _check_int(kv_heads, "kv_heads", 1)
    if heads % kv_heads != 0:
        raise ValueError(f"kv_heads={kv_heads} must divide heads={heads}")
    method = _check_method(method, ("exact", "poly"))
    is_causal = _check_bool(is_causal, "is_causal")
    if degree is not None:
        degree = _check_int(degree, "degree", 0)
    if eps is not None:
        eps = _check_eps(eps)
    if beta is not None:
        beta = _check_number(beta, "beta")
        if not 0.0 <= beta < math.inf:
            raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    if method == "exact" and (degree, eps, beta) != (None, None, None):
        raise ValueError("degree=, eps= and beta= apply to method='poly' only")
    if method == "poly" and (degree is None) == (eps is None or beta is None):
        raise ValueError(
            "io_cost(method='poly') needs degree=, or eps= and beta= (not both), got "
            f"degree={degree!r}, eps={eps!r}, beta={beta!r}"
        )
    if fast_memory_words is not None:
        fast_memory_words = _check_int(fast_memory_words, "fast_memory_words", 1)
    storage_name = _check_storage(storage)
    if storage_name is None:
        raise ValueError("storage must be 'float16' or 'float32', got None")
    return dict(
        _core.io_cost(
            kv_heads,
            heads // kv_heads,
            L,
            S,
            E,
            Ev,
            is_causal,
            method,
            degree,
            eps,
            beta,
            fast_memory_words,
            storage_name,
        )
    )


def io_lower_bound(
    L: int,
    S: int,
    E: int,
    *,
    method: str = "poly",
    degree: int | None = None,
    fast_memory_words: int | None = None,
) -> float:
    """Reconstructed I/O lower bound in words (docs/io-model.md): for ``poly`` with rank
    r = C(E+degree, degree), Ω(n·d + min(n·r·d²/M, n·r·d/√M)) with the segment-argument
    constants; for ``exact``, Ω(min(n²d²/M, n²d/√M)) (Saha & Ye 2024).

    Arguments are checked as in :func:`io_cost`: sizes are integers (Python or NumPy, not
    bools; TypeError otherwise), L ≥ 0, S, E and ``fast_memory_words`` ≥ 1 (ValueError),
    ``method`` is ``"exact"`` or ``"poly"``, ``degree`` a non-negative integer for poly only.
    ``fast_memory_words`` defaults to the current adapter's."""
    L, S, E = _check_int(L, "L", 0), _check_int(S, "S", 1), _check_int(E, "E", 1)
    method = _check_method(method, ("exact", "poly"))
    if degree is not None:
        degree = _check_int(degree, "degree", 0)
        if method != "poly":
            raise ValueError("degree= applies to method='poly' only")
    elif method == "poly":
        raise ValueError("io_lower_bound(method='poly') needs degree=")
    if fast_memory_words is None:
        fast_memory_words = device_info()["fast_memory_words"]
    fast_memory_words = _check_int(fast_memory_words, "fast_memory_words", 1)
    return _core.io_lower_bound(L, S, E, method, degree, fast_memory_words)


# After every helper it imports is defined.
from .poly_kernel import POLY_KERNELS, PolyState, poly_attention
