"""GPU exact attention against the float64 NumPy twin `reference.exact_attention`.

Covers shapes (L, S in {1, 7, 64, 1000, 5000}, E in {1, 3, 16, 64, 128, 256}, Ev != E), 2-D/3-D/4-D
inputs, upper-left causal masks with L != S, grouped-query heads, float16/float64 inputs, strided
views, explicit scales, reduced workgroup-memory and binding budgets, the `Report`, shader-counted
I/O and concurrent callers.

Tolerance (float32 GPU arithmetic, u = 2^-24, standard normal inputs, smax = max |s_ij|):
  * each softmax weight w_j = exp(s_j - m) / l gets a relative error d_j from
    - the subtraction s_j - m before exp2: u |s_j - m| <= 2 smax u (rounding scale * log2 e
      scales all scores alike and mostly cancels in the softmax; exp2 adds a few u);
    - the E-term fma chain of the dot product: with probabilistic rounding (Higham & Mary 2019)
      the error grows like sqrt(E) u times the partial sums, which are O(1) for unit-variance
      inputs scaled by 1/sqrt(E): about sqrt(E) u;
  * perturbing the weights moves the output by sum_j w_j d_j (v_j - o) <= max_j |d_j| range(V);
  * accumulating l and o over S keys (positive weights, online rescaling), exp2 and the final
    division add a few u times max |v| <= range(V): the constant 8.
  Hence |gpu - ref| <= tol32 = u * range(V) * (8 + 2 smax + sqrt(E)).  On lavapipe the measured
  errors of this suite stay below 0.12 tol32 (0.3-5 u range(V)); for E = 256 tol32 is about
  2e-6 range(V), tighter than a 4e-6 range(V) rule of thumb.  `test_tolerance_has_teeth` checks
  that dropping one key of 1000, or shifting the causal diagonal by one, exceeds it tenfold.
  float64 inputs are rounded to float32 first: scores move by <= 2u A (A = max scale |q| |k|^T)
  and values by u |v|, adding u (2 A range(V) + max |v|).
  float16 outputs add the rounding of the result, elementwise 2^-11 |ref| + 2^-25 (half an ulp;
  the second term for subnormals), on top of tol32.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import re
from typing import Any

import approx_attn
import numpy as np
import pytest
from _helpers import assert_close
from approx_attn.reference import exact_attention, exact_attention_lse

# The exact method explicitly: "auto" may pick the approximate polynomial method.
attention = functools.partial(approx_attn.attention, method="exact")

U32 = 2.0**-24  # float32 unit roundoff (round to nearest)
U16 = 2.0**-11  # float16 unit roundoff
F16_SUBNORMAL_HALF_SPACING = 2.0**-25


def randn(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
    """Standard normal values, generated in float32 so that float32 inputs are exact."""
    return rng.standard_normal(shape, dtype=np.float32).astype(dtype)


def expand_kv(q: np.ndarray, kv: np.ndarray) -> np.ndarray:
    """Repeats KV heads like torch's repeat_interleave so that query head h sees kv head h//g."""
    if q.ndim >= 3 and kv.shape[-3] != q.shape[-3]:
        return np.repeat(kv, q.shape[-3] // kv.shape[-3], axis=-3)
    return kv


def score_stats(q: np.ndarray, k: np.ndarray, scale: float) -> tuple[float, float]:
    """(smax, A): max |scale * q k^T| and max scale * |q| |k|^T over all heads and entries."""
    q64 = np.asarray(q, dtype=np.float64)
    k64 = expand_kv(q64, np.asarray(k, dtype=np.float64))
    smax = float(np.abs(np.matmul(q64, np.swapaxes(k64, -1, -2))).max()) * abs(scale)
    a = float(np.matmul(np.abs(q64), np.swapaxes(np.abs(k64), -1, -2)).max()) * abs(scale)
    return smax, a


def tolerance32(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float | None) -> float:
    """tol32 of the module docstring, from the inputs the GPU actually sees."""
    e = q.shape[-1]
    scale = 1.0 / math.sqrt(e) if scale is None else scale
    smax, _ = score_stats(q, k, scale)
    v64 = np.asarray(v, dtype=np.float64)
    return U32 * float(v64.max() - v64.min()) * (8.0 + 2.0 * smax + math.sqrt(e))


def check_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    enable_gqa: bool = False,
    what: str = "",
) -> approx_attn.Report:
    """Runs the GPU and compares with the float64 reference under the dtype's tolerance."""
    out, rep = attention(
        q, k, v, scale=scale, is_causal=is_causal, enable_gqa=enable_gqa, return_report=True
    )
    lead = q.shape[:-2]
    assert out.shape == lead + (q.shape[-2], v.shape[-1])
    assert out.dtype == q.dtype, f"output dtype {out.dtype} for query dtype {q.dtype}"
    ref = exact_attention(q, k, v, scale=scale, is_causal=is_causal, enable_gqa=enable_gqa)
    if q.dtype == np.float64:
        # The GPU sees the float32-rounded inputs: bound from those plus the rounding itself.
        q32, k32, v32 = (x.astype(np.float32) for x in (q, k, v))
        tol = tolerance32(q32, k32, v32, scale)
        e = q.shape[-1]
        _, a = score_stats(q32, k32, 1.0 / math.sqrt(e) if scale is None else scale)
        vr = float(v.max() - v.min())
        tol += U32 * (2.0 * a * vr + float(np.abs(v).max()))
    else:
        tol = tolerance32(q, k, v, scale)
    if q.dtype == np.float16:
        tol = tol + U16 * (np.abs(ref) + tol) + F16_SUBNORMAL_HALF_SPACING
    assert_close(out, ref, tol, what)
    return rep


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention problem: leading dims of query and key/value, sizes and options."""

    lead_q: tuple[int, ...]
    lead_kv: tuple[int, ...]
    L: int
    S: int
    E: int
    Ev: int
    causal: bool = False
    gqa: bool = False
    dtype: Any = np.float32
    scale: float | None = None

    def inputs(self, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        q = randn(rng, self.lead_q + (self.L, self.E), self.dtype)
        k = randn(rng, self.lead_kv + (self.S, self.E), self.dtype)
        v = randn(rng, self.lead_kv + (self.S, self.Ev), self.dtype)
        return q, k, v


def case_id(c: Case) -> str:
    parts = [f"{len(c.lead_q) + 2}d"]
    if c.lead_q:
        parts.append("x".join(map(str, c.lead_q)))
    if c.gqa:
        parts.append("gqa" + "x".join(map(str, c.lead_kv)))
    parts += [f"L{c.L}", f"S{c.S}", f"E{c.E}", f"Ev{c.Ev}"]
    if c.causal:
        parts.append("causal")
    if c.dtype != np.float32:
        parts.append(np.dtype(c.dtype).name)
    if c.scale is not None:
        parts.append(f"scale{c.scale}")
    return "-".join(parts)


def same(lead: tuple[int, ...], L: int, S: int, E: int, Ev: int, **kw: Any) -> Case:
    return Case(lead, lead, L, S, E, Ev, **kw)


# A covering set, not the cross product: every L, S in {1, 7, 64, 1000, 5000} and every E in
# {1, 3, 16, 64, 128, 256} appears, Ev differs from E in most cases, 2-D/3-D/4-D inputs.
SHAPE_CASES = [
    same((), 1, 1, 1, 1),
    same((), 7, 64, 3, 5),
    same((3,), 64, 7, 16, 1),
    same((1, 2), 1000, 1000, 64, 64),
    same((), 64, 1000, 256, 128),
    same((2,), 7, 1, 128, 256),
    same((), 5000, 7, 64, 3),
    same((2,), 1, 5000, 128, 64),
    same((2, 2), 1000, 64, 1, 16),
    same((), 64, 5000, 3, 3),
    # The one big problem (a few seconds on lavapipe).
    same((1, 1), 5000, 5000, 256, 256),
]

CAUSAL_CASES = [
    same((), 1, 7, 16, 16, causal=True),
    same((2,), 7, 1, 3, 3, causal=True),
    same((2, 1), 64, 1000, 64, 16, causal=True),  # L < S
    same((3,), 1000, 64, 128, 16, causal=True),  # L > S
    same((), 1000, 1000, 256, 64, causal=True),
    same((), 5000, 5000, 16, 16, causal=True),
]

GQA_CASES = [
    Case((2, 6), (2, 2), 64, 64, 16, 16, gqa=True),
    Case((1, 4), (1, 1), 7, 1000, 64, 32, gqa=True, causal=True),
    Case((8,), (4,), 64, 7, 3, 5, gqa=True),  # 3-D: the head dimension is the first one
    Case((2, 2), (2, 2), 7, 64, 16, 8, gqa=True),  # equal heads with enable_gqa
]

DTYPE_SCALE_CASES = [
    same((), 64, 64, 64, 64, dtype=np.float16),
    same((2, 2), 1000, 64, 16, 3, causal=True, dtype=np.float16),
    same((3,), 64, 1000, 16, 16, dtype=np.float64),
    same((), 7, 64, 128, 1, causal=True, dtype=np.float64),
    same((2,), 64, 1000, 64, 64, scale=0.0),  # uniform weights: the mean of V
    same((), 64, 64, 16, 16, scale=0.3),
    same((), 64, 64, 16, 8, scale=2.5),  # peaked softmax
    same((2,), 7, 64, 3, 3, scale=-1.0),
]


@pytest.mark.parametrize("case", SHAPE_CASES + CAUSAL_CASES, ids=case_id)
def test_matches_reference(case: Case) -> None:
    q, k, v = case.inputs(seed=case.L * 7 + case.S * 13 + case.E)
    check_attention(q, k, v, is_causal=case.causal, what=case_id(case))


@pytest.mark.parametrize("case", DTYPE_SCALE_CASES, ids=case_id)
def test_dtypes_and_scales(case: Case) -> None:
    q, k, v = case.inputs(seed=11)
    check_attention(q, k, v, scale=case.scale, is_causal=case.causal, what=case_id(case))


def test_scale_zero_is_mean_of_values() -> None:
    # Independent of the reference: with scale 0 every weight is 1/S.
    rng = np.random.default_rng(5)
    q, k, v = randn(rng, (7, 16)), randn(rng, (64, 16)), randn(rng, (64, 4))
    out = attention(q, k, v, scale=0.0)
    want = np.broadcast_to(v.astype(np.float64).mean(axis=0), out.shape)
    assert_close(out, want, U32 * float(v.max() - v.min()) * 8.0, "scale=0")


@pytest.mark.parametrize("case", GQA_CASES, ids=case_id)
def test_grouped_query_heads(case: Case) -> None:
    q, k, v = case.inputs(seed=3)
    check_attention(q, k, v, is_causal=case.causal, enable_gqa=True, what=case_id(case))
    # Independently of the reference's np.repeat: query head h must use kv head h // group.
    out = attention(q, k, v, is_causal=case.causal, enable_gqa=True)
    hq, hk = q.shape[-3], k.shape[-3]
    for h in range(hq):
        kh, vh = k[..., h // (hq // hk), :, :], v[..., h // (hq // hk), :, :]
        ref = exact_attention(q[..., h, :, :], kh, vh, is_causal=case.causal)
        tol = tolerance32(q[..., h, :, :], kh, vh, None)
        assert_close(out[..., h, :, :], ref, tol, f"{case_id(case)} head {h}")


@pytest.mark.parametrize(("L", "S"), [(7, 64), (64, 7), (1, 1000)], ids=["L<S", "L>S", "L1-S1000"])
def test_causal_is_upper_left_aligned(L: int, S: int) -> None:
    # Row i sees keys 0..i (PyTorch's upper-left alignment, not bottom-right as in kv-caching).
    rng = np.random.default_rng(L + S)
    q, k, v = randn(rng, (L, 16)), randn(rng, (S, 16)), randn(rng, (S, 8))
    out = attention(q, k, v, is_causal=True)
    tol = tolerance32(q, k, v, None)
    assert_close(out[0], v[0].astype(np.float64), tol, "row 0 sees only key 0")
    for i in sorted({min(1, L - 1), min(L, S) - 1, L - 1}):
        ref = exact_attention(q[i : i + 1], k[: i + 1], v[: i + 1])
        assert_close(out[i : i + 1], ref, tol, f"row {i} sees keys 0..{i}")


def test_tolerance_has_teeth() -> None:
    # The tolerance must reject the smallest plausible bugs: one key dropped of 1000, or the
    # causal diagonal shifted by one.
    rng = np.random.default_rng(9)
    q, k, v = randn(rng, (64, 64)), randn(rng, (1000, 64)), randn(rng, (1000, 64))
    out = attention(q, k, v)
    tol = tolerance32(q, k, v, None)
    dropped = exact_attention(q, k[:-1], v[:-1])
    assert np.abs(out - dropped).max() > 10 * tol
    out_c = attention(q, k, v, is_causal=True)
    s = (q.astype(np.float64) @ k.T.astype(np.float64)) / 8.0
    s = np.where(np.triu(np.ones(s.shape, dtype=bool), k=0), -np.inf, s)  # diagonal excluded too
    s[0, 0] = 0.0  # row 0 would have no key at all
    w = np.exp(s - s.max(axis=1, keepdims=True))
    shifted = (w / w.sum(axis=1, keepdims=True)) @ v
    assert np.abs(out_c - shifted).max() > 10 * tol


NONCONTIG_LAYOUTS = ["transposed-BLHE", "transposed-2d", "step-slices", "fortran", "negative"]


def layout_inputs(kind: str, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Query, key, value as non-contiguous views of the given kind."""
    if kind == "transposed-BLHE":  # (B, L, H, E) storage viewed as (B, H, L, E)
        return tuple(
            randn(rng, (2, n, 3, d)).transpose(0, 2, 1, 3) for n, d in ((64, 16), (70, 16), (70, 8))
        )
    if kind == "transposed-2d":
        return randn(rng, (16, 64)).T, randn(rng, (16, 70)).T, randn(rng, (8, 70)).T
    if kind == "step-slices":
        return (
            randn(rng, (2, 128, 48))[:, ::2, ::3],
            randn(rng, (2, 210, 32))[:, ::3, 1::2],
            randn(rng, (4, 70, 10))[::2, :, 1:9],
        )
    if kind == "fortran":
        return tuple(
            np.asfortranarray(randn(rng, s)) for s in ((2, 64, 16), (2, 70, 16), (2, 70, 8))
        )
    if kind == "negative":
        return randn(rng, (64, 16))[::-1], randn(rng, (70, 16))[:, ::-1], randn(rng, (70, 8))[::-1]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", NONCONTIG_LAYOUTS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_non_contiguous_inputs(kind: str, causal: bool) -> None:
    rng = np.random.default_rng(17)
    q, k, v = layout_inputs(kind, rng)
    assert not (q.flags.c_contiguous and k.flags.c_contiguous and v.flags.c_contiguous)
    check_attention(q, k, v, is_causal=causal, what=kind)
    # The strided result must equal the contiguous one bit for bit: same float32 inputs.
    want = attention(*(np.ascontiguousarray(x) for x in (q, k, v)), is_causal=causal)
    np.testing.assert_array_equal(attention(q, k, v, is_causal=causal), want)


