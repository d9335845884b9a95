"""Polynomial attention as a model primitive (`approx_attn.poly_attention`, `PolyState`): the GPU
against the float64 twins (`reference.polynomial_kernel_attention`, the parallel form, and
`reference.polynomial_kernel_attention_chunked`, the chunked and recurrent form), the recurrent
state against the parallel call, gates far beyond float32's range, the shader-counted I/O, and a
clear error for every input it cannot serve.

Tolerance (float32 rounding, u = 2^-24), as in tests/test_causal_poly.py's docstring with the
model's kernel in place of the fitted polynomial and no key centring: with
y_ij = |s| sum_l |q_il| |k_jl| and A_ij = sum_m |c_m| y_ij^m * exp(G_i - G_j) (j visible), every
weight and every partial sum of the GPU is off by at most n_ops u relative to A, with
    n_ops = 2g + 5 + LAMBDA (sqrt(S) + sqrt(r)) + g (4 + LAMBDA sqrt(E)) + n_gate,
LAMBDA = 2 the probabilistic growth of a sum of n roundings (LAMBDA sqrt(n) u, Higham 2.8), and
with gates n_gate = 6 + LAMBDA sqrt(S) + 2 |G_i - G_j| per pair: the three factors (key weight,
chunk decay, row factor) are each one rounding of a float64 value, the decays multiply along the
scan (a nested product of up to S / C factors), and the diagonal blocks' exp(g_i - g_j) has
WGSL's exp error (3 + 2|x|) ulp; g, the gate sums relative to the chunk, reach the GPU as a
float32 pair hi + lo, so their difference carries no error of the size u |g| (with a single
float32 the error of `test_strong_gates`'s case at E = 64 was 9.2e-6, with the pair 1.2e-6; both
are inside this bound, which is about 50x the measured errors here).
A_ij counts n_ops (+ the pair's term) per weight; then
    unnormalised: |O_gpu - O_twin|_ic <= u sum_j n_ij A_ij |v_jc|,
    normalised:   |O_gpu - O_twin|_ic <= u (sum_j n_ij A_ij |v_jc| + |O_ic| sum_j n_ij A_ij) / D_i,
with n_ij = n_ops + 2 |G_i - G_j| (gated).
`test_tolerance_has_teeth` checks that a 1e-3 change of one coefficient lands far outside it.
"""

from __future__ import annotations

import math

import approx_attn
import numpy as np
import pytest
from _helpers import assert_close
from approx_attn import POLY_KERNELS, PolyState, poly_attention
from approx_attn.reference import (
    _expand_gqa,
    causal_mask,
    polynomial_kernel_attention,
    polynomial_kernel_attention_chunked,
)

U32 = 2.0**-24
LAMBDA = 2.0


def coeffs_of(c: str | tuple[float, ...]) -> tuple[float, ...]:
    return POLY_KERNELS[c] if isinstance(c, str) else c


def rank_of(e: int, c: tuple[float, ...]) -> int:
    return sum(math.comb(e + m - 1, m) for m, x in enumerate(c) if x != 0)


