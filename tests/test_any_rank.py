"""Ranks beyond one pass-2 dispatch: where the driver's loop budget (lavapipe: 65,535 iterations
per invocation) cannot stream all of S' through one dispatch, pass 2 runs once per range of S'
chunks and sums the ranges (`Report.plan` says how many: `pass2_ranges`). The refused cases of
old (degree 3 at E = 64, degree 4 at E = 32, the primitive's degree 2 at E = 256 in 16 KiB) run
and match their float64 twins; forced splits (`APPROX_ATTN_MAX_LOOP_ITERATIONS`) on small inputs
match the unsplit call; the shaders' counted I/O equals the model and `io_cost`.

Tolerance: the twins' float32 bounds of tests/test_poly.py, tests/test_causal_poly.py and
tests/test_poly_kernel.py, whose feature sum of r terms errs by <= LAMBDA sqrt(r) u. Split over k
ranges it is a nested sum (k sums of about r / k terms, then the k partial sums), which errs by
<= LAMBDA (sqrt(r / k) + sqrt(k)) u <= LAMBDA (sqrt(r) + 1) u for 1 <= k <= r: one LAMBDA more
per term, so each bound is taken with rank (sqrt(r) + 1)^2 in place of r (or, for the primitive,
scaled by (n_ops + LAMBDA) / n_ops, which adds at least LAMBDA to every term's count). A split and
an unsplit call differ by at most the sum of their bounds against the twin.
"""

from __future__ import annotations

import math
import re
from typing import Any

import approx_attn
import numpy as np
import pytest
from _helpers import assert_close
from approx_attn import _core, poly_attention
from approx_attn.reference import polynomial_kernel_attention
from test_causal_poly import causal_tolerance
from test_causal_poly import check_certificate as check_causal_certificate
from test_poly import (
    KERNEL_BUDGET,
    LAMBDA,
    check_certificate,
    f32_scale,
    kernel_tolerance,
    random_problem,
    value_range,
)
from test_poly_kernel import coeffs_of, rank_of, tolerance

LAVAPIPE = "llvmpipe" in approx_attn.device_info()["adapter"]
on_lavapipe = pytest.mark.skipif(
    not LAVAPIPE, reason="the refused ranks were refused by lavapipe's loop budget"
)


def ranges_of(rep: Any) -> int:
    """Pass-2 dispatches per query chunk of the report's plan."""
    m = re.search(r"pass2_ranges: (\d+)", rep.plan)
    assert m, rep.plan
    return int(m.group(1))


def split_rank(r: int) -> float:
    """The rank whose LAMBDA sqrt(rank) covers a nested sum of r terms (module docstring)."""
    return (math.sqrt(r) + 1.0) ** 2


def poly_tolerance(q, k, v, rep, *, scale: float, causal: bool) -> np.ndarray:
    _, coeffs, _ = _core.fit_polynomial(rep.beta, degree=rep.degree)
    of = causal_tolerance if causal else kernel_tolerance
    tol = of(q, k, v, coeffs, scale=scale, rank=split_rank(rep.rank))
    budget = KERNEL_BUDGET * value_range(v)
    assert tol.max() <= budget, f"tolerance {tol.max():.3e} > {budget:.3e}"
    return tol


def twin(q, k, v, rep, *, scale: float, causal: bool, enable_gqa: bool = False) -> np.ndarray:
    _, coeffs, _ = _core.fit_polynomial(rep.beta, degree=rep.degree)
    return approx_attn.reference.poly_attention(
        q, k, v, coeffs, scale=scale, is_causal=causal, enable_gqa=enable_gqa
    )


# ---------------------------------------------------------------------------------------------
# 1. The ranks lavapipe refused


@on_lavapipe
@pytest.mark.parametrize(
    ("E", "kw", "causal"),
    [
        (64, {"eps": 1e-2}, False),  # degree 3, r = 47,905
        (32, {"eps": 1e-3}, False),  # degree 4, r = 58,905
        (32, {"degree": 4}, True),
        (64, {"eps": 1e-2}, True),
    ],
    ids=["E64-eps1e-2", "E32-eps1e-3", "E32-g4-causal", "E64-eps1e-2-causal"],
)
def test_refused_ranks_run_and_meet_the_certificate(E: int, kw: dict, causal: bool) -> None:
    scale = f32_scale(E)
    q, k, v = random_problem(7 * E + causal, (), (), 40, 40, E, E, 1.0, scale)
    out, rep = approx_attn.attention(
        q, k, v, method="poly", scale=scale, is_causal=causal, return_report=True, **kw
    )
    assert rep.method == "poly" and not rep.tensor_cores, rep.reason
    if "eps" in kw:
        want = _core.fit_polynomial(rep.beta, eps=kw["eps"] / (1.0 + kw["eps"]))[0]
        assert rep.degree == want >= 3, rep
    assert rep.rank == math.comb(E + rep.degree, rep.degree) > 45_000, rep.rank
    assert ranges_of(rep) > 1, rep.plan
    tol = poly_tolerance(q, k, v, rep, scale=scale, causal=causal)
    assert_close(out, twin(q, k, v, rep, scale=scale, causal=causal), tol, "vs twin")
    check = check_causal_certificate if causal else check_certificate
    check(out, rep, q, k, v, scale=scale, eps=kw.get("eps"), what=f"E={E} {kw}")


