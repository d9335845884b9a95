"""`poly_attention` against the published definitions of the models built on polynomial attention.

- Based: flash-linear-attention's ``fla/ops/based/naive.py`` (``naive_parallel_based``, and
  ``naive_chunk_based`` for the definition check), feature map 1 + x + x^2/2, layout
  (b, h, t, d), causal (``tril``: key j visible to query i iff j <= i, L = S), default scale
  d^-1/2, ``use_norm`` dividing by the row sum plus 1e-6. No GQA (its matmul would not broadcast
  fewer key heads); we compare our ``enable_gqa`` against it with the key/value heads repeated.
- Power retention: Manifest AI's ``power_attention/_attention/reference.py`` ``attention(Q, K,
  V, log_G, deg, causal=True, head_first=False, scale=1.0, norm=False, use_log2=False)``, layout
  (b, t, h, d), GQA (query head h*r + i uses key/value head h, as PyTorch's ``enable_gqa``),
  weights |scale q.k|^deg = exp(deg log|s|) times exp(log_GQ_i - log_GK_j) with log_G the
  *cumulative* log gate (b, t, h_kv): its ``power_full`` passes ``log_G.cumsum(1)`` of the
  per-token log gates, the same inclusive cumulative sum as our G (G_i includes the gate of
  token i, so exp(G_i - G_j) = prod_{j < t <= i} gate_t, and the own token j = i has weight 1).
  No shift of log_gates is needed. Causal mask lower-right aligned (qidx + S - L >= kidx): the
  same as ours at L = S, the only case compared.

Both run in float64 on the CPU with PyTorch. The peer modules are loaded as single files (their
package roots pull Triton kernels, and power_attention's needs ``vidrial``), so only PyTorch
(and einops for fla) is required. CI has no PyTorch: the module is skipped there.

Each published function carries numerical guards; where they make a float64 comparison at
1e-10 impossible they are either modelled exactly or neutralised in a patched copy of the source
(each patch must match the source exactly once, so a changed peer fails loudly):
- fla: ``o / (z + 1e-6)``, modelled exactly: published = ours * z / (z + 1e-6).
- power retention: ``log(|s| + 1e-7)`` (weight (|x| + 1e-7)^deg, not a polynomial), the row
  normaliser cast to float32 and ``+ 1e-6`` (relative to the row's largest weight). The patched
  copy drops all three; a separate check bounds how far the published output is from it.
"""

from __future__ import annotations

import importlib.util
import math
import re
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the peers' reference code needs PyTorch")

import approx_attn
from _helpers import assert_close
from approx_attn.reference import polynomial_kernel_attention

U32 = 2.0**-24  # float32 unit roundoff
DEF_TOL = 1e-10  # float64 definition checks: relative to the largest |output|

# ---------------------------------------------------------------------------------------------
# Loading the peers' files
# ---------------------------------------------------------------------------------------------


def _package_dir(package: str) -> Path | None:
    """The directory of an installed package, without executing its __init__."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _exec_source(
    name: str, source: str, path: Path, globs: dict[str, Any] | None = None
) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__file__ = str(path)
    mod.__dict__.update(globs or {})
    exec(compile(source, str(path), "exec"), mod.__dict__)  # noqa: S102 (the peer's own file)
    return mod


def _patched(source: str, patches: dict[str, str], where: str) -> str:
    for old, new in patches.items():
        count = source.count(old)
        if count != 1:
            pytest.fail(
                f"{where}: expected {old!r} exactly once in the peer's source, found {count}"
            )
        source = source.replace(old, new)
    return source


def _load_peer_file(package: str, relpath: str, what: str) -> tuple[Path, str]:
    root = _package_dir(package)
    if root is None:
        pytest.skip(f"{what}: package {package!r} is not installed")
    path = root / relpath
    if not path.is_file():
        pytest.skip(f"{what}: {path} not found (a different version of {package}?)")
    return path, path.read_text()


@pytest.fixture(scope="module")
def fla_based() -> types.ModuleType:
    return load_fla_based()


@pytest.fixture(scope="module")
def power_ref() -> tuple[Callable[..., Any], Callable[..., Any]]:
    return load_power_reference()


def load_fla_based() -> types.ModuleType:
    """flash-linear-attention's fla/ops/based/naive.py, as published."""
    what = "flash-linear-attention (pip install fla-core)"
    path, src = _load_peer_file("fla", "ops/based/naive.py", what)
    try:
        return _exec_source("_peer_fla_based_naive", src, path)
    except ImportError as e:  # einops
        pytest.skip(f"{what}: {path.name} needs {e.name or e}")


