"""Polynomial attention as a model primitive: the kernel of Based, power retention and
PolySketchFormer, computed exactly (up to float32 rounding) on the GPU, with gates and a
constant-size recurrent state for decoding."""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from . import (
    _F32_MAX,
    _as_float_array,
    _check_bool,
    _check_finite,
    _check_host_memory,
    _check_number,
    _check_out,
    _core,
    _count_io,
    _float32_flat,
    _in_place,
    _new_out,
    _report,
    _shapes,
    _slices,
    _to_out_dtype,
    _type_error,
)

POLY_KERNELS: dict[str, tuple[float, ...]] = {
    # Based (Arora et al. 2024): the 2nd-order Taylor map of exp, 1 + x + x^2/2.
    "based": (1.0, 1.0, 0.5),
    # Power attention / power retention (Manifest AI): even powers x^p.
    "power2": (0.0, 0.0, 1.0),
    "power4": (0.0, 0.0, 0.0, 0.0, 1.0),
    "power6": (0.0,) * 6 + (1.0,),
}
"""Named kernels for ``coeffs=``: coefficients c_0, c_1, ... of P(x) = sum_m c_m x^m."""


def _coeffs(val: Any) -> tuple[float, ...]:
    if isinstance(val, str):
        if val not in POLY_KERNELS:
            raise ValueError(f"coeffs must be one of {tuple(POLY_KERNELS)} or numbers, got {val!r}")
        return POLY_KERNELS[val]
    try:
        arr = np.asarray(val)
    except Exception as exc:
        raise _type_error("coeffs", "a sequence of numbers or a kernel name", val) from exc
    if arr.ndim != 1 or arr.size == 0 or arr.dtype.kind not in "iuf":
        raise _type_error("coeffs", "a non-empty 1-D sequence of real numbers", val)
    c = tuple(float(x) for x in arr)
    if not all(math.isfinite(x) for x in c):
        raise ValueError(f"coeffs must be finite, got {c}")
    if not any(c):
        raise ValueError("coeffs are all zero: the kernel would weigh every key 0")
    return c


def _nonnegative(c: tuple[float, ...]) -> bool:
    """Whether P(x) = sum_m c_m x^m >= 0 for every real x (then a normaliser is a sum of
    nonnegative weights): an even degree with a positive leading coefficient and P >= 0 at every
    real critical point (its minima), checked with a relative margin for rounding."""
    p = np.polynomial.Polynomial(c).trim()
    g = p.degree()
    lead = p.coef[-1]
    if g == 0:
        return lead > 0
    if g % 2 == 1 or lead < 0:
        return False
    crit = p.deriv().roots()
    real = crit[np.abs(crit.imag) <= 1e-9 * np.maximum(1.0, np.abs(crit))].real
    scale = np.abs(p.coef).sum()
    return bool(np.all(p(real) >= -1e-12 * scale * np.maximum(1.0, np.abs(real)) ** g))


# Checked at every device step: the roots of P once per kernel, not per token.
_nonnegative_kernel = functools.lru_cache(maxsize=64)(_nonnegative)


