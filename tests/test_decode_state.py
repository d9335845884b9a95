"""Decoding with the state in GPU memory (`PolyState.step`, `approx_attn._core.DeviceState`):
many steps against the float64 one-token twin (`reference.polynomial_state_step`, on the same
state layout) and against the host-state path (`poly_attention` with `initial_state`), for
Based, x^2 and an odd unnormalised kernel, with and without gates, GQA, Ev != E and E not a
multiple of 4; a state saved mid-stream (to_numpy, pickle) continues identically; bad inputs
raise what the host path raises.

Tolerance (float32 rounding, u = 2^-24, worst case to first order). Every stream starts from the
zero state, so each state entry is a recursive float32 sum over the tokens so far. For output
token i and an earlier (or the same) token j of its kv head, the GPU's term
phi_q(q_i)_f phi_k(k_j)_f [v_j | 1]_c exp(G_i - G_j) carries at most n_ij roundings relative to
its magnitude:
    g (the key's monomial: g products) + g + 1 (the query's: the float32 weight and g products)
    + 1 (phi_k v) + (i - j + 1) (the additions into the state entry since j)
    + d_r (the sum over the r features: sequential sums of BR = 64 rows per workgroup, then the
    blocks, strided and by a tree, d_r = min(r, BR + ceil(r / BR))) + 1 (phi_q times s)
    + 1 (the division, normalised) and, gated, 4 (i - j) + 2 |G_i - G_j| (per later token one
    product by exp(log_gate) plus WGSL's exp error of (3 + 2 |x|) ulp).
With A_ij = sum_m |c_m| (|s| |q_i| . |k_j|)^m exp(G_i - G_j) (the sum over features of
|phi_q(q_i)_f| |phi_k(k_j)_f|, multinomial weights included) and D_i the normaliser,
    unnormalised: |O_gpu - O_twin|_ic <= u sum_j n_ij A_ij |v_jc|,
    normalised:   |O_gpu - O_twin|_ic <= u (sum_j n_ij A_ij |v_jc| + |O_ic| sum_j n_ij A_ij) / D_i.
The state entry (f, c) after token t: u sum_j n'_tj |phi_k(k_j)_f| |[v_j | 1]_c| exp(G_t - G_j),
n'_tj = g + 2 + (t - j + 1) + gated (4 (t - j) + 2 |G_t - G_j|). The host path does the same sums
with no more roundings per term (its decays are float64 values rounded once), so the two paths
differ by at most twice the bound. Both forms of the step kernel run (the unrolled column of GPUs
and the loop of CPU adapters): the same sums in the same order. `test_tolerance_has_teeth` checks that a 1e-3 change of one
coefficient lands far outside it.
"""

from __future__ import annotations

import math
import pickle
import subprocess
import sys
import textwrap

import approx_attn
import numpy as np
import pytest
from _helpers import assert_close
from approx_attn import POLY_KERNELS, PolyState
from approx_attn.reference import monomial_features, polynomial_state_step

U32 = 2.0**-24
ODD = (0.2, 1.0, 0.0, 0.5)  # degree 3, negative somewhere: unnormalised only
MAX_TOKENS = approx_attn._core.DeviceState.max_step_tokens
STEP_ROWS = 64  # feature rows per workgroup of shaders/poly_step.wgsl (src/poly/decode.rs)


def coeffs_of(c):
    return POLY_KERNELS[c] if isinstance(c, str) else c


def rand(rng, shape, f=1.0):
    return (f * rng.standard_normal(shape)).astype(np.float32)


def zero_state(
    lead_kv, e, ev, coeffs, *, host_only=False, enable_gqa=False, normalize=True, unrolled=None
):
    rank = approx_attn._core.poly_kernel_rank(e, list(coeffs_of(coeffs)))
    st = PolyState.from_numpy(
        np.zeros(lead_kv + (rank, ev + 1), np.float32),
        coeffs=coeffs,
        scale=1 / math.sqrt(e),
        head_dim=e,
        normalize=normalize,
        enable_gqa=enable_gqa,
    )
    st._host_only = host_only
    st._device_unrolled = unrolled
    return st