POWER_GUARDS = {
    # weight exp(deg * log(|s| + 1e-7)) = (|s| + 1e-7)^deg -> |s|^deg
    "log(s.abs() + 1e-7)": "log(s.abs())",
    # normaliser cast to float32 plus 1e-6 (relative to the row max) -> the plain float64 sum
    "(torch.sum(p, dim=-1).to(torch.float32) + 1e-6)": "torch.sum(p, dim=-1)",
}


def load_power_reference() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """Manifest AI's power_attention/_attention/reference.py ``attention``: (as published,
    with its numerical guards removed)."""
    what = "power retention (pip install power-attention)"
    path, src = _load_peer_file("power_attention", "_attention/reference.py", what)
    upath, usrc = _load_peer_file("power_attention", "_utils.py", what)
    utils = _exec_source("_peer_power_utils", usrc, upath)
    imp = "from power_attention._utils import dummify"
    src = _patched(src, {imp: ""}, str(path))
    globs = {"dummify": utils.dummify}
    published = _exec_source("_peer_power_reference", src, path, globs)
    exact = _exec_source(
        "_peer_power_reference_exact", _patched(src, POWER_GUARDS, str(path)), path, globs
    )
    return published.attention, exact.attention


# ---------------------------------------------------------------------------------------------
# Inputs and the float32 tolerance
# ---------------------------------------------------------------------------------------------


def _inputs(
    seed: int, b: int, hq: int, hk: int, t: int, e: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, hq, t, e)).astype(np.float32)
    k = rng.standard_normal((b, hk, t, e)).astype(np.float32)
    v = rng.standard_normal((b, hk, t, e)).astype(np.float32)
    return q, k, v


def _log_gates(seed: int, b: int, hk: int, t: int, bias: float) -> np.ndarray:
    """Per-token log gates log(sigmoid(z)), z ~ N(bias, 1): mean decay -log(sigmoid(bias))."""
    z = np.random.default_rng(seed + 1000).standard_normal((b, hk, t)) + bias
    return (-np.logaddexp(0.0, -z)).astype(np.float32)


def _rank(e: int, coeffs: tuple[float, ...]) -> int:
    """Monomial features of the nonzero degrees: sum_m C(E + m - 1, m)."""
    return sum(math.comb(e + m - 1, m) for m, c in enumerate(coeffs) if c != 0.0)


def _plan_chunk(report: Any) -> int | None:
    """The causal chunk C the call planned (``chunk: C`` in ``Report.plan``), if it says."""
    m = re.search(r"\bchunk: (\d+)", str(report.plan))
    return int(m.group(1)) if m else None


