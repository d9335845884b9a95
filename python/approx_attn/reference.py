"""NumPy float64 twins of every GPU method: the ground truth of the tests.

Same semantics as `approx_attn.attention` (scale, upper-left causal mask, grouped-query heads).
"""

from __future__ import annotations

import itertools
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


def exact_attention_lse(
    query: np.ndarray,
    key: np.ndarray,
    value: np.ndarray,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    enable_gqa: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(softmax(scale * Q K^T) V, ln sum_j exp(scale q_i.k_j)) in float64: the output and each
    row's log-sum-exp over the keys it sees (twin of `approx_attn._exact_attention_lse`)."""
    q = np.asarray(query, dtype=np.float64)
    k, v = _expand_gqa(
        q, np.asarray(key, dtype=np.float64), np.asarray(value, dtype=np.float64), enable_gqa
    )
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    s = np.matmul(q, np.swapaxes(k, -1, -2)) * scale
    if is_causal:
        s = np.where(causal_mask(s.shape[-2], s.shape[-1]), -np.inf, s)
    m = s.max(axis=-1, keepdims=True)
    w = np.exp(s - m)
    total = w.sum(axis=-1, keepdims=True)
    return np.matmul(w / total, v), (m + np.log(total))[..., 0]


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
    row sum); see src/exact/coop.rs.
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
    is_causal: bool = False,
    enable_gqa: bool = False,
) -> np.ndarray:
    """The polynomial method in float64: keys centred on their mean (per batch and head), then
    O = sum_j P(scale q.(k_j - mu)) v_j / sum_j P(scale q.(k_j - mu)) with P = sum_k coeffs[k] x^k,
    the sums over the keys the causal mask leaves visible (j <= i, upper-left aligned). The mean
    is over all keys: a shift common to every key leaves the softmax over any subset unchanged.

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
    if is_causal:
        w = np.where(causal_mask(w.shape[-2], w.shape[-1]), 0.0, w)
    return np.matmul(w, v) / w.sum(axis=-1, keepdims=True)


def tensor_features(x: np.ndarray, coeffs: np.ndarray, scale: float) -> tuple[np.ndarray, ...]:
    """Feature maps with <phi_q(q), phi_k(k)> = P(scale q.k): the tensor powers x^(x)m of every
    degree m (E^m entries each), the query side weighted by coeffs[m] scale^m. Plainer than the
    GPU's monomials (no multinomial weights, E^m instead of C(E+m-1, m) entries); for small E."""
    lead = x.shape[:-1]
    powers = [np.ones((*lead, 1))]
    for _ in range(1, len(coeffs)):
        powers.append((powers[-1][..., :, None] * x[..., None, :]).reshape(*lead, -1))
    q_side = np.concatenate([c * scale**m * p for m, (c, p) in enumerate(zip(coeffs, powers))], -1)
    k_side = np.concatenate(powers, -1)
    return q_side, k_side


