"""Causal poly with its diagonal blocks on cooperative matrices (``is_causal=True,
tensor_cores=True``): against the float64 twin of the tensor-core schedule
(`reference.causal_poly_attention_f16_diag`, f16 operands modelled) and against exact attention
within the certificate, whose f16 term the report adds (src/poly/causal_coop.rs derives it). The
kernels run where the adapter has cooperative matrices (device_info()["coop_f16"]); elsewhere
only the dispatch rules and the twin itself are checked.

Tolerance against the twin, elementwise, on top of the f32 path's (`causal_tolerance` of
tests/test_causal_poly.py, which covers the prefix states, the passes and the block's f32
arithmetic): the twin forms Q' and V' exactly as the kernel does (the same float32 operations
on the same float32 numbers), but K' from its own key mean, and P in float64. With u32 = 2^-24,
for row i and key j of its chunk (j <= i), y_ij = sum_l |q'_il| |k'_jl|:
- K': the GPU's float32 mean differs from the twin's by at most dmu = (LAMBDA sqrt(S) + 2) u32
  max|k| (probabilistic sum, and its rounding), so k'_jl before its f16 rounding lies within
  delta = (dmu + u32 (|k_jl - mu_l| + dmu)) / P2 of the twin's centred key t_jl; both round into
  [f16(t - delta), f16(t + delta)]: dk_jl = f16(t + delta) - f16(t - delta) (zero unless a
  rounding boundary is that close).
- The score: dS_ij = 2 E u32 y_ij (f32 sums of the tensor cores, truncating adders) +
  sum_l |q'_il| dk_jl.
- P before its f16 rounding: dP_ij = Pabs'(y + dS) dS + (2G + 1) u32 Pabs(y + dS) (float32
  coefficients and Horner); after it the two weights differ by at most
  dW_ij = f16(P + dP) - f16(P - dP) (again zero unless a rounding boundary is that close).
- Output: sum_j dW_ij range_c / D_i (D_i the twin's normaliser), plus the f32 sums over the
  block's n_i keys of W V' and of D (each within 2 n_i u32 sum_j W_ij: truncating adders), which
  enter through num = vmin D + vrange num' (its rounding: 3 u32) and through O D:
  (4 n_i + 4) u32 (|vmin_c| + range_c) sum_j W_ij / D_i.
Every case checks that the twin on f16 operands lands more than 10 tol away from the f32 path's
twin somewhere (the tolerance sees the f16 rounding).

Certificate: |O - O*| <= error_bound_per_column + causal_tolerance + the f32 sums above +
8 u32 (1 + beta) range(V), with approximation_bound_per_column = (poly_eps/(1 - poly_eps) +
f16_rounding) range_c and error_bound_per_column that plus the float32 rounding part.
"""

from __future__ import annotations

import math
from typing import Any

import approx_attn
import numpy as np
import pytest
from _helpers import assert_close, count_io_with_fast_memory
from approx_attn import _core, reference
from test_causal_poly import (
    LAMBDA,
    causal_tolerance,
    column_ranges,
    f32_scale,
    plan_of,
    random_problem,
    value_range,
)

INFO = approx_attn.device_info()
COOP = bool(INFO["coop_f16"])
U = 2.0**-11
ETA = 2.0**-25
U32 = 2.0**-24

needs_coop = pytest.mark.skipif(
    not COOP,
    reason=f"{INFO['adapter']} has no 16x16 f16 cooperative matrices (device_info()['coop_f16'])",
)


def f16(x: np.ndarray) -> np.ndarray:
    return reference.f16_round(x)