def _f32_tol(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    out: np.ndarray,
    coeffs: tuple[float, ...],
    scale: float,
    normalize: bool,
    log_gates: np.ndarray | None = None,
    chunk: int | None = None,
) -> np.ndarray:
    """Per-entry bound on |float32 result - exact| for causal polynomial attention (L = S).

    The kernel evaluates N_i = sum_j w_ij v_j and D_i = sum_j w_ij as phi(q_i)^T sum_j g_ij
    phi(k_j) [v_j | 1]: sums over the S keys and the R monomial features, n = S + R float32
    products in all. A sum's forward error is at most gamma_n = n u times the sum of its terms'
    magnitudes (Higham, Accuracy and Stability, Sec. 3.1); with rounding errors as independent
    zero-mean variables, sqrt(n) u with high probability (Higham & Mary, SIAM J. Sci. Comput.
    2019). The magnitudes over the features are sum_r |phi_r(q) phi_r(k)| = Pabs(scale |q|.|k|),
    Pabs(x) = sum_m |c_m| x^m on the dot product of absolute values (>= |P(scale q.k)|). A gate
    factor g_ij = exp(G_i - G_j) evaluated from float32 data carries a relative error of about
    u (1 + |G_i - G_j|). Normalised, o = N / D gives |do| <= (|dN| + |o| |dD|) / D. So

        |do_i| <= sqrt(n) u sum_j Pabs_ij g_ij (1 + |G_i - G_j|) (|v_j| + |o_i|) / sum_j w_ij

    (without normalize: the numerator term alone, undivided). One more term with gates: the
    diagonal blocks weigh exp(h_i - h_j) with h the gate sums relative to the start of their
    chunk of C rows (``chunk``, from ``Report.plan``; None: the whole sequence) held in float32,
    each rounded by u |h|, a relative weight error up to u (|h_i| + |h_j|) <= 2 u |h_i| (log
    gates <= 0) that does not grow with n; it adds

        u sum_{j in i's chunk} |w_ij| 2 |h_i| (|v_j| + |o_i|) / sum_j w_ij.

    Measured on lavapipe the largest error is 0.004 to 0.26 of this bound per case (gates with a
    decay of 2 to 4 per token the highest), so a result a few times beyond float32 rounding
    fails."""
    q64, k64, v64 = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    group = q64.shape[-3] // k64.shape[-3]
    k64, v64 = np.repeat(k64, group, axis=-3), np.repeat(v64, group, axis=-3)
    c = np.asarray(coeffs, dtype=np.float64)
    t = q64.shape[-2]
    mask = np.tril(np.ones((t, t), dtype=bool))
    x = scale * np.matmul(q64, np.swapaxes(k64, -1, -2))
    xabs = abs(scale) * np.matmul(np.abs(q64), np.swapaxes(np.abs(k64), -1, -2))
    w = np.polynomial.polynomial.polyval(x, c)
    mag = np.polynomial.polynomial.polyval(xabs, np.abs(c))
    local = np.zeros_like(mag)
    if log_gates is not None:
        g = np.repeat(np.cumsum(np.asarray(log_gates, dtype=np.float64), axis=-1), group, axis=-2)
        dg = np.where(mask, g[..., :, None] - g[..., None, :], 0.0)
        w, mag = w * np.exp(dg), mag * np.exp(dg)
        c_rows = t if chunk is None else chunk
        start = (np.arange(t) // c_rows) * c_rows  # each row's chunk start
        g0 = np.concatenate([np.zeros_like(g[..., :1]), g], axis=-1)  # G before each position
        h = g - np.take(g0, start, axis=-1)  # gate sum relative to the chunk's start
        same = start[:, None] == start[None, :]
        local = np.where(same, np.abs(w) * 2.0 * np.abs(h)[..., :, None], 0.0)
        mag = mag * (1.0 + np.abs(dg))
    w, mag, local = (np.where(mask, a, 0.0) for a in (w, mag, local))
    n = t + _rank(q64.shape[-1], coeffs)
    big = math.sqrt(n) * mag + local
    bound = np.matmul(big, np.abs(v64))
    if normalize:
        bound = (bound + big.sum(-1, keepdims=True) * np.abs(out)) / w.sum(-1, keepdims=True)
    return U32 * bound


def _def_tol(ref: np.ndarray) -> float:
    return DEF_TOL * max(1.0, float(np.abs(ref).max()))


def _report(what: str, out: np.ndarray, ref: np.ndarray, tol: np.ndarray) -> None:
    err = np.abs(out - ref)
    print(
        f"{what}: max |diff| {err.max():.3e}, max |diff|/tol {(err / tol).max():.3f}, "
        f"median tol {np.median(tol):.2e}"
    )


# ---------------------------------------------------------------------------------------------
# Based (flash-linear-attention)
# ---------------------------------------------------------------------------------------------

BASED = approx_attn.POLY_KERNELS["based"]  # (1, 1, 0.5): fla's 1 + x + x^2 / 2


def _t64(a: np.ndarray) -> Any:
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


def _based_peer(
    mod: types.ModuleType,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    scale: float | None,
    use_norm: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """fla's naive_parallel_based in float64 (key/value heads repeated for GQA): (published
    output, the output without its +1e-6 guard, i.e. published * (z + 1e-6) / z)."""
    group = q.shape[-3] // k.shape[-3]
    k, v = np.repeat(k, group, axis=-3), np.repeat(v, group, axis=-3)
    with torch.no_grad():
        out = mod.naive_parallel_based(_t64(q), _t64(k), _t64(v), scale=scale, use_norm=use_norm)
        if not use_norm:
            return out.numpy(), out.numpy()
        ones = torch.ones(v.shape[:-1] + (1,), dtype=torch.float64)
        z = mod.naive_parallel_based(_t64(q), _t64(k), ones, scale=scale, use_norm=False)
    out, z = out.numpy(), z.numpy()
    return out, out * (z + 1e-6) / z


# (b, hq, hk, t, e): the last one has query heads sharing key/value heads (GQA)
BASED_SHAPES = [
    (1, 1, 1, 64, 16),
    (2, 3, 3, 200, 16),
    (1, 2, 2, 256, 8),
    (1, 2, 2, 128, 64),
    (1, 4, 2, 192, 16),
]


@pytest.mark.parametrize("use_norm", [True, False])
@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("shape", BASED_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_based_definition_float64(fla_based, shape, scale, use_norm) -> None:
    """Our float64 twin equals fla's naive_parallel_based (its +1e-6 guard modelled exactly)."""
    b, hq, hk, t, e = shape
    q, k, v = _inputs(1, b, hq, hk, t, e)
    published, exact = _based_peer(fla_based, q, k, v, scale, use_norm)
    ours = polynomial_kernel_attention(
        q,
        k,
        v,
        BASED,
        scale=e**-0.5 if scale is None else scale,
        is_causal=True,
        normalize=use_norm,
        enable_gqa=hq != hk,
    )
    assert_close(ours, exact, _def_tol(exact), "twin vs fla naive_parallel_based (guard undone)")
    if use_norm:  # the guard itself: 1 + x + x^2/2 >= 1/2, so z_i >= (i + 1) / 2
        zmin = (np.arange(t) + 1.0)[:, None] / 2.0
        assert np.abs(published - ours).max() <= (1e-6 / zmin * np.abs(ours)).max() + 1e-12


@pytest.mark.parametrize("t,chunk", [(64, 16), (256, 64)])
def test_based_chunked_definition_float64(fla_based, t, chunk) -> None:
    """fla's naive_chunk_based (its linear-time form: cumulative 0th, 1st and 2nd order states)
    is the same function too."""
    q, k, v = _inputs(2, 2, 2, 2, t, 16)
    with torch.no_grad():
        peer = fla_based.naive_chunk_based(_t64(q), _t64(k), _t64(v), chunk_size=chunk).numpy()
    ours = polynomial_kernel_attention(q, k, v, BASED, is_causal=True)
    z = polynomial_kernel_attention(
        q, k, np.ones_like(v[..., :1]), BASED, is_causal=True, normalize=False
    )
    exact = peer * (z + 1e-6) / z
    assert_close(ours, exact, _def_tol(exact), "twin vs fla naive_chunk_based")


@pytest.mark.parametrize("use_norm", [True, False])
@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("shape", BASED_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_based_poly_attention(fla_based, shape, scale, use_norm) -> None:
    """approx_attn.poly_attention(coeffs="based") in float32 on the GPU against fla's
    naive_parallel_based in float64, within the float32 rounding bound."""
    b, hq, hk, t, e = shape
    q, k, v = _inputs(3, b, hq, hk, t, e)
    _, exact = _based_peer(fla_based, q, k, v, scale, use_norm)
    out = approx_attn.poly_attention(
        q,
        k,
        v,
        coeffs="based",
        scale=scale,
        is_causal=True,
        normalize=use_norm,
        enable_gqa=hq != hk,
    )
    s = e**-0.5 if scale is None else scale
    tol = _f32_tol(q, k, v, exact, BASED, s, use_norm)
    _report(f"based {shape} scale={scale} norm={use_norm}", out, exact, tol)
    assert_close(out, exact, tol, "poly_attention('based') vs fla naive_parallel_based")


# ---------------------------------------------------------------------------------------------
# Power retention (Manifest AI)
# ---------------------------------------------------------------------------------------------


def _power_peer(
    fn: Callable[..., Any],
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    deg: int,
    scale: float,
    log_gates: np.ndarray | None,
) -> np.ndarray:
    """The peer's ``attention`` in float64 on our (b, h, t, d) arrays: its layout is (b, t, h, d)
    and its log_G the cumulative sum of the per-token log gates, as its power_full forms it."""

    def bthd(a: np.ndarray) -> Any:
        return _t64(np.swapaxes(a, 1, 2)).contiguous()

    log_g = None
    if log_gates is not None:
        log_g = _t64(np.swapaxes(log_gates, 1, 2)).cumsum(1)  # (b, t, h_kv)
    with torch.no_grad():
        out = fn(bthd(q), bthd(k), bthd(v), log_g, deg, causal=True, scale=scale, norm=True)
    return np.swapaxes(out.numpy(), 1, 2)


# (b, hq, hk, t, e, gate bias or None): bias 2 decays ~0.13 per token; bias -2 ~2.1 per token,
# a total decay exp(-1000) over 512 tokens, far below float32's range (and float64's).
POWER_CASES = [
    (1, 1, 1, 64, 16, None),
    (2, 2, 2, 200, 16, 2.0),
    (1, 4, 2, 256, 16, 2.0),
    (1, 2, 1, 512, 16, -2.0),
    (1, 2, 2, 128, 32, 0.0),
    (2, 1, 1, 100, 8, 0.0),
]
POWER_IDS = ["x".join(map(str, c[:5])) + f"-gate{c[5]}" for c in POWER_CASES]
# On the GPU: degree 4 at E = 32 has rank C(35, 4) = 52,360 features, which lavapipe's fast
# memory does not fit (any E is promised only at degree 2); degree 4 runs at E <= 16.
POWER_GPU = [
    pytest.param(case, deg, id=f"{cid}-{deg}")
    for case, cid in zip(POWER_CASES, POWER_IDS)
    for deg in (2, 4)
    if deg == 2 or case[4] <= 16
]


# the twin forms exp(G_i - G_j) for every pair, masked ones (j > i, up to e^+1000) included
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("deg", [2, 4])
@pytest.mark.parametrize("case", POWER_CASES, ids=POWER_IDS)
def test_power_definition_float64(power_ref, case, deg) -> None:
    """Our float64 twin equals the peer's reference attention with its guards removed (to 1e-10),
    and the published one within the guards' effect."""
    published_fn, exact_fn = power_ref
    b, hq, hk, t, e, bias = case
    q, k, v = _inputs(4, b, hq, hk, t, e)
    lg = None if bias is None else _log_gates(4, b, hk, t, bias)
    scale = e**-0.5
    coeffs = approx_attn.POLY_KERNELS[f"power{deg}"]
    ours = polynomial_kernel_attention(
        q, k, v, coeffs, scale=scale, is_causal=True, log_gates=lg, enable_gqa=hq != hk
    )
    exact = _power_peer(exact_fn, q, k, v, deg, scale, lg)
    assert_close(ours, exact, _def_tol(exact), "twin vs power retention reference (no guards)")
    # The guards: (|x| + 1e-7)^deg moves a weight by at most deg 1e-7 (|x| + 1e-7)^(deg - 1)
    # g_ij, the output by at most that relative share of the weights times 2 max|v|; the
    # normaliser's +1e-6 (relative to the largest weight <= the sum) and float32 cast move it
    # by at most (1e-6 + 2^-24) |o|.
    published = _power_peer(published_fn, q, k, v, deg, scale, lg)
    w = polynomial_kernel_attention(
        q,
        k,
        np.ones_like(v[..., :1]),
        coeffs,
        scale=scale,
        is_causal=True,
        log_gates=lg,
        normalize=False,
        enable_gqa=hq != hk,
    )
    dw = polynomial_kernel_attention(  # sum_j deg 1e-7 (|x| + 1e-7)^(deg-1) g_ij, from above
        np.abs(q),
        np.abs(k),
        np.ones_like(v[..., :1]),
        tuple(deg * 1e-7 * math.comb(deg - 1, m) * 1e-7 ** (deg - 1 - m) for m in range(deg)),
        scale=scale,
        is_causal=True,
        log_gates=lg,
        normalize=False,
        enable_gqa=hq != hk,
    )
    vmax = np.abs(v).max()
    guard = 2 * vmax * dw / w + (1e-6 + U32) * np.abs(ours) + 1e-12
    assert_close(published, ours, guard * 1.01, "published power retention reference vs twin")


@pytest.mark.parametrize("case,deg", POWER_GPU)
def test_power_poly_attention(power_ref, case, deg) -> None:
    """approx_attn.poly_attention(coeffs=f"power{deg}", log_gates=...) in float32 on the GPU
    against the peer's reference in float64, within the float32 rounding bound."""
    _, exact_fn = power_ref
    b, hq, hk, t, e, bias = case
    q, k, v = _inputs(5, b, hq, hk, t, e)
    lg = None if bias is None else _log_gates(5, b, hk, t, bias)
    scale = e**-0.5
    exact = _power_peer(exact_fn, q, k, v, deg, scale, lg)
    out, report = approx_attn.poly_attention(
        q,
        k,
        v,
        coeffs=f"power{deg}",
        is_causal=True,
        log_gates=lg,
        enable_gqa=hq != hk,
        return_report=True,
    )
    coeffs = approx_attn.POLY_KERNELS[f"power{deg}"]
    tol = _f32_tol(q, k, v, exact, coeffs, scale, True, lg, _plan_chunk(report))
    _report(f"power{deg} {case}", out, exact, tol)
    assert_close(out, exact, tol, f"poly_attention('power{deg}') vs power retention reference")


@pytest.mark.parametrize("deg", [2, 4])
def test_power_decoding_matches_peer(power_ref, deg) -> None:
    """A prefill with return_state=True, then PolyState.step one token at a time (with gates,
    GQA) gives the peer's parallel outputs within the float32 rounding bound."""
    _, exact_fn = power_ref
    b, hq, hk, t, e, prefill = 1, 4, 2, 96, 16, 64
    q, k, v = _inputs(6, b, hq, hk, t, e)
    lg = _log_gates(6, b, hk, t, 2.0)
    exact = _power_peer(exact_fn, q, k, v, deg, e**-0.5, lg)
    out0, state = approx_attn.poly_attention(
        q[..., :prefill, :],
        k[..., :prefill, :],
        v[..., :prefill, :],
        coeffs=f"power{deg}",
        is_causal=True,
        log_gates=lg[..., :prefill],
        enable_gqa=True,
        return_state=True,
    )
    outs = [out0]
    for i in range(prefill, t):
        sl = slice(i, i + 1)
        outs.append(state.step(q[..., sl, :], k[..., sl, :], v[..., sl, :], log_gates=lg[..., sl]))
    out = np.concatenate(outs, axis=-2)
    coeffs = approx_attn.POLY_KERNELS[f"power{deg}"]
    # chunk None: the gate-sum term as if the whole sequence were one chunk (conservative for
    # the prefill rows; each step is a call of one row)
    tol = _f32_tol(q, k, v, exact, coeffs, e**-0.5, True, lg)
    _report(f"power{deg} decode", out, exact, tol)
    assert_close(out, exact, tol, f"prefill + step('power{deg}') vs power retention reference")