def causal_poly_attention_chunked(
    query: np.ndarray,
    key: np.ndarray,
    value: np.ndarray,
    coeffs: np.ndarray,
    *,
    chunk: int,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> np.ndarray:
    """The chunked causal schedule written plainly, for one (..., L, E) problem: the sequence is
    cut into chunks of `chunk` rows; query chunk c gets the prefix state of the key chunks before
    it, S'_<c = sum_{j < c chunk} phi_k(k_j) [v_j | 1], plus the masked polynomial block of key
    chunk c computed directly; the state then absorbs key chunk c. Equals `poly_attention(...,
    is_causal=True)` up to float64 rounding."""
    q = np.asarray(query, dtype=np.float64)
    k, v = _expand_gqa(
        q, np.asarray(key, dtype=np.float64), np.asarray(value, dtype=np.float64), enable_gqa
    )
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    coeffs = np.asarray(coeffs, dtype=np.float64)
    k = k - k.mean(axis=-2, keepdims=True)
    L, S = q.shape[-2], k.shape[-2]
    vv = np.concatenate([v, np.ones((*v.shape[:-1], 1))], -1)  # [V | 1]: the normaliser column
    phi_q, _ = tensor_features(q, coeffs, scale)
    _, phi_k = tensor_features(k, coeffs, scale)
    state = np.zeros((*q.shape[:-2], phi_k.shape[-1], vv.shape[-1]))
    out = np.zeros((*q.shape[:-1], vv.shape[-1]))
    for c0 in range(0, max(L, S), chunk):
        rows, keys = slice(c0, min(c0 + chunk, L)), slice(c0, min(c0 + chunk, S))
        if c0 < L:
            x = np.matmul(q[..., rows, :], np.swapaxes(k[..., keys, :], -1, -2)) * scale
            w = np.polynomial.polynomial.polyval(x, coeffs)
            # Inside the chunk, row c0 + a sees keys c0 + b with b <= a.
            w = np.where(causal_mask(w.shape[-2], w.shape[-1]), 0.0, w)
            out[..., rows, :] = np.matmul(phi_q[..., rows, :], state) + np.matmul(
                w, vv[..., keys, :]
            )
        if c0 < S:
            state += np.matmul(np.swapaxes(phi_k[..., keys, :], -1, -2), vv[..., keys, :])
    return out[..., :-1] / out[..., -1:]


def f16_round(x: np.ndarray) -> np.ndarray:
    """x rounded to float32, then to float16 (round to nearest even), back in float64."""
    return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float64)


def key_power_of_two(key: np.ndarray) -> float:
    """P2 of the tensor-core diagonal kernel: the least power of two at or above the largest
    centred key norm max_j |k_j - mean(k)| over every batch and head (1 where that is 0)."""
    k = np.asarray(key, dtype=np.float64)
    kn = float(np.linalg.norm(k - k.mean(axis=-2, keepdims=True), axis=-1).max())
    if not (kn > 0.0 and math.isfinite(kn)):
        return 1.0
    p2 = 2.0 ** math.ceil(math.log2(kn))
    while p2 < kn:
        p2 *= 2.0
    while p2 / 2.0 >= kn:
        p2 /= 2.0
    return p2


def causal_diag_coop_operands(
    query: np.ndarray,
    key: np.ndarray,
    value: np.ndarray,
    *,
    scale: float,
    enable_gqa: bool = False,
) -> dict[str, np.ndarray | float]:
    """The f16 operands of the tensor-core diagonal kernel (src/poly/causal_coop.rs), formed as
    it forms them in float32 from the float32 inputs: Q' = f16(q * (scale P2)), K' =
    f16((k - mu) / P2) (mu the key mean, here rounded from float64 to float32: the GPU's own
    float32 mean may differ in its last bits), V' = f16((v - vmin) / vrange) per batch, head and
    value column (vrange = 1 for a constant column). K' and V' are expanded to the query heads.
    Returns q, k, v (float64 holding f16 values), vmin, vrange (expanded), p2 and, for tests, the
    centred keys kc = (k - mu) / P2 in float64."""
    q32 = np.asarray(query, dtype=np.float32)
    k32 = np.asarray(key, dtype=np.float32)
    v32 = np.asarray(value, dtype=np.float32)
    p2 = key_power_of_two(k32)
    a = np.float32(np.float32(scale) * np.float32(p2))  # exact: P2 is a power of two
    qp = f16_round(q32 * a)
    mu64 = k32.astype(np.float64).mean(axis=-2, keepdims=True)
    kc32 = (k32 - mu64.astype(np.float32)) * np.float32(1.0 / p2)
    kp = f16_round(kc32)
    vmin = v32.min(axis=-2, keepdims=True)
    vmax = v32.max(axis=-2, keepdims=True)
    rng = np.where(vmax > vmin, (vmax.astype(np.float64) - vmin).astype(np.float32), 1.0)
    rng = rng.astype(np.float32)
    inv = np.float32(1.0) / rng
    vp = f16_round((v32 - vmin) * inv)
    kc = (k32.astype(np.float64) - mu64) / p2
    kp, vp = _expand_gqa(qp, kp, vp, enable_gqa)
    kc, _ = _expand_gqa(qp, kc, kc, enable_gqa)
    vmin_e, rng_e = _expand_gqa(qp, vmin, rng, enable_gqa)
    return {
        "q": qp,
        "k": kp,
        "v": vp,
        "vmin": vmin_e.astype(np.float64),
        "vrange": rng_e.astype(np.float64),
        "p2": p2,
        "kc": kc,
    }