def tolerance(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    coeffs: tuple[float, ...],
    *,
    scale: float,
    is_causal: bool,
    normalize: bool,
    log_gates: np.ndarray | None,
    enable_gqa: bool,
) -> np.ndarray:
    """The elementwise bound of the module docstring."""
    q64 = np.abs(np.asarray(q, np.float64))
    k64, v64 = (np.asarray(x, np.float64) for x in (k, v))
    k64, v64 = _expand_gqa(q64, k64, v64, enable_gqa)
    y = abs(scale) * np.matmul(q64, np.swapaxes(np.abs(k64), -1, -2))
    a = np.polynomial.polynomial.polyval(y, np.abs(np.asarray(coeffs)))
    g = len(coeffs) - 1
    e, s = q.shape[-1], k.shape[-2]
    n_ops = 2 * g + 5 + LAMBDA * (math.sqrt(s) + math.sqrt(rank_of(e, coeffs)))
    n_ops += g * (4 + LAMBDA * math.sqrt(e))
    per_pair = 0.0
    if log_gates is not None:
        group = q.shape[-3] // k.shape[-3] if enable_gqa else 1
        gs = np.cumsum(np.asarray(log_gates, np.float64), axis=-1)
        if group > 1:
            gs = np.repeat(gs, group, axis=-2)
        dg = gs[..., :, None] - gs[..., None, :]
        with np.errstate(over="ignore"):
            a = a * np.exp(dg)
        # Three factors rounded once each and the scan's nested product of decays; per pair,
        # WGSL's exp of the gate difference x: (3 + 2|x|) ulp.
        n_ops += 6 + LAMBDA * math.sqrt(s)
        per_pair = 2 * np.abs(dg)
    with np.errstate(invalid="ignore"):
        a = a * (n_ops + per_pair)
    if is_causal:
        a = np.where(causal_mask(a.shape[-2], a.shape[-1]), 0.0, a)
    num = np.matmul(a, np.abs(v64))
    if not normalize:
        return U32 * num
    want = polynomial_kernel_attention(
        q,
        k,
        v,
        coeffs,
        scale=scale,
        is_causal=is_causal,
        log_gates=log_gates,
        enable_gqa=enable_gqa,
        normalize=False,
    )
    w = np.polynomial.polynomial.polyval(
        scale * np.matmul(np.asarray(q, np.float64), np.swapaxes(k64, -1, -2)), coeffs
    )
    if log_gates is not None:
        with np.errstate(over="ignore"):
            w = w * np.exp(gs[..., :, None] - gs[..., None, :])
    if is_causal:
        w = np.where(causal_mask(w.shape[-2], w.shape[-1]), 0.0, w)
    d = w.sum(-1, keepdims=True)
    o = want / d
    return U32 * (num + np.abs(o) * a.sum(-1, keepdims=True)) / d


def rand(rng: np.random.Generator, shape: tuple[int, ...], f: float = 1.0) -> np.ndarray:
    return (f * rng.standard_normal(shape)).astype(np.float32)


def check(
    q,
    k,
    v,
    coeffs,
    *,
    is_causal=False,
    normalize=True,
    log_gates=None,
    enable_gqa=False,
    scale=None,
    what="",
) -> np.ndarray:
    c = coeffs_of(coeffs)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    kw = {
        "is_causal": is_causal,
        "normalize": normalize,
        "log_gates": log_gates,
        "enable_gqa": enable_gqa,
    }
    out, rep = poly_attention(q, k, v, coeffs=coeffs, scale=scale, return_report=True, **kw)
    with np.errstate(over="ignore"):
        want = polynomial_kernel_attention(q, k, v, c, scale=float(np.float32(scale)), **kw)
        tol = tolerance(q, k, v, c, scale=float(np.float32(scale)), **kw)
    assert rep.method == "poly_kernel"
    assert rep.rank == rank_of(q.shape[-1], c)
    assert_close(out, want, tol, what)
    return out


MIXED = (0.5, -0.2, 0.3)  # positive on every real x (discriminant < 0)
ODD = (0.2, 1.0, 0.0, 0.5)  # degree 3: unnormalised only
CASES = [
    # (E, coeffs, normalize)
    (1, "based", True),
    (3, "power2", True),
    (8, "power4", True),
    (16, "based", True),
    (16, MIXED, True),
    (16, ODD, False),
    (32, (0.0, 1.0), False),  # linear attention without a feature map
    (64, "power2", True),
]


@pytest.mark.parametrize("e,coeffs,normalize", CASES)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("gated", [False, True])
def test_matches_the_twin(e, coeffs, normalize, is_causal, gated):
    rng = np.random.default_rng(e * 7 + is_causal + 2 * gated)
    n = 67
    q, k, v = rand(rng, (2, n, e)), rand(rng, (2, n, e)), rand(rng, (2, n, 5))
    log_gates = -rng.uniform(0.0, 0.3, (2, n)) if gated else None
    check(
        q,
        k,
        v,
        coeffs,
        is_causal=is_causal,
        normalize=normalize,
        log_gates=log_gates,
        what=f"E={e} {coeffs}",
    )


def test_tolerance_has_teeth():
    """A 1e-3 change of one coefficient moves the twin by far more than the tolerance."""
    rng = np.random.default_rng(3)
    q, k, v = rand(rng, (1, 50, 16)), rand(rng, (1, 50, 16)), rand(rng, (1, 50, 4))
    c = POLY_KERNELS["based"]
    kw = {
        "scale": 0.25,
        "is_causal": True,
        "normalize": True,
        "log_gates": None,
        "enable_gqa": False,
    }
    tol = tolerance(q, k, v, c, **kw)
    near = polynomial_kernel_attention(q, k, v, c, **{x: kw[x] for x in ("scale", "is_causal")})
    off = polynomial_kernel_attention(
        q, k, v, (1.0, 1.001, 0.5), **{x: kw[x] for x in ("scale", "is_causal")}
    )
    assert float(np.max(np.abs(near - off) / tol)) > 10


