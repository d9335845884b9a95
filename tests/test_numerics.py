"""float32's range: scores and values near its ends (src/numerics.rs, `_fold_scale`).

Every finite input gives a finite answer within the derived float32 tolerance of the float64 twin
(`exact_tolerance` of test_fuzz.py, whose docstring derives it, including the terms for values
mapped per column), or a ValueError that names the bound, and then only where that bound is beyond
float32's range. A property-based run (hypothesis, derandomized) draws magnitudes from 1e-25 to
3e37, scales from 1e-45 to 1e40 and value offsets up to 1e38 for exact and auto; the default
strategies of test_fuzz.py stay clear of these ends.
"""

from __future__ import annotations

import math
from typing import Any

import approx_attn
import numpy as np
import pytest
from approx_attn.reference import exact_attention
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_fuzz import F32_MAX, exact_tolerance

LOG2_E = 1.0 / math.log(2.0)
# Scores the exact kernel refuses: c B >= 2^127 in log2 units (src/numerics.rs SCORE_LIMIT_LOG2).
SCORE_LIMIT = 2.0**127 / LOG2_E


def _qkv(seed: int, shape: tuple[int, ...] = (2, 8, 4), ev: int = 4) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal(shape), rng.standard_normal(shape)
    v = rng.standard_normal(shape[:-1] + (ev,))
    return q, k, v


def cs_bound(q: np.ndarray, k: np.ndarray, scale: float) -> float:
    """|scale| max_i |q_i| max_j |k_j| in float64: the Cauchy-Schwarz bound on every score."""
    qn = np.sqrt((q.astype(np.float64) ** 2).sum(axis=-1)).max()
    kn = np.sqrt((k.astype(np.float64) ** 2).sum(axis=-1)).max()
    return abs(scale) * float(qn) * float(kn)


def check_exact_result(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float | None, out: np.ndarray, rep: Any
) -> None:
    ref = exact_attention(q, k, v, scale=scale)
    mapped = "values mapped" in rep.reason
    tol = exact_tolerance(q, k, v, ref, scale=scale, causal=False, gqa=False, values_mapped=mapped)
    assert np.isfinite(out).all(), f"{np.count_nonzero(~np.isfinite(out))} non-finite"
    err = np.abs(out.astype(np.float64) - ref)
    assert (err <= tol).all(), (
        f"max |err| {err.max():.3e}, worst err/tol {np.max(err / tol):.3g} ({rep.reason})"
    )


# ---------------------------------------------------------------------------------------------
# Scores


@pytest.mark.parametrize(
    "how", ["inputs-1e30", "scale-3e38", "scale-1e39", "scale--1e39", "inputs-f32-1e20"]
)
@pytest.mark.parametrize("method", ["exact", "auto"])
def test_scores_beyond_float32_are_refused_naming_the_bound(how: str, method: str) -> None:
    q, k, v = _qkv(1)
    scale = 0.5
    if how == "inputs-1e30":
        q, k = q * 1e30, k * 1e30
    elif how == "inputs-f32-1e20":
        q, k = (q * 1e20).astype(np.float32), (k * 1e20).astype(np.float32)
    else:
        scale = float(how.split("-", 1)[1])
    # The true scores leave float32's range: there is no float32 answer to give.
    q64, k64 = q.astype(np.float64), k.astype(np.float64)
    assert np.abs(scale * np.matmul(q64, np.swapaxes(k64, -1, -2))).max() > F32_MAX
    with pytest.raises(ValueError, match=r"can overflow float32: .*Cauchy-Schwarz") as exc:
        approx_attn.attention(q, k, v, method=method, scale=scale)
    # The bound it names is the call's, from the row norms (4 digits printed).
    named = float(str(exc.value).split("max|k_j| = ")[1].split(" ")[0])
    b = cs_bound(q, k, scale)
    assert abs(named / b - 1) <= 1e-4, (named, b)


