"""Benchmark harness for approx_attn: our exact and certified-polynomial attention against
NumPy, PyTorch SDPA (CPU, CUDA bf16/fp32) and a materialized degree-2 Taylor reference.

One process, one run: every (method, n, E) is timed with the same inputs, its error is measured
against a float64 reference (on sampled query rows for large n), and the results go to a JSON file
plus a log-log PNG. See benches/README.md. This is a benchmark, not a test: nothing here asserts.

    python benches/bench.py --n 4096 16384 --E 64 128 --out benches/results/h100.json
    python benches/bench.py --plot-only benches/results/h100.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import fnmatch
import gc
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import approx_attn
import numpy as np
from approx_attn import reference

try:  # optional: the harness must run where torch is absent
    import torch
    import torch.nn.functional as F
except ImportError:
    torch = None
    F = None

try:  # optional progress bar
    from tqdm import tqdm
except ImportError:
    tqdm = None

Array = np.ndarray
SDPA_FP32 = "torch_cuda_sdpa_fp32"
SDPA_BF16 = "torch_cuda_sdpa_bf16"
SDPA_FP16 = "torch_cuda_sdpa_fp16"


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def certified_beta(degree: int, eps: float) -> float:
    """Largest beta at which the degree-`degree` fit certifies eps/(1+eps) (bisection).

    eps/(1+eps) on the polynomial is what makes the output bound come out at eps.
    """
    target = eps / (1.0 + eps)

    def ok(beta: float) -> bool:
        return approx_attn._core.fit_polynomial(beta, degree=degree)[2] <= target

    lo, hi = 0.0, 1.0
    while ok(hi):
        lo, hi = hi, hi * 2.0
        if hi > 1e6:
            return lo
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def beta_of(q: Array, k: Array, scale: float) -> float:
    """scale * max|q| * max|k - mean(k)| over heads; per head in float64 to bound memory."""
    best = 0.0
    for h in range(q.shape[1]):
        qh = q[0, h].astype(np.float64)
        kh = k[0, h].astype(np.float64)
        kh -= kh.mean(axis=0)
        qn = float(np.sqrt((qh * qh).sum(axis=1)).max())
        kn = float(np.sqrt((kh * kh).sum(axis=1)).max())
        best = max(best, abs(scale) * qn * kn)
    return best


def make_inputs(n: int, E: int, heads: int, beta_target: float, seed: int) -> dict[str, Any]:
    """Standard-normal q, k, v of shape (1, heads, n, E), q and k rescaled to beta_target."""
    rng = np.random.default_rng([seed, n, E, heads])
    q, k, v = (rng.standard_normal((1, heads, n, E), dtype=np.float32) for _ in range(3))
    scale = 1.0 / math.sqrt(E)
    c = math.sqrt(beta_target / beta_of(q, k, scale))  # beta is bilinear in (q, k)
    q *= np.float32(c)
    k *= np.float32(c)
    return {"q": q, "k": k, "v": v, "scale": scale, "beta": beta_of(q, k, scale)}


def float64_reference(
    q: Array, k: Array, v: Array, scale: float, rows: Array | None = None, causal: bool = False
) -> Array:
    """Exact attention in float64 for the query rows `rows` (all when None), head by head and in
    query blocks so memory stays bounded; `causal`: row i sees keys j <= i (upper-left)."""
    _, H, n, _ = q.shape
    rows = np.arange(n) if rows is None else rows
    out = np.empty((1, H, len(rows), v.shape[-1]), dtype=np.float64)
    block = max(1, (1 << 24) // k.shape[2])  # ~128 MiB per n-wide float64 score block
    for h in range(H):
        for i in range(0, len(rows), block):
            r = rows[i : i + block]
            if not causal:
                out[0, h, i : i + block] = reference.exact_attention(
                    q[0, h, r], k[0, h], v[0, h], scale=scale
                )
                continue
            s = np.asarray(q[0, h, r], np.float64) @ np.asarray(k[0, h], np.float64).T * scale
            s[np.arange(k.shape[2])[None, :] > r[:, None]] = -np.inf
            w = np.exp(s - s.max(axis=-1, keepdims=True))
            w /= w.sum(axis=-1, keepdims=True)
            out[0, h, i : i + block] = w @ np.asarray(v[0, h], np.float64)
    return out


def reference_rows(n: int, args: Any) -> Array | None:
    """Query rows the float64 reference covers: all up to --ref-max-n, else --ref-rows evenly
    spaced rows (first and last included) of every head."""
    if n <= args.ref_max_n:
        return None
    return np.unique(np.linspace(0, n - 1, args.ref_rows).round().astype(np.int64))


def max_abs_error(out: Array, ref: Array) -> float:
    worst = 0.0
    for h in range(out.shape[1]):  # per head: avoids a full float64 copy of out
        d = np.abs(out[0, h].astype(np.float64) - ref[0, h])
        worst = max(worst, float(d.max()))
    return worst


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Measured:
    """What one method produced: output for the error, per-repeat times, extra facts."""

    out: Array | None
    wall_s: list[float]
    kernel_s: list[float] | None = None
    wall_device_s: list[float] | None = None
    peak_gpu_bytes: int | None = None
    error_bound: float | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


def spread(xs: list[float] | None) -> dict[str, Any] | None:
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "repeats": len(xs)}


def repeat(fn: Callable[[], tuple[Any, Any]], warmup: int, repeats: int) -> tuple[Any, list[Any]]:
    """Warm-up calls (pipeline compilation, allocation), then `repeats` timed calls.

    fn returns (output, timings); only the last output is kept, so host memory stays at one.
    """
    for _ in range(warmup):
        fn()
    out, times = None, []
    for _ in range(repeats):
        out = None  # drop the previous output before the next call allocates its own
        out, t = fn()
        times.append(t)
    return out, times


def bench_ours(
    inp: dict[str, Any],
    method: str,
    degree: int | None,
    args: Any,
    tensor_cores: bool | None = None,
    input_dtype: Any = None,
) -> Measured:
    kw: dict[str, Any] = {
        "method": method,
        "eps": args.eps,
        "return_report": True,
        "is_causal": args.causal,
    }
    if degree is not None:
        kw["degree"] = degree
    if tensor_cores is not None:
        kw["tensor_cores"] = tensor_cores
    q, k, v = inp["q"], inp["k"], inp["v"]
    if input_dtype is not None:
        # Cast outside the timed calls, as a caller holding float16 arrays would.
        q, k, v = (x.astype(input_dtype) for x in (q, k, v))

    def once() -> tuple[Array, tuple[Any, float]]:
        t0 = time.perf_counter()
        out, rep = approx_attn.attention(q, k, v, **kw)  # NumPy in, NumPy out
        return out, (rep, time.perf_counter() - t0)

    out, runs = repeat(once, args.warmup, args.repeats)
    rep = runs[-1][0]
    kern = [r.kernel_s for r, _ in runs]
    info = {
        "ran_method": rep.method,
        "degree": rep.degree,
        "rank": rep.rank,
        "beta": rep.beta,
        "poly_eps": rep.poly_eps,
        "io_words": rep.io_words,
        "dispatches": rep.dispatches,
        "plan": rep.plan,
        "schedule": rep.schedule,
        "f16_rounding": rep.f16_rounding,
        "storage": rep.storage,
        "pass_s": dict(rep.pass_s),
        "reason": rep.reason,
        "gpu_call_s": spread([r.elapsed_s for r, _ in runs]),
    }
    if rep.predicted_cost:
        info["predicted_cost_s"] = rep.predicted_cost
    return Measured(
        out=out,
        wall_s=[w for _, w in runs],
        kernel_s=None if any(x is None for x in kern) else kern,
        error_bound=rep.error_bound,
        info=info,
        peak_gpu_bytes=max((r.gpu_allocated_bytes or 0 for r, _ in runs), default=0) or None,
    )


def numpy_exact_fp32(q: Array, k: Array, v: Array, scale: float, causal: bool = False) -> Array:
    s = np.matmul(q, np.swapaxes(k, -1, -2))
    s *= np.float32(scale)
    if causal:
        s[..., reference.causal_mask(s.shape[-2], s.shape[-1])] = -np.inf
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return np.matmul(s, v)


def bench_numpy(inp: dict[str, Any], args: Any) -> Measured:
    def once() -> tuple[Array, float]:
        t0 = time.perf_counter()
        out = numpy_exact_fp32(inp["q"], inp["k"], inp["v"], inp["scale"], args.causal)
        return out, time.perf_counter() - t0

    out, wall = repeat(once, args.warmup, args.repeats)
    return Measured(out=out, wall_s=wall)


def taylor2(q: Any, k: Any, v: Any) -> Any:
    """Degree-2 Taylor attention with materialized features.

    phi(x) = [1, x, vec(x x^T)/sqrt(2)] on sqrt(s)-scaled rows, so <phi(q), phi(k)> =
    1 + s q.k + (s q.k)^2/2 > 0. Keys are centred first (softmax is shift-invariant per query)
    so the scores lie in the same [-beta, beta] our certificate uses.
    """
    rs = q.shape[-1] ** -0.25  # sqrt(scale), scale = 1/sqrt(E)
    k = k - k.mean(dim=-2, keepdim=True)

    def phi(x: Any) -> Any:
        x = x * rs
        outer = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) * (0.5**0.5)
        return torch.cat([torch.ones_like(x[..., :1]), x, outer], dim=-1)

    v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # last column: normaliser
    kv = phi(k).transpose(-1, -2) @ v1
    o = phi(q) @ kv
    return o[..., :-1] / o[..., -1:]


def sdpa(q: Any, k: Any, v: Any) -> Any:
    return F.scaled_dot_product_attention(q, k, v)


def sdpa_causal(q: Any, k: Any, v: Any) -> Any:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


TAYLOR2_CHUNK = 64


def numpy_taylor2_causal(q: Array, k: Array, v: Array, chunk: int = TAYLOR2_CHUNK) -> Array:
    """Causal degree-2 Taylor attention in float32 NumPy, the chunked linear-attention schedule
    of flash-linear-attention's naive references: features [1, x, vec(x x^T)/sqrt(2)] of
    sqrt(scale)-scaled rows (keys centred on their mean, as `taylor2`), a prefix state
    phi(K)^T [V | 1] across chunks of `chunk` rows and the masked block inside each chunk. Head
    by head; the features of one chunk at a time (1 + E + E^2 columns)."""
    rs = np.float32(q.shape[-1] ** -0.25)

    def phi(x: Array) -> Array:
        x = x * rs
        outer = (x[:, :, None] * x[:, None, :]).reshape(x.shape[0], -1) * np.float32(0.5**0.5)
        return np.concatenate([np.ones_like(x[:, :1]), x, outer], axis=-1)

    out = np.empty(q.shape[:-1] + (v.shape[-1],), dtype=np.float32)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            qh, vh = q[b, h], v[b, h]
            kh = k[b, h] - k[b, h].mean(axis=0, keepdims=True)
            v1 = np.concatenate([vh, np.ones_like(vh[:, :1])], axis=-1)
            state = np.zeros((1 + qh.shape[1] * (qh.shape[1] + 1), v1.shape[1]), np.float32)
            for c0 in range(0, qh.shape[0], chunk):
                fq, fk = phi(qh[c0 : c0 + chunk]), phi(kh[c0 : c0 + chunk])
                w = np.tril(fq @ fk.T)
                o = fq @ state + w @ v1[c0 : c0 + chunk]
                out[b, h, c0 : c0 + chunk] = o[:, :-1] / o[:, -1:]
                state += fk.T @ v1[c0 : c0 + chunk]
    return out


def bench_numpy_taylor2_causal(inp: dict[str, Any], args: Any) -> Measured:
    def once() -> tuple[Array, float]:
        t0 = time.perf_counter()
        out = numpy_taylor2_causal(inp["q"], inp["k"], inp["v"])
        return out, time.perf_counter() - t0

    out, wall = repeat(once, args.warmup, args.repeats)
    return Measured(out=out, wall_s=wall)


CUBLAS_QUERY_BLOCK = 8192


def cublas_fp32(q: Any, k: Any, v: Any) -> Any:
    """float32 attention on CUDA cores: cuBLAS SGEMM with TF32 off, softmax, SGEMM, in query
    blocks (the score block is CUBLAS_QUERY_BLOCK x S per head at a time).

    PyTorch's float32 SDPA on sm80+ runs the memory-efficient kernel, whose matrix products use
    tensor cores (CUTLASS's OpMultiplyAddFastF32: three TF32 products per float32 product); this
    method is what the same GPU does without tensor cores, the class of arithmetic our exact
    kernel uses.
    """
    allow = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        scale = q.shape[-1] ** -0.5
        out = torch.empty(*q.shape[:-1], v.shape[-1], device=q.device, dtype=q.dtype)
        kt = k.transpose(-1, -2)
        for i in range(0, q.shape[-2], CUBLAS_QUERY_BLOCK):
            s = (q[..., i : i + CUBLAS_QUERY_BLOCK, :] @ kt) * scale
            out[..., i : i + CUBLAS_QUERY_BLOCK, :] = torch.softmax(s, dim=-1) @ v
            del s
        return out
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow


def bench_torch_cpu(inp: dict[str, Any], args: Any) -> Measured:
    def once() -> tuple[Array, float]:
        t0 = time.perf_counter()
        with torch.inference_mode():
            qt, kt, vt = (torch.from_numpy(inp[x]) for x in "qkv")
            out = (sdpa_causal if args.causal else sdpa)(qt, kt, vt).numpy()
        return out, time.perf_counter() - t0

    out, wall = repeat(once, args.warmup, args.repeats)
    return Measured(out=out, wall_s=wall)


def bench_torch_cuda(
    inp: dict[str, Any], fn: Callable[..., Any], dtype: Any, args: Any
) -> Measured:
    """Kernel time from CUDA events on device-resident inputs (no host transfers); wall time
    NumPy-to-NumPy (host-to-device copy and cast, compute, device-to-host copy); peak GPU
    memory of the device-resident runs, inputs included."""
    dev = torch.device("cuda")
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    with torch.inference_mode():
        dev_in = [torch.from_numpy(inp[x]).to(dev, dtype) for x in "qkv"]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

        def on_device() -> tuple[Any, tuple[float, float]]:
            t0 = time.perf_counter()
            start.record()
            o = fn(*dev_in)
            end.record()
            end.synchronize()
            return o, (start.elapsed_time(end) * 1e-3, time.perf_counter() - t0)

        o, runs = repeat(on_device, args.warmup, args.repeats)
        peak = int(torch.cuda.max_memory_allocated())
        out = o.float().cpu().numpy()
        del o
        dev_in.clear()  # the end-to-end runs upload their own copies

        def numpy_to_numpy() -> tuple[None, float]:
            t0 = time.perf_counter()
            qh, kh, vh = (torch.from_numpy(inp[x]).to(dev, dtype) for x in "qkv")
            fn(qh, kh, vh).float().cpu().numpy()  # .cpu() synchronizes
            return None, time.perf_counter() - t0

        _, wall = repeat(numpy_to_numpy, 1, args.repeats)
    return Measured(
        out=out,
        wall_s=wall,
        kernel_s=[k for k, _ in runs],
        wall_device_s=[w for _, w in runs],
        peak_gpu_bytes=peak,
    )


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Method:
    name: str
    family: str  # "ours", "numpy", "torch_cpu", "torch_cuda"
    run: Callable[[dict[str, Any], Any], Measured]
    max_n: int | None = None  # skipped above this n (too slow / n^2 memory on the host)


def build_methods(args: Any) -> tuple[list[Method], dict[str, str]]:
    """Methods in run order. Returns (methods, unavailable name -> why)."""
    methods: list[Method] = []
    unavailable: dict[str, str] = {}
    cuda_names = [
        SDPA_FP32,
        SDPA_BF16,
        "torch_cuda_taylor2_fp32",
        "torch_cuda_taylor2_bf16",
        "torch_cuda_cublas_fp32",
    ]
    if torch is not None and torch.cuda.is_available() and args.causal:
        # Causal: SDPA with is_causal=True; the Taylor and cuBLAS baselines are non-causal only.
        f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
        methods += [
            Method(SDPA_FP32, "torch_cuda", lambda i, a: bench_torch_cuda(i, sdpa_causal, f32, a)),
            Method(SDPA_BF16, "torch_cuda", lambda i, a: bench_torch_cuda(i, sdpa_causal, bf16, a)),
            Method(SDPA_FP16, "torch_cuda", lambda i, a: bench_torch_cuda(i, sdpa_causal, f16, a)),
        ]
        unavailable.update({name: "non-causal only" for name in cuda_names[2:]})
    elif torch is not None and torch.cuda.is_available():
        f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
        methods += [
            Method(SDPA_FP32, "torch_cuda", lambda i, a: bench_torch_cuda(i, sdpa, f32, a)),
            Method(SDPA_BF16, "torch_cuda", lambda i, a: bench_torch_cuda(i, sdpa, bf16, a)),
            Method(SDPA_FP16, "torch_cuda", lambda i, a: bench_torch_cuda(i, sdpa, f16, a)),
            Method(cuda_names[2], "torch_cuda", lambda i, a: bench_torch_cuda(i, taylor2, f32, a)),
            Method(cuda_names[3], "torch_cuda", lambda i, a: bench_torch_cuda(i, taylor2, bf16, a)),
            Method(
                cuda_names[4],
                "torch_cuda",
                lambda i, a: bench_torch_cuda(i, cublas_fp32, f32, a),
                args.cublas_max_n,
            ),
        ]
    else:
        why = "torch not installed" if torch is None else "torch.cuda not available"
        unavailable.update({name: why for name in [*cuda_names, SDPA_FP16]})
    if torch is not None:
        methods.append(
            Method("torch_cpu_sdpa_fp32", "torch_cpu", bench_torch_cpu, args.torch_cpu_max_n)
        )
    else:
        unavailable["torch_cpu_sdpa_fp32"] = "torch not installed"
    methods.append(Method("numpy_exact_fp32", "numpy", bench_numpy, args.numpy_max_n))
    if args.causal:
        methods.append(
            Method(
                "numpy_taylor2_causal",
                "numpy",
                bench_numpy_taylor2_causal,
                args.taylor2_max_n,
            )
        )
    methods.append(
        Method("ours_exact", "ours", lambda i, a: bench_ours(i, "exact", None, a), args.exact_max_n)
    )
    if approx_attn.device_info().get("coop_f16"):
        # Exact on cooperative matrices (f16 operands, f32 accumulation), causal or not.
        methods.append(
            Method(
                "ours_exact_tc",
                "ours",
                lambda i, a: bench_ours(i, "exact", None, a, tensor_cores=True),
                args.exact_tc_max_n,
            )
        )
        # The same kernel on float16 NumPy inputs: float16 storage (half the words up).
        methods.append(
            Method(
                "ours_exact_f16",
                "ours",
                lambda i, a: bench_ours(i, "exact", None, a, input_dtype=np.float16),
                args.exact_tc_max_n,
            )
        )
    else:
        unavailable["ours_exact_tc"] = "no 16x16 f16 cooperative matrices"
        unavailable["ours_exact_f16"] = "no 16x16 f16 cooperative matrices"
    for d in args.degree:
        methods.append(
            Method(
                f"ours_poly_d{d}",
                "ours",
                lambda i, a, d=d: bench_ours(i, "poly", d, a, tensor_cores=False),
            )
        )
    if approx_attn.device_info().get("coop_f16"):
        # Causal: the diagonal blocks on tensor cores, the chunk passes in f32.
        for d in args.degree:
            methods.append(
                Method(
                    f"ours_poly_tc_d{d}",
                    "ours",
                    lambda i, a, d=d: bench_ours(i, "poly", d, a, tensor_cores=True),
                )
            )
    else:
        for d in args.degree:
            unavailable[f"ours_poly_tc_d{d}"] = "no 16x16 f16 cooperative matrices"
    methods.append(
        Method(
            "ours_auto",
            "ours",
            lambda i, a: bench_ours(i, "auto", None, a),
            args.exact_max_n if args.auto_max_n is None else args.auto_max_n,
        )
    )
    keep = [m for m in methods if any(fnmatch.fnmatch(m.name, p) for p in args.methods)]
    return keep, unavailable


def run_one(
    method: Method, inp: dict[str, Any], args: Any
) -> tuple[dict[str, Any], Measured | None]:
    """One record; OOM and other failures become a status, never an abort."""
    try:
        return {"status": "ok"}, method.run(inp, args)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - a failing method must not end the run
        if torch is not None and isinstance(e, torch.cuda.OutOfMemoryError):
            return {"status": "oom", "note": str(e).splitlines()[0][:300]}, None
        tb = traceback.format_exc(limit=3)
        return {"status": f"error: {type(e).__name__}: {e}"[:500], "traceback": tb}, None


def release_memory() -> None:
    """Called after the exception (and its frames holding tensors) is gone, so the caching
    allocator's pool really goes back before the next method, ours included, allocates."""
    gc.collect()
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------


class Progress:
    """tqdm if importable, else one stderr line per step."""

    def __init__(self, total: int) -> None:
        self.total, self.i = total, 0
        self.bar = tqdm(total=total, unit="run", dynamic_ncols=True) if tqdm else None

    def start(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_description(label)
        else:
            print(f"[{self.i + 1}/{self.total}] {label}", file=sys.stderr, flush=True)

    def done(self) -> None:
        self.i += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def versions() -> dict[str, Any]:
    v: dict[str, Any] = {"python": platform.python_version(), "numpy": np.__version__}
    try:
        v["approx_attn"] = importlib.metadata.version("approx_attn")
    except importlib.metadata.PackageNotFoundError:
        v["approx_attn"] = getattr(approx_attn, "__version__", None)
    v["approx_attn_path"] = str(Path(approx_attn.__file__).parent)  # which build ran
    if torch is not None:
        v["torch"] = torch.__version__
        v["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            v["cuda_device"] = torch.cuda.get_device_name(0)
            try:  # whether PyTorch's float32 matrix products may use TF32
                v["torch_allow_tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
            except AttributeError:
                pass
    try:
        v["matplotlib"] = importlib.metadata.version("matplotlib")
    except importlib.metadata.PackageNotFoundError:
        pass
    return v


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Atomic write, so a kill mid-write leaves the previous complete file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def run(args: Any) -> int:
    methods, unavailable = build_methods(args)
    info = approx_attn.device_info()
    beta_target = certified_beta(args.cert_degree, args.eps) * (1.0 - args.beta_margin)
    doc: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "adapter": info.get("adapter"),
        "backend": info.get("backend"),
        "device_info": info,
        "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "versions": versions(),
        "args": {k: v for k, v in vars(args).items() if k != "plot_only"},
        "input": {
            "distribution": "standard normal; q and k rescaled to beta_target",
            "beta_target": beta_target,
            "cert_degree": args.cert_degree,
            "cert_poly_eps": args.eps / (1.0 + args.eps),
        },
        "methods": [m.name for m in methods],
        "methods_unavailable": unavailable,
        "records": [],
        "complete": False,
    }
    out_path = Path(args.out)
    configs = [(n, E) for n in sorted(args.n) for E in args.E]
    progress = Progress(len(configs) * len(methods))
    try:
        for n, E in configs:
            progress.start(f"inputs n={n} E={E}")
            inp = make_inputs(n, E, args.heads, beta_target, args.seed)
            rows = reference_rows(n, args)
            progress.start(f"float64 reference n={n} E={E}")
            ref = float64_reference(inp["q"], inp["k"], inp["v"], inp["scale"], rows, args.causal)
            against = "float64 reference"
            if rows is not None:
                against += f" on {len(rows)} evenly spaced query rows per head"
            for m in methods:
                progress.start(f"{m.name} n={n} E={E}")
                # a hang inside a GPU call cannot be caught here: say what was running
                doc["running"] = {"method": m.name, "n": n, "E": E}
                write_json(out_path, doc)
                rec: dict[str, Any] = {
                    "method": m.name,
                    "family": m.family,
                    "n": n,
                    "E": E,
                    "heads": args.heads,
                    "batch": 1,
                    "causal": args.causal,
                    "input_beta": inp["beta"],
                    "kernel_s": None,
                    "wall_s": None,
                    "max_abs_error": None,
                    "error_against": "n/a",
                    "error_bound": None,
                }
                if m.max_n is not None and n > m.max_n:
                    rec.update(status="skipped", note=f"n > {m.max_n}")
                    meas = None
                else:
                    status, meas = run_one(m, inp, args)
                    release_memory()
                    rec.update(status)
                if meas is not None:
                    rec.update(
                        kernel_s=spread(meas.kernel_s),
                        wall_s=spread(meas.wall_s),
                        wall_device_s=spread(meas.wall_device_s),
                        peak_gpu_bytes=meas.peak_gpu_bytes,
                        error_bound=meas.error_bound,
                        **meas.info,
                    )
                    if meas.info.get("poly_eps") is not None:  # did the certificate hold?
                        rec["certified"] = meas.info["poly_eps"] <= args.eps / (1.0 + args.eps)
                    if meas.out is not None:
                        out = meas.out if rows is None else meas.out[:, :, rows]
                        rec.update(max_abs_error=max_abs_error(out, ref), error_against=against)
                    else:
                        rec.update(max_abs_error=None, error_against="n/a")
                doc["records"].append(rec)
                del meas
                progress.done()
                write_json(out_path, doc)  # after every record: a crash keeps what is done
            del inp, ref
            gc.collect()
        doc["complete"] = True
        doc.pop("running", None)
    except KeyboardInterrupt:
        doc["interrupted"] = True
        print("\ninterrupted: writing what is done", file=sys.stderr)
    finally:
        progress.close()
        doc["crossovers"] = crossovers(doc, args.metric)
        write_json(out_path, doc)
    plot_and_summarize(doc, out_path, args)
    return 130 if doc.get("interrupted") else 0


def plot_and_summarize(doc: dict[str, Any], out_path: Path, args: Any) -> None:
    """The PNG beside the written JSON (or at --png), then the table on stdout."""
    png = Path(args.png) if args.png else out_path.with_suffix(".png")
    plot(doc, png, args.metric)
    print(f"wrote {out_path} and {png}", file=sys.stderr)
    print_table(doc)


# --------------------------------------------------------------------------------------------
# Crossover and plot
# --------------------------------------------------------------------------------------------


def time_of(rec: dict[str, Any], metric: str) -> dict[str, Any] | None:
    """Kernel time where measured (GPU methods), else wall time (CPU methods)."""
    if rec.get("status") != "ok":
        return None
    if metric == "kernel" and rec.get("kernel_s"):
        return rec["kernel_s"]
    return rec.get("wall_s")


def series(doc: dict[str, Any], method: str, E: int, metric: str) -> dict[int, float]:
    out = {}
    for r in doc["records"]:
        t = time_of(r, metric)
        if r["method"] == method and r["E"] == E and t is not None:
            out[r["n"]] = t["median"]
    return out


def crossover_for(poly: dict[int, float], base: dict[int, float]) -> dict[str, Any] | None:
    """n beyond which poly stays faster than base, interpolated in log-log between the two
    measured n around the last sign change; None when poly is slower at the largest n."""
    ns = sorted(set(poly) & set(base))
    if not ns:
        return None
    r = [math.log(poly[n] / base[n]) for n in ns]
    if r[-1] >= 0:
        return {"n": None, "kind": "poly not faster at the largest measured n", "n_max": ns[-1]}
    i = len(r) - 1
    while i > 0 and r[i - 1] < 0:
        i -= 1
    if i == 0:
        return {"n": ns[0], "kind": "poly faster at every measured n"}
    x0, x1 = math.log(ns[i - 1]), math.log(ns[i])
    x = x0 + (x1 - x0) * r[i - 1] / (r[i - 1] - r[i])
    return {"n": math.exp(x), "kind": "interpolated", "between": [ns[i - 1], ns[i]]}


def crossovers(doc: dict[str, Any], metric: str) -> dict[str, Any]:
    """Per E: where ours_poly (first --degree; on tensor cores where they ran) overtakes CUDA
    SDPA bf16, else our exact."""
    degrees = doc["args"].get("degree") or [2]
    result = {}
    for E in sorted({r["E"] for r in doc["records"]}):
        poly_name = f"ours_poly_tc_d{degrees[0]}"
        if not series(doc, poly_name, E, metric):
            poly_name = f"ours_poly_d{degrees[0]}"
        base_name = SDPA_BF16 if series(doc, SDPA_BF16, E, metric) else "ours_exact"
        c = crossover_for(series(doc, poly_name, E, metric), series(doc, base_name, E, metric))
        if c is not None:
            result[str(E)] = {"poly": poly_name, "baseline": base_name, **c}
    return result


STYLE = {"ours": "-", "torch_cuda": "--", "torch_cpu": ":", "numpy": "-."}


def plot(doc: dict[str, Any], png: Path, metric: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    Es = sorted({r["E"] for r in doc["records"]})
    if not Es:
        return
    names = list(dict.fromkeys(r["method"] for r in doc["records"]))
    colors = {nm: plt.get_cmap("tab10")(i % 10) for i, nm in enumerate(names)}
    cross = crossovers(doc, metric)
    fig, axes = plt.subplots(1, len(Es), figsize=(7 * len(Es), 5.5), squeeze=False)
    for ax, E in zip(axes[0], Es):
        for nm in names:
            recs = sorted(
                (r for r in doc["records"] if r["method"] == nm and r["E"] == E),
                key=lambda r: r["n"],
            )
            pts = [(r["n"], time_of(r, metric), r) for r in recs if time_of(r, metric)]
            if not pts:
                continue
            ns = [p[0] for p in pts]
            med = [p[1]["median"] for p in pts]
            err = [
                [p[1]["median"] - p[1]["min"] for p in pts],
                [p[1]["max"] - p[1]["median"] for p in pts],
            ]
            family = pts[0][2].get("family", "ours")
            ax.errorbar(
                ns,
                med,
                yerr=err,
                ls=STYLE.get(family, "-"),
                marker="o",
                ms=4,
                capsize=2,
                color=colors[nm],
                label=nm,
            )
            for r in recs:  # mark OOMs where they happened
                if r["status"] == "oom" and med:
                    ax.plot([r["n"]], [max(med)], "x", color=colors[nm], ms=8)
            if nm == "ours_auto":  # auto's choice differs per point: label each
                for n, t, r in pts:
                    tag = r.get("ran_method") or "?"
                    tag += f"{r['degree']}" if r.get("degree") else ""
                    ax.annotate(
                        tag,
                        (n, t["median"]),
                        xytext=(3, -9),
                        textcoords="offset points",
                        fontsize=6,
                        color=colors[nm],
                    )
        c = cross.get(str(E))
        if c and c.get("n"):
            ax.axvline(c["n"], color="k", lw=1, alpha=0.6)
            ax.annotate(
                f"{c['poly']} faster than\n{c['baseline']}\n"
                + (
                    f"from n≈{c['n']:.0f}"
                    if c["kind"] == "interpolated"
                    else f"at every n measured (≥{c['n']})"
                ),
                xy=(c["n"], 0.97),
                xycoords=("data", "axes fraction"),
                va="top",
                ha="left",
                fontsize=8,
                xytext=(4, 0),
                textcoords="offset points",
            )
        elif c:
            ax.text(
                0.02,
                0.97,
                f"{c['poly']} vs {c['baseline']}: {c['kind']}",
                transform=ax.transAxes,
                va="top",
                fontsize=8,
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("n (sequence length, L = S)")
        ylabel = "median time [s]: GPU kernel where measured, else wall"
        ax.set_ylabel(ylabel if metric == "kernel" else "median wall time [s]")
        heads = doc["args"].get("heads")
        causal = "causal" if doc["args"].get("causal") else "non-causal"
        ax.set_title(f"E={E}, heads={heads}, batch 1, {causal}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(
        f"approx_attn on {doc.get('adapter')} ({doc.get('backend')})\n"
        f"{doc.get('date', '')[:10]}; bars: min-max over repeats; x: OOM",
        fontsize=9,
    )
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)


def fmt_t(t: dict[str, Any] | None) -> str:
    return "-" if not t else f"{t['median']:.3e}"


def print_table(doc: dict[str, Any]) -> None:
    """A short text summary on stdout; the JSON holds everything."""
    print(
        f"{'method':26} {'n':>7} {'E':>4} {'kernel_s':>10} {'wall_s':>10} "
        f"{'max_err':>9} {'bound':>9} {'ran':>7}  status"
    )
    for r in doc["records"]:
        err = r.get("max_abs_error")
        bnd = r.get("error_bound")
        ran = (r.get("ran_method") or "-") + (f"{r['degree']}" if r.get("degree") else "")
        print(
            f"{r['method']:26} {r['n']:>7} {r['E']:>4} {fmt_t(r.get('kernel_s')):>10} "
            f"{fmt_t(r.get('wall_s')):>10} {'-' if err is None else f'{err:.2e}':>9} "
            f"{'-' if bnd is None else f'{bnd:.2e}':>9} {ran:>7}  {r['status']}"
        )


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--n", type=int, nargs="+", default=[1024, 4096, 16384], help="sequence lengths L = S"
    )
    p.add_argument("--E", type=int, nargs="+", default=[64, 128], help="head dimensions")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument(
        "--degree",
        type=int,
        nargs="+",
        default=[2],
        help="degrees for ours_poly_d<degree>; the first one is used for the crossover",
    )
    p.add_argument(
        "--eps",
        type=float,
        default=1e-2,
        help="target error for the input scaling and for method='auto'",
    )
    p.add_argument(
        "--cert-degree",
        type=int,
        default=2,
        help="inputs are scaled so this degree certifies --eps",
    )
    p.add_argument(
        "--beta-margin",
        type=float,
        default=1e-3,
        help="relative margin below the certified beta (float32 rounding on the GPU)",
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--numpy-max-n", type=int, default=4096)
    p.add_argument(
        "--exact-max-n",
        type=int,
        default=None,
        help="skip ours_exact (and ours_auto, which may run exact) above this n",
    )
    p.add_argument(
        "--exact-tc-max-n",
        type=int,
        default=None,
        help="skip ours_exact_tc (exact on tensor cores) above this n",
    )
    p.add_argument(
        "--auto-max-n",
        type=int,
        default=None,
        help="skip ours_auto above this n (default: --exact-max-n)",
    )
    p.add_argument("--torch-cpu-max-n", type=int, default=8192)
    p.add_argument(
        "--causal",
        action="store_true",
        help="causal attention (is_causal=True): ours, NumPy, SDPA and a causal Taylor-2 reference",
    )
    p.add_argument(
        "--taylor2-max-n",
        type=int,
        default=16384,
        help="skip numpy_taylor2_causal (1 + E + E^2 features on the host) above this n",
    )
    p.add_argument(
        "--cublas-max-n",
        type=int,
        default=65536,
        help="skip torch_cuda_cublas_fp32 (n^2 work without tensor cores) above this n",
    )
    p.add_argument(
        "--ref-max-n",
        type=int,
        default=8192,
        help="float64 reference on every query row up to this n, else on --ref-rows rows",
    )
    p.add_argument(
        "--ref-rows",
        type=int,
        default=256,
        help="query rows per head (evenly spaced) of the float64 reference above --ref-max-n",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=["*"],
        help="glob patterns of methods to run, e.g. 'ours_*' 'torch_cuda_sdpa_*'",
    )
    p.add_argument(
        "--metric",
        choices=["kernel", "wall"],
        default="kernel",
        help="time plotted and used for the crossover",
    )
    p.add_argument(
        "--trusted",
        action="store_true",
        help="compile our shaders without wgpu's runtime checks (APPROX_ATTN_TRUSTED_SHADERS=1)",
    )
    p.add_argument("--seed", type=int, default=0)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    p.add_argument("--out", default=f"benches/results/bench-{stamp}.json")
    p.add_argument("--png", default=None, help="plot path (default: --out with .png)")
    p.add_argument(
        "--merge",
        metavar="RESULTS_JSON",
        nargs="+",
        default=None,
        help="merge the records of earlier results files (e.g. one per E) into --out and plot",
    )
    p.add_argument(
        "--plot-only",
        metavar="RESULTS_JSON",
        default=None,
        help="re-plot an earlier results file and exit",
    )
    return p.parse_args(argv)


def merge(args: argparse.Namespace) -> int:
    """One results file from several runs (same machine, e.g. one call per E): the first file's
    header, every file's records, each file's own header kept under "parts"."""
    docs = [json.loads(Path(p).read_text()) for p in args.merge]
    doc = dict(docs[0])
    doc["records"] = [r for d in docs for r in d["records"]]
    doc["methods"] = sorted({m for d in docs for m in d["methods"]})
    doc["complete"] = all(d.get("complete") for d in docs)
    doc["parts"] = [
        {"file": Path(p).name, **{k: v for k, v in d.items() if k not in ("records", "crossovers")}}
        for p, d in zip(args.merge, docs)
    ]
    doc["crossovers"] = crossovers(doc, args.metric)
    out_path = Path(args.out)
    write_json(out_path, doc)
    plot_and_summarize(doc, out_path, args)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.trusted:
        os.environ["APPROX_ATTN_TRUSTED_SHADERS"] = "1"
    if args.merge:
        return merge(args)
    if args.plot_only:
        doc = json.loads(Path(args.plot_only).read_text())
        png = Path(args.png) if args.png else Path(args.plot_only).with_suffix(".png")
        plot(doc, png, args.metric)
        print(f"wrote {png}", file=sys.stderr)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