@pytest.mark.parametrize("coeffs", ["power2", "based"])
def test_head_dimension_256_at_degree_2(coeffs):
    """x^2 alone: C(E+1, 2) = 32,896 features at E = 256 (Based: C(E+2, 2) = 33,153)."""
    rng = np.random.default_rng(256)
    q, k, v = rand(rng, (1, 24, 256), 0.3), rand(rng, (1, 24, 256), 0.3), rand(rng, (1, 24, 8))
    check(q, k, v, coeffs, is_causal=True, what="E=256")


@pytest.mark.parametrize("is_causal", [False, True])
def test_gqa_batch_and_heads(is_causal):
    rng = np.random.default_rng(11)
    q = rand(rng, (2, 4, 45, 8))
    k, v = rand(rng, (2, 2, 45, 8)), rand(rng, (2, 2, 45, 3))
    gates = -rng.uniform(0, 0.5, (2, 2, 45))
    check(q, k, v, "based", is_causal=is_causal, log_gates=gates, enable_gqa=True, what="gqa")


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("l,s", [(30, 70), (70, 30)])
def test_l_differs_from_s(is_causal, l, s):
    rng = np.random.default_rng(l + s)
    q, k, v = rand(rng, (3, l, 8)), rand(rng, (3, s, 8)), rand(rng, (3, s, 4))
    check(q, k, v, "power2", is_causal=is_causal, what=f"L={l} S={s}")


def test_chunks_and_windows_with_gates_and_state(monkeypatch):
    """Tiny forced chunks and windows: gates cross every chunk and window boundary."""
    monkeypatch.setenv("APPROX_ATTN_CAUSAL_CHUNK", "16")
    monkeypatch.setenv("APPROX_ATTN_CAUSAL_WINDOW", "2")
    rng = np.random.default_rng(5)
    n = 150
    q, k, v = rand(rng, (2, n, 8)), rand(rng, (2, n, 8)), rand(rng, (2, n, 6))
    gates = -rng.uniform(0, 1.0, (2, n))
    out = check(q, k, v, "based", is_causal=True, log_gates=gates, what="chunked")
    _, rep = poly_attention(
        q, k, v, coeffs="based", is_causal=True, log_gates=gates, return_report=True
    )
    # The forced chunk is rounded up to a multiple of the pass-2 and diagonal blocks.
    chunk = int(rep.plan.split("chunk: ")[1].split(",")[0])
    assert "window_chunks: 2" in rep.plan and 2 * chunk < n, rep.plan
    # A state handed over at an odd position continues exactly where the call left off.
    o1, st = poly_attention(
        q[:, :37],
        k[:, :37],
        v[:, :37],
        coeffs="based",
        is_causal=True,
        log_gates=gates[:, :37],
        return_state=True,
    )
    o2 = st.step(q[:, 37:], k[:, 37:], v[:, 37:], log_gates=gates[:, 37:])
    both = np.concatenate([o1, o2], axis=1)
    assert np.abs(both - out).max() <= 1e-5 * np.abs(out).max()


def decode(q, k, v, coeffs, gates, prefill):
    out, st = poly_attention(
        q[..., :prefill, :],
        k[..., :prefill, :],
        v[..., :prefill, :],
        coeffs=coeffs,
        is_causal=True,
        return_state=True,
        log_gates=None if gates is None else gates[..., :prefill],
    )
    outs = [out]
    nbytes = st.nbytes
    for t in range(prefill, q.shape[-2]):
        g = None if gates is None else gates[..., t : t + 1]
        outs.append(st.step(q[..., t : t + 1, :], k[..., t : t + 1, :], v[..., t : t + 1, :], g))
        assert st.nbytes == nbytes
    return np.concatenate(outs, axis=-2), st


