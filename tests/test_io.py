"""I/O accounting: `io_cost`, `io_lower_bound` and the words the shaders count.

One word = 4 bytes moved between a storage buffer (slow memory) and workgroup memory (fast
memory of M = `fast_memory_words` words). All checks here are exact integer identities or
asymptotic statements about the planner's counts; no floating-point tolerance is involved except
in the log-log slopes (measured over a 4x step in n) and the lower-bound ratio.
"""

from __future__ import annotations

import math
from typing import Any

import approx_attn
import numpy as np
import pytest
from _helpers import count_io_with_fast_memory
from approx_attn import _core
from approx_attn.reference import beta as ref_beta

KEYS = {
    "method",
    "schedule",
    "degree",
    "rank",
    "fast_memory_words",
    "storage",
    "passes",
    "reads",
    "writes",
    "total",
    "host_to_device",
    "device_to_host",
}
# Stated in src/io.rs (poly_stays_within_a_constant_of_the_lower_bound): the planned count stays
# below 32x the reconstructed lower bound.
LOWER_BOUND_CONSTANT = 32.0
TARGET_WORKGROUPS = 4096  # src/plan.rs: pass-2 workgroups per problem (schedule A) at most


def passes(cost: dict[str, Any]) -> dict[str, tuple[int, int]]:
    return {name: (reads, writes) for name, reads, writes in cost["passes"]}


def check_consistent(cost: dict[str, Any]) -> None:
    assert set(cost) == KEYS, sorted(cost)
    assert cost["reads"] == sum(r for _, r, _ in cost["passes"])
    assert cost["writes"] == sum(w for _, _, w in cost["passes"])
    assert cost["total"] == cost["reads"] + cost["writes"] > 0
    assert all(r >= 0 and w >= 0 for _, r, w in cost["passes"])


def test_io_cost_returns_the_documented_keys() -> None:
    L, S, E, Ev, M = 1000, 700, 32, 16, 8192
    exact = approx_attn.io_cost(L, S, E, Ev, method="exact", fast_memory_words=M)
    check_consistent(exact)
    assert (exact["method"], exact["schedule"], exact["degree"], exact["rank"]) == (
        "exact",
        None,
        None,
        None,
    )
    assert exact["fast_memory_words"] == M and exact["storage"] == "float32"
    assert [p[0] for p in exact["passes"]] == ["exact"]
    # Q and O once, K and V at least once.
    reads, writes = passes(exact)["exact"]
    assert reads >= L * E + S * (E + Ev) and writes == L * Ev

    poly = approx_attn.io_cost(L, S, E, Ev, method="poly", degree=2, fast_memory_words=M)
    check_consistent(poly)
    assert (poly["method"], poly["degree"], poly["rank"]) == ("poly", 2, math.comb(E + 2, 2))
    assert poly["schedule"] in ("A", "B") and poly["fast_memory_words"] == M
    assert [p[0] for p in poly["passes"]] == ["prepass", "pass1", "reduce", "pass2"]
    assert passes(poly)["pass2"][1] == L * Ev
    # Ev defaults to E; heads multiply every term.
    one = approx_attn.io_cost(L, S, E, method="exact", fast_memory_words=M)
    three = approx_attn.io_cost(L, S, E, method="exact", fast_memory_words=M, heads=3)
    assert one == approx_attn.io_cost(L, S, E, E, method="exact", fast_memory_words=M)
    assert three["total"] == 3 * one["total"]


@pytest.mark.parametrize(("eps", "beta"), [(1e-2, 0.5), (1e-3, 1.0), (1e-3, 2.0)])
def test_poly_degree_from_eps_and_beta(eps: float, beta: float) -> None:
    E = 8
    cost = approx_attn.io_cost(
        500, 500, E, method="poly", eps=eps, beta=beta, fast_memory_words=8192
    )
    check_consistent(cost)
    # The degree the attention call would pick: smallest certifying eps/(1+eps).
    g, coeffs, ceps = _core.fit_polynomial(beta, eps=eps / (1.0 + eps))
    assert ceps <= eps / (1.0 + eps)
    assert cost["degree"] == g and cost["rank"] == math.comb(E + g, g)
    assert coeffs[g] != 0.0
    by_degree = approx_attn.io_cost(500, 500, E, method="poly", degree=g, fast_memory_words=8192)
    assert by_degree == cost


