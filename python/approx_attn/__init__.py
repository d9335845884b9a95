"""approx_attn: I/O-aware exact and certified polynomial attention on any GPU wgpu reaches.

`attention` mirrors `torch.nn.functional.scaled_dot_product_attention` on NumPy arrays.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import numpy as np

from . import _core
from ._core import DeviceError, NoDeviceError

__all__ = [
    "DeviceError",
    "NoDeviceError",
    "Report",
    "attention",
    "device_info",
    "empty_cache",
    "io_cost",
    "io_lower_bound",
    "list_adapters",
]

_METHODS = ("auto", "exact", "poly")
_FLOAT_DTYPES = (np.float16, np.float32, np.float64)


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
    """Certified bound on max |O - O*| over all output entries (poly only)."""
    error_bound_per_column: tuple[float, ...] | None = None
    """Certified bound on max |O - O*| per output column: (poly_eps/(1-poly_eps) + f16_rounding)
    * value range."""
    f16_rounding: float | None = None
    """Bound on the tensor-core passes' f16 rounding relative to the value range (None: f32 path)."""
    schedule: str | None = None
    pass_s: tuple[tuple[str, float], ...] = ()
    """GPU seconds per pass (timestamps, where the adapter has them)."""
    gpu_allocated_bytes: int | None = None
    """Peak bytes wgpu's allocator held for the device, sampled after each dispatch of the call
    (inputs, outputs, intermediates; None where the backend does not report it)."""


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
    """
    return int(_core.empty_cache())


def _as_float_array(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype not in _FLOAT_DTYPES:
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
    if x.dtype == np.float64:
        return np.abs(x) <= _F32_MAX  # False for NaN too
    return np.isfinite(x)


def _check_finite(arr: np.ndarray, name: str) -> None:
    flat = arr.ravel(order="K")  # a view when the elements are one block in memory
    if np.shares_memory(flat, arr):
        finite = all(
            _finite_in_float32(flat[i : i + _FINITE_CHECK_SLICE]).all()
            for i in range(0, flat.size, _FINITE_CHECK_SLICE)
        )
    else:  # strided input: ravel copied it; check the original in one go
        finite = bool(_finite_in_float32(arr).all())
    if not finite:
        bad = int(arr.size - np.count_nonzero(_finite_in_float32(arr)))
        beyond = " (or beyond float32's range)" if arr.dtype == np.float64 else ""
        raise ValueError(
            f"{name} contains {bad} NaN or Inf value(s){beyond}; pass check_finite=False to "
            "skip this check"
        )


def _trusted() -> bool:
    # Benchmarks only: compile shaders without wgpu's runtime bounds checks (tests keep them on).
    return os.environ.get("APPROX_ATTN_TRUSTED_SHADERS", "") not in ("", "0")


def _count_io() -> bool:
    return os.environ.get("APPROX_ATTN_COUNT_IO", "") not in ("", "0")


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
    return_report: bool = False,
) -> np.ndarray | tuple[np.ndarray, Report]:
    """softmax(scale * query @ key^T) @ value, computed on the GPU.

    Shapes: query (..., L, E), key (..., S, E), value (..., S, Ev) -> output (..., L, Ev). Leading
    dimensions must match, except that with ``enable_gqa`` the head dimension (the one before L)
    of key/value may divide that of query. float16, float32 or float64 in, any strides; the GPU
    computes in float32 (float64 inputs are rounded to float32) and the output has the query's
    dtype.
    ``is_causal`` masks key j for query i when j > i (upper-left aligned, as in PyTorch).
    ``method``: "exact" or "auto".
    ``tensor_cores`` (poly and auto): run both poly passes on cooperative matrices (f16
    operands, f32 accumulation); the certificate then adds their f16 rounding bound
    (``Report.f16_rounding``) and the degree is chosen for what is left of eps. ``None`` (default)
    uses them where the adapter has them and that bound is at most eps/2; ``True`` requires them
    (NotImplementedError where the adapter has none); ``False`` keeps the portable f32 path.
    """
    q = _as_float_array(query, "query")
    k = _as_float_array(key, "key")
    v = _as_float_array(value, "value")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if not (isinstance(eps, (int, float)) and 0.0 < eps < 1.0):
        raise ValueError(f"eps must be a number in (0, 1), got {eps!r}")
    if degree is not None:
        if method != "poly":
            raise ValueError("degree= applies to method='poly' only")
        if not isinstance(degree, (int, np.integer)) or isinstance(degree, bool) or degree < 0:
            raise ValueError(f"degree must be a non-negative integer, got {degree!r}")
    if tensor_cores not in (None, True, False):
        raise ValueError(f"tensor_cores must be None, True or False, got {tensor_cores!r}")
    if tensor_cores is not None and method == "exact":
        raise ValueError("tensor_cores= applies to method='poly' and 'auto' only")
    if method != "exact" and is_causal and tensor_cores is True:
        raise NotImplementedError(
            "tensor_cores=True is not implemented for causal poly yet; use tensor_cores=None or "
            "False (the f32 path)"
        )
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
        raise ValueError(f"key and value must have at least one row (S >= 1), got key {k.shape}")
    if E == 0 or Ev == 0:
        raise ValueError(
            f"head dimensions must be at least 1, got query {q.shape} and value {v.shape}"
        )
    if scale is None:
        scale = 1.0 / math.sqrt(E)
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    out_dtype = q.dtype
    out_shape = lead_q + (L, Ev)
    units = int(np.prod(lead_kv, dtype=np.int64)) if lead_kv else 1
    # poly and auto (causal or not) run a GPU pre-pass over all three inputs that counts
    # their NaN and Inf values (after the float32 conversion): no second pass over them here
    # (on an H100 this one took about a quarter of a call's time at n = 262,144).
    gpu_checks_finite = method != "exact" and L > 0 and units > 0
    if check_finite and not gpu_checks_finite:
        for arr, name in ((q, "query"), (k, "key"), (v, "value")):
            _check_finite(arr, name)
    if L == 0 or units == 0:
        out = np.zeros(out_shape, dtype=out_dtype)
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

    # Contiguous float32 copies in (B, H, L, E) order; any input strides are accepted.
    # float64 values beyond float32's range become Inf here; the finiteness checks report them.
    with np.errstate(over="ignore"):
        qf = np.ascontiguousarray(q, dtype=np.float32).reshape(-1)
        kf = np.ascontiguousarray(k, dtype=np.float32).reshape(-1)
        vf = np.ascontiguousarray(v, dtype=np.float32).reshape(-1)
    flat, rep = _core.attention(
        qf,
        kf,
        vf,
        units,
        group,
        L,
        S,
        E,
        Ev,
        bool(is_causal),
        scale,
        method,
        float(eps),
        None if degree is None else int(degree),
        bool(check_finite),
        _trusted(),
        _count_io(),
        tensor_cores,
    )
    out = flat.reshape(out_shape).astype(out_dtype, copy=False)
    if not return_report:
        return out
    return out, _report(rep)


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
        f16_rounding=rep.get("f16_rounding"),
        schedule=rep.get("schedule"),
        pass_s=tuple((str(n), float(t)) for n, t in rep.get("pass_s", [])),
        gpu_allocated_bytes=rep.get("gpu_allocated_bytes"),
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
) -> dict[str, Any]:
    """Words the plan that would run moves between storage buffers and workgroup memory.

    Returns ``{"method", "schedule", "degree", "rank", "fast_memory_words", "passes": [(name,
    reads, writes), ...], "reads", "writes", "total"}``. ``fast_memory_words`` defaults to the
    current adapter's (and its binding limits); any value may be given to study other GPUs (then
    the model is one dispatch). For ``method="poly"`` give ``degree``, or ``eps`` and ``beta``.
    ``heads`` counts query heads; ``kv_heads`` (default: ``heads``) the key/value heads they
    share, as with ``enable_gqa``.
    """
    kv_heads = heads if kv_heads is None else kv_heads
    for name, val in (("L", L), ("S", S), ("E", E), ("heads", heads), ("kv_heads", kv_heads)):
        if not isinstance(val, (int, np.integer)) or val < (0 if name == "L" else 1):
            raise ValueError(f"{name} must be a positive integer, got {val!r}")
    Ev = E if Ev is None else Ev
    if heads % kv_heads != 0:
        raise ValueError(f"kv_heads={kv_heads} must divide heads={heads}")
    if method not in ("exact", "poly"):
        raise ValueError(f"method must be 'exact' or 'poly', got {method!r}")
    if fast_memory_words is not None and fast_memory_words < 1:
        raise ValueError(f"fast_memory_words must be positive, got {fast_memory_words}")
    return dict(
        _core.io_cost(
            int(kv_heads),
            int(heads // kv_heads),
            int(L),
            int(S),
            int(E),
            int(Ev),
            bool(is_causal),
            method,
            degree,
            eps,
            beta,
            fast_memory_words,
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
    """Reconstructed I/O lower bound in words (see README): for ``poly`` with rank
    r = C(E+degree, degree), Ω(n·d + min(n·r·d²/M, n·r·d/√M)) with the segment-argument
    constants; for ``exact``, Ω(min(n²d²/M, n²d/√M)) (Saha & Ye 2024)."""
    if fast_memory_words is None:
        fast_memory_words = device_info()["fast_memory_words"]
    m = float(fast_memory_words)
    if method == "exact":
        return _core.io_closed_form(L, S, E, 1.0, m)[5]
    if degree is None:
        raise ValueError("io_lower_bound(method='poly') needs degree=")
    r = float(_core.num_features(E, degree))
    return _core.io_closed_form(L, S, E, r, m)[4]
