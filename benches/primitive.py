"""Polynomial attention as a model primitive on this machine's driver.

Not a test: measures and writes JSON + PNG under benches/results/primitive/.

1. Prefill: ``poly_attention`` (Based coefficients 1 + x + x^2/2 and x^2, E = 16, causal) against
   the materialized form ``P(scale Q K^T)``, masked, normalised, times V, in float32 on the CPU
   with PyTorch (NumPy where PyTorch does not import; the JSON says which), one head at a time
   so the n x n matrix of one head is the largest allocation.
2. Decode: the cost per token of ``PolyState.step`` (one token at a time) after a context built
   by one ``poly_attention(..., return_state=True)`` prefill, against exact attention over a KV
   cache (``attention(q_new, K_cache, V_cache, method="exact")``, L = 1, S = context). Also the
   largest difference between the step-by-step outputs and one causal call over the whole
   sequence.
3. A PNG with both panels.

Times are NumPy-to-NumPy wall times (``time.perf_counter`` around the call; the first call of
each shape is a warm-up that builds the pipelines), median of the repeats, with min and max.

    python benches/primitive.py            # full run (about 5 minutes on 2 cores)
    python benches/primitive.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("APPROX_ATTN_AUTOTUNE", "0")

import approx_attn

try:
    import torch

    torch.set_grad_enabled(False)
except ImportError:  # the project's own venv has no PyTorch
    torch = None

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ("based", "power2")


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _stats(ts: list[float]) -> dict[str, Any]:
    a = np.asarray(ts)
    return {
        "median_s": float(np.median(a)),
        "min_s": float(a.min()),
        "max_s": float(a.max()),
        "repeats": len(ts),
    }


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[dict[str, Any], Any]:
    out = None
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return _stats(ts), out


# -------------------------------------------------------------------------------------------
# The materialized form
# -------------------------------------------------------------------------------------------


def materialized(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, coeffs: tuple[float, ...], scale: float
) -> np.ndarray:
    """P(scale q k^T) masked causally (key j visible to query i iff j <= i), normalised by the
    row sums, times v; float32, one (batch, head) at a time."""
    out = np.empty(q.shape[:-1] + (v.shape[-1],), dtype=np.float32)
    qs, ks, vs, os_ = (a.reshape(-1, *a.shape[-2:]) for a in (q, k, v, out))
    for h in range(qs.shape[0]):
        if torch is not None:
            tq, tk, tv = (torch.from_numpy(a[h]) for a in (qs, ks, vs))
            s = (tq * scale) @ tk.T
            p = torch.full_like(s, coeffs[-1])  # Horner, in place
            for c in coeffs[-2::-1]:
                p.mul_(s)
                if c:
                    p.add_(c)
            del s
            p.tril_()
            os_[h] = ((p @ tv) / p.sum(-1, keepdim=True)).numpy()
        else:
            s = (qs[h] * np.float32(scale)) @ ks[h].T
            p = np.full_like(s, coeffs[-1])
            for c in coeffs[-2::-1]:
                p *= s
                if c:
                    p += np.float32(c)
            del s
            p = np.tril(p)
            os_[h] = (p @ vs[h]) / p.sum(-1, keepdims=True)
    return out


# -------------------------------------------------------------------------------------------
# Measurements
# -------------------------------------------------------------------------------------------


def prefill(args: argparse.Namespace, rng: np.random.Generator) -> list[dict[str, Any]]:
    rows = []
    e, h = args.head_dim, args.heads
    w = rng.standard_normal((1, h, 1024, e), dtype=np.float32)
    for _ in range(3):  # first use of the baseline's BLAS / thread pool, untimed
        materialized(w, w, w, approx_attn.POLY_KERNELS["based"], e**-0.5)
    n = args.n_min
    while n <= args.n_max:
        q, k, v = (rng.standard_normal((1, h, n, e), dtype=np.float32) for _ in range(3))
        for kern in KERNELS:
            coeffs = approx_attn.POLY_KERNELS[kern]

            def run_poly(q=q, k=k, v=v, kern=kern) -> Any:
                return approx_attn.poly_attention(
                    q, k, v, coeffs=kern, is_causal=True, return_report=True
                )

            run_poly()  # warm-up: pipelines for this shape
            st, (out, rep) = _timed(run_poly, args.repeats)
            row: dict[str, Any] = {
                "kernel": kern,
                "n": n,
                "heads": h,
                "head_dim": e,
                "poly": st,
                "poly_kernel_s": rep.kernel_s,
                "poly_plan": str(rep.plan),
            }
            if n <= args.max_materialized:
                reps = args.repeats if n <= 4096 else max(1, min(args.repeats, 3))

                def run_mat(q=q, k=k, v=v, coeffs=coeffs) -> np.ndarray:
                    return materialized(q, k, v, coeffs, e**-0.5)

                if n <= 4096:
                    run_mat()  # warm-up (thread pools, allocator)
                st_m, ref = _timed(run_mat, reps)
                row["materialized"] = st_m
                row["max_abs_diff"] = float(np.abs(out - ref).max())
                row["speedup"] = st_m["median_s"] / st["median_s"]
            rows.append(row)
            m = row.get("materialized", {}).get("median_s")
            print(
                f"prefill {kern:6s} n={n:6d}: poly {st['median_s'] * 1e3:9.2f} ms"
                + (f", materialized {m * 1e3:9.2f} ms" if m else ", materialized not run"),
                flush=True,
            )
        n *= 2
    return rows


def decode(args: argparse.Namespace, rng: np.random.Generator) -> list[dict[str, Any]]:
    rows = []
    e, h, t = args.head_dim, args.heads, args.decode_tokens
    for ctx in args.contexts:
        q, k, v = (rng.standard_normal((1, h, ctx + t, e), dtype=np.float32) for _ in range(3))
        pre = slice(0, ctx)
        for kern in KERNELS:
            _, state = approx_attn.poly_attention(
                q[..., pre, :],
                k[..., pre, :],
                v[..., pre, :],
                coeffs=kern,
                is_causal=True,
                return_state=True,
            )
            # warm-up: a copy of the state steps once (pipelines for one token)
            warm = approx_attn.PolyState.from_numpy(
                state.to_numpy(), coeffs=kern, scale=state.scale, head_dim=e
            )
            warm.step(q[..., ctx : ctx + 1, :], k[..., ctx : ctx + 1, :], v[..., ctx : ctx + 1, :])
            ts, outs = [], []
            for i in range(ctx, ctx + t):
                sl = slice(i, i + 1)
                t0 = time.perf_counter()
                outs.append(state.step(q[..., sl, :], k[..., sl, :], v[..., sl, :]))
                ts.append(time.perf_counter() - t0)
            full = approx_attn.poly_attention(q, k, v, coeffs=kern, is_causal=True)
            stepped = np.concatenate(outs, axis=-2)
            last = full[..., ctx:, :]
            diff = float(np.abs(stepped - last).max())
            rows.append(
                {
                    "method": f"poly step ({kern})",
                    "context": ctx,
                    "heads": h,
                    "head_dim": e,
                    "per_token": _stats(ts),
                    "state_bytes": state.nbytes,
                    "max_abs_diff_step_vs_parallel": diff,
                    "max_abs_output": float(np.abs(last).max()),
                }
            )
            print(
                f"decode {kern:6s} context={ctx:6d}: {np.median(ts) * 1e3:7.3f} ms/token, "
                f"state {state.nbytes} B, |step - parallel| <= {diff:.2e}",
                flush=True,
            )
        kc, vc = np.ascontiguousarray(k[..., pre, :]), np.ascontiguousarray(v[..., pre, :])
        approx_attn.attention(q[..., ctx : ctx + 1, :], kc, vc, method="exact")  # warm-up
        ts = []
        for i in range(ctx, ctx + t):
            qi = q[..., i : i + 1, :]
            t0 = time.perf_counter()
            approx_attn.attention(qi, kc, vc, method="exact")
            ts.append(time.perf_counter() - t0)
        rows.append(
            {
                "method": "exact over KV cache",
                "context": ctx,
                "heads": h,
                "head_dim": e,
                "per_token": _stats(ts),
                "cache_bytes": int(kc.nbytes + vc.nbytes),
            }
        )
        print(f"decode exact  context={ctx:6d}: {np.median(ts) * 1e3:7.3f} ms/token", flush=True)
    return rows


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.6))
    base = result["baseline"]
    for kern, color in zip(KERNELS, ("C0", "C1")):
        rows = [r for r in result["prefill"] if r["kernel"] == kern]
        ns = [r["n"] for r in rows]

        def band(key: str, rows: list[dict[str, Any]] = rows) -> tuple[list[float], ...]:
            return tuple(
                [r[key][s] for r in rows if key in r] for s in ("median_s", "min_s", "max_s")
            )

        med, lo, hi = band("poly")
        a1.plot(ns, med, "o-", color=color, label=f"poly_attention ({kern})")
        a1.fill_between(ns, lo, hi, color=color, alpha=0.2)
        nm = [r["n"] for r in rows if "materialized" in r]
        med, lo, hi = band("materialized")
        a1.plot(nm, med, "s--", color=color, label=f"materialized {base} ({kern})")
        a1.fill_between(nm, lo, hi, color=color, alpha=0.2)
    a1.set_xscale("log", base=2)
    a1.set_yscale("log")
    a1.set_xlabel("sequence length n")
    a1.set_ylabel("time (s)")
    h, e = result["config"]["heads"], result["config"]["head_dim"]
    a1.set_title(f"causal prefill, {h} heads, E = {e}")
    a1.grid(True, which="both", alpha=0.3)
    a1.legend(fontsize=8)
    methods = sorted({r["method"] for r in result["decode"]})
    for i, m in enumerate(methods):
        rows = [r for r in result["decode"] if r["method"] == m]
        ctx = [r["context"] for r in rows]
        med = [r["per_token"]["median_s"] * 1e3 for r in rows]
        lo = [r["per_token"]["min_s"] * 1e3 for r in rows]
        hi = [r["per_token"]["max_s"] * 1e3 for r in rows]
        a2.plot(ctx, med, "o-", color=f"C{i + 2}", label=m)
        a2.fill_between(ctx, lo, hi, color=f"C{i + 2}", alpha=0.2)
    a2.set_xscale("log", base=2)
    a2.set_xlabel("context length")
    a2.set_ylabel("time per generated token (ms)")
    a2.set_title(f"decoding one token at a time, {h} heads, E = {e}")
    a2.set_ylim(bottom=0)
    a2.grid(True, which="both", alpha=0.3)
    a2.legend(fontsize=8)
    adapter = result["machine"]["device_info"].get("adapter", "?")
    fig.suptitle(f"approx_attn polynomial primitive on {adapter} ({result['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run: small sizes, 2 repeats")
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=16)
    ap.add_argument("--n-min", type=int, default=256)
    ap.add_argument("--n-max", type=int, default=65536)
    ap.add_argument(
        "--max-materialized",
        type=int,
        default=16384,
        help="largest n for the materialized form (its n x n matrix per head: 1 GiB at 16,384)",
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    ap.add_argument("--decode-tokens", type=int, default=32, help="tokens stepped per context")
    ap.add_argument("--out", type=Path, default=ROOT / "benches" / "results" / "primitive")
    ap.add_argument("--tag", default="", help="appended to the file names")
    args = ap.parse_args(argv)
    if args.quick:
        args.n_max = min(args.n_max, 1024)
        args.repeats = 2
        args.contexts = [256, 1024]
        args.decode_tokens = 4
    rng = np.random.default_rng(0)
    baseline = "torch" if torch is not None else "numpy"
    now = dt.datetime.now()
    result: dict[str, Any] = {
        "date": now.isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "git_commit": _git_commit(),
        "machine": {
            "device_info": approx_attn.device_info(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "torch": None if torch is None else torch.__version__,
            "torch_threads": None if torch is None else torch.get_num_threads(),
        },
        "baseline": baseline,
        "baseline_note": (
            "materialized form in PyTorch (float32, CPU)"
            if torch is not None
            else "PyTorch not importable in this interpreter: materialized form in NumPy (float32)"
        ),
        "config": {k: (v if not isinstance(v, Path) else str(v)) for k, v in vars(args).items()},
        "timing": "NumPy-to-NumPy wall time per call (perf_counter); median, min, max of repeats; "
        "first call of each shape untimed",
    }
    print(f"adapter: {result['machine']['device_info'].get('adapter')}, baseline: {baseline}")
    result["prefill"] = prefill(args, rng)
    result["decode"] = decode(args, rng)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"primitive-{now:%Y-%m-%d}-{baseline}" + ("-quick" if args.quick else "")
    stem += f"-{args.tag}" if args.tag else ""
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out / f"{stem}.png")
    print(f"wrote {args.out / stem}.json and .png")


if __name__ == "__main__":
    main()
