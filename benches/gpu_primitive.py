"""GPU harness for polynomial attention as a model primitive: our `poly_attention` (Based's
1 + x + x^2/2 and x^2, with and without gates) and its recurrent step, against the peers' Triton
kernels (flash-linear-attention's `parallel_based` / `fused_chunk_based`, Manifest AI's power
retention `power_full`) and PyTorch SDPA bf16 causal, in one process on the same inputs.

Every method's error is measured against a float64 reference of its own definition on sampled
query rows (Based or x^p with gates: `reference.polynomial_kernel_attention` restricted to the
row; SDPA: softmax). Times: kernel time (our timestamps, CUDA events for torch) and NumPy-to-NumPy
wall time, median and spread. A benchmark, not a test: nothing here asserts.

    python benches/gpu_primitive.py --n 4096 16384 65536 262144 --E 16 64 \
        --out benches/results/h200-primitive.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import fnmatch
import functools
import importlib.util
import math
import subprocess
import sys
import time
import traceback
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import approx_attn
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench import repeat, spread, versions, write_json

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # the harness still times our kernels without torch
    torch = None
    F = None

KERNELS = {"based": (1.0, 1.0, 0.5), "power2": (0.0, 0.0, 1.0)}


def row_reference(inp: dict[str, Any], kernel: str, gated: bool, rows: np.ndarray) -> np.ndarray:
    """float64 outputs of the sampled (head, row) pairs: causal, normalised."""
    q, k, v, g = inp["q"], inp["k"], inp["v"], inp["G"]
    out = np.zeros((len(rows), v.shape[-1]))
    for n, (h, i) in enumerate(rows):
        qi = q[0, h, i].astype(np.float64)
        kj, vj = k[0, h, : i + 1].astype(np.float64), v[0, h, : i + 1].astype(np.float64)
        x = inp["scale"] * (kj @ qi)
        if kernel == "softmax":
            w = np.exp(x - x.max())
        else:
            w = np.polynomial.polynomial.polyval(x, KERNELS[kernel])
            if gated:
                w = w * np.exp(g[0, h, i] - g[0, h, : i + 1])
        out[n] = w @ vj / w.sum()
    return out


def max_error(out: np.ndarray, ref: np.ndarray, rows: np.ndarray) -> float:
    got = np.stack([out[0, h, i] for h, i in rows]).astype(np.float64)
    return float(np.abs(got - ref).max())


def ours(inp: dict[str, Any], kernel: str, gated: bool, args: Any) -> dict[str, Any]:
    gates = inp["log_gates"] if gated else None

    def once() -> tuple[Any, tuple[Any, float]]:
        t0 = time.perf_counter()
        out, rep = approx_attn.poly_attention(
            inp["q"],
            inp["k"],
            inp["v"],
            coeffs=kernel,
            scale=inp["scale"],
            is_causal=True,
            log_gates=gates,
            return_report=True,
        )
        return out, (rep, time.perf_counter() - t0)

    out, runs = repeat(once, args.warmup, args.repeats)
    rep = runs[-1][0]
    kern = [r.kernel_s for r, _ in runs]
    return {
        "out": out,
        "wall_s": spread([w for _, w in runs]),
        "kernel_s": None if None in kern else spread(kern),
        "rank": rep.rank,
        "io_words": rep.io_words,
        "plan": rep.plan,
        "pass_s": dict(rep.pass_s),
    }


def decode(inp: dict[str, Any], kernel: str, args: Any) -> dict[str, Any]:
    """Per-token time of PolyState.step after a prefill of the whole context."""
    q, k, v = inp["q"], inp["k"], inp["v"]
    _, state = approx_attn.poly_attention(
        q, k, v, coeffs=kernel, scale=inp["scale"], is_causal=True, return_state=True
    )
    rng = np.random.default_rng(1)
    tok = [rng.standard_normal(q.shape[:2] + (1, q.shape[-1])).astype(np.float32) for _ in "qkv"]
    tok[2] = tok[2][..., : v.shape[-1]]
    times = []
    for t in range(args.warmup + args.decode_tokens):
        t0 = time.perf_counter()
        state.step(*tok)
        if t >= args.warmup:
            times.append(time.perf_counter() - t0)
    return {"per_token_s": spread(times), "state_bytes": state.nbytes}


def torch_timed(fn: Callable[[], Any], args: Any) -> tuple[Any, dict[str, Any]]:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def once() -> tuple[Any, float]:
        start.record()
        o = fn()
        end.record()
        end.synchronize()
        return o, start.elapsed_time(end) * 1e-3

    out, times = repeat(once, args.warmup, args.repeats)
    return out, spread(times)


@functools.cache
def load_power_full() -> Callable[..., Any]:
    """Power retention's Triton `power_full` without running the package's `__init__` files:
    they import its CUDA (vidrial) kernels, which clone a repository at import (no network on
    the GPU machine). The Triton path needs none of them."""
    spec = importlib.util.find_spec("power_attention")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("power_attention is not installed")
    root = Path(spec.submodule_search_locations[0])
    for sub in ("", "_attention", "_update_state", "_discumsum", "_query_state"):
        name = "power_attention" + (f".{sub}" if sub else "")
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(root / sub)] if sub else [str(root)]
        sys.modules[name] = pkg
    from power_attention.triton import power_full

    return power_full


def peers(inp: dict[str, Any], E: int, args: Any) -> dict[str, dict[str, Any]]:
    """The torch methods, bf16 on device, (B, T, H, D) layout where the peer wants it."""
    found: dict[str, dict[str, Any]] = {}
    if torch is None or not torch.cuda.is_available():
        return found
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    with torch.inference_mode():
        qkv = [torch.from_numpy(inp[x]).to(dev, bf16) for x in "qkv"]
        bthd = [x.transpose(1, 2).contiguous() for x in qkv]
        log_g = torch.from_numpy(inp["log_gates"]).to(dev).transpose(1, 2).contiguous()
        scale = inp["scale"]
        cands: dict[str, tuple[str, bool, Callable[[], Any], bool]] = {
            "sdpa_bf16_causal": (
                "softmax",
                False,
                lambda: F.scaled_dot_product_attention(*qkv, is_causal=True, scale=scale),
                False,
            ),
        }
        try:
            from fla.ops.based import fused_chunk_based, parallel_based

            cands["fla_parallel_based"] = (
                "based",
                False,
                lambda: parallel_based(*bthd, scale=scale, use_norm=True),
                True,
            )
            cands["fla_fused_chunk_based"] = (
                "based",
                False,
                lambda: fused_chunk_based(*bthd, scale=scale, use_norm=True),
                True,
            )
        except Exception as exc:  # noqa: BLE001 - record why the peer is missing
            found["fla"] = {"skipped": f"{type(exc).__name__}: {exc}"}
        try:
            power_full = load_power_full()

            for gated in (False, True):
                cands[f"power_retention_deg2{'_gated' if gated else ''}"] = (
                    "power2",
                    gated,
                    lambda gated=gated: power_full(
                        *bthd,
                        log_G=log_g if gated else None,
                        deg=2,
                        scale=scale,
                        chunk_size=min(128, inp["q"].shape[2]),
                    ),
                    True,
                )
        except Exception as exc:  # noqa: BLE001
            found["power_retention"] = {"skipped": f"{type(exc).__name__}: {exc}"}
        for name, (kernel, gated, fn, transposed) in cands.items():
            try:
                o, kern = torch_timed(fn, args)
                o = (o.transpose(1, 2) if transposed else o).float().cpu().numpy()
                ref = row_reference(inp, kernel, gated, inp["rows"])
                found[name] = {
                    "kernel_s": kern,
                    "max_err": max_error(o, ref, inp["rows"]),
                    "kernel": kernel,
                    "gated": gated,
                }
            except Exception as exc:  # noqa: BLE001 - a peer refusing a shape is a result
                found[name] = {"refused": f"{type(exc).__name__}: {str(exc)[:300]}"}
            torch.cuda.empty_cache()
    return found


def make_inputs(n: int, E: int, heads: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((1, heads, n, E), dtype=np.float32) for _ in range(3))
    # Power retention's own test gates: log sigmoid of a standard normal.
    log_gates = -np.logaddexp(0.0, -rng.standard_normal((1, heads, n))).astype(np.float32)
    rows = np.array([(h, i) for h in (0, heads - 1) for i in rng.integers(0, n, 6)])
    return {
        "q": q,
        "k": k,
        "v": v,
        "log_gates": log_gates,
        "G": np.cumsum(log_gates, -1, np.float64),
        "scale": 1.0 / math.sqrt(E),
        "rows": rows,
    }


def run(args: Any) -> int:
    if torch is not None and torch.cuda.is_available():
        torch.zeros(1, device="cuda")  # hold a CUDA context: keeps the SM clock up for us too
    doc: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            check=False,
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
        or args.commit,
        "device": approx_attn.device_info(),
        "versions": versions(),
        "results": [],
    }
    for E in args.E:
        for n in args.n:
            inp = make_inputs(n, E, args.heads, seed=n + E)
            rec: dict[str, Any] = {"n": n, "E": E, "heads": args.heads, "methods": {}}
            for kernel in ("based", "power2"):
                for gated in (False, True):
                    name = f"ours_{kernel}{'_gated' if gated else ''}"
                    if not any(fnmatch.fnmatch(name, pat) for pat in args.ours):
                        continue
                    try:
                        r = ours(inp, kernel, gated, args)
                        ref = row_reference(inp, kernel, gated, inp["rows"])
                        r["max_err"] = max_error(r.pop("out"), ref, inp["rows"])
                    except Exception as exc:  # noqa: BLE001
                        r = {"failed": f"{type(exc).__name__}: {exc}"}
                        traceback.print_exc()
                    rec["methods"][name] = r
            if n in args.decode_n:
                rec["methods"]["ours_based_decode"] = decode(inp, "based", args)
            rec["methods"].update(peers(inp, E, args))
            doc["results"].append(rec)
            write_json(Path(args.out), doc)
            summary = {
                m: (x.get("kernel_s") or x.get("per_token_s") or {}).get("median")
                for m, x in rec["methods"].items()
            }
            print(f"n={n} E={E}: " + ", ".join(f"{m} {t}" for m, t in summary.items()), flush=True)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[4096, 16384, 65536, 262144])
    p.add_argument("--E", type=int, nargs="+", default=[16, 64])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--decode-n", type=int, nargs="*", default=[4096, 65536, 262144])
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--ours", nargs="+", default=["*"], help="our variants to run (glob patterns)")
    p.add_argument("--commit", default="unknown", help="where git is absent (the GPU machine)")
    p.add_argument("--out", default="benches/results/primitive-gpu.json")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(run(parse_args()))
