"""NumPy float64 twins of every GPU method: the ground truth of the tests.

Same semantics as `approx_attn.attention` (scale, upper-left causal mask, grouped-query heads).
"""

from __future__ import annotations

import math

import numpy as np


def _expand_gqa(q: np.ndarray, k: np.ndarray, v: np.ndarray, enable_gqa: bool):
    if enable_gqa and q.ndim >= 3 and k.shape[-3] != q.shape[-3]:
        group = q.shape[-3] // k.shape[-3]
        k = np.repeat(k, group, axis=-3)
        v = np.repeat(v, group, axis=-3)
    return k, v


def causal_mask(L: int, S: int) -> np.ndarray:
    """True where key j is hidden from query i (j > i), upper-left aligned as in PyTorch."""
    return np.triu(np.ones((L, S), dtype=bool), k=1)


def exact_attention(
    query: np.ndarray,
    key: np.ndarray,
    value: np.ndarray,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    enable_gqa: bool = False,
) -> np.ndarray:
    """softmax(scale * Q K^T) V in float64."""
    q = np.asarray(query, dtype=np.float64)
    k, v = _expand_gqa(q, np.asarray(key, dtype=np.float64), np.asarray(value, dtype=np.float64),
                       enable_gqa)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    s = np.matmul(q, np.swapaxes(k, -1, -2)) * scale
    if is_causal:
        s = np.where(causal_mask(s.shape[-2], s.shape[-1]), -np.inf, s)
    s = s - s.max(axis=-1, keepdims=True)
    w = np.exp(s)
    w /= w.sum(axis=-1, keepdims=True)
    return np.matmul(w, v)
