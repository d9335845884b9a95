"""approx_attn.distributed on a local Ray cluster (skipped without ray).

Results are checked against the single-process call and the float64 twins:

- poly (certified): |O - O*| <= Report.error_bound_per_column + tol, O* =
  `reference.exact_attention`, with tol the float32 kernel tolerance of tests/test_poly.py
  (derivation in its docstring), taken with the causal mask, plus two roundings per term for the
  distributed path (the host's float32 copy of the centred keys and the float32 copy of the
  combined state, summed in float64). Against the single-process call: 2 tol (both are within tol
  of the twin with the same coefficients, and the degree is the same).
- the primitive: the same tolerance with P the model's kernel, no centring and the gate factors
  exp(G_i - G_j) in the weights (+4 roundings: the chunk-relative gate pairs).
- exact (ring): the f32 kernel's rounding, 8 (sqrt(S) + W + E) u (1 + max|x|) max|v| with x the
  scores: the online softmax's sums and the W log-sum-exp merges (float64, rounded once).
- traffic: the measured bytes equal `traffic_model` exactly (the model counts the same arrays from
  the sizes), and the poly model does not depend on the sequence length.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

ray = pytest.importorskip("ray")

import approx_attn
from _helpers import assert_close
from approx_attn import (
    _core,
    reference,
)
from approx_attn import distributed as dist

U32 = 2.0**-24
LAMBDA = 2.0


@pytest.fixture(scope="module", autouse=True)
def cluster():
    ray.init(num_cpus=3, include_dashboard=False, ignore_reinit_error=True, logging_level="ERROR")
    yield
    dist.shutdown()


def problem(seed, lead_q, lead_kv, n, E, Ev, qk_scale=0.4):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal(lead_q + (n, E), dtype=np.float32) * np.float32(qk_scale)
    k = rng.standard_normal(lead_kv + (n, E), dtype=np.float32) * np.float32(qk_scale)
    v = rng.standard_normal(lead_kv + (n, Ev), dtype=np.float32)
    return q, k, v


def expand(q, kv):
    if kv.ndim >= 3 and kv.shape[-3] != q.shape[-3]:
        return np.repeat(kv, q.shape[-3] // kv.shape[-3], axis=-3)
    return kv


def f32_tolerance(q, k, v, coeffs, *, scale, rank, causal, centre, gates=None, extra_ops=2):
    """Elementwise float32 tolerance (module docstring): n_ops u (sum_j A_ij |v_j| + |O_i|
    sum_j A_ij) / D_i with A_ij the absolute-value expansion of P(x_ij), times the gate factors."""
    q64 = np.asarray(q, dtype=np.float64)
    k64 = expand(q64, np.asarray(k, dtype=np.float64))
    v64 = expand(q64, np.asarray(v, dtype=np.float64))
    if centre:
        k64 = k64 - k64.mean(axis=-2, keepdims=True)
    c = np.asarray(coeffs, dtype=np.float64)
    y = abs(scale) * np.abs(q64) @ np.swapaxes(np.abs(k64), -1, -2)
    x = scale * q64 @ np.swapaxes(k64, -1, -2)
    a = np.polynomial.polynomial.polyval(y, np.abs(c))
    p = np.polynomial.polynomial.polyval(x, c)
    if gates is not None:
        G = np.cumsum(np.asarray(gates, dtype=np.float64), axis=-1)
        G = expand(q64, G[..., None])[..., 0]
        f = np.exp(G[..., :, None] - G[..., None, :])
        a, p = a * f, p * f
    if causal:
        mask = np.triu(np.ones(p.shape[-2:], dtype=bool), k=1)
        a, p = np.where(mask, 0.0, a), np.where(mask, 0.0, p)
    d = p.sum(axis=-1, keepdims=True)
    o = (p @ v64) / d
    g, S = len(c) - 1, k64.shape[-2]
    ops = 2 * g + 4 + extra_ops + LAMBDA * (math.sqrt(S) + math.sqrt(rank))
    return ops * U32 * ((a @ np.abs(v64)) + np.abs(o) * a.sum(axis=-1, keepdims=True)) / d


def check_poly(q, k, v, *, workers, causal, gqa=False, eps=1e-3):
    out, rep = dist.attention(
        q,
        k,
        v,
        num_workers=workers,
        method="poly",
        eps=eps,
        is_causal=causal,
        enable_gqa=gqa,
        return_report=True,
    )
    one, rep1 = approx_attn.attention(
        q,
        k,
        v,
        method="poly",
        eps=eps,
        is_causal=causal,
        enable_gqa=gqa,
        tensor_cores=False,
        return_report=True,
    )
    assert rep.method == "poly" and rep.num_workers == workers
    # The single-process certificate: the same degree and rank, beta to float32 rounding (the GPU
    # pre-pass computes it in float32), its approximation part per column accordingly (the
    # distributed bound has no rounding part).
    assert (rep.degree, rep.rank) == (rep1.degree, rep1.rank)
    assert rep.beta == pytest.approx(rep1.beta, rel=1e-5)
    assert rep.poly_eps == pytest.approx(rep1.poly_eps, rel=1e-3)
    np.testing.assert_allclose(
        rep.error_bound_per_column, rep1.approximation_bound_per_column, rtol=1e-3
    )
    assert rep.error_bound <= eps * 1.0001 * float(np.max(v.max(axis=-2) - v.min(axis=-2)))
    scale = 1.0 / math.sqrt(q.shape[-1])
    _, coeffs, _ = _core.fit_polynomial(rep.beta, degree=rep.degree)
    tol = f32_tolerance(
        q, k, v, coeffs, scale=scale, rank=rep.rank, causal=causal, centre=True
    ) + 8.0 * U32 * (1.0 + rep.beta) * float(v.max() - v.min())
    ref = reference.exact_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    assert_close(out, ref, np.asarray(rep.error_bound_per_column) + tol, "distributed vs float64")
    assert_close(out, one.astype(np.float64), 2 * tol, "distributed vs single-process")
    # Traffic: measured = model, exactly.
    assert rep.bytes_sent == rep.model_bytes_sent
    assert rep.bytes_received == rep.model_bytes_received
    return out, rep


@pytest.mark.parametrize("workers", [1, 3])
def test_poly_non_causal_matches_single_process_within_the_certificate(workers: int) -> None:
    # n = 200 does not divide into 3; one head: more workers than heads.
    q, k, v = problem(1, (), (), 200, 8, 5)
    check_poly(q, k, v, workers=workers, causal=False)


def test_poly_causal_with_gqa() -> None:
    q, k, v = problem(2, (1, 4), (1, 2), 150, 8, 6)
    _, rep = check_poly(q, k, v, workers=3, causal=True, gqa=True)
    assert rep.bytes_received[0] < rep.bytes_received[2]  # the scan: later shards read more


def test_poly_traffic_does_not_grow_with_n() -> None:
    q, k, v = problem(3, (2,), (2,), 256, 8, 4)
    _, rep = check_poly(q, k, v, workers=2, causal=False)
    z = 4 * 2 * rep.rank * (4 + 1)  # one state: 4 bytes, 2 heads, rank x (Ev + 1)
    stats = 8 * 2 * 8 + 8 * 2 * (2 + 2 * 4)
    assert rep.bytes_sent == (stats + z, stats + z)
    assert rep.bytes_received == (8 * 2 * 8 + 8 * (rep.degree + 1) + z,) * 2
    big = dist.traffic_model(
        "poly",
        key_rows=[2**20, 2**20],
        kv_units=2,
        E=8,
        Ev=4,
        rank=rep.rank,
        n_coeffs=rep.degree + 1,
    )
    assert big == (rep.model_bytes_sent, rep.model_bytes_received)


@pytest.mark.parametrize("causal", [False, True])
def test_exact_ring_attention(causal: bool) -> None:
    q, k, v = problem(5, (1, 2), (1, 2), 130, 8, 5, qk_scale=1.5)
    W = 3
    out, rep = dist.attention(
        q, k, v, num_workers=W, method="exact", is_causal=causal, return_report=True
    )
    assert rep.method == "exact"
    ref = reference.exact_attention(q, k, v, is_causal=causal)
    scores = np.abs(np.asarray(q, np.float64) @ np.swapaxes(k, -1, -2)).max() / math.sqrt(8)
    tol = 8 * (math.sqrt(130) + W + 8) * U32 * (1 + scores) * float(np.abs(v).max())
    assert_close(out, ref, tol, "ring vs float64")
    one = approx_attn.attention(q, k, v, method="exact", is_causal=causal)
    assert_close(out, one.astype(np.float64), 2 * tol, "ring vs single-process")
    assert rep.bytes_sent == rep.model_bytes_sent
    assert rep.bytes_received == rep.model_bytes_received
    shard = [4 * 2 * s * (8 + 5) for s in rep.key_rows]
    if causal:
        assert rep.bytes_received == (0, shard[0], shard[0] + shard[1])
    else:
        assert rep.bytes_received == tuple(sum(shard) - s for s in shard)


def test_auto_runs_exact_where_poly_cannot_certify() -> None:
    q, k, v = problem(6, (), (), 64, 8, 4, qk_scale=4.0)
    _, rep = dist.attention(q, k, v, num_workers=2, eps=1e-3, return_report=True)
    assert rep.method == "exact" and "cannot certify" in rep.reason
    with pytest.raises(ValueError, match="cannot certify"):
        dist.attention(q, k, v, num_workers=2, method="poly", eps=1e-3)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("gated", [False, True])
def test_primitive_with_gates(causal: bool, gated: bool) -> None:
    q, k, v = problem(7, (1, 4), (1, 2), 120, 8, 5, qk_scale=1.0)
    rng = np.random.default_rng(8)
    g = -0.1 * rng.random((1, 2, 120)) if gated else None
    out, rep = dist.poly_attention(
        q,
        k,
        v,
        num_workers=3,
        coeffs="based",
        is_causal=causal,
        log_gates=g,
        enable_gqa=True,
        return_report=True,
    )
    ref = reference.polynomial_kernel_attention(
        q, k, v, [1.0, 1.0, 0.5], is_causal=causal, log_gates=g, enable_gqa=True
    )
    tol = f32_tolerance(
        q,
        k,
        v,
        [1.0, 1.0, 0.5],
        scale=1 / math.sqrt(8),
        rank=rep.rank,
        causal=causal,
        centre=False,
        gates=g,
        extra_ops=6,
    )
    assert_close(out, ref, tol, f"primitive causal={causal} gated={gated}")
    one = approx_attn.poly_attention(
        q, k, v, coeffs="based", is_causal=causal, log_gates=g, enable_gqa=True
    )
    assert_close(out, one.astype(np.float64), 2 * tol, "primitive vs single-process")
    assert rep.bytes_sent == rep.model_bytes_sent
    assert rep.bytes_received == rep.model_bytes_received


def test_object_reference_inputs() -> None:
    q, k, v = problem(9, (2,), (2,), 100, 8, 4)
    cut = [0, 37, 100]
    refs = [
        [ray.put(np.ascontiguousarray(x[..., cut[i] : cut[i + 1], :])) for i in range(2)]
        for x in (q, k, v)
    ]
    out, rep = dist.attention(*refs, num_workers=2, method="poly", return_report=True)
    assert rep.query_rows == (37, 63)
    want = dist.attention(q, k, v, num_workers=2, method="poly")
    ref = reference.exact_attention(q, k, v)
    assert_close(out, ref, np.asarray(rep.error_bound_per_column) + 1e-5, "refs")
    assert want.shape == out.shape


def test_bad_inputs_get_the_errors_of_attention() -> None:
    q, k, v = problem(10, (), (), 64, 8, 4)
    k2 = k.copy()
    k2[40, 3] = np.nan
    with pytest.raises(ValueError, match="key contains 1 NaN"):
        dist.attention(q, k2, v, num_workers=2)
    with pytest.raises(ValueError, match="same head dimension"):
        dist.attention(q, k[:, :4], v, num_workers=2)
    with pytest.raises(TypeError):
        dist.attention(q.astype(np.int32), k, v, num_workers=2)
    with pytest.raises(ValueError, match="positive integer"):
        dist.attention(q, k, v, num_workers=0)


def test_a_dead_worker_raises_naming_its_shard_and_is_replaced() -> None:
    q, k, v = problem(11, (), (), 96, 8, 4)
    dist.attention(q, k, v, num_workers=3, method="poly")  # the pool exists
    dist._POOL["actors"][1].arm_failure.remote("answer")
    with pytest.raises(RuntimeError, match="shard 1 died"):
        dist.attention(q, k, v, num_workers=3, method="poly")
    out = dist.attention(q, k, v, num_workers=3, method="poly")  # a new worker took its place
    assert np.isfinite(out).all()