# (query scale, key scale, scale, dtype): scores within float32's range that the kernel could not
# form as given (an operand or the scale beyond float32, or flushed to zero), or only just can.
FOLDED = {
    "scale=1e39, q~1e-20": (1e-20, 1.0, 1e39, np.float64),
    "scale=-1e39, q~1e-20": (1e-20, 1.0, -1e39, np.float64),
    "scale=1e-40, q~k~1e20": (1e20, 1e20, 1e-40, np.float64),
    "scale=1e-45, q~k~1e22": (1e22, 1e22, 1e-45, np.float64),
    "scale=1e300, q~k~1e-151": (1e-151, 1e-151, 1e300, np.float64),
    "q~1e30, k~1e-31 (f32)": (1e30, 1e-31, 0.5, np.float32),
    "q~1e-5, k~1e34, scale=2e-30 (f32)": (1e-5, 1e34, 2e-30, np.float32),
    "q~k~1e18, scale=1e-36 (f32)": (1e18, 1e18, 1e-36, np.float32),
    "scores up to ~1e37 (f32)": (1e18, 1e18, 1.0, np.float32),
}


@pytest.mark.parametrize("case", list(FOLDED), ids=list(FOLDED))
@pytest.mark.parametrize("method", ["exact", "auto"])
def test_scores_within_float32_run(case: str, method: str) -> None:
    qs, ks, scale, dtype = FOLDED[case]
    q, k, v = _qkv(2)
    q, k = (q * qs).astype(dtype), (k * ks).astype(dtype)
    v = v.astype(dtype)
    assert cs_bound(q, k, scale) < SCORE_LIMIT
    out, rep = approx_attn.attention(q, k, v, method=method, scale=scale, return_report=True)
    assert rep.method == "exact"
    check_exact_result(q, k, v, scale, out, rep)


def test_scores_are_rebalanced_only_where_needed() -> None:
    q, k, v = (x.astype(np.float32) for x in _qkv(3))
    _, rep = approx_attn.attention(q, k, v, method="exact", return_report=True)
    assert "rebalanced" not in rep.reason, rep.reason
    _, rep = approx_attn.attention(q * 1e30, k * 1e-31, v, method="exact", return_report=True)
    assert "score operands rebalanced" in rep.reason, rep.reason


# ---------------------------------------------------------------------------------------------
# Values