def causal_poly_attention_f16_diag(
    query: np.ndarray,
    key: np.ndarray,
    value: np.ndarray,
    coeffs: np.ndarray,
    *,
    chunk: int,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> np.ndarray:
    """Twin of causal poly with its diagonal blocks on tensor cores: the chunked schedule of
    `causal_poly_attention_chunked` (prefix states in float64), the masked block of each chunk
    from the kernel's f16 operands (`causal_diag_coop_operands`): X = Q' K'^T (exact sums of the
    exact f16 products), W = f16(P(X)) masked, num = vmin D + vrange (W V'), D = sum W.

    What is left between this and the kernel: the float32 sums of the tensor cores (the E
    products of a score, the keys of W V' and of D), float32 Horner with float32 coefficients,
    the last bits of the key mean (both only where they move an f16 rounding), float32 in the
    prefix states and the store."""
    q = np.asarray(query, dtype=np.float64)
    k, v = _expand_gqa(
        q, np.asarray(key, dtype=np.float64), np.asarray(value, dtype=np.float64), enable_gqa
    )
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    coeffs = np.asarray(coeffs, dtype=np.float64)
    ops = causal_diag_coop_operands(query, key, value, scale=scale, enable_gqa=enable_gqa)
    k = k - k.mean(axis=-2, keepdims=True)
    L, S = q.shape[-2], k.shape[-2]
    vv = np.concatenate([v, np.ones((*v.shape[:-1], 1))], -1)
    phi_q, _ = tensor_features(q, coeffs, scale)
    _, phi_k = tensor_features(k, coeffs, scale)
    state = np.zeros((*q.shape[:-2], phi_k.shape[-1], vv.shape[-1]))
    out = np.zeros((*q.shape[:-1], vv.shape[-1]))
    for c0 in range(0, max(L, S), chunk):
        rows, keys = slice(c0, min(c0 + chunk, L)), slice(c0, min(c0 + chunk, S))
        if c0 < L:
            x = np.matmul(ops["q"][..., rows, :], np.swapaxes(ops["k"][..., keys, :], -1, -2))
            w = f16_round(np.polynomial.polynomial.polyval(x, coeffs))
            w = np.where(causal_mask(w.shape[-2], w.shape[-1]), 0.0, w)
            d = w.sum(axis=-1, keepdims=True)
            num = ops["vmin"] * d + ops["vrange"] * np.matmul(w, ops["v"][..., keys, :])
            out[..., rows, :] = np.matmul(phi_q[..., rows, :], state) + np.concatenate([num, d], -1)
        if c0 < S:
            state += np.matmul(np.swapaxes(phi_k[..., keys, :], -1, -2), vv[..., keys, :])
    return out[..., :-1] / out[..., -1:]


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


def _gate_cumsum(log_gates: np.ndarray | None, shape: tuple[int, ...], group: int) -> np.ndarray:
    """G = cumulative sum of log_gates along the sequence, expanded to the query heads (shape
    (..., S)); zeros without gates."""
    if log_gates is None:
        return np.zeros(shape)
    g = np.cumsum(np.asarray(log_gates, dtype=np.float64), axis=-1)
    if group > 1:
        g = np.repeat(g, group, axis=-2)
    return g


def polynomial_kernel_attention(
    query: np.ndarray,
    key: np.ndarray,
    value: np.ndarray,
    coeffs: np.ndarray,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    normalize: bool = True,
    log_gates: np.ndarray | None = None,
    enable_gqa: bool = False,
) -> np.ndarray:
    """Polynomial attention as a model primitive, parallel form in float64: the weight of key j
    for query i is w_ij = P(scale q_i.k_j) exp(G_i - G_j) with P = sum_m coeffs[m] x^m and G the
    cumulative sum of log_gates (shape (..., S) over key/value heads; L = S where gates are given:
    G_i is the gate sum at query i's own position). No key centring. The output row is
    sum_j w_ij v_j / sum_j w_ij with `normalize`, else sum_j w_ij v_j; causal mask as in
    `exact_attention`. exp(G_i - G_j) is formed from the difference, as a model would mean it."""
    q = np.asarray(query, dtype=np.float64)
    group = q.shape[-3] // np.shape(key)[-3] if enable_gqa and q.ndim >= 3 else 1
    k, v = _expand_gqa(
        q, np.asarray(key, dtype=np.float64), np.asarray(value, dtype=np.float64), enable_gqa
    )
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    x = np.matmul(q, np.swapaxes(k, -1, -2)) * scale
    w = np.polynomial.polynomial.polyval(x, np.asarray(coeffs, dtype=np.float64))
    if log_gates is not None:
        g = _gate_cumsum(log_gates, (), group)
        w = w * np.exp(g[..., :, None] - g[..., None, :])
    if is_causal:
        w = np.where(causal_mask(w.shape[-2], w.shape[-1]), 0.0, w)
    out = np.matmul(w, v)
    return out / w.sum(axis=-1, keepdims=True) if normalize else out


def polynomial_state_init(
    batch_shape: tuple[int, ...], e: int, ev: int, coeffs: np.ndarray
) -> np.ndarray:
    """An empty recurrent state of `polynomial_kernel_attention_chunked`: per (..., kv head), the
    tensor-feature state sum_j exp(G_t - G_j) phi_k(k_j) [v_j | 1] (see `tensor_features`)."""
    r = sum(e**m for m in range(len(coeffs)))
    return np.zeros((*batch_shape, r, ev + 1))


def polynomial_kernel_attention_chunked(
    query: np.ndarray,
    key: np.ndarray,
    value: np.ndarray,
    coeffs: np.ndarray,
    *,
    chunk: int,
    scale: float | None = None,
    normalize: bool = True,
    log_gates: np.ndarray | None = None,
    state: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Causal polynomial attention, chunked and recurrent, in float64, with L = S and kv heads
    equal to query heads (expand GQA first). Every gate factor is taken relative to a chunk
    boundary, so no exponent exceeds one chunk's decay: the state after position t is
    S(t) = sum_{j <= t} exp(G_t - G_j) phi_k(k_j) [v_j | 1]; query i in the chunk starting after
    position s gets exp(G_i - G_s) phi_q(q_i) S(s) plus the masked direct block with weights
    P(scale q_i.k_j) exp(G_i - G_j); then S(e) = exp(G_e - G_s) S(s) + the chunk's keys with
    weights exp(G_e - G_j). `state` continues an earlier call (its S(s) at the call's start;
    earlier tokens are not visible otherwise). With chunk = 1 this is token-by-token decoding.
    Returns (output, final state)."""
    q = np.asarray(query, dtype=np.float64)
    k = np.asarray(key, dtype=np.float64)
    v = np.asarray(value, dtype=np.float64)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    coeffs = np.asarray(coeffs, dtype=np.float64)
    n = q.shape[-2]
    lg = (
        np.zeros(q.shape[:-1])
        if log_gates is None
        else np.asarray(log_gates, dtype=np.float64) * np.ones(q.shape[:-1])
    )
    vv = np.concatenate([v, np.ones((*v.shape[:-1], 1))], -1)
    phi_q, _ = tensor_features(q, coeffs, scale)
    _, phi_k = tensor_features(k, coeffs, scale)
    if state is None:
        state = polynomial_state_init(q.shape[:-2], q.shape[-1], v.shape[-1], coeffs)
    state = np.array(state, dtype=np.float64)
    out = np.zeros((*q.shape[:-1], vv.shape[-1]))
    for c0 in range(0, n, chunk):
        rows = slice(c0, min(c0 + chunk, n))
        g = np.cumsum(lg[..., rows], axis=-1)  # G_i - G_s for the chunk's positions
        x = np.matmul(q[..., rows, :], np.swapaxes(k[..., rows, :], -1, -2)) * scale
        w = np.polynomial.polynomial.polyval(x, coeffs) * np.exp(g[..., :, None] - g[..., None, :])
        w = np.where(causal_mask(w.shape[-2], w.shape[-1]), 0.0, w)
        inter = np.exp(g)[..., None] * np.matmul(phi_q[..., rows, :], state)
        out[..., rows, :] = inter + np.matmul(w, vv[..., rows, :])
        decay_to_end = np.exp(g[..., -1:] - g)  # exp(G_e - G_j)
        state = np.exp(g[..., -1])[..., None, None] * state + np.matmul(
            np.swapaxes(phi_k[..., rows, :] * decay_to_end[..., None], -1, -2), vv[..., rows, :]
        )
    o = out[..., :-1] / out[..., -1:] if normalize else out[..., :-1]
    return o, state


def monomial_features(x: np.ndarray, coeffs: np.ndarray, scale: float) -> tuple[np.ndarray, ...]:
    """The GPU's feature maps, the rows of a `PolyState` in their order: for each degree m whose
    coefficient is not zero, in increasing m, the monomials of degree m as sorted index tuples in
    lexicographic order (graded lexicographic); the key side x^alpha, the query side
    coeffs[m] scale^m (m choose alpha) x^alpha, so <phi_q(q), phi_k(k)> = P(scale q.k)."""
    x = np.asarray(x, dtype=np.float64)
    q_side, k_side = [], []
    for m, c in enumerate(np.asarray(coeffs, dtype=np.float64)):
        if c == 0:
            continue
        for alpha in itertools.combinations_with_replacement(range(x.shape[-1]), m):
            mono = np.prod(x[..., list(alpha)], axis=-1)
            counts = [alpha.count(i) for i in set(alpha)]
            mult = math.factorial(m) // math.prod(math.factorial(a) for a in counts)
            k_side.append(mono)
            q_side.append(c * scale**m * mult * mono)
    return np.stack(q_side, -1), np.stack(k_side, -1)


def polynomial_state_step(
    state: np.ndarray,
    query: np.ndarray,
    key: np.ndarray,
    value: np.ndarray,
    coeffs: np.ndarray,
    *,
    scale: float,
    normalize: bool = True,
    log_gate: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One token of decoding in float64 on the GPU's state layout (`PolyState.array`: per kv
    head, sum_j exp(G_t - G_j) phi_k(k_j) [v_j | 1] over `monomial_features`): state
    (..., kv heads, r, Ev + 1), query (..., heads, E) with heads a multiple of kv heads (GQA:
    consecutive query heads share a kv head), key (..., kv heads, E), value (..., kv heads, Ev),
    log_gate (..., kv heads) or None. The state first decays by exp(log_gate) and takes the token,
    which then attends to itself and everything before. Returns (output (..., heads, Ev), state)."""
    state = np.asarray(state, dtype=np.float64)
    k = np.asarray(key, dtype=np.float64)
    v = np.asarray(value, dtype=np.float64)
    vv = np.concatenate([v, np.ones((*v.shape[:-1], 1))], -1)
    _, phi_k = monomial_features(k, coeffs, scale)
    if log_gate is not None:
        state = np.exp(np.asarray(log_gate, dtype=np.float64))[..., None, None] * state
    state = state + phi_k[..., :, None] * vv[..., None, :]
    phi_q, _ = monomial_features(query, coeffs, scale)
    group = phi_q.shape[-2] // state.shape[-3]
    num = np.einsum("...hf,...hfc->...hc", phi_q, np.repeat(state, group, axis=-3))
    out = num[..., :-1] / num[..., -1:] if normalize else num[..., :-1]
    return out, state
