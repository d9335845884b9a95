"""Sequence-sharded attention on Ray: the sequence dimension split into contiguous shards, one
Ray actor (one device) per shard.

- ``method="poly"`` (certified): two small all-reductions through the driver (key sums for the
  centring mean, maxima for beta and the value ranges), the degree chosen once for the whole
  sequence, then the recurrent states of the shards (rank x (Ev + 1) floats per key/value head,
  whatever the shard's length) exchanged through the object store: summed for non-causal calls,
  an exclusive prefix for causal ones. Each worker then answers its own queries with
  ``poly_attention(..., initial_state=)``. The certificate is the single-process one.
- ``method="exact"``: ring attention. Every key/value shard visits every worker that needs it;
  partial outputs are merged by their rows' log-sum-exp.
- ``poly_attention``: the polynomial primitive (model kernels, gates), by the same state
  exchange; with gates, each state is decayed by the gate sums of the shards between.

Traffic (``Report.bytes_sent`` / ``bytes_received``) counts the bytes of every array that moves
between two parties (a worker, another worker, the driver) once at the sender and once at the
receiver; loading the shards and returning the outputs are reported apart (``input_bytes``,
``output_bytes``). ``traffic_model`` gives the same counts from the sizes alone
(docs/distributed.md).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

import numpy as np

from . import (
    _F32_MAX,
    _as_float_array,
    _check_bool,
    _check_eps,
    _check_finite,
    _check_int,
    _check_method,
    _check_number,
    _core,
    _shapes,
    _to_out_dtype,
)
from . import Report as _LocalReport
from .poly_kernel import PolyState, _coeffs, _nonnegative, _poly_attention

__all__ = ["Report", "attention", "poly_attention", "shutdown", "traffic_model"]


@dataclasses.dataclass(frozen=True)
class Report:
    """What a distributed call ran, its certificate (poly) and the bytes each worker moved."""

    method: str
    """"poly", "exact" or "poly_kernel" (the primitive)."""
    num_workers: int
    query_rows: tuple[int, ...]
    key_rows: tuple[int, ...]
    bytes_sent: tuple[int, ...]
    """Per worker: bytes of the arrays it sent to the driver or to other workers (an array read by
    several workers counts once per reader)."""
    bytes_received: tuple[int, ...]
    """Per worker: bytes of the arrays it received from the driver or from other workers."""
    model_bytes_sent: tuple[int, ...]
    """The same counts from `traffic_model` (sizes only)."""
    model_bytes_received: tuple[int, ...]
    driver_bytes_sent: int
    driver_bytes_received: int
    input_bytes: tuple[int, ...]
    """Per worker: bytes of the input shards it loaded (not part of the exchange)."""
    output_bytes: tuple[int, ...]
    """Per worker: bytes of the output rows it returned."""
    elapsed_s: float
    reason: str
    degree: int | None = None
    rank: int | None = None
    beta: float | None = None
    poly_eps: float | None = None
    error_bound: float | None = None
    error_bound_per_column: tuple[float, ...] | None = None
    worker_reports: tuple[_LocalReport, ...] = ()
    """Each worker's single-process reports (one per kernel call it made)."""