def plan_fields(plan: str) -> dict[str, int]:
    """The integer fields of the Debug-printed plan, e.g. {'bq': 16, ..., 'kv_rows': 5000}."""
    return {k: int(v) for k, v in re.findall(r"(\w+): (\d+)", plan)}


def tile_words(p: dict[str, int]) -> int:
    """Workgroup words of the exact kernel's tiles (mirrors ExactTiles::fast_memory_words)."""
    kvw = max(p["e"], p["ev"])
    return p["bq"] * p["e"] + p["bk"] * kvw + p["tk"] + p["bq"] * p["bk"] + 3 * p["bq"]


BUDGET_CASES = [
    same((), 64, 200, 256, 256),
    same((), 1, 7, 256, 256, causal=True),
    same((3,), 100, 300, 64, 16, causal=True),
    Case((1, 4), (1, 2), 33, 70, 3, 128, gqa=True),
    same((2,), 1000, 64, 128, 1),
]


@pytest.mark.parametrize("case", BUDGET_CASES, ids=case_id)
def test_webgpu_default_workgroup_budget(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    # 16 KiB is WebGPU's default maxComputeWorkgroupStorageSize: the kernels must fit it.
    monkeypatch.setenv("APPROX_ATTN_FAST_MEMORY_BYTES", "16384")
    q, k, v = case.inputs(seed=21)
    rep = check_attention(q, k, v, is_causal=case.causal, enable_gqa=case.gqa, what=case_id(case))
    assert rep.fast_memory_words == 4096
    assert tile_words(plan_fields(rep.plan)) <= 4096, rep.plan


def expected_dispatches(
    lead: tuple[int, ...], L: int, S: int, group: int, p: dict[str, int], causal: bool
) -> int:
    """Dispatch count of a chunking (mirrors plan::chunks, skipping fully masked key blocks)."""
    units = math.prod(lead) // group if lead else 1
    n = 0
    for _ in range(0, units, p["units"]):
        for l0 in range(0, L, p["q_rows"]):
            lc = min(p["q_rows"], L - l0)
            n += sum(1 for s0 in range(0, S, p["kv_rows"]) if not (causal and s0 > l0 + lc - 1))
    return n


BINDING_CASES = [
    same((1, 3), 600, 700, 64, 64),  # split along heads, query rows and key rows
    same((1, 3), 500, 700, 64, 32, causal=True),
    same((4, 4), 32, 40, 64, 64),  # only along heads
    Case((1, 4), (1, 2), 300, 500, 16, 100, gqa=True, causal=True),
    same((), 100, 130, 256, 256, causal=True),
    same((2,), 5000, 7, 3, 3),  # only along query rows
]


@pytest.mark.parametrize("case", BINDING_CASES, ids=case_id)
def test_small_storage_bindings_split_the_problem(
    case: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("APPROX_ATTN_MAX_BINDING_BYTES", "65536")
    q, k, v = case.inputs(seed=23)
    rep = check_attention(q, k, v, is_causal=case.causal, enable_gqa=case.gqa, what=case_id(case))
    assert rep.dispatches > 1, rep
    p = plan_fields(rep.plan)
    words = 65536 // 4
    width = max(case.E, case.Ev) + 2  # + the two split-KV statistics per row
    group = q.shape[-3] // k.shape[-3] if case.gqa else 1
    assert p["units"] * p["kv_rows"] * width <= words, rep.plan
    assert p["units"] * group * p["q_rows"] * width <= words, rep.plan
    lead = case.lead_q
    assert rep.dispatches == expected_dispatches(lead, case.L, case.S, group, p, case.causal)


def test_binding_split_covers_all_three_axes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPROX_ATTN_MAX_BINDING_BYTES", "65536")
    q, k, v = same((1, 3), 600, 700, 64, 64).inputs(seed=23)
    _, rep = attention(q, k, v, return_report=True)
    p = plan_fields(rep.plan)
    assert p["units"] < 3 and p["q_rows"] < 600 and p["kv_rows"] < 700, rep.plan


def test_report(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("APPROX_ATTN_FAST_MEMORY_BYTES", raising=False)
    rng = np.random.default_rng(1)
    L, S, E, Ev, heads = 64, 100, 16, 8, 2
    q, k, v = randn(rng, (heads, L, E)), randn(rng, (heads, S, E)), randn(rng, (heads, S, Ev))
    out, rep = attention(q, k, v, return_report=True)
    assert isinstance(rep, approx_attn.Report)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rep.io_words = 0  # type: ignore[misc]
    info = approx_attn.device_info()
    assert rep.method == "exact"
    assert (rep.adapter, rep.backend) == (info["adapter"], info["backend"])
    assert rep.fast_memory_words == info["fast_memory_words"]
    assert rep.io_words > 0 and rep.io_words == rep.io_reads + rep.io_writes
    # Every input word is read at least once and every output word written exactly once.
    assert rep.io_reads >= heads * (L * E + S * (E + Ev))
    assert rep.io_writes == heads * L * Ev
    assert rep.elapsed_s > 0 and rep.dispatches == 1
    assert rep.kernel_s is None or rep.kernel_s > 0
    assert rep.io_words_counted is None  # counting is off by default
    np.testing.assert_array_equal(out, attention(q, k, v))


COUNT_IO_CASES = [
    pytest.param(same((2,), 64, 100, 16, 8), {}, id="plain"),
    pytest.param(same((), 1000, 1000, 64, 32, causal=True), {}, id="causal"),
    pytest.param(
        Case((1, 4), (1, 2), 300, 500, 16, 100, gqa=True, causal=True),
        {"APPROX_ATTN_MAX_BINDING_BYTES": "65536"},
        id="gqa-causal-split-bindings",
    ),
    pytest.param(
        same((), 64, 200, 256, 256), {"APPROX_ATTN_FAST_MEMORY_BYTES": "16384"}, id="E256-16KiB"
    ),
]


@pytest.mark.parametrize(("case", "env"), COUNT_IO_CASES)
def test_counted_io_equals_planned_io(
    case: Case, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("APPROX_ATTN_COUNT_IO", "1")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    q, k, v = case.inputs(seed=29)
    rep = check_attention(q, k, v, is_causal=case.causal, enable_gqa=case.gqa, what=case_id(case))
    assert rep.io_words_counted is not None
    assert rep.io_words_counted == rep.io_words, rep


def test_concurrent_threads() -> None:
    # The GIL is released during the GPU call; results must not mix between callers.
    causal = [False, True] * 4
    problems = [same((2,), 64, 100, 16, 8).inputs(seed=100 + i) for i in range(len(causal))]

    def run(i: int) -> np.ndarray:
        return attention(*problems[i], is_causal=causal[i])

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        outs = list(pool.map(run, range(len(problems))))
    for i, (out, (q, k, v)) in enumerate(zip(outs, problems)):
        ref = exact_attention(q, k, v, is_causal=causal[i])
        assert_close(out, ref, tolerance32(q, k, v, None), f"thread task {i}")


def test_forced_exact_tiles_are_used_or_refused_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    # APPROX_ATTN_EXACT_TILES (benches/sweep_tiles.py) replaces the tuned tiles: each forced shape
    # runs (V in K's tile and in its own one) and matches the twin; a malformed value or tiles that
    # do not fit raise instead of falling back silently.
    case = same((2,), 200, 300, 32, 32)
    q, k, v = case.inputs(seed=41)
    for forced, causal in [("64 32 16 8 0", False), ("32 16 8 8 1", True), ("16 64 4 16 0", False)]:
        monkeypatch.setenv("APPROX_ATTN_EXACT_TILES", forced)
        rep = check_attention(q, k, v, is_causal=causal, what=f"forced tiles {forced}")
        p = plan_fields(rep.plan)
        bq, bk, tq, tk, split_v = (int(x) for x in forced.split())
        assert (p["bq"], p["bk"], p["tq"], p["tk"]) == (bq, bk, tq, tk), rep.plan
        assert f"split_v: {str(bool(split_v)).lower()}" in rep.plan, rep.plan
    for bad, match in [
        ("32 32 8", "not 5 whole numbers"),
        ("32 0 8 8 0", "not 5 whole numbers"),
        ("32 32 8 8 2", "not 5 whole numbers"),
        ("32 32 3 8 0", "do not fit"),
        ("64 64 1 1 0", "do not fit"),
    ]:
        monkeypatch.setenv("APPROX_ATTN_EXACT_TILES", bad)
        with pytest.raises(ValueError, match=match):
            attention(q, k, v)


def test_exact_lse_matches_twin() -> None:
    """The kernel's row log-sum-exp (for ring attention): |lse - lse*| <= 8 (sqrt(S) + E) u
    (1 + max|lse*|), the float32 scores (E products) and the row sums (sqrt(S) probabilistic)."""
    rng = np.random.default_rng(4)
    q, k, v = (randn(rng, shape) for shape in ((2, 2, 90, 8), (2, 1, 90, 8), (2, 1, 90, 5)))
    for causal in (False, True):
        out, lse, _ = approx_attn._exact_attention_lse(q, k, v, is_causal=causal, enable_gqa=True)
        ro, rl = exact_attention_lse(q, k, v, is_causal=causal, enable_gqa=True)
        assert out.shape == ro.shape and lse.shape == rl.shape == q.shape[:-1]
        one = attention(q, k, v, is_causal=causal, enable_gqa=True)
        np.testing.assert_array_equal(out, one)  # the same kernel, the same plan
        smax = float(np.abs(rl).max()) + 1.0
        assert_close(lse, rl, 8 * (math.sqrt(90) + 8) * U32 * smax, f"lse causal={causal}")
