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
    k, v = _expand_gqa(
        q, np.asarray(key, dtype=np.float64), np.asarray(value, dtype=np.float64), enable_gqa
    )
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    s = np.matmul(q, np.swapaxes(k, -1, -2)) * scale
    if is_causal:
        s = np.where(causal_mask(s.shape[-2], s.shape[-1]), -np.inf, s)
    s = s - s.max(axis=-1, keepdims=True)
    w = np.exp(s)
    w /= w.sum(axis=-1, keepdims=True)
    return np.matmul(w, v)


def exact_attention_f16_operands(
    query: np.ndarray,
    key: np.ndarray,
    value: np.ndarray,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    enable_gqa: bool = False,
) -> np.ndarray:
    """Twin of exact attention on tensor cores: its operands rounded to float16 as the kernel
    rounds them (q * scale * log2(e) in float32, then k and v), everything else in float64.

    What is left between this and the kernel: the rounding of each probability to float16
    (relative 2^-11, absolute 2^-25 below 2^-14, the row's largest being at least 2^11), the
    exp2 of the GPU, and float32 sums (the E products of a score, the S terms of P V and of the
    row sum); see src/kernels/exact_coop.rs.
    """
    q32 = np.asarray(query, dtype=np.float32)
    if scale is None:
        scale = 1.0 / math.sqrt(q32.shape[-1])
    c = np.float32(np.float32(scale) * np.float32(1.0 / math.log(2.0)))

    def f16(x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float64)

    q = f16(q32 * c)
    k, v = _expand_gqa(q, f16(key), f16(value), enable_gqa)
    s = np.matmul(q, np.swapaxes(k, -1, -2))  # log2 units
    if is_causal:
        s = np.where(causal_mask(s.shape[-2], s.shape[-1]), -np.inf, s)
    s = s - s.max(axis=-1, keepdims=True)
    w = np.exp2(s)
    w /= w.sum(axis=-1, keepdims=True)
    return np.matmul(w, v)


def poly_attention(
    query: np.ndarray,
    key: np.ndarray,
    value: np.ndarray,
    coeffs: np.ndarray,
    *,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> np.ndarray:
    """The polynomial method in float64: keys centred on their mean (per batch and head), then
    O = sum_j P(scale q.(k_j - mu)) v_j / sum_j P(scale q.(k_j - mu)) with P = sum_k coeffs[k] x^k.

    Twin of the GPU's poly kernels (same P, same centring); the features are not materialized
    because <phi_q(q), phi_k(k)> = P(scale q.k) exactly.
    """
    q = np.asarray(query, dtype=np.float64)
    k, v = _expand_gqa(
        q, np.asarray(key, dtype=np.float64), np.asarray(value, dtype=np.float64), enable_gqa
    )
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    k = k - k.mean(axis=-2, keepdims=True)
    x = np.matmul(q, np.swapaxes(k, -1, -2)) * scale
    w = np.polynomial.polynomial.polyval(x, np.asarray(coeffs, dtype=np.float64))
    return np.matmul(w, v) / w.sum(axis=-1, keepdims=True)


def beta(query: np.ndarray, key: np.ndarray, *, scale: float | None = None) -> float:
    """scale * max_i |q_i| * max_j |k_j - mean(k)|, the largest over batches and heads."""
    q = np.asarray(query, dtype=np.float64)
    k = np.asarray(key, dtype=np.float64)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    qn = np.linalg.norm(q, axis=-1).max(axis=-1)
    kn = np.linalg.norm(k - k.mean(axis=-2, keepdims=True), axis=-1).max(axis=-1)
    if qn.shape != kn.shape:  # grouped-query heads: every query head of a group sees its KV head
        group = qn.shape[-1] // kn.shape[-1]
        kn = np.repeat(kn, group, axis=-1)
    return float(abs(scale) * np.max(qn * kn))