@pytest.mark.parametrize("coeffs", ["based", "power2", ODD])
def test_decoding_step_by_step_equals_the_causal_call(coeffs):
    """Token by token from a prefill equals one causal call over all n within the tolerance of
    the twin (both are the same sums; only the order of the float32 roundings differs)."""
    rng = np.random.default_rng(21)
    n, e = 48, 8
    q, k, v = rand(rng, (2, n, e)), rand(rng, (2, n, e)), rand(rng, (2, n, 4))
    gates = -rng.uniform(0, 0.5, (2, n))
    normalize = coeffs != ODD
    c = coeffs_of(coeffs)
    par = poly_attention(
        q, k, v, coeffs=coeffs, is_causal=True, log_gates=gates, normalize=normalize
    )
    step, st = decode(q, k, v, coeffs, gates, prefill=5) if normalize else (None, None)
    if not normalize:
        out, st = poly_attention(
            q[:, :5],
            k[:, :5],
            v[:, :5],
            coeffs=coeffs,
            is_causal=True,
            log_gates=gates[:, :5],
            return_state=True,
            normalize=False,
        )
        outs = [out]
        for t in range(5, n):
            o = poly_attention(
                q[:, t : t + 1],
                k[:, t : t + 1],
                v[:, t : t + 1],
                coeffs=coeffs,
                is_causal=True,
                log_gates=gates[:, t : t + 1],
                normalize=False,
                initial_state=st,
                return_state=True,
            )
            outs.append(o[0])
            st = o[1]
        step = np.concatenate(outs, axis=1)
    tol = tolerance(
        q,
        k,
        v,
        c,
        scale=float(np.float32(1 / math.sqrt(e))),
        is_causal=True,
        normalize=normalize,
        log_gates=gates,
        enable_gqa=False,
    )
    assert_close(step, par.astype(np.float64), 2 * tol, "step vs parallel")
    # The recurrent twin agrees with the GPU state's outputs too.
    want, _ = polynomial_kernel_attention_chunked(
        q,
        k,
        v,
        c,
        chunk=1,
        scale=float(np.float32(1 / math.sqrt(e))),
        normalize=normalize,
        log_gates=gates,
    )
    assert_close(step, want, tol, "step vs recurrent twin")
    assert st.array.shape == (2, rank_of(e, c), 5)


def test_strong_gates():
    """Power retention's own test gates (log sigmoid of a standard normal, -0.8 per token on
    average) over one long chunk: gate sums reach hundreds inside it."""
    rng = np.random.default_rng(15)
    n = 700
    q, k, v = rand(rng, (2, n, 8)), rand(rng, (2, n, 8)), rand(rng, (2, n, 4))
    gates = -np.logaddexp(0.0, -rng.standard_normal((2, n)))
    for coeffs in ("based", "power2"):
        check(q, k, v, coeffs, is_causal=True, log_gates=gates, what=f"strong gates {coeffs}")


def test_total_decay_far_beyond_float32():
    """log gates of -50 per token: G reaches -15,000 (exp(G) is 0 in float32 and float64), yet
    every factor the GPU forms stays relative to a chunk."""
    rng = np.random.default_rng(8)
    n = 300
    q, k, v = rand(rng, (1, n, 8)), rand(rng, (1, n, 8)), rand(rng, (1, n, 3))
    gates = np.full((1, n), -50.0)
    gates[:, ::7] = -0.01  # some tokens keep their predecessors
    out = check(q, k, v, "based", is_causal=True, log_gates=gates, what="decay")
    assert np.isfinite(out).all()


def test_non_causal_state_continues_over_more_keys():
    rng = np.random.default_rng(9)
    q, k, v = rand(rng, (2, 30, 8)), rand(rng, (2, 60, 8)), rand(rng, (2, 60, 4))
    whole = poly_attention(q, k, v, coeffs="power2")
    _, st = poly_attention(q[:, :1], k[:, :25], v[:, :25], coeffs="power2", return_state=True)
    rest = poly_attention(q, k[:, 25:], v[:, 25:], coeffs="power2", initial_state=st)
    assert np.abs(rest - whole).max() <= 1e-5 * np.abs(whole).max()


def test_state_round_trips_through_numpy(tmp_path):
    rng = np.random.default_rng(10)
    q, k, v = rand(rng, (1, 2, 20, 4)), rand(rng, (1, 2, 20, 4)), rand(rng, (1, 2, 20, 3))
    _, st = poly_attention(q, k, v, coeffs="based", is_causal=True, return_state=True)
    path = tmp_path / "state.npy"
    np.save(path, st.to_numpy())
    back = PolyState.from_numpy(np.load(path), coeffs="based", scale=st.scale, head_dim=4)
    x = rand(rng, (1, 2, 1, 4))
    a, b = st.step(x, x, x[..., :3]), back.step(x, x, x[..., :3])
    np.testing.assert_array_equal(a, b)
    assert st.nbytes == 1 * 2 * rank_of(4, POLY_KERNELS["based"]) * 4 * 4