def test_fast_memory_defaults_to_the_adapters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("APPROX_ATTN_FAST_MEMORY_BYTES", raising=False)
    m = approx_attn.device_info()["fast_memory_words"]
    for method, kw in (("exact", {}), ("poly", {"degree": 2})):
        cost = approx_attn.io_cost(300, 200, 16, method=method, **kw)
        assert cost["fast_memory_words"] == m
        assert cost == approx_attn.io_cost(300, 200, 16, method=method, fast_memory_words=m, **kw)
    # The environment cap lowers it, as it does for attention().
    monkeypatch.setenv("APPROX_ATTN_FAST_MEMORY_BYTES", "4096")
    assert approx_attn.io_cost(300, 200, 16, method="exact")["fast_memory_words"] == min(m, 1024)


# (name, method, is_causal, fast memory cap in bytes or None, expected poly schedule)
COUNTED_CASES = [
    pytest.param("exact", False, None, None, id="exact"),
    pytest.param("exact", True, None, None, id="exact-causal"),
    pytest.param("exact", True, "16384", None, id="exact-causal-16KiB"),
    pytest.param("poly", False, None, "A", id="poly-A"),
    pytest.param("poly", False, "4096", "B", id="poly-B"),
]


@pytest.mark.parametrize(("method", "causal", "fast_memory_bytes", "schedule"), COUNTED_CASES)
def test_planned_equals_counted(
    method: str,
    causal: bool,
    fast_memory_bytes: str | None,
    schedule: str | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    count_io_with_fast_memory(monkeypatch, fast_memory_bytes)
    B, H, L, S, E, Ev = 2, 3, 130, 90, 16, 8
    rng = np.random.default_rng(7)
    q = rng.standard_normal((B, H, L, E), dtype=np.float32)
    k = rng.standard_normal((B, H, S, E), dtype=np.float32)
    v = rng.standard_normal((B, H, S, Ev), dtype=np.float32)
    kw: dict[str, Any] = {}
    if method == "poly":
        f = np.float32(math.sqrt(1.0 / ref_beta(q, k)))
        q, k = q * f, k * f
        kw["degree"] = 2
    _, rep = approx_attn.attention(
        q, k, v, method=method, is_causal=causal, return_report=True, **kw
    )
    assert rep.method == method and rep.schedule == schedule, rep.plan
    assert rep.io_words_counted is not None
    planned = approx_attn.io_cost(
        L,
        S,
        E,
        Ev,
        method=method,
        is_causal=causal,
        heads=B * H,
        degree=rep.degree,
        fast_memory_words=rep.fast_memory_words,
    )
    if method == "poly":
        # The run's count includes the pre-pass (K twice, V and Q once), as io_cost does.
        assert "prepass" in passes(planned)
        assert (planned["schedule"], planned["rank"]) == (rep.schedule, rep.rank)
    assert rep.io_words_counted == planned["total"], (rep.io_words_counted, planned)
    assert (rep.io_reads, rep.io_writes) == (planned["reads"], planned["writes"])
    # With the adapter's own budget (the cap above applies to both) the plan is the same.
    default = approx_attn.io_cost(
        L, S, E, Ev, method=method, is_causal=causal, heads=B * H, degree=rep.degree
    )
    assert default["total"] == rep.io_words


def test_schedule_a_reads_inputs_once_plus_state() -> None:
    # Mirrors src/io.rs schedule_a_reads_inputs_once_plus_state, through the Python API.
    n, d, g, M = 1 << 16, 16, 2, 8192
    cost = approx_attn.io_cost(n, n, d, method="poly", degree=g, fast_memory_words=M)
    assert cost["schedule"] == "A"
    p = passes(cost)
    nd, r, ev1, iw = n * d, math.comb(d + g, g), d + 1, 1  # iw: 3 feature indices per word
    (p1r, p1w), (rdr, rdw), (p2r, p2w) = p["pass1"], p["reduce"], p["pass2"]
    # Pass 1: `splits` workgroups each read mu and the index words and write a partial S'; K and
    # V are read once in all (one feature chunk). The reduction reads the partials, writes S'.
    splits, rem = divmod(p1w, r * ev1)
    assert rem == 0 and splits >= 1
    assert p1r == splits * (d + r * iw) + n * 2 * d
    assert (rdr, rdw) == (splits * r * ev1, r * ev1)
    # Pass 2: Q read once, O written once, S' (+ index words, weights) once per workgroup.
    loads, rem = divmod(p2r - nd, r * (ev1 + iw + 1))
    assert rem == 0 and 1 <= loads <= TARGET_WORKGROUPS
    assert p2w == nd
    reads, writes = p1r + rdr + p2r, p1w + rdw + p2w
    assert reads >= 3 * nd and writes >= nd
    # The state traffic is bounded by the planner's rules: partial S' traffic (2 splits r ev1)
    # below the K/V traffic it parallelizes (n (2d + 1)), <= TARGET_WORKGROUPS pass-2 loads of S'.
    state = reads + writes - 4 * nd
    assert state <= splits * (d + r * iw) + n * (2 * d + 1) + r * ev1 + loads * r * (ev1 + iw + 1)
    # The planner keeps the partial S' traffic below an eighth of the K/V traffic and the S'
    # reloads of pass 2 below an eighth of the Q traffic, so the overhead over the trivial 4 n d
    # stays below (2/8 + 1/8) / 4 ~ 0.094 plus the index words: measured 0.097 at 2^16..2^20.
    overhead = {}
    for e in (16, 18, 20):
        m = 1 << e
        c = passes(approx_attn.io_cost(m, m, d, method="poly", degree=g, fast_memory_words=M))
        words = sum(sum(c[name]) for name in ("pass1", "reduce", "pass2"))
        overhead[e] = (words - 4 * m * d) / (4 * m * d)
    assert all(0 < o < 0.1 for o in overhead.values()), overhead


def slope(f: Any, n0: int) -> float:
    """log-log slope of f between n0 and 4 n0."""
    return math.log(f(4 * n0) / f(n0)) / math.log(4.0)


@pytest.mark.parametrize("M", [4096, 8192, 12288, 16384])
def test_poly_is_near_linear_and_exact_quadratic(M: int) -> None:
    E, g = 64, 2

    def total(method: str, n: int) -> float:
        kw = {"degree": g} if method == "poly" else {}
        return float(
            approx_attn.io_cost(n, n, E, method=method, fast_memory_words=M, **kw)["total"]
        )

    for n0 in (1 << 14, 1 << 16, 1 << 18):
        sp = slope(lambda n: total("poly", n), n0)
        se = slope(lambda n: total("exact", n), n0)
        assert sp <= 1.05, f"poly slope {sp:.3f} at n={n0}, M={M}"
        assert se >= 1.9, f"exact slope {se:.3f} at n={n0}, M={M}"


@pytest.mark.parametrize("M", [4096, 8192, 12288, 16384])
def test_poly_within_a_constant_of_the_lower_bound(M: int) -> None:
    for E, g in ((64, 2), (16, 2), (16, 3)):
        for n in (1 << 14, 1 << 17, 1 << 20):
            planned = approx_attn.io_cost(n, n, E, method="poly", degree=g, fast_memory_words=M)
            lb = approx_attn.io_lower_bound(n, n, E, degree=g, fast_memory_words=M)
            ratio = planned["total"] / lb
            # >= 1: a plan below the lower bound would mean a miscount (or a wrong bound).
            assert 1.0 <= ratio < LOWER_BOUND_CONSTANT, f"ratio {ratio:.2f} E={E} g={g} n={n} M={M}"
        exact = approx_attn.io_cost(1 << 14, 1 << 14, E, method="exact", fast_memory_words=M)
        exact_lb = approx_attn.io_lower_bound(
            1 << 14, 1 << 14, E, method="exact", fast_memory_words=M
        )
        assert exact["total"] >= exact_lb


def test_poly_beats_exact_asymptotically() -> None:
    # docs/io-model.md's worked example: d=64, g=2, n=2^20, M=65,536 (the planner: 537x).
    n, E, M = 1 << 20, 64, 65536
    poly = approx_attn.io_cost(n, n, E, method="poly", degree=2, fast_memory_words=M)["total"]
    exact = approx_attn.io_cost(n, n, E, method="exact", fast_memory_words=M)["total"]
    assert exact / poly > 100, (poly, exact)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "bogus"}, "method"),
        ({"method": "auto"}, "method"),
        ({"method": "poly"}, "degree"),
        ({"method": "poly", "eps": 1e-3}, "degree"),
        ({"method": "poly", "beta": 1.0}, "degree"),
        ({"method": "exact", "fast_memory_words": 0}, "fast_memory_words"),
        ({"method": "poly", "degree": 2, "fast_memory_words": 0}, "fast_memory_words"),
        ({"method": "exact", "fast_memory_words": -5}, "fast_memory_words"),
    ],
    ids=[
        "bogus",
        "auto",
        "poly-bare",
        "poly-eps-only",
        "poly-beta-only",
        "M0-exact",
        "M0-poly",
        "M-negative",
    ],
)
def test_bad_input(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        approx_attn.io_cost(100, 100, 16, **kwargs)


def test_bad_sizes_and_causal_poly() -> None:
    with pytest.raises(ValueError, match="S must be a positive integer"):
        approx_attn.io_cost(10, 0, 16, method="exact")
    with pytest.raises(ValueError, match="E must be a positive integer"):
        approx_attn.io_cost(10, 10, 0, method="exact")
    # Causal poly has a plan too (tests/test_causal_poly.py checks it against the shaders).
    causal = approx_attn.io_cost(
        10, 10, 16, method="poly", degree=2, is_causal=True, fast_memory_words=8192
    )
    assert [p[0] for p in causal["passes"]] == ["prepass", "pass1", "scan", "diag", "pass2"]
    with pytest.raises(ValueError, match="degree"):
        approx_attn.io_lower_bound(100, 100, 16, method="poly")


def test_io_cost_with_grouped_query_heads_matches_a_gqa_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 4 query heads sharing 2 KV heads: the planned words equal what the shaders count.
    monkeypatch.setenv("APPROX_ATTN_COUNT_IO", "1")
    rng = np.random.default_rng(5)
    q = rng.standard_normal((4, 96, 16)).astype(np.float32)
    k = rng.standard_normal((2, 80, 16)).astype(np.float32)
    v = rng.standard_normal((2, 80, 16)).astype(np.float32)
    _, rep = approx_attn.attention(q, k, v, method="exact", enable_gqa=True, return_report=True)
    cost = approx_attn.io_cost(96, 80, 16, method="exact", heads=4, kv_heads=2)
    assert rep.io_words_counted == rep.io_words == cost["total"]
    with pytest.raises(ValueError, match="kv_heads=3 must divide heads=4"):
        approx_attn.io_cost(96, 80, 16, method="exact", heads=4, kv_heads=3)


def test_io_cost_exact_is_closed_form_and_never_wraps() -> None:
    # Once a loop over every dispatch and tile (2^62 grew to 23 GB) in u64 that wrapped (2^32
    # gave less than 2^30): now closed form in u128, an OverflowError beyond u64.
    with pytest.raises(OverflowError, match="beyond u64"):
        approx_attn.io_cost(2**62, 2**62, 64, method="exact")
    with pytest.raises(OverflowError, match="beyond u64"):
        approx_attn.io_cost(2**32, 2**32, 64, method="exact", fast_memory_words=12288)
    for causal in (False, True):
        small, big = (
            approx_attn.io_cost(n, n, 64, method="exact", is_causal=causal)["total"]
            for n in (2**28, 2**30)
        )
        assert 15.9 < big / small < 16.1, (causal, small, big)


@pytest.mark.parametrize("fast_memory_words", [None, 12288], ids=["device", "M=12288"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("method", ["poly", "exact"])
def test_io_cost_answers_any_size_at_once(
    method: str, is_causal: bool, fast_memory_words: int | None
) -> None:
    # Poly once looped over every dispatch, window and query block in u64: 2^62 returned a
    # wrapped total (non-causal) or aborted allocating 1.4 PB of windows (causal), and causal
    # 2^40 took 33 s. Now closed form in u128: an OverflowError beyond u64, no allocation.
    kwargs: dict[str, Any] = {"degree": 2} if method == "poly" else {}

    def cost(n: int) -> int:
        return approx_attn.io_cost(
            n,
            n,
            64,
            method=method,
            is_causal=is_causal,
            fast_memory_words=fast_memory_words,
            **kwargs,
        )["total"]

    rss_kib = _peak_rss_kib()
    with pytest.raises(OverflowError, match="beyond u64"):
        cost(2**62)
    if method == "poly":
        # Near-linear and within the stated constant of the lower bound (32x, Rust tests).
        small, big = cost(2**39), cost(2**40)
        assert 1.99 < big / small < 2.01, (small, big)
        m = fast_memory_words or approx_attn.device_info()["fast_memory_words"]
        lb = approx_attn.io_lower_bound(2**40, 2**40, 64, degree=2, fast_memory_words=m)
        assert lb <= big < 32 * lb, (big, lb)
    else:
        # Quadratic: 2^39 already moves about 2^84 words.
        with pytest.raises(OverflowError, match="beyond u64"):
            cost(2**39)
        small, big = cost(2**29), cost(2**30)
        assert 3.99 < big / small < 4.01, (small, big)
    if rss_kib is not None:
        grown_mib = (_peak_rss_kib() - rss_kib) / 1024
        assert grown_mib < 64, grown_mib


def _peak_rss_kib() -> int | None:
    """Peak resident memory of this process in KiB (Linux), None where unknown."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