def run(st, q, k, v, gates, sizes):
    """Steps of the given token counts over the stream; outputs concatenated."""
    outs, t = [], 0
    for n in sizes:
        sl = slice(t, t + n)
        g = None if gates is None else gates[..., sl]
        outs.append(st.step(q[..., sl, :], k[..., sl, :], v[..., sl, :], g))
        t += n
    assert t == q.shape[-2]
    return np.concatenate(outs, axis=-2)


def twin(q, k, v, coeffs, gates, *, normalize, state=None):
    """The one-token twin over the stream: outputs (..., H, T, Ev) and the final state."""
    c = coeffs_of(coeffs)
    scale = float(np.float32(1 / math.sqrt(q.shape[-1])))
    if state is None:
        rank = approx_attn._core.poly_kernel_rank(q.shape[-1], list(c))
        state = np.zeros(k.shape[:-2] + (rank, v.shape[-1] + 1))
    outs = []
    for t in range(q.shape[-2]):
        o, state = polynomial_state_step(
            state,
            q[..., t, :],
            k[..., t, :],
            v[..., t, :],
            c,
            scale=scale,
            normalize=normalize,
            log_gate=None if gates is None else gates[..., t],
        )
        outs.append(o)
    return np.stack(outs, -2), state


def tolerance(q, k, v, coeffs, gates, *, normalize):
    """The module docstring's bounds: (outputs (..., H, T, Ev), final state)."""
    c = np.asarray(coeffs_of(coeffs), np.float64)
    g = len(c) - 1
    e, n = q.shape[-1], q.shape[-2]
    scale = float(np.float32(1 / math.sqrt(e)))
    r = approx_attn._core.poly_kernel_rank(e, list(c))
    group = q.shape[-3] // k.shape[-3]
    q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k, v))
    kh, vh = (np.repeat(x, group, axis=-3) for x in (k64, v64))
    vv = np.concatenate([vh, np.ones(vh.shape[:-1] + (1,))], -1)
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    gs = np.zeros(k.shape[:-1]) if gates is None else np.cumsum(np.asarray(gates, np.float64), -1)
    gh = np.repeat(gs, group, axis=-2)
    dg = gh[..., :, None] - gh[..., None, :]
    visible = j <= i
    decay = np.where(visible, np.exp(np.where(visible, dg, 0.0)), 0.0)
    n_ij = 2 * g + 5 + (i - j + 1) + min(r, STEP_ROWS + -(-r // STEP_ROWS))
    if gates is not None:
        n_ij = n_ij + 4 * (i - j) + 2 * np.abs(dg)
    y = scale * np.matmul(np.abs(q64), np.swapaxes(np.abs(kh), -1, -2))
    a = np.polynomial.polynomial.polyval(y, np.abs(c)) * decay * n_ij
    num = np.matmul(a, np.abs(vv[..., :-1]))
    if normalize:
        w = np.polynomial.polynomial.polyval(scale * q64 @ np.swapaxes(kh, -1, -2), c) * decay
        d = w.sum(-1, keepdims=True)
        o = np.matmul(w, vh) / d
        out_tol = U32 * (num + np.abs(o) * a.sum(-1, keepdims=True)) / d
    else:
        out_tol = U32 * num
    _, phi_k = monomial_features(k64, c, scale)
    last = gs[..., -1:] - gs  # G_T - G_j per kv head
    n_t = g + 2 + (n - np.arange(n)) + (0 if gates is None else 4 * (n - 1 - np.arange(n)))
    n_t = n_t + (0 if gates is None else 2 * np.abs(last))
    vk = np.concatenate([np.abs(v64), np.ones(v64.shape[:-1] + (1,))], -1)
    weight = np.exp(last) * n_t
    state_tol = U32 * np.einsum("...jf,...j,...jc->...fc", np.abs(phi_k), weight, vk)
    return out_tol, state_tol


CASES = [
    # (E, Ev, coeffs, normalize, kv heads, query heads)
    (7, 7, "based", True, 2, 2),
    (8, 5, "power2", True, 2, 2),
    (6, 9, "based", True, 2, 4),  # GQA, Ev != E
    (5, 3, ODD, False, 1, 3),
    (64, 64, "based", True, 2, 2),  # the production head size, rank 2,145
]


@pytest.mark.parametrize("e,ev,coeffs,normalize,kv,heads", CASES)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("unrolled", [False, True])
def test_steps_match_the_twin_and_the_host_path(
    e, ev, coeffs, normalize, kv, heads, gated, unrolled
):
    rng = np.random.default_rng(e + 100 * gated + kv + heads)
    sizes = [1] * 12 + [3, 2, MAX_TOKENS, MAX_TOKENS + 1, 1, 1] if e < 64 else [1] * 6 + [4, 1]
    n = sum(sizes)
    gqa = heads != kv
    q, k, v = rand(rng, (1, heads, n, e)), rand(rng, (1, kv, n, e)), rand(rng, (1, kv, n, ev))
    gates = -rng.uniform(0, 0.3, (1, kv, n)).astype(np.float32) if gated else None
    dev = zero_state((1, kv), e, ev, coeffs, enable_gqa=gqa, normalize=normalize, unrolled=unrolled)
    host = zero_state((1, kv), e, ev, coeffs, host_only=True, enable_gqa=gqa, normalize=normalize)
    got = run(dev, q, k, v, gates, sizes)
    assert dev._device is not None  # the GPU path ran (and holds the state now)
    assert dev.nbytes == host.nbytes and dev.rank == host.rank
    ref = run(host, q, k, v, gates, sizes)
    want, want_state = twin(q, k, v, coeffs, gates, normalize=normalize)
    out_tol, state_tol = tolerance(q, k, v, coeffs, gates, normalize=normalize)
    what = f"E={e} Ev={ev} {coeffs} gated={gated}"
    assert_close(got, want, out_tol, f"device vs twin, {what}")
    assert_close(ref, want, out_tol, f"host vs twin, {what}")
    assert_close(got, ref.astype(np.float64), 2 * out_tol, f"device vs host, {what}")
    assert_close(dev.to_numpy(), want_state, state_tol, f"device state vs twin, {what}")
    assert_close(dev.to_numpy(), host.array.astype(np.float64), 2 * state_tol, what)


def test_tolerance_has_teeth():
    """A 1e-3 change of one coefficient moves the twin by far more than the tolerance."""
    rng = np.random.default_rng(3)
    n, e = 20, 8
    q, k, v = rand(rng, (1, 2, n, e)), rand(rng, (1, 2, n, e)), rand(rng, (1, 2, n, 4))
    gates = -rng.uniform(0, 0.3, (1, 2, n)).astype(np.float32)
    got = run(zero_state((1, 2), e, 4, "based"), q, k, v, gates, [1] * n)
    off, _ = twin(q, k, v, (1.0, 1.0, 0.5005), gates, normalize=True)
    out_tol, _ = tolerance(q, k, v, "based", gates, normalize=True)
    assert float(np.max(np.abs(got - off) / out_tol)) > 10


def test_saved_state_continues_identically(tmp_path):
    rng = np.random.default_rng(4)
    n, e = 24, 6
    q, k, v = rand(rng, (2, 2, n, e)), rand(rng, (2, 2, n, e)), rand(rng, (2, 2, n, 5))
    gates = -rng.uniform(0, 0.3, (2, 2, n)).astype(np.float32)
    st = zero_state((2, 2), e, 5, "based")
    first = run(st, q[..., :10, :], k[..., :10, :], v[..., :10, :], gates[..., :10], [1] * 10)
    saved = st.to_numpy()
    np.save(tmp_path / "state.npy", saved)
    pickled = pickle.dumps(st)
    assert st._device is not None  # neither to_numpy nor pickling moved the state to the host
    rest = (q[..., 10:, :], k[..., 10:, :], v[..., 10:, :], gates[..., 10:])
    sizes = [1, 1, 4, 1, 1, 1, 5]
    a = run(st, *rest, sizes)
    back = PolyState.from_numpy(
        np.load(tmp_path / "state.npy"), coeffs="based", scale=st.scale, head_dim=e
    )
    b = run(back, *rest, sizes)
    c = run(pickle.loads(pickled), *rest, sizes)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(st.to_numpy(), back.to_numpy())
    # The saved copy is a copy: the device state moved on, the saved array did not.
    assert not np.array_equal(saved, st.to_numpy())
    whole = run(zero_state((2, 2), e, 5, "based"), q, k, v, gates, [1] * n)
    np.testing.assert_array_equal(np.concatenate([first, a], -2), whole)


def test_array_reads_back_and_writes_through():
    """`.array` is the state, as for a host state: writing into it changes the next step."""
    rng = np.random.default_rng(5)
    e = 4
    q, k, v = rand(rng, (1, 8, e)), rand(rng, (1, 8, e)), rand(rng, (1, 8, 3))
    st = zero_state((1,), e, 3, "power2")
    run(st, q[:, :6], k[:, :6], v[:, :6], None, [1] * 6)
    want = st.to_numpy()
    np.testing.assert_array_equal(st.array, want)
    assert st._device is None  # handed to the host
    st.array[...] = 0.0
    fresh = zero_state((1,), e, 3, "power2")
    tail = (q[:, 6:], k[:, 6:], v[:, 6:], None, [1, 1])
    np.testing.assert_array_equal(run(st, *tail), run(fresh, *tail))
    assert "nbytes" in repr(st) and st._device is not None


def bad_inputs(rng, e):
    x = rand(rng, (1, 2, 1, e))
    two = rand(rng, (1, 2, 2, e))
    nan = x.copy()
    nan[0, 0, 0, 0] = np.nan
    return {
        "head dim": (rand(rng, (1, 2, 1, e + 1)),) * 3,
        "kv heads": (rand(rng, (1, 3, 1, e)),) * 3,
        "dtype": (x.astype(np.int32), x, x),
        "1-D": (x.reshape(-1), x, x),
        "L != S": (x, two, two),
        "k vs v": (x, x, two),
        "nan query": (nan, x, x),
        "gates shape": (x, x, x, np.zeros((1, 2, 2))),
        "gates nan": (x, x, x, np.full((1, 2, 1), np.nan)),
        "gates dtype": (x, x, x, np.array([["a", "b"]])),
    }


def test_bad_inputs_raise_what_the_host_path_raises():
    rng = np.random.default_rng(6)
    e = 4
    dev, host = zero_state((1, 2), e, e, "based"), zero_state((1, 2), e, e, "based", host_only=True)
    warm = [rand(rng, (1, 2, 1, e)) for _ in range(3)]
    np.testing.assert_allclose(dev.step(*warm), host.step(*warm), rtol=1e-6)
    assert dev._device is not None
    before = dev.to_numpy()
    for what, args in bad_inputs(rng, e).items():
        errors = []
        for st in (dev, host):
            with pytest.raises((ValueError, TypeError)) as info:
                st.step(*args)
            errors.append((type(info.value), str(info.value)))
        assert errors[0] == errors[1], what
    np.testing.assert_array_equal(dev.to_numpy(), before)
    # x^2 with a query orthogonal to every key: a zero normaliser, raised; the state unchanged.
    sq = zero_state((1, 2), e, e, "power2")
    sq.step(*warm)
    kept = sq.to_numpy()
    z = np.zeros((1, 2, 1, e), np.float32)
    with pytest.raises(ValueError, match="not finite.*vanish"):
        sq.step(z, z, warm[2])
    np.testing.assert_array_equal(sq.to_numpy(), kept)
    # A state from another kernel or head size is refused when it is made, as before.
    with pytest.raises(ValueError, match="has shape"):
        PolyState.from_numpy(before, coeffs="power2", scale=0.5, head_dim=e)
    with pytest.raises(ValueError, match="has shape"):
        PolyState.from_numpy(before, coeffs="based", scale=0.5, head_dim=e + 1)
    # A kernel negative somewhere cannot normalise: every step raises, as before.
    neg = zero_state((1, 2), e, e, ODD, normalize=False)
    neg.normalize = True
    with pytest.raises(ValueError, match="negative for some x"):
        neg.step(*warm)


def test_the_device_state_checks_its_own_arguments():
    core = approx_attn._core
    with pytest.raises(ValueError, match="expected"):
        core.DeviceState(np.zeros(10, np.float32), 1, 1, 4, 4, [1.0, 1.0, 0.5], 0.5, True)
    with pytest.raises(ValueError, match="all zero"):
        core.DeviceState(np.zeros(10, np.float32), 1, 1, 4, 4, [0.0], 0.5, True)
    r = core.poly_kernel_rank(4, [1.0, 1.0, 0.5])
    st = core.DeviceState(np.zeros(r * 5, np.float32), 1, 1, 4, 4, [1.0, 1.0, 0.5], 0.5, True)
    x = np.ones(4, np.float32)
    with pytest.raises(ValueError, match="1 to"):
        st.step(np.ones(0, np.float32), x[:0], x[:0], 0)
    with pytest.raises(ValueError, match="key holds"):
        st.step(x, x[:3], x, 1)
    out, took = st.step(x, x, x, 1)
    assert took and out.shape == (4,)


def test_changed_kernel_attributes_take_a_new_device_state():
    """A caller who changes `normalize` (or the scale) between steps gets that kernel, as on the
    host path, not the one the device state was made for."""
    rng = np.random.default_rng(7)
    e = 4
    q, k, v = rand(rng, (1, 2, 6, e)), rand(rng, (1, 2, 6, e)), rand(rng, (1, 2, 6, 3))
    dev, host = zero_state((1, 2), e, 3, "based"), zero_state((1, 2), e, 3, "based", host_only=True)
    tol = 1e-6 * np.abs(run(host, q[..., :3, :], k[..., :3, :], v[..., :3, :], None, [3])).max()
    run(dev, q[..., :3, :], k[..., :3, :], v[..., :3, :], None, [3])
    for st in (dev, host):
        st.normalize, st.scale = False, 0.3
    tail = (q[..., 3:, :], k[..., 3:, :], v[..., 3:, :], None, [1, 1, 1])
    a, b = run(dev, *tail), run(host, *tail)
    assert dev._device is not None
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max() + tol


def test_device_loss_raises_and_a_saved_copy_continues():
    # In a subprocess: destroying the device must not leak into the other tests.
    code = textwrap.dedent(
        """
        import numpy as np, approx_attn
        rng = np.random.default_rng(0)
        x = [rng.standard_normal((1, 2, 1, 4), dtype=np.float32) for _ in range(3)]
        r = approx_attn._core.poly_kernel_rank(4, [1.0, 1.0, 0.5])
        z = np.zeros((1, 2, r, 5), np.float32)
        st = approx_attn.PolyState.from_numpy(z, coeffs="based", scale=0.5, head_dim=4)
        st.step(*x)
        saved = st.to_numpy()
        approx_attn._core._destroy_device()
        try:
            st.step(*x)
            print("no error")
        except approx_attn.DeviceError as err:
            print("DeviceError", err)
        back = approx_attn.PolyState.from_numpy(saved, coeffs="based", scale=0.5, head_dim=4)
        back.step(*x)
        print("continued", back._device is not None)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("DeviceError"), lines
    assert lines[-1] == "continued True", lines


def test_pickles_of_host_states_still_load():
    """A pickle of a state made before states lived on the device (its dict holds `array`)."""
    rng = np.random.default_rng(8)
    e = 4
    x = [rand(rng, (1, 2, 1, e)) for _ in range(3)]
    st = zero_state((1, 2), e, e, "based")
    st.step(*x)
    old = {k: v for k, v in st.__getstate__().items() if not k.startswith("_")}
    old["array"] = st.to_numpy()
    back = PolyState.__new__(PolyState)
    back.__setstate__(old)
    assert back.nbytes == st.nbytes and back.rank == st.rank
    np.testing.assert_array_equal(back.step(*x), st.step(*x))