def test_counted_io_equals_the_model(monkeypatch):
    monkeypatch.setenv("APPROX_ATTN_COUNT_IO", "1")
    rng = np.random.default_rng(12)
    q, k, v = rand(rng, (4, 200, 16)), rand(rng, (2, 200, 16)), rand(rng, (2, 200, 6))
    q = q.reshape(1, 4, 200, 16)
    k, v = k.reshape(1, 2, 200, 16), v.reshape(1, 2, 200, 6)
    gates = -rng.uniform(0, 1, (1, 2, 200))
    for is_causal in (False, True):
        _, st = poly_attention(
            q[..., :5, :],
            k[..., :5, :],
            v[..., :5, :],
            coeffs="based",
            is_causal=is_causal,
            enable_gqa=True,
            return_state=True,
        )
        for g in (None, gates):
            _, rep = poly_attention(
                q,
                k,
                v,
                coeffs="based",
                is_causal=is_causal,
                log_gates=g,
                enable_gqa=True,
                initial_state=st,
                return_report=True,
            )
            assert rep.io_words_counted == rep.io_words, (is_causal, g is None, rep.plan)


def test_errors():
    rng = np.random.default_rng(13)
    q = rand(rng, (2, 10, 4))
    with pytest.raises(ValueError, match="negative for some x"):
        poly_attention(q, q, q, coeffs=(0.0, 1.0))
    with pytest.raises(ValueError, match="negative for some x"):
        poly_attention(q, q, q, coeffs=(1.0, 0.0, -1.0))
    with pytest.raises(ValueError, match="all zero"):
        poly_attention(q, q, q, coeffs=(0.0, 0.0))
    with pytest.raises(ValueError, match="finite"):
        poly_attention(q, q, q, coeffs=(1.0, float("nan")))
    with pytest.raises(ValueError, match="one of"):
        poly_attention(q, q, q, coeffs="cubic")
    with pytest.raises(TypeError):
        poly_attention(q, q, q, coeffs=[[1.0]])
    with pytest.raises(ValueError, match="L = S"):
        poly_attention(q[:, :5], q, q, coeffs="based", log_gates=np.zeros((2, 10)))
    with pytest.raises(ValueError, match="shape"):
        poly_attention(q, q, q, coeffs="based", log_gates=np.zeros((2, 9)))
    with pytest.raises(ValueError, match="log_gates"):
        poly_attention(q, q, q, coeffs="based", log_gates=np.full((2, 10), np.nan))
    with pytest.raises(TypeError):
        poly_attention(q, q, q, coeffs="based", is_causal="yes")
    # x^2 with a query orthogonal to every key: every weight is 0, the normaliser too.
    z = np.zeros_like(q)
    with pytest.raises(ValueError, match="not finite.*vanish"):
        poly_attention(z, q, q, coeffs="power2")
    with pytest.raises(ValueError, match="not finite.*float32"):
        poly_attention(q, q, np.full_like(q, 3e38), coeffs="power2", normalize=False)
    _, st = poly_attention(q, q, q, coeffs="based", is_causal=True, return_state=True)
    with pytest.raises(ValueError, match="initial_state"):
        poly_attention(q[..., :3], q[..., :3], q[..., :3], coeffs="based", initial_state=st)
    with pytest.raises(TypeError):
        poly_attention(q, q, q, coeffs="based", initial_state=st.array)
    assert isinstance(approx_attn.poly_attention, type(poly_attention))


def test_twins_agree():
    """The chunked/recurrent twin equals the parallel twin (float64) at every chunk size."""
    rng = np.random.default_rng(14)
    n = 40
    q, k, v = (rng.standard_normal((2, n, 3)) for _ in range(3))
    g = -rng.uniform(0, 2, (2, n))
    par = polynomial_kernel_attention(q, k, v, (1, 1, 0.5), is_causal=True, log_gates=g)
    for chunk in (1, 7, 40):
        ch, _ = polynomial_kernel_attention_chunked(q, k, v, (1, 1, 0.5), chunk=chunk, log_gates=g)
        np.testing.assert_allclose(ch, par, rtol=1e-12, atol=1e-12)