@on_lavapipe
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Ev", [8, 256])
def test_primitive_at_head_dimension_256_in_16_kib(
    Ev: int, causal: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ev = 8 was refused by the loop budget: the one-dispatch search picks its query block at
    16 feature rows per chunk, where streaming all of S' exceeds the budget for every block;
    the split search picks it at one chunk per dispatch, and that tile, with the largest chunk
    that fits, streams S' in one dispatch after all. Ev = 256: S' has 33,153 x 257 words, more
    than 65,535 workgroups of the reduction and the scan cover in one dispatch."""
    monkeypatch.setenv("APPROX_ATTN_FAST_MEMORY_BYTES", "16384")
    rng = np.random.default_rng(256 + causal)
    n = 24 if Ev == 8 else 8  # lavapipe's time goes with n r Ev
    q, k = (rng.standard_normal((1, n, 256)).astype(np.float32) for _ in range(2))
    v = rng.standard_normal((1, n, Ev)).astype(np.float32)
    scale = 1.0 / 16.0
    out, rep = poly_attention(
        q, k, v, coeffs="based", scale=scale, is_causal=causal, return_report=True
    )
    c = coeffs_of("based")
    assert rep.rank == rank_of(256, c) == 33_153
    assert ranges_of(rep) == 1, rep.plan
    want = polynomial_kernel_attention(q, k, v, c, scale=scale, is_causal=causal)
    assert_close(out, want, primitive_tolerance(q, k, v, c, scale=scale, is_causal=causal))


def primitive_tolerance(q, k, v, c, **kw: Any) -> np.ndarray:
    """tests/test_poly_kernel.py's bound with one LAMBDA more per term (module docstring)."""
    kw = {"normalize": True, "log_gates": None, "enable_gqa": False, **kw}
    g, e, s = len(c) - 1, q.shape[-1], k.shape[-2]
    n_ops = (
        2 * g
        + 5
        + LAMBDA * (math.sqrt(s) + math.sqrt(rank_of(e, c)))
        + g * (4 + LAMBDA * math.sqrt(e))
    )
    return tolerance(q, k, v, c, **kw) * (n_ops + LAMBDA) / n_ops


# ---------------------------------------------------------------------------------------------
# 2. Forced splits on small inputs: the same result as one dispatch, the counted I/O as modelled


def count_io(monkeypatch: pytest.MonkeyPatch, loop_budget: int | None) -> None:
    monkeypatch.setenv("APPROX_ATTN_COUNT_IO", "1")
    monkeypatch.setenv("APPROX_ATTN_FAST_MEMORY_BYTES", "4096")
    if loop_budget is None:
        monkeypatch.delenv("APPROX_ATTN_MAX_LOOP_ITERATIONS", raising=False)
    else:
        monkeypatch.setenv("APPROX_ATTN_MAX_LOOP_ITERATIONS", str(loop_budget))


@pytest.mark.parametrize("causal", [False, True])
def test_forced_split_equals_one_dispatch(causal: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    E, scale = 16, f32_scale(16)
    # Grouped heads and L != S, so that every term of the count is exercised.
    q, k, v = random_problem(31 + causal, (2, 4), (2, 2), 90, 130, E, 8, 1.0, scale)
    outs = []
    for loop_budget in (None, 2000):
        count_io(monkeypatch, loop_budget)
        if causal:
            monkeypatch.setenv("APPROX_ATTN_CAUSAL_CHUNK", "16")
        out, rep = approx_attn.attention(
            q, k, v, method="poly", degree=3, scale=scale, is_causal=causal,
            enable_gqa=True, tensor_cores=False, return_report=True,
        )  # fmt: skip
        assert (ranges_of(rep) > 1) == (loop_budget is not None), rep.plan
        assert rep.io_words_counted == rep.io_words, rep
        cost = approx_attn.io_cost(
            90, 130, E, 8, method="poly", degree=3, is_causal=causal, heads=8, kv_heads=4
        )
        assert cost["total"] == rep.io_words, (cost, rep.plan)
        tol = poly_tolerance(q, k, v, rep, scale=scale, causal=causal)
        ref = twin(q, k, v, rep, scale=scale, causal=causal, enable_gqa=True)
        assert_close(out, ref, tol, f"loop budget {loop_budget} vs twin")
        outs.append((out, tol))
    (one, tol1), (split, tol2) = outs
    assert_close(split, one, tol1 + tol2, "split vs one dispatch")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("gated", "normalize"), [(False, True), (True, False), (True, True)])
def test_forced_split_of_the_primitive(
    causal: bool, gated: bool, normalize: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(41 + 2 * causal + gated)
    n, e = 70, 16
    q, k, v = (rng.standard_normal((2, n, e)).astype(np.float32) for _ in range(3))
    log_gates = -rng.uniform(0.0, 0.3, (2, n)) if gated else None
    c = coeffs_of("power4")
    kw = {"is_causal": causal, "normalize": normalize, "log_gates": log_gates}
    if causal:
        monkeypatch.setenv("APPROX_ATTN_CAUSAL_CHUNK", "16")
    outs = []
    for loop_budget in (None, 2000):
        count_io(monkeypatch, loop_budget)
        out, rep = poly_attention(q, k, v, coeffs="power4", scale=0.25, return_report=True, **kw)
        assert (ranges_of(rep) > 1) == (loop_budget is not None), rep.plan
        assert rep.io_words_counted == rep.io_words, rep.plan
        with np.errstate(over="ignore"):
            want = polynomial_kernel_attention(q, k, v, c, scale=0.25, **kw)
            tol = primitive_tolerance(q, k, v, c, scale=0.25, **kw)
        assert_close(out, want, tol, f"loop budget {loop_budget} vs twin")
        outs.append((out, tol))
    (one, tol1), (split, tol2) = outs
    assert_close(split, one, tol1 + tol2, "split vs one dispatch")