def _values(how: str, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    if how == "3e38":
        return np.full(shape, 3e38)
    if how == "-3e38":
        return np.full(shape, -3e38)
    if how == "1e38+noise":
        return 1e38 + 1e36 * rng.standard_normal(shape)
    if how == "+-3.4e38":  # range 6.8e38, itself beyond float32
        return rng.uniform(-3.4e38, 3.4e38, shape)
    assert how == "-3e38+tiny-noise"
    return -3e38 + 1e31 * rng.standard_normal(shape)


VALUES = ["3e38", "-3e38", "1e38+noise", "+-3.4e38", "-3e38+tiny-noise"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("how", VALUES)
@pytest.mark.parametrize("method", ["exact", "auto"])
def test_values_near_float32_max_exact(how: str, method: str, dtype: Any) -> None:
    rng = np.random.default_rng(4)
    q, k, _ = _qkv(4, (2, 3, 16, 8))
    v = _values(how, rng, (2, 3, 16, 8)).astype(dtype)
    q, k = (2.0 * q).astype(dtype), (2.0 * k).astype(dtype)  # beta ~ 20: auto runs exact
    out, rep = approx_attn.attention(q, k, v, method=method, return_report=True)
    assert rep.method == "exact"
    assert "values mapped" in rep.reason, rep.reason  # 16 * 3e38 overflows float32 sums
    check_exact_result(q, k, v, None, out, rep)


@pytest.mark.parametrize("how", VALUES)
def test_values_near_float32_max_poly(how: str) -> None:
    # Per column: |O - O*| <= the reported bound, which includes the float32 rounding of the
    # values mapped per column (the poly passes always run on them) and of the output.
    rng = np.random.default_rng(5)
    q, k, _ = _qkv(5, (2, 16, 4))
    v = _values(how, rng, (2, 16, 4)).astype(np.float32)
    q, k = (0.1 * q).astype(np.float32), (0.1 * k).astype(np.float32)
    out, rep = approx_attn.attention(q, k, v, method="poly", eps=1e-2, return_report=True)
    ref = exact_attention(q, k, v)
    assert np.isfinite(out).all()
    bound = np.asarray(rep.error_bound_per_column)
    err = np.abs(out.astype(np.float64) - ref).reshape(-1, 4).max(axis=0)
    assert (err <= bound).all(), (err, bound)


def test_values_are_mapped_only_where_needed() -> None:
    q, k, v = (x.astype(np.float32) for x in _qkv(6))
    _, rep = approx_attn.attention(q, k, v * 1e36, method="exact", return_report=True)
    assert "values mapped" not in rep.reason, rep.reason


@pytest.mark.parametrize("method", ["exact", "auto"])
def test_non_finite_inputs_unchecked_still_run(method: str) -> None:
    # check_finite=False: NaN in, NaN out, as in PyTorch (no ValueError for the output).
    q, k, v = (x.astype(np.float32) for x in _qkv(7))
    v[0, 3, 1] = np.nan
    out = approx_attn.attention(q, k, v, method=method, check_finite=False)
    assert np.isnan(out[0, :, 1]).all() and np.isfinite(out[1]).all()


# ---------------------------------------------------------------------------------------------
# Property-based: magnitudes, scales and offsets across float32's range


@st.composite
def extreme_cases(draw: Any) -> dict[str, Any]:
    e, ev = draw(st.sampled_from([(4, 4), (3, 5), (8, 1)]))
    return {
        "method": draw(st.sampled_from(["exact", "exact", "auto"])),
        "heads": draw(st.integers(1, 2)),
        "L": draw(st.integers(1, 9)),
        "S": draw(st.integers(1, 12)),
        "E": e,
        "Ev": ev,
        "dtype": draw(st.sampled_from(["<f4", "<f8"])),
        "q_exp": draw(st.floats(-25, 37.5)),
        "k_exp": draw(st.floats(-25, 37.5)),
        "scale": draw(
            st.none()
            | st.tuples(st.sampled_from([-1.0, 1.0]), st.floats(-45, 40)).map(
                lambda t: t[0] * 10.0 ** t[1]
            )
        ),
        "v_exp": draw(st.floats(-25, 38.2) | st.floats(37.8, 38.5)),
        "v_offset": draw(st.none() | st.floats(30, 38.2)),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


@settings(
    max_examples=1000,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(extreme_cases())
def test_fuzz_float32_range(c: dict[str, Any]) -> None:
    rng = np.random.default_rng(c["seed"])
    q = rng.standard_normal((c["heads"], c["L"], c["E"])) * 10.0 ** c["q_exp"]
    k = rng.standard_normal((c["heads"], c["S"], c["E"])) * 10.0 ** c["k_exp"]
    v = rng.standard_normal((c["heads"], c["S"], c["Ev"])) * 10.0 ** c["v_exp"]
    if c["v_offset"] is not None:
        v = v + rng.choice([-1.0, 1.0], size=c["Ev"]) * 10.0 ** c["v_offset"]
    v = np.clip(v, -F32_MAX, F32_MAX)
    q, k, v = (x.astype(c["dtype"]) for x in (q, k, v))
    scale = c["scale"]
    s = 1.0 / math.sqrt(c["E"]) if scale is None else scale
    try:
        out, rep = approx_attn.attention(
            q, k, v, method=c["method"], scale=scale, return_report=True
        )
    except ValueError as exc:
        assert "can overflow float32" in str(exc), str(exc)
        event("refused: scores beyond float32")
        # Refused only where the scores may leave float32: the Cauchy-Schwarz bound, from the
        # row norms in float64, reaches the limit (cheaper bounds only settle calls they pass).
        assert cs_bound(q, k, s) * (1 + 1e-6) >= SCORE_LIMIT, (cs_bound(q, k, s), exc)
        return
    if rep.method == "poly":  # auto where the scores are small: the certificate (test_fuzz.py)
        event("auto ran poly")
        return
    event("values mapped" if "values mapped" in rep.reason else "values as given")
    if "rebalanced" in rep.reason:
        event("score operands rebalanced")
    check_exact_result(q, k, v, scale, out, rep)