class PolyState:
    """The recurrent state of polynomial attention: per batch and key/value head,
    sum_j exp(G_last - G_j) phi(k_j) [v_j | 1] (``rank`` x (Ev + 1) float32), its size constant
    in the sequence length. ``step`` consumes new tokens and returns their outputs;
    ``array`` (or ``to_numpy()``) and ``PolyState.from_numpy`` persist it.

    phi are the monomials of the kernel's nonzero degrees in the key's E coordinates (in graded
    lexicographic order); the scale and coefficients act on the query side only, so a state
    depends on the keys, values and gates and on which degrees the kernel has.

    After its first ``step`` the state lives in GPU memory (``_core.DeviceState``): a step of a
    few tokens uploads only them and reads back only their outputs. ``to_numpy()`` and pickling
    copy it back and leave it there; ``array`` copies it back and hands it to the host (writes
    into that array are seen by the next step, which uploads it again).
    """

    # The step kernel's form on the device (None: by the adapter); tests run both.
    _device_unrolled: bool | None = None

    def __init__(
        self,
        array: np.ndarray,
        *,
        coeffs: Any,
        scale: float,
        normalize: bool = True,
        enable_gqa: bool = False,
        head_dim: int,
    ) -> None:
        self.coeffs = _coeffs(coeffs)
        self.scale = _check_number(scale, "scale")
        self.normalize = bool(_check_bool(normalize, "normalize"))
        self.enable_gqa = bool(_check_bool(enable_gqa, "enable_gqa"))
        self.head_dim = int(head_dim)
        arr = np.ascontiguousarray(array, dtype=np.float32)
        rank = _core.poly_kernel_rank(self.head_dim, list(self.coeffs))
        if arr.ndim < 2 or arr.shape[-2] != rank or arr.shape[-1] < 2:
            raise ValueError(
                f"a state for head dimension {self.head_dim} and coeffs {self.coeffs} has shape "
                f"(..., {rank}, Ev + 1), got {arr.shape}"
            )
        self._array = arr
        self._shape: tuple[int, ...] = arr.shape
        # The state in GPU memory after a step on the device (then `_array` is stale), and
        # whether this state's sizes cannot be held there (every step then takes the host path).
        self._device: Any = None
        self._device_key: tuple[Any, ...] = ()
        self._host_only = False

    @property
    def array(self) -> np.ndarray:
        """The state array, shape (..., kv heads, rank, Ev + 1). Reading it copies a
        device-resident state back to host memory and hands it to the host: writes into the
        returned array are seen by the next step, as for any host state."""
        if self._device is not None:
            self._array = self._device.to_numpy().reshape(self._shape)
            self._device = None
        return self._array

    @array.setter
    def array(self, value: np.ndarray) -> None:
        self._array = value
        self._shape = value.shape
        self._device = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self._device is not None:
            state["_array"] = self._device.to_numpy().reshape(self._shape)
        state["_device"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Pickles of the host-only class hold `array` and none of the device attributes.
        if "array" in state:
            state["_array"] = state.pop("array")
        state.setdefault("_shape", state["_array"].shape)
        state.setdefault("_device", None)
        state.setdefault("_device_key", ())
        state.setdefault("_host_only", False)
        self.__dict__.update(state)

    @classmethod
    def from_numpy(
        cls,
        array: np.ndarray,
        *,
        coeffs: Any,
        scale: float,
        head_dim: int,
        normalize: bool = True,
        enable_gqa: bool = False,
    ) -> PolyState:
        """A state saved with ``to_numpy()`` (or ``.array``), with the call's kernel."""
        return cls(
            array,
            coeffs=coeffs,
            scale=scale,
            normalize=normalize,
            enable_gqa=enable_gqa,
            head_dim=head_dim,
        )

    def to_numpy(self) -> np.ndarray:
        """A copy of the state array, shape (..., kv heads, rank, Ev + 1)."""
        if self._device is not None:
            return self._device.to_numpy().reshape(self._shape)
        return self._array.copy()

    @property
    def nbytes(self) -> int:
        """Bytes of the state: constant in the number of tokens consumed."""
        return self._array.itemsize * math.prod(self._shape)

    @property
    def rank(self) -> int:
        return int(self._shape[-2])

    def step(
        self,
        query: Any,
        key: Any,
        value: Any,
        log_gates: Any = None,
    ) -> np.ndarray:
        """Consumes new tokens (query (..., n, E), key (..., n, E), value (..., n, Ev); causal among
        themselves, attending to everything before) and returns their outputs (..., n, Ev); the
        state then includes them. The cost does not depend on the context length.

        Up to ``_core.DeviceState.max_step_tokens`` tokens run on the GPU against the state kept
        in GPU memory from the previous step (one submission, only the tokens and their outputs
        cross the bus); longer inputs, and any input the GPU step does not take, run through
        ``poly_attention`` with this state, which raises for bad inputs."""
        ready = self._device_inputs(query, key, value, log_gates)
        if ready is not None:
            out = self._device_step(*ready)
            if out is not None:
                return out
        out, state = poly_attention(
            query,
            key,
            value,
            coeffs=self.coeffs,
            scale=self.scale,
            is_causal=True,
            normalize=self.normalize,
            log_gates=log_gates,
            enable_gqa=self.enable_gqa,
            initial_state=self,
            return_state=True,
        )
        self.array = state.array
        return out

    def _device_inputs(
        self, query: Any, key: Any, value: Any, log_gates: Any
    ) -> tuple[Any, ...] | None:
        """The step's inputs as flat float32 for the GPU step, or None where it does not take
        them (bad inputs included: the host path then raises its own error)."""
        if self._host_only:
            return None
        arrays = (query, key, value)
        if not all(
            isinstance(x, np.ndarray) and x.dtype.kind == "f" and x.dtype.itemsize in (2, 4, 8)
            for x in arrays
        ):
            return None
        q, k, v = arrays
        if not q.ndim == k.ndim == v.ndim >= 2:
            return None
        try:
            lead_q, lead_kv, group, L, S, E, Ev, units = _shapes(q, k, v, self.enable_gqa)
        except ValueError:
            return None
        if not (
            L == S
            and 1 <= L <= _core.DeviceState.max_step_tokens
            and E == self.head_dim
            and units > 0
            and lead_kv + (self.rank, Ev + 1) == self._shape
            and abs(self.scale) <= _F32_MAX
            and (not self.normalize or _nonnegative_kernel(self.coeffs))
        ):
            return None
        with np.errstate(over="ignore", invalid="ignore"):
            flat = _float32_flat(q, k, v)
            gates = None
            if log_gates is not None:
                g = log_gates
                if not (
                    isinstance(g, np.ndarray)
                    and g.dtype.kind in "iuf"
                    and g.shape == lead_kv + (S,)
                ):
                    return None
                (gates,) = _float32_flat(g)
                flat.append(gates)
            if not all(np.isfinite(x).all() for x in flat):
                return None
        out_shape = lead_q + (L, Ev)
        return flat[0], flat[1], flat[2], gates, group, L, out_shape, q.dtype.newbyteorder("=")

    def _device_step(
        self,
        q: np.ndarray,
        k: np.ndarray,
        v: np.ndarray,
        gates: np.ndarray | None,
        group: int,
        n: int,
        out_shape: tuple[int, ...],
        out_dtype: np.dtype,
    ) -> np.ndarray | None:
        """One GPU step; None where its outputs are not finite (the state is then unchanged and
        the host path raises) or the GPU cannot hold this state."""
        # The kernel as the device state was made for it (a caller may change the attributes).
        key = (group, self.coeffs, self.scale, self.normalize, self._device_unrolled)
        if self._device is not None and self._device_key != key:
            self._array = self.array  # a new device state for this kernel
        if self._device is None:
            units = math.prod(self._shape[:-2])
            self._device_key = key
            try:
                self._device = _core.DeviceState(
                    _float32_flat(self._array)[0],
                    units,
                    group,
                    self.head_dim,
                    self._shape[-1] - 1,
                    list(self.coeffs),
                    float(np.float32(self.scale)),
                    self.normalize,
                    self._device_unrolled,
                )
            except ValueError:
                self._host_only = True
                return None
        flat, took = self._device.step(q, k, v, n, gates)
        if not took:
            return None
        return _to_out_dtype(flat.reshape(out_shape), out_dtype)

    def __repr__(self) -> str:
        return (
            f"PolyState(shape={self._shape}, coeffs={self.coeffs}, scale={self.scale}, "
            f"nbytes={self.nbytes})"
        )


def poly_attention(
    query: Any,
    key: Any,
    value: Any,
    *,
    coeffs: Any,
    scale: float | None = None,
    is_causal: bool = False,
    normalize: bool = True,
    log_gates: Any = None,
    enable_gqa: bool = False,
    initial_state: PolyState | None = None,
    return_state: bool = False,
    return_report: bool = False,
    out: np.ndarray | None = None,
) -> Any:
    """Polynomial attention with the model's own kernel, on the GPU.

    The weight of key j for query i is ``w_ij = P(scale * q_i.k_j) * exp(G_i - G_j)`` with
    ``P(x) = sum_m coeffs[m] x^m`` (or a name in ``POLY_KERNELS``: "based" = 1 + x + x^2/2,
    "power2", "power4", "power6" = x^p) and G the cumulative sum of ``log_gates`` (shape
    (..., S) over key/value heads; needs L = S; none: G = 0). ``normalize``: the output row is
    sum_j w_ij v_j / sum_j w_ij, else sum_j w_ij v_j. Shapes, ``scale`` (default 1/sqrt(E)),
    ``is_causal`` and ``enable_gqa`` as in ``attention``. No key centring and no certificate:
    this is the model's kernel, exact up to float32 rounding; the cost is near-linear in the
    sequence (features only for the degrees whose coefficient is not zero).

    ``initial_state`` (a ``PolyState``) continues an earlier call: its tokens come before these
    (visible to every query). ``return_state=True`` also returns the ``PolyState`` after the
    last key. Returns ``out``, then the state and the ``Report`` where asked.

    Raises ValueError where normalising could divide by zero or by a negative sum: with
    ``normalize=True`` the kernel must be nonnegative on every real x (even degree, positive
    leading coefficient, no real root of odd multiplicity); a row whose weights all vanish (x^p
    with the query orthogonal to every key) raises too. Any non-finite output is raised, never
    returned.

    ``out``: a float32 C-contiguous writeable array of the output's shape (an ``np.memmap``
    works) that receives the result and is returned, as in ``attention``.
    """
    return _poly_attention(
        query,
        key,
        value,
        coeffs=coeffs,
        scale=scale,
        is_causal=is_causal,
        normalize=normalize,
        log_gates=log_gates,
        enable_gqa=enable_gqa,
        initial_state=initial_state,
        return_state=return_state,
        return_report=return_report,
        out=out,
    )


def _poly_attention(
    query: Any,
    key: Any,
    value: Any,
    *,
    coeffs: Any,
    scale: float | None = None,
    is_causal: bool = False,
    normalize: bool = True,
    log_gates: Any = None,
    enable_gqa: bool = False,
    initial_state: PolyState | None = None,
    return_state: bool = False,
    return_report: bool = False,
    positive_on_scores: bool = False,
    out: np.ndarray | None = None,
) -> Any:
    """`poly_attention`; ``positive_on_scores=True`` skips the check that the kernel is
    nonnegative on every real x, for a caller that has certified P > 0 on the interval every
    score lies in (the distributed certified method: a fit of exp with certified error < 1)."""
    c = _coeffs(coeffs)
    q = _as_float_array(query, "query")
    k = _as_float_array(key, "key")
    v = _as_float_array(value, "value")
    is_causal = _check_bool(is_causal, "is_causal")
    normalize = _check_bool(normalize, "normalize")
    enable_gqa = _check_bool(enable_gqa, "enable_gqa")
    return_state = _check_bool(return_state, "return_state")
    return_report = _check_bool(return_report, "return_report")
    if normalize and not positive_on_scores and not _nonnegative(c):
        raise ValueError(
            f"coeffs {c} give a kernel that is negative for some x: with normalize=True a row's "
            "normaliser could vanish or change sign. Use a kernel that is nonnegative on every "
            "real x (even degree, e.g. 'based' or 'power2') or normalize=False"
        )
    lead_q, lead_kv, group, L, S, E, Ev, units = _shapes(q, k, v, enable_gqa)
    if scale is None:
        scale = 1.0 / math.sqrt(E)
    scale = _check_number(scale, "scale")
    if not abs(scale) <= _F32_MAX:
        raise ValueError(f"scale must be finite in float32, got {scale!r}")
    for arr, name in ((q, "query"), (k, "key"), (v, "value")):
        _check_finite(arr, name)
    gates = None
    if log_gates is not None:
        g = np.asarray(log_gates)
        if g.dtype.kind not in "iuf":
            raise _type_error("log_gates", "a real array of shape (..., S)", log_gates)
        if g.shape != lead_kv + (S,):
            raise ValueError(
                f"log_gates must have shape {lead_kv + (S,)} (key/value heads, S), got {g.shape}"
            )
        if L != S:
            raise ValueError(f"log_gates need L = S (a gate sum is per position), got L={L}, S={S}")
        _check_finite(g, "log_gates")
        (gates,) = _float32_flat(g)
    rank = _core.poly_kernel_rank(E, list(c))
    state0 = None
    if initial_state is not None:
        if not isinstance(initial_state, PolyState):
            raise _type_error("initial_state", "a PolyState", initial_state)
        want = lead_kv + (rank, Ev + 1)
        if initial_state.array.shape != want or initial_state.head_dim != E:
            raise ValueError(
                f"initial_state has shape {initial_state.array.shape} for head dimension "
                f"{initial_state.head_dim}; this call needs {want} for head dimension {E}"
            )
        if is_causal and L != S:
            raise ValueError(f"a causal call that continues a state needs L = S, got L={L}, S={S}")
        (state0,) = _float32_flat(initial_state.array)
    if return_state and is_causal and L != S:
        raise ValueError(f"a causal call that returns its state needs L = S, got L={L}, S={S}")
    out_dtype = q.dtype.newbyteorder("=")
    out_shape = lead_q + (L, Ev)
    if out is not None:
        out = _check_out(out, out_shape, (q, k, v))
        out_dtype = np.dtype(np.float32)
    state_words = units * rank * (Ev + 1)
    # The float32 copies of inputs not read in place, the output (where not given) and the
    # kernel's own output and states.
    copies = sum(0 if _in_place(x) else x.size for x in (q, k, v))
    need = 4 * (copies + (2 if out is None else 1) * math.prod(out_shape) + 2 * state_words)
    _check_host_memory(need, f"poly_attention on query {q.shape}, key {k.shape}, value {v.shape}")
    qf, kf, vf = _float32_flat(q, k, v)
    flat = _new_out(out, out_shape)
    state, rep = _core.poly_kernel_attention(
        qf,
        kf,
        vf,
        flat.reshape(-1),
        units,
        group,
        L,
        S,
        E,
        Ev,
        is_causal,
        scale,
        list(c),
        normalize,
        gates,
        state0,
        return_state,
        _count_io(),
    )
    out = flat
    # Slice by slice: no temporary the size of the output (which may be a caller's memmap).
    if L > 0 and units > 0 and not all(np.isfinite(part).all() for part in _slices(out)):
        rows = int(np.count_nonzero(~np.isfinite(out).all(axis=-1)))
        why = (
            "the weights of those rows all vanish (a zero normaliser), e.g. x^p with the query "
            "orthogonal to every visible key, or the gates decay every key to 0"
            if normalize
            else "the weighted sums exceed float32's range"
        )
        raise ValueError(f"poly_attention: {rows} output row(s) are not finite: {why}")
    out = _to_out_dtype(out, out_dtype)
    result: list[Any] = [out]
    if return_state:
        result.append(
            PolyState(
                state.reshape(lead_kv + (rank, Ev + 1)),
                coeffs=c,
                scale=scale,
                normalize=normalize,
                enable_gqa=enable_gqa,
                head_dim=E,
            )
        )
    if return_report:
        result.append(_report(rep))
    return result[0] if len(result) == 1 else tuple(result)