def block_mask(L: int, S: int, chunk: int) -> np.ndarray:
    """True where key j is in query i's chunk and visible (j <= i): the diagonal blocks."""
    i = np.arange(L)[:, None]
    j = np.arange(S)[None, :]
    return (j <= i) & (i // chunk == j // chunk)


def coop_parts(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    coeffs: Any,
    *,
    scale: float,
    chunk: int,
    enable_gqa: bool,
) -> dict[str, np.ndarray]:
    """The twin's block weights W, its normaliser D, and the flip allowance dW (docstring)."""
    ops = reference.causal_diag_coop_operands(q, k, v, scale=scale, enable_gqa=enable_gqa)
    c = np.asarray(coeffs, dtype=np.float64)
    g = len(c) - 1
    L, S, E = q.shape[-2], k.shape[-2], q.shape[-1]
    blk = block_mask(L, S, chunk)
    qp, kp, kc, p2 = ops["q"], ops["k"], ops["kc"], float(ops["p2"])
    k64 = np.asarray(k, dtype=np.float64)
    dmu = (LAMBDA * math.sqrt(S) + 2.0) * U32 * float(np.abs(k64).max())
    delta = (dmu + U32 * (np.abs(kc) * p2 + dmu)) / p2
    dk = f16(kc + delta) - f16(kc - delta)
    x = np.matmul(qp, np.swapaxes(kp, -1, -2))
    y = np.matmul(np.abs(qp), np.swapaxes(np.abs(kp), -1, -2))
    ds = 2 * E * U32 * y + np.matmul(np.abs(qp), np.swapaxes(dk, -1, -2))
    abs_c = np.abs(c)
    d_abs_c = np.arange(1, g + 1) * abs_c[1:] if g > 0 else np.zeros(1)
    top = y + ds
    dp = np.polynomial.polynomial.polyval(top, d_abs_c) * ds + (2 * g + 1) * U32 * (
        np.polynomial.polynomial.polyval(top, abs_c)
    )
    p = np.polynomial.polynomial.polyval(x, c)
    w = np.where(blk, f16(p), 0.0)
    dw = np.where(blk, f16(p + dp) - f16(p - dp), 0.0)
    # The twin's normaliser: the prefix keys' P in float64, the block's W.
    q64 = np.asarray(q, dtype=np.float64)
    kk = reference._expand_gqa(q64, k64, k64, enable_gqa)[0]
    xc = scale * np.matmul(q64, np.swapaxes(kk - kk.mean(axis=-2, keepdims=True), -1, -2))
    prefix = (~reference.causal_mask(L, S)) & ~blk
    d = (np.where(prefix, np.polynomial.polynomial.polyval(xc, c), 0.0) + w).sum(-1, keepdims=True)
    return {"w": w, "dw": dw, "d": d, "n": blk.sum(-1)[:, None], **ops}


def coop_tolerances(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    coeffs: Any,
    *,
    scale: float,
    chunk: int,
    rank: int,
    enable_gqa: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """(tolerance against the twin, the f32 part of the tolerance against exact)."""
    parts = coop_parts(q, k, v, coeffs, scale=scale, chunk=chunk, enable_gqa=enable_gqa)
    base = causal_tolerance(q, k, v, coeffs, scale=scale, rank=rank)
    wsum = parts["w"].sum(-1, keepdims=True) / parts["d"]
    sums = (4 * parts["n"] + 4) * U32 * (np.abs(parts["vmin"]) + parts["vrange"]) * wsum
    flips = parts["vrange"] * parts["dw"].sum(-1, keepdims=True) / parts["d"]
    return base + sums + flips, base + sums


def coop_causal_poly(q: np.ndarray, k: np.ndarray, v: np.ndarray, **kw: Any) -> tuple[Any, Any]:
    kw.setdefault("method", "poly")
    out, rep = approx_attn.attention(
        q, k, v, is_causal=True, tensor_cores=True, return_report=True, **kw
    )
    assert out.dtype == q.dtype and out.shape == q.shape[:-1] + (v.shape[-1],)
    assert rep.method == "poly" and rep.tensor_cores, rep.reason
    assert rep.f16_rounding is not None and rep.f16_rounding > 0, rep
    assert "diag_coop: Some" in rep.plan, rep.plan
    return out, rep


def away_from_a_power_of_two(k: np.ndarray) -> None:
    # The twin's P2 equals the GPU's unless the key norm is within float32 noise of a power of two.
    p2 = reference.key_power_of_two(k)
    k64 = np.asarray(k, dtype=np.float64)
    kn = float(np.linalg.norm(k64 - k64.mean(axis=-2, keepdims=True), axis=-1).max())
    assert 0.5 * (1 + 1e-4) < kn / p2 < 1 - 1e-4, (kn, p2)


def check_coop(
    out: np.ndarray,
    rep: Any,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    scale: float,
    enable_gqa: bool,
    what: str,
) -> None:
    """GPU vs the twin, the certificate vs exact, and the tolerance's teeth."""
    away_from_a_power_of_two(k)
    _, coeffs, _ = _core.fit_polynomial(rep.beta, degree=rep.degree)
    chunk, _, _ = plan_of(rep)
    tol, f32_tol = coop_tolerances(
        q, k, v, coeffs, scale=scale, chunk=chunk, rank=rep.rank, enable_gqa=enable_gqa
    )
    twin = reference.causal_poly_attention_f16_diag(
        q, k, v, coeffs, chunk=chunk, scale=scale, enable_gqa=enable_gqa
    )
    assert_close(out, twin, tol, f"{what} vs the f16 twin")
    ranges = column_ranges(v)
    bound = np.asarray(rep.error_bound_per_column, dtype=np.float64)
    approx = np.asarray(rep.approximation_bound_per_column, dtype=np.float64)
    factor = rep.poly_eps / (1.0 - rep.poly_eps) + rep.f16_rounding
    np.testing.assert_allclose(approx, factor * ranges, rtol=1e-12, atol=0.0, err_msg=what)
    # The float32 rounding part comes on top of the approximation part.
    assert (bound > approx).all(), what
    ref = reference.exact_attention(q, k, v, scale=scale, is_causal=True, enable_gqa=enable_gqa)
    slack = 8.0 * U32 * (1.0 + rep.beta) * value_range(v)
    assert_close(out, ref, bound + f32_tol + slack, f"{what}: certificate")
    if q.shape[-2] > 1:
        f32_twin = reference.causal_poly_attention_chunked(
            q, k, v, coeffs, chunk=chunk, scale=scale, enable_gqa=enable_gqa
        )
        assert (np.abs(twin - f32_twin) / tol).max() > 10, what


# (id, lead_q, lead_kv, L, S, E, Ev, forced chunk, forced window)
SHAPES = [
    ("L>S", (), (), 300, 200, 16, 8, 16, None),
    ("L<S-odd-dims", (), (), 200, 333, 20, 9, 16, None),
    ("one-row", (), (), 1, 50, 16, 8, 16, None),
    ("one-chunk", (), (), 13, 13, 7, 5, 16, None),
    ("gqa", (2, 4), (2, 2), 90, 130, 33, 17, 16, None),
    ("windows", (3,), (3,), 300, 250, 16, 8, 16, 2),
    ("windows-past-keys", (), (), 500, 100, 8, 5, 16, 2),
    ("e64-gqa", (1, 4), (1, 2), 257, 255, 64, 64, 64, None),
    ("default-chunk", (2,), (2,), 1500, 1300, 64, 64, None, None),
]


@needs_coop
@pytest.mark.parametrize(
    ("lead_q", "lead_kv", "L", "S", "E", "Ev", "chunk", "window"),
    [s[1:] for s in SHAPES],
    ids=[s[0] for s in SHAPES],
)
def test_matches_the_f16_twin_and_the_certificate(
    lead_q: tuple[int, ...],
    lead_kv: tuple[int, ...],
    L: int,
    S: int,
    E: int,
    Ev: int,
    chunk: int | None,
    window: int | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("APPROX_ATTN_FAST_MEMORY_BYTES", raising=False)
    for var, val in (("APPROX_ATTN_CAUSAL_CHUNK", chunk), ("APPROX_ATTN_CAUSAL_WINDOW", window)):
        if val is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, str(val))
    scale = f32_scale(E)
    q, k, v = random_problem(L * 5 + S, lead_q, lead_kv, L, S, E, Ev, 1.0, scale)
    gqa = lead_q != lead_kv
    out, rep = coop_causal_poly(q, k, v, degree=2, scale=scale, enable_gqa=gqa)
    c, t, _ = plan_of(rep)
    if L > 13:
        assert c < L, rep.plan  # chunk boundaries are crossed
    if window is not None:
        assert c * t < L, rep.plan
    check_coop(out, rep, q, k, v, scale=scale, enable_gqa=gqa, what=f"L={L} S={S} E={E}")


@needs_coop
@pytest.mark.parametrize("eps", [1e-2, 3e-3])
def test_eps_is_certified_with_the_f16_term(eps: float, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPROX_ATTN_CAUSAL_CHUNK", "16")
    E, scale = 16, f32_scale(16)
    q, k, v = random_problem(7, (2,), (2,), 260, 240, E, 8, 0.5, scale)
    out, rep = coop_causal_poly(q, k, v, eps=eps, scale=scale)
    approx = np.asarray(rep.approximation_bound_per_column)
    assert (approx <= eps * column_ranges(v) * (1 + 1e-12)).all()
    check_coop(out, rep, q, k, v, scale=scale, enable_gqa=False, what=f"eps={eps}")


@needs_coop
@pytest.mark.parametrize(("L", "S", "window"), [(90, 130, None), (300, 250, 2)], ids=["s", "m"])
def test_counted_io_equals_planned_io(
    L: int, S: int, window: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    count_io_with_fast_memory(monkeypatch, None)
    monkeypatch.setenv("APPROX_ATTN_CAUSAL_CHUNK", "16")
    if window is None:
        monkeypatch.delenv("APPROX_ATTN_CAUSAL_WINDOW", raising=False)
    else:
        monkeypatch.setenv("APPROX_ATTN_CAUSAL_WINDOW", str(window))
    E, scale = 20, f32_scale(20)
    q, k, v = random_problem(L + 3 * S, (2, 4), (2, 2), L, S, E, 9, 1.0, scale)
    out, rep = coop_causal_poly(q, k, v, degree=2, scale=scale, enable_gqa=True)
    assert rep.io_words_counted is not None
    assert rep.io_words_counted == rep.io_words, rep
    check_coop(out, rep, q, k, v, scale=scale, enable_gqa=True, what="counted")


@pytest.mark.skipif(COOP, reason="the adapter has cooperative matrices")
def test_without_cooperative_matrices() -> None:
    E, scale = 16, f32_scale(16)
    q, k, v = random_problem(91, (), (), 32, 32, E, 8, 0.25, scale)
    for method in ("poly", "auto"):
        with pytest.raises(NotImplementedError, match="tensor_cores=True"):
            approx_attn.attention(q, k, v, is_causal=True, method=method, tensor_cores=True)
    _, rep = approx_attn.attention(
        q, k, v, is_causal=True, method="poly", scale=scale, return_report=True
    )
    assert not rep.tensor_cores and rep.f16_rounding is None
    assert "diag_coop: None" in rep.plan, rep.plan


@pytest.mark.parametrize("gqa", [False, True])
def test_twin_on_f16_operands_is_close_to_float64(gqa: bool) -> None:
    # The twin itself against the f32 path's twin, within the operand rounding alone: per block
    # weight |x' - x| <= ((1+u)^2 (1+u32)^2 - 1) y + eta sqrt(E) (|q'| + |k'|)(1+u) + E eta^2
    # (y = sum |q'||k'| in the scaled operands, x' their exact product), so
    # |W - P(x)| <= Pabs'(y + d) d + u |P(x')| + eta, |P(x')| <= Pabs(y + d); V' adds
    # (u + eta + 4 u32) range_c of the block's share; the output moves by sum_j |dW_j| range_c / D.
    E, Ev, L, S, chunk = 12, 5, 70, 60, 16
    scale = f32_scale(E)
    q, k, v = random_problem(3, (4,) if gqa else (2,), (2,), L, S, E, Ev, 1.0, scale)
    _, coeffs, _ = _core.fit_polynomial(1.0, degree=2)
    c = np.asarray(coeffs)
    parts = coop_parts(q, k, v, coeffs, scale=scale, chunk=chunk, enable_gqa=gqa)
    qp, kp = parts["q"], parts["k"]
    y = np.matmul(np.abs(qp), np.swapaxes(np.abs(kp), -1, -2))
    qn = np.linalg.norm(qp, axis=-1)[..., :, None]
    kn = np.linalg.norm(kp, axis=-1)[..., None, :]
    d = ((1 + U) ** 2 * (1 + U32) ** 2 - 1) * y + ETA * math.sqrt(E) * (qn + kn) * (1 + U)
    d = d + E * ETA**2
    abs_c = np.abs(c)
    pa = np.polynomial.polynomial.polyval(y + d, abs_c)
    dpa = np.polynomial.polynomial.polyval(y + d, np.arange(1, 3) * abs_c[1:])
    blk = block_mask(L, S, chunk)
    dw = np.where(blk, dpa * d + U * pa + ETA, 0.0)
    rng = parts["vrange"]
    share = parts["w"].sum(-1, keepdims=True) / parts["d"]
    tol = rng * dw.sum(-1, keepdims=True) / parts["d"] + (U + ETA + 4 * U32) * rng * share
    twin = reference.causal_poly_attention_f16_diag(
        q, k, v, coeffs, chunk=chunk, scale=scale, enable_gqa=gqa
    )
    f32_twin = reference.causal_poly_attention_chunked(
        q, k, v, coeffs, chunk=chunk, scale=scale, enable_gqa=gqa
    )
    assert_close(twin, f32_twin, tol * (1 + 1e-9), "twin on f16 operands")
    # It does round, and the bound is within 20x of what the rounding does somewhere (0.2 here).
    ratio = np.abs(twin - f32_twin) / np.where(tol > 0, tol, np.inf)
    assert ratio.max() > 0.05, ratio.max()
