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
    "attention",
    "Report",
    "device_info",
    "list_adapters",
    "NoDeviceError",
    "DeviceError",
]

_METHODS = ("auto", "exact")
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


def device_info() -> dict[str, Any]:
    """The adapter in use: name, backend, `fast_memory_words`, limits and optional features."""
    return dict(_core.device_info())


def list_adapters() -> list[tuple[str, str, str]]:
    """Every adapter wgpu can see, as (name, backend, device type)."""
    return list(_core.list_adapters())


def _as_float_array(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point array (float16 or float32), got dtype {arr.dtype}"
        )
    if arr.ndim < 2:
        raise ValueError(
            f"{name} must have at least 2 dimensions (..., seq, dim), got shape {arr.shape}"
        )
    return arr


def _check_finite(arr: np.ndarray, name: str) -> None:
    if not np.isfinite(arr).all():
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(
            f"{name} contains {bad} NaN or Inf value(s); pass check_finite=False to skip this check"
        )


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
    """
    q = _as_float_array(query, "query")
    k = _as_float_array(key, "key")
    v = _as_float_array(value, "value")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if not (isinstance(eps, (int, float)) and 0.0 < eps < 1.0):
        raise ValueError(f"eps must be a number in (0, 1), got {eps!r}")
    if degree is not None:
        raise ValueError("degree= applies to method='poly' only")
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
    if check_finite:
        for arr, name in ((q, "query"), (k, "key"), (v, "value")):
            _check_finite(arr, name)
    if L == 0 or units == 0:
        out = np.zeros(out_shape, dtype=out_dtype)
        if return_report:
            info = device_info()
            return out, Report(
                method="exact", adapter=info["adapter"], backend=info["backend"],
                fast_memory_words=info["fast_memory_words"], io_words=0, io_reads=0,
                io_writes=0, elapsed_s=0.0, kernel_s=None, io_words_counted=None,
                dispatches=0, plan="empty",
            )
        return out

    # Contiguous float32 copies in (B, H, L, E) order; any input strides are accepted.
    qf = np.ascontiguousarray(q, dtype=np.float32).reshape(-1)
    kf = np.ascontiguousarray(k, dtype=np.float32).reshape(-1)
    vf = np.ascontiguousarray(v, dtype=np.float32).reshape(-1)
    flat, rep = _core.exact(
        qf, kf, vf, units, group, L, S, E, Ev, bool(is_causal), scale, False, _count_io()
    )
    out = flat.reshape(out_shape).astype(out_dtype, copy=False)
    if not return_report:
        return out
    return out, Report(
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
    )
