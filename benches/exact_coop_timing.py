"""Exact attention on tensor cores (approx_attn, wgpu cooperative matrices) against PyTorch SDPA
in bf16 and fp16, in one process: GPU kernel seconds from our timestamps and from CUDA events.

    python benches/exact_coop_timing.py --n 16384 65536 --E 64 128 --out result.json

Our kernel reads float32 inputs and rounds them to f16 in workgroup memory; SDPA reads bf16/fp16.
The process holds a CUDA context throughout (without one the driver may keep the GPU's clocks
idle while wgpu runs). Shaders run without wgpu's runtime checks (APPROX_ATTN_TRUSTED_SHADERS=1,
as benches/bench.py --trusted). With --sweep, every tile shape of the planner's candidates is
timed at each (n, E) by APPROX_ATTN_COOP_EXACT_TILES. This is a benchmark: nothing here asserts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
import time

os.environ.setdefault("APPROX_ATTN_TRUSTED_SHADERS", "1")

import approx_attn
import numpy as np
import torch
import torch.nn.functional as F
from approx_attn import reference


def sdpa_seconds(q, k, v, causal: bool, dtype, runs: int) -> list[float]:
    dev = torch.device("cuda")
    qt, kt, vt = (torch.from_numpy(x).to(dev, dtype) for x in (q, k, v))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    out = []
    for i in range(runs + 3):
        start.record()
        F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            out.append(start.elapsed_time(end) / 1e3)
    del qt, kt, vt
    torch.cuda.empty_cache()
    return out


def ours(q, k, v, causal: bool, runs: int, tiles: str | None):
    if tiles is None:
        os.environ.pop("APPROX_ATTN_COOP_EXACT_TILES", None)
    else:
        os.environ["APPROX_ATTN_COOP_EXACT_TILES"] = tiles
    secs, rep = [], None
    for i in range(runs + 1):
        t0 = time.perf_counter()
        out, rep = approx_attn.attention(
            q, k, v, method="exact", is_causal=causal, tensor_cores=True, return_report=True
        )
        wall = time.perf_counter() - t0
        if i >= 1:
            secs.append(rep.kernel_s if rep.kernel_s is not None else wall)
    return out, rep, secs


def sampled_error(out, q, k, v, causal: bool, rows: int = 64) -> float:
    """max |O - O*| over `rows` sampled query rows of head 0 and the last head, in float64."""
    n = q.shape[2]
    idx = np.unique(np.linspace(0, n - 1, rows).astype(int))
    worst = 0.0
    for h in (0, q.shape[1] - 1):
        ref = reference.exact_attention(
            q[0, h, idx], k[0, h], v[0, h], scale=1 / math.sqrt(q.shape[-1])
        )
        if causal:  # row i sees keys 0..i: recompute per row
            ref = np.stack(
                [
                    reference.exact_attention(
                        q[0, h, i : i + 1], k[0, h, : i + 1], v[0, h, : i + 1]
                    )[0]
                    for i in idx
                ]
            )
        worst = max(worst, float(np.abs(out[0, h, idx].astype(np.float64) - ref).max()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[65536])
    ap.add_argument("--E", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--causal", choices=["both", "no", "yes"], default="both")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-n", type=int, default=16384)
    ap.add_argument("--autotune", action="store_true", help="tune the tiles per class first")
    ap.add_argument(
        "--f32-at", type=int, nargs="*", default=[], help="also time the f32 kernel at these n"
    )
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.autotune:
        os.environ["APPROX_ATTN_AUTOTUNE"] = "1"
        os.environ["APPROX_ATTN_TUNE_LOG"] = "1"
    torch.zeros(1, device="cuda")  # hold a CUDA context: clocks up
    info = approx_attn.device_info()
    print(json.dumps(info), flush=True)
    results = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.node(),
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "device_info": info,
        "env": {k: v for k, v in os.environ.items() if k.startswith("APPROX_ATTN")},
        "rows": [],
        "sweep": [],
    }
    try:
        results["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        pass
    causals = {"both": [False, True], "no": [False], "yes": [True]}[args.causal]
    rng = np.random.default_rng(0)
    for E in args.E:
        if args.sweep:
            n = args.sweep_n
            q, k, v = (
                rng.standard_normal((1, args.heads, n, E), dtype=np.float32) for _ in range(3)
            )
            shapes = [
                "4 2 32",
                "4 1 64",
                "4 1 32",
                "2 2 32",
                "4 1 16",
                "2 1 32",
                "8 1 32",
                "8 1 16",
            ]
            for causal in causals:
                for s in shapes:
                    try:
                        _, rep, secs = ours(q, k, v, causal, 2, s)
                        row = {"n": n, "E": E, "causal": causal, "tiles": s, "kernel_s": min(secs)}
                    except ValueError as e:  # shapes that do not fit are refused
                        row = {"n": n, "E": E, "causal": causal, "tiles": s, "error": str(e)[:200]}
                    print(json.dumps(row), flush=True)
                    results["sweep"].append(row)
        for n in args.n:
            q, k, v = (
                rng.standard_normal((1, args.heads, n, E), dtype=np.float32) for _ in range(3)
            )
            for causal in causals:
                flops = 4.0 * n * n * E * args.heads * (0.5 if causal else 1.0)
                row = {"n": n, "E": E, "heads": args.heads, "causal": causal}
                out, rep, secs = ours(q, k, v, causal, args.runs, None)
                row["ours_kernel_s"] = secs
                row["ours_plan"] = rep.plan
                row["ours_elapsed_s"] = rep.elapsed_s
                row["ours_tflops"] = flops / min(secs) / 1e12
                row["ours_f16_rounding"] = rep.f16_rounding
                row["ours_error_bound"] = rep.error_bound
                if n <= 65536:
                    row["ours_sampled_max_err"] = sampled_error(out, q, k, v, causal)
                del out
                if n in args.f32_at:
                    f32 = []
                    for i in range(2):
                        _, r32 = approx_attn.attention(
                            q,
                            k,
                            v,
                            method="exact",
                            is_causal=causal,
                            tensor_cores=False,
                            return_report=True,
                        )
                        f32.append(r32.kernel_s)
                    row["f32_kernel_s"] = f32[1:]
                    row["f32_plan"] = r32.plan
                for name, dtype in (("sdpa_bf16", torch.bfloat16), ("sdpa_fp16", torch.float16)):
                    s = sdpa_seconds(q, k, v, causal, dtype, 5)
                    row[f"{name}_s"] = s
                    row[f"{name}_tflops"] = flops / min(s) / 1e12
                row["ratio_vs_sdpa_bf16"] = min(secs) / min(row["sdpa_bf16_s"])
                print(json.dumps(row), flush=True)
                results["rows"].append(row)
            del q, k, v
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    for r in results["rows"]:
        print(
            f"n={r['n']} E={r['E']} causal={r['causal']}: ours {min(r['ours_kernel_s']):.4f} s "
            f"({r['ours_tflops']:.0f} TFLOP/s), SDPA bf16 {min(r['sdpa_bf16_s']):.4f} s "
            f"({r['sdpa_bf16_tflops']:.0f}), ratio {r['ratio_vs_sdpa_bf16']:.2f}"
        )


if __name__ == "__main__":
    main()