def traffic_model(
    method: str,
    *,
    key_rows: tuple[int, ...] | list[int],
    kv_units: int,
    E: int,
    Ev: int,
    rank: int | None = None,
    n_coeffs: int | None = None,
    is_causal: bool = False,
    gated: bool = False,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(bytes sent, bytes received) per worker, from the sizes alone.

    ``key_rows``: key rows of each shard (its length is the worker count W); ``kv_units``: the
    number of key/value heads times the batch (U). With Z = 4 U rank (Ev + 1), the bytes of one
    state, and worker i (0-based):

    - poly (certified): sends 8 U E (key sums) + 8 U (2 + 2 Ev) (max |q|, max |k - mu|, value
      min and max per column) + readers_i Z; receives 8 U E (mu) + 8 n_coeffs + states_i Z, where
      non-causal: readers_i = states_i = W - 1; causal: readers_i = W - 1 - i, states_i = i.
      Per head and worker that is O(W rank (Ev + 1)), independent of the sequence length.
    - poly_kernel (the primitive): the states as above, plus 8 n_coeffs received; with gates,
      8 U sent (the shard's gate sum) and 8 U per state received (its decay factor).
    - exact (ring): with B_j = 4 U key_rows[j] (E + Ev), the bytes of shard j's keys and values:
      sends readers_i B_i, receives the sum of B_j over the shards j it reads; non-causal: every
      other shard (readers_i = W - 1), causal: the shards j < i (readers_i = W - 1 - i).
      O(n (E + Ev)) per worker.
    With one worker nothing is exchanged but the poly reductions.
    """
    w = len(key_rows)
    sent, recv = [], []
    for i in range(w):
        if is_causal:
            readers, fetched = w - 1 - i, list(range(i))
        else:
            readers, fetched = w - 1, [j for j in range(w) if j != i]
        if method == "exact":
            b = [4 * kv_units * s * (E + Ev) for s in key_rows]
            sent.append(readers * b[i])
            recv.append(sum(b[j] for j in fetched))
            continue
        if rank is None or n_coeffs is None:
            raise ValueError("the poly traffic model needs rank= and n_coeffs=")
        z = 4 * kv_units * rank * (Ev + 1)
        s_i = readers * z
        r_i = len(fetched) * z + 8 * n_coeffs
        if method == "poly":
            s_i += 8 * kv_units * E + 8 * kv_units * (2 + 2 * Ev)
            r_i += 8 * kv_units * E
        elif method == "poly_kernel":
            if gated and w > 1:
                s_i += 8 * kv_units
                r_i += 8 * kv_units * len(fetched)
        else:
            raise ValueError(f"method must be 'poly', 'poly_kernel' or 'exact', got {method!r}")
        sent.append(s_i)
        recv.append(r_i)
    return tuple(sent), tuple(recv)


# ----------------------------------------------------------------------------------------------
# Ray


def _ray():
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - exercised without ray
        raise ImportError(
            "approx_attn.distributed needs Ray: pip install 'approx_attn[distributed]'"
        ) from exc
    return ray


class _Worker:
    """One shard: its inputs, its device (the process's approx_attn device) and its traffic."""

    def __init__(self) -> None:
        os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")
        self.fail_at: str | None = None
        self._reset()

    def _reset(self) -> None:
        self.sent = 0
        self.received = 0
        self.reports: list[_LocalReport] = []

    def _die_if(self, step: str) -> None:
        if self.fail_at == step:  # the fault test: the process dies mid-call
            os._exit(1)

    def arm_failure(self, step: str | None) -> None:
        self.fail_at = step

    def load(self, index: int, q: Any, k: Any, v: Any, g: Any, check_finite: bool) -> dict:
        """Takes its shard (arrays, or object references Ray resolved) and checks it."""
        self._reset()
        self.index = index
        try:
            self.q = _as_float_array(q, "query")
            self.k = _as_float_array(k, "key")
            self.v = _as_float_array(v, "value")
            self.g = None if g is None else np.asarray(g)
            if check_finite:
                for arr, name in ((self.q, "query"), (self.k, "key"), (self.v, "value")):
                    _check_finite(arr, name)
                if self.g is not None:
                    _check_finite(self.g, "log_gates")
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"shard {index}: {exc}") from None
        nbytes = self.q.nbytes + self.k.nbytes + self.v.nbytes
        nbytes += 0 if self.g is None else self.g.nbytes
        return {
            "q": (self.q.shape, str(self.q.dtype)),
            "k": (self.k.shape, str(self.k.dtype)),
            "v": (self.v.shape, str(self.v.dtype)),
            "g": None if self.g is None else (self.g.shape, str(self.g.dtype)),
            "input_bytes": int(nbytes),
        }

    def configure(self, kv_units: int, group: int) -> None:
        self.units, self.group = kv_units, group

    def _send(self, x: np.ndarray, readers: int = 1) -> np.ndarray:
        self.sent += readers * x.nbytes
        return x

    def _recv(self, x: np.ndarray) -> np.ndarray:
        self.received += x.nbytes
        return x

    # -- poly: the two small reductions ------------------------------------------------------

    def key_sums(self) -> np.ndarray:
        k = np.asarray(self.k, dtype=np.float64)
        return self._send(k.sum(axis=-2).reshape(self.units, -1))

    def norms(self, mu: np.ndarray) -> np.ndarray:
        """Centres its keys on mu; returns per kv unit max|q|, max|k - mu|, the value columns' min
        and max, packed as (U, 2 + 2 Ev) float64."""
        mu = self._recv(mu)
        e = self.k.shape[-1]
        k = np.asarray(self.k, dtype=np.float64).reshape(self.units, -1, e) - mu[:, None, :]
        self.kc = k.astype(np.float32).reshape(self.k.shape)
        q = np.asarray(self.q, dtype=np.float64).reshape(self.units, self.group, -1, e)
        qn = np.linalg.norm(q, axis=-1).reshape(self.units, -1)
        kn = np.linalg.norm(k, axis=-1)
        v = np.asarray(self.v, dtype=np.float64).reshape(self.units, -1, self.v.shape[-1])
        rows = [
            qn.max(axis=-1, initial=0.0)[:, None],
            kn.max(axis=-1, initial=0.0)[:, None],
            v.min(axis=1),
            v.max(axis=1),
        ]
        return self._send(np.concatenate(rows, axis=1))

    # -- poly: the state exchange ------------------------------------------------------------

    def gate_total(self) -> np.ndarray:
        g = np.asarray(self.g, dtype=np.float64)
        return self._send(g.sum(axis=-1).reshape(self.units))

    def set_kernel(self, coeffs: np.ndarray, kw: dict) -> None:
        self.coeffs = self._recv(coeffs)
        self.kw = kw

    def _keys(self) -> np.ndarray:
        return self.kc if self.kw.get("centred") else self.k

    def _call(self, q: Any, k: Any, v: Any, g: Any, **kw: Any) -> Any:
        kw = dict(kw)
        res = _poly_attention(
            q,
            k,
            v,
            coeffs=self.coeffs,
            scale=self.kw["scale"],
            normalize=self.kw["normalize"],
            log_gates=g,
            enable_gqa=self.kw["enable_gqa"],
            positive_on_scores=self.kw.get("centred", False),
            return_report=True,
            **kw,
        )
        self.reports.append(res[-1])
        return res[:-1] if len(res) > 2 else res[0]

    def local_state(self, readers: int) -> np.ndarray:
        """The state of its own keys, read by `readers` other workers."""
        self._die_if("local_state")
        k = self._keys()
        # The state needs a call with queries: one zero query (pass 2 over one row), or with
        # gates (which need L = S) zero queries over the shard, causal (weights c_0 times decays
        # <= 1 for non-positive gates). normalize=False: no row to check.
        rows = 1 if self.g is None else k.shape[-2]
        q0 = np.zeros(self.q.shape[:-2] + (rows, self.q.shape[-1]), dtype=np.float32)
        res = _poly_attention(
            q0,
            k,
            self.v,
            coeffs=self.coeffs,
            scale=self.kw["scale"],
            is_causal=self.g is not None,
            normalize=False,
            log_gates=self.g,
            enable_gqa=self.kw["enable_gqa"],
            positive_on_scores=True,
            return_state=True,
            return_report=True,
        )
        self.reports.append(res[-1])
        return self._send(res[1].array, readers)

    def answer(self, state_refs: list, factors: np.ndarray | None, is_causal: bool) -> np.ndarray:
        """Its queries against the combined state of the other shards (non-causal) or of the
        earlier ones (causal: with its own keys causally), weighted by `factors` (U per state:
        the gate decays)."""
        self._die_if("answer")
        ray = _ray()
        init = None
        if state_refs:
            states = [self._recv(s) for s in ray.get(state_refs)]
            acc = np.zeros(states[0].shape, dtype=np.float64)
            if factors is not None:
                factors = self._recv(factors)
            for n, s in enumerate(states):
                w = 1.0 if factors is None else factors[n].reshape(s.shape[:-2] + (1, 1))
                acc += w * s
            with np.errstate(over="ignore"):
                arr = acc.astype(np.float32)
            if not np.isfinite(arr).all():
                raise ValueError(
                    f"shard {self.index}: the combined state of the other shards leaves "
                    "float32's range (gate decays between shards)"
                )
            init = PolyState(
                arr,
                coeffs=self.coeffs,
                scale=self.kw["scale"],
                normalize=self.kw["normalize"],
                enable_gqa=self.kw["enable_gqa"],
                head_dim=self.q.shape[-1],
            )
        try:
            out = self._call(
                self.q, self._keys(), self.v, self.g, is_causal=is_causal, initial_state=init
            )
        except ValueError as exc:
            raise ValueError(f"shard {self.index}: {exc}") from None
        return out

    # -- exact: ring attention ---------------------------------------------------------------

    def publish_kv(self, readers: int) -> tuple[np.ndarray, np.ndarray]:
        k = np.ascontiguousarray(self.k, dtype=np.float32)
        v = np.ascontiguousarray(self.v, dtype=np.float32)
        self._send(k, readers)
        self._send(v, readers)
        return k, v

    def ring(self, kv_refs: list, scale: float, is_causal: bool, enable_gqa: bool) -> np.ndarray:
        """Its queries against its own keys (causal: the diagonal block) and then each shard of
        `kv_refs` in ring order, merged by the rows' log-sum-exp (float64)."""
        from . import _exact_attention_lse

        self._die_if("ring")
        ray = _ray()
        try:
            o, lse, rep = _exact_attention_lse(
                self.q, self.k, self.v, scale=scale, is_causal=is_causal, enable_gqa=enable_gqa
            )
            self.reports.append(rep)
            acc, m = o.astype(np.float64), lse.astype(np.float64)
            for ref in kv_refs:
                k, v = (self._recv(x) for x in ray.get(ref))
                o2, lse2, rep = _exact_attention_lse(
                    self.q, k, v, scale=scale, is_causal=False, enable_gqa=enable_gqa
                )
                self.reports.append(rep)
                acc, m = _merge(acc, m, o2, lse2)
        except ValueError as exc:
            raise ValueError(f"shard {self.index}: {exc}") from None
        return acc.astype(np.float32)

    def traffic(self) -> tuple[int, int, list]:
        return self.sent, self.received, self.reports


def _merge(acc: np.ndarray, m: np.ndarray, o: np.ndarray, lse: np.ndarray):
    """Merges two normalised partial outputs by their rows' log-sum-exp (natural log)."""
    lse = lse.astype(np.float64)
    top = np.maximum(m, lse)
    wa, wb = np.exp(m - top), np.exp(lse - top)
    tot = wa + wb
    acc = (acc * wa[..., None] + o.astype(np.float64) * wb[..., None]) / tot[..., None]
    return acc, top + np.log(tot)


_POOL: dict[str, Any] = {"actors": [], "options": None}


def _connect(address: str | None, num_workers: int) -> Any:
    ray = _ray()
    if not ray.is_initialized():
        if address is None:
            ray.init(
                num_cpus=max(os.cpu_count() or 1, num_workers),
                ignore_reinit_error=True,
                include_dashboard=False,
                logging_level="ERROR",
            )
        else:
            ray.init(address=address, ignore_reinit_error=True, logging_level="ERROR")
    return ray


def _actors(ray: Any, num_workers: int, actor_options: dict | None) -> list:
    opts = {"num_cpus": 1} if actor_options is None else dict(actor_options)
    if _POOL["options"] != opts:
        shutdown(disconnect=False)
        _POOL["options"] = opts
    actors = _POOL["actors"]
    cls = ray.remote(_Worker)
    while len(actors) < num_workers:
        actors.append(cls.options(**opts).remote())
    return actors[:num_workers]


def shutdown(disconnect: bool = True) -> None:
    """Ends the pool of worker actors (and, with ``disconnect``, this process's Ray connection)."""
    try:
        import ray
    except ImportError:  # pragma: no cover
        return
    if ray.is_initialized():
        for a in _POOL["actors"]:
            ray.kill(a)
    _POOL["actors"] = []
    _POOL["options"] = None
    if disconnect and ray.is_initialized():
        ray.shutdown()


class _Call:
    """Runs remote calls and turns failures into clear errors: a worker's exception is raised as
    itself; a dead worker raises RuntimeError naming its shard (and leaves the pool)."""

    def __init__(self, ray: Any, actors: list) -> None:
        self.ray, self.actors = ray, actors

    def get(self, refs: list, step: str) -> list:
        ray = self.ray
        out = []
        for i, ref in enumerate(refs):
            try:
                out.append(ray.get(ref))
            except ray.exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                # Ray may report the death of the actor running the task wrapped in a task error.
                if isinstance(cause, ray.exceptions.RayActorError):
                    raise self._dead(i, step, cause) from exc
                if isinstance(cause, Exception):
                    raise cause from None
                raise
            except ray.exceptions.RayActorError as exc:
                raise self._dead(i, step, exc) from exc
        return out

    def _dead(self, i: int, step: str, exc: Exception) -> RuntimeError:
        """Drops shard i's worker from the pool; the error to raise."""
        dead = self.actors[i]
        if dead in _POOL["actors"]:
            _POOL["actors"].remove(dead)
        return RuntimeError(
            f"distributed attention: the worker of shard {i} died during {step} "
            f"({type(exc).__name__}); no result was returned. Run the call again: a "
            "new worker replaces it"
        )


def _split(x: Any, name: str, num_workers: int, axis_from_end: int = 2) -> list:
    """A list of per-shard object references (given), or the array cut into contiguous shards
    along its sequence dimension."""
    if isinstance(x, (list, tuple)):
        if len(x) != num_workers:
            raise ValueError(f"{name}: got {len(x)} shards for num_workers={num_workers}")
        return list(x)
    arr = np.asarray(x)
    n = arr.shape[-axis_from_end] if arr.ndim >= axis_from_end else 0
    bounds = [n * i // num_workers for i in range(num_workers + 1)]
    idx = arr.ndim - axis_from_end
    return [np.take(arr, np.arange(bounds[i], bounds[i + 1]), axis=idx) for i in range(num_workers)]


def _setup(
    query: Any,
    key: Any,
    value: Any,
    log_gates: Any,
    num_workers: Any,
    enable_gqa: bool,
    check_finite: bool,
    address: str | None,
    actor_options: dict | None,
):
    num_workers = _check_int(num_workers, "num_workers", 1)
    given_refs = isinstance(query, (list, tuple))
    if not given_refs:
        # The errors of `attention` on the whole arrays, before anything is shipped.
        q, k, v = (
            _as_float_array(x, n) for x, n in ((query, "query"), (key, "key"), (value, "value"))
        )
        _shapes(q, k, v, enable_gqa)
        query, key, value = q, k, v
    qs = _split(query, "query", num_workers)
    ks = _split(key, "key", num_workers)
    vs = _split(value, "value", num_workers)
    gs = (
        [None] * num_workers
        if log_gates is None
        else _split(log_gates, "log_gates", num_workers, 1)
    )
    ray = _connect(address, num_workers)
    actors = _actors(ray, num_workers, actor_options)
    call = _Call(ray, actors)
    infos = call.get(
        [a.load.remote(i, qs[i], ks[i], vs[i], gs[i], check_finite) for i, a in enumerate(actors)],
        "load",
    )

    # The whole problem's shapes, as `attention` would see them (without building it).
    def whole(part: str) -> tuple[np.ndarray, list[int]]:
        shapes = [info[part][0] for info in infos]
        lead = {s[:-2] for s in shapes}
        width = {s[-1] for s in shapes}
        if len(lead) != 1 or len(width) != 1:
            raise ValueError(f"the {part} shards disagree on their other dimensions: {shapes}")
        rows = [s[-2] for s in shapes]
        shape = shapes[0][:-2] + (sum(rows), shapes[0][-1])
        return np.broadcast_to(np.zeros((), np.float32), shape), rows

    (qw, q_rows), (kw_, k_rows), (vw, v_rows) = whole("q"), whole("k"), whole("v")
    if k_rows != v_rows:
        raise ValueError(f"key and value shards differ in rows: {k_rows} and {v_rows}")
    sh = _shapes(qw, kw_, vw, enable_gqa)
    call.get([a.configure.remote(sh.units, sh.group) for a in actors], "configure")
    return ray, actors, call, sh, q_rows, k_rows, infos


def _traffic(call: _Call, actors: list) -> tuple[list[int], list[int], list]:
    got = call.get([a.traffic.remote() for a in actors], "traffic")
    return [g[0] for g in got], [g[1] for g in got], [r for g in got for r in g[2]]


def _state_exchange(
    ray: Any,
    call: _Call,
    actors: list,
    is_causal: bool,
    gate_totals: list[np.ndarray] | None,
) -> list:
    """Each worker's output: the states of the others (non-causal) or of the earlier shards
    (causal) through the object store, decayed by the gate sums between where gated."""
    w = len(actors)
    if w == 1:
        state_refs: list = []
    else:
        readers = [(w - 1 - i) if is_causal else (w - 1) for i in range(w)]
        state_refs = [
            a.local_state.remote(readers[i]) if readers[i] > 0 else None
            for i, a in enumerate(actors)
        ]
    outs = []
    for i, a in enumerate(actors):
        fetched = [j for j in range(w) if (j < i if is_causal else j != i)]
        factors = None
        if gate_totals is not None and fetched:
            # exp(E_{i-1} - E_m): the gate sum from shard m's end to shard i's start.
            ends = np.cumsum(np.stack(gate_totals), axis=0)  # E_m, (W, U)
            start_i = ends[i - 1] if i > 0 else np.zeros_like(ends[0])
            with np.errstate(over="ignore"):
                factors = np.exp(np.stack([start_i - ends[m] for m in fetched]))
        outs.append(a.answer.remote([state_refs[j] for j in fetched], factors, is_causal))
    return call.get(outs, "answer")


def _finish(
    method: str,
    actors: list,
    call: _Call,
    outs: list,
    sh: Any,
    q_rows: list[int],
    k_rows: list[int],
    infos: list,
    model: tuple,
    driver: tuple[int, int],
    start: float,
    reason: str,
    out_dtype: Any,
    **cert: Any,
) -> tuple[np.ndarray, Report]:
    sent, received, reports = _traffic(call, actors)
    out = _to_out_dtype(np.concatenate([np.asarray(o) for o in outs], axis=-2), out_dtype)
    rep = Report(
        method=method,
        num_workers=len(actors),
        query_rows=tuple(q_rows),
        key_rows=tuple(k_rows),
        bytes_sent=tuple(sent),
        bytes_received=tuple(received),
        model_bytes_sent=model[0],
        model_bytes_received=model[1],
        driver_bytes_sent=driver[0],
        driver_bytes_received=driver[1],
        input_bytes=tuple(info["input_bytes"] for info in infos),
        output_bytes=tuple(int(np.asarray(o).nbytes) for o in outs),
        elapsed_s=time.perf_counter() - start,
        reason=reason,
        worker_reports=tuple(reports),
        **cert,
    )
    return out, rep


def attention(
    query: Any,
    key: Any,
    value: Any,
    *,
    num_workers: int,
    address: str | None = None,
    scale: float | None = None,
    is_causal: bool = False,
    enable_gqa: bool = False,
    method: str = "auto",
    eps: float = 1e-3,
    degree: int | None = None,
    check_finite: bool = True,
    tensor_cores: bool | None = None,
    return_report: bool = False,
    actor_options: dict | None = None,
) -> np.ndarray | tuple[np.ndarray, Report]:
    """`approx_attn.attention` with the sequence dimension split into ``num_workers`` contiguous
    shards, one Ray actor each.

    ``query``, ``key``, ``value``: NumPy arrays (cut here along the sequence dimension) or lists
    of ``num_workers`` object references to the shards (``ray.put``), so that no host holds the
    whole input. ``address``: None starts (or reuses) a local Ray cluster; else the address of a
    cluster to join. Other keywords as in `attention`; ``method="auto"`` runs poly where it
    certifies ``eps`` and exact (ring attention) otherwise. Causal calls need the query and key
    shards to have the same rows (L = S). ``actor_options``: Ray options of the worker actors
    (default ``{"num_cpus": 1}``; e.g. ``{"num_gpus": 1}`` on a GPU cluster).

    Returns the output (the query's dtype), and with ``return_report`` a `Report` with the
    certificate (poly) and the bytes each worker sent and received.
    """
    start = time.perf_counter()
    is_causal = _check_bool(is_causal, "is_causal")
    enable_gqa = _check_bool(enable_gqa, "enable_gqa")
    check_finite = _check_bool(check_finite, "check_finite")
    return_report = _check_bool(return_report, "return_report")
    tensor_cores = _check_bool(tensor_cores, "tensor_cores", none=True)
    method = _check_method(method, ("auto", "exact", "poly"))
    eps = _check_eps(eps)
    if degree is not None:
        if method != "poly":
            raise ValueError("degree= applies to method='poly' only")
        degree = _check_int(degree, "degree", 0)
    if scale is not None:
        scale = _check_number(scale, "scale")
        if not math.isfinite(scale) or abs(scale) > _F32_MAX:
            raise ValueError(f"scale must be finite in float32, got {scale!r}")
    if tensor_cores:
        raise NotImplementedError("distributed attention runs the f32 kernels (tensor_cores=True)")
    ray, actors, call, sh, q_rows, k_rows, infos = _setup(
        query, key, value, None, num_workers, enable_gqa, check_finite, address, actor_options
    )
    if is_causal and q_rows != k_rows:
        raise NotImplementedError(
            f"distributed causal attention needs query and key shards of equal rows, got "
            f"{q_rows} and {k_rows}"
        )
    if scale is None:
        scale = 1.0 / math.sqrt(sh.E)
    out_dtype = np.dtype(infos[0]["q"][1]).newbyteorder("=")
    w, U = len(actors), sh.units
    if method != "exact":
        # (1) key sums -> mu; (2) maxima -> beta, value ranges; the degree once, here.
        sums = call.get([a.key_sums.remote() for a in actors], "key sums")
        mu = np.sum(sums, axis=0) / sh.S
        stats = call.get([a.norms.remote(mu) for a in actors], "norms")
        st = np.stack(stats)  # (W, U, 2 + 2 Ev)
        qmax, kmax = st[:, :, 0].max(axis=0), st[:, :, 1].max(axis=0)
        vmin = st[:, :, 2 : 2 + sh.Ev].min(axis=0)
        vmax = st[:, :, 2 + sh.Ev :].max(axis=0)
        beta = float(np.max(abs(scale) * qmax * kmax))
        driver_recv = sum(x.nbytes for x in sums) + sum(x.nbytes for x in stats)
        driver_sent = w * mu.nbytes
        why_not = None
        fit = None
        try:  # the attention call's certification and refusals, on the gathered beta
            fit = _core.certified_polynomial(beta, sh.E, eps, degree)
        except ValueError as exc:
            why_not = str(exc)
        if why_not is not None and method == "poly":
            raise ValueError(why_not)
        if why_not is None:
            assert fit is not None
            g, coeffs, poly_eps = fit
            c = np.asarray(coeffs, dtype=np.float64)
            kw = {
                "scale": scale,
                "normalize": True,
                "enable_gqa": enable_gqa,
                "centred": True,
            }
            call.get([a.set_kernel.remote(c, kw) for a in actors], "set_kernel")
            driver_sent += w * c.nbytes
            outs = _state_exchange(ray, call, actors, is_causal, None)
            rank = _core.poly_kernel_rank(sh.E, list(coeffs))
            factor = poly_eps / (1.0 - poly_eps)
            per_col = tuple(float(x) for x in (factor * (vmax - vmin)).max(axis=0))
            model = traffic_model(
                "poly",
                key_rows=k_rows,
                kv_units=U,
                E=sh.E,
                Ev=sh.Ev,
                rank=rank,
                n_coeffs=len(coeffs),
                is_causal=is_causal,
            )
            out, rep = _finish(
                "poly",
                actors,
                call,
                outs,
                sh,
                q_rows,
                k_rows,
                infos,
                model,
                (driver_sent, driver_recv),
                start,
                f"certified: degree {g} at beta={beta:.4f} (eps={eps})"
                if degree is None
                else f"degree {g} as requested",
                out_dtype,
                degree=g,
                rank=rank,
                beta=beta,
                poly_eps=poly_eps,
                error_bound=max(per_col),
                error_bound_per_column=per_col,
            )
            return (out, rep) if return_report else out
        reason = f"auto: {why_not}; exact (ring attention)"
    else:
        reason = "exact (ring attention)"
        driver_sent = driver_recv = 0
    # Exact: ring attention.
    readers = [(w - 1 - i) if is_causal else (w - 1) for i in range(w)]
    kv_refs = [a.publish_kv.remote(readers[i]) for i, a in enumerate(actors)]
    outs = []
    for i, a in enumerate(actors):
        # Ring order: the shard before i first, then the one before that.
        order = [(i - t) % w for t in range(1, w)]
        if is_causal:
            order = [j for j in order if j < i]
        outs.append(a.ring.remote([kv_refs[j] for j in order], scale, is_causal, enable_gqa))
    outs = call.get(outs, "ring")
    model = traffic_model(
        "exact", key_rows=k_rows, kv_units=U, E=sh.E, Ev=sh.Ev, is_causal=is_causal
    )
    out, rep = _finish(
        "exact",
        actors,
        call,
        outs,
        sh,
        q_rows,
        k_rows,
        infos,
        model,
        (driver_sent, driver_recv),
        start,
        reason,
        out_dtype,
    )
    return (out, rep) if return_report else out


def poly_attention(
    query: Any,
    key: Any,
    value: Any,
    *,
    num_workers: int,
    coeffs: Any,
    address: str | None = None,
    scale: float | None = None,
    is_causal: bool = False,
    normalize: bool = True,
    log_gates: Any = None,
    enable_gqa: bool = False,
    return_report: bool = False,
    actor_options: dict | None = None,
) -> np.ndarray | tuple[np.ndarray, Report]:
    """`approx_attn.poly_attention` (the polynomial primitive) with the sequence split into
    ``num_workers`` shards: each worker reduces its keys to a state, the states are exchanged
    (all for non-causal calls, the earlier shards' for causal ones), each decayed by the gate
    sums of the shards between, and each worker answers its queries. ``log_gates``: an array
    (..., S) (cut with the keys) or a list of per-shard references. Other keywords as in
    `poly_attention` and `attention` here."""
    start = time.perf_counter()
    c = _coeffs(coeffs)
    is_causal = _check_bool(is_causal, "is_causal")
    normalize = _check_bool(normalize, "normalize")
    enable_gqa = _check_bool(enable_gqa, "enable_gqa")
    return_report = _check_bool(return_report, "return_report")
    if normalize and not _nonnegative(c):
        raise ValueError(
            f"coeffs {c} give a kernel that is negative for some x: with normalize=True a row's "
            "normaliser could vanish or change sign; use normalize=False"
        )
    ray, actors, call, sh, q_rows, k_rows, infos = _setup(
        query, key, value, log_gates, num_workers, enable_gqa, True, address, actor_options
    )
    if (is_causal or log_gates is not None) and q_rows != k_rows:
        raise NotImplementedError(
            f"distributed causal or gated poly_attention needs query and key shards of equal "
            f"rows, got {q_rows} and {k_rows}"
        )
    if scale is None:
        scale = 1.0 / math.sqrt(sh.E)
    scale = _check_number(scale, "scale")
    w = len(actors)
    carr = np.asarray(c, dtype=np.float64)
    kw = {"scale": scale, "normalize": normalize, "enable_gqa": enable_gqa, "centred": False}
    call.get([a.set_kernel.remote(carr, kw) for a in actors], "set_kernel")
    driver_sent, driver_recv = w * carr.nbytes, 0
    totals = None
    if log_gates is not None and w > 1:
        totals = call.get([a.gate_total.remote() for a in actors], "gate sums")
        driver_recv += sum(t.nbytes for t in totals)
    outs = _state_exchange(ray, call, actors, is_causal, totals)
    if totals is not None:
        fetched = [(i if is_causal else w - 1) for i in range(w)]
        driver_sent += sum(n * 8 * sh.units for n in fetched)
    rank = _core.poly_kernel_rank(sh.E, list(c))
    model = traffic_model(
        "poly_kernel",
        key_rows=k_rows,
        kv_units=sh.units,
        E=sh.E,
        Ev=sh.Ev,
        rank=rank,
        n_coeffs=len(c),
        is_causal=is_causal,
        gated=log_gates is not None,
    )
    out_dtype = np.dtype(infos[0]["q"][1]).newbyteorder("=")
    out, rep = _finish(
        "poly_kernel",
        actors,
        call,
        outs,
        sh,
        q_rows,
        k_rows,
        infos,
        model,
        (driver_sent, driver_recv),
        start,
        "the model's polynomial kernel, computed exactly (no certificate)",
        out_dtype,
        degree=len(c) - 1,
        rank=rank,
    )
    return (out, rep) if return_report else out
