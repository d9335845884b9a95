"""Exact attention on tensor cores (approx_attn, wgpu cooperative matrices) against PyTorch SDPA
in bf16 and fp16, in one process: GPU kernel seconds from our timestamps and from CUDA events.

    python benches/exact_coop_timing.py --n 16384 65536 --E 64 128 --out result.json

Variants of our kernel (--variants, all timed in the same process on the same inputs):
  f32   float32 storage: the inputs are read as f32 and rounded to f16 in workgroup memory;
  f16   f16 storage (storage="float16": the float32 inputs rounded to f16 on the host): half the
        words read;
  f32u, f16u  the same with APPROX_ATTN_COOP_EXACT_UNMASKED=1 (key tiles every row sees whole
        skip the mask).
SDPA reads bf16/fp16.

    python benches/exact_coop_timing.py --dry-run --out /tmp/dry.json

checks the script on any adapter without torch or CUDA: small n, SDPA skipped, and where the
adapter has no cooperative matrices the f32 kernel runs in their place (rows say which ran).
The process holds a CUDA context throughout (without one the driver may keep the GPU's clocks
idle while wgpu runs). Shaders run without wgpu's runtime checks (APPROX_ATTN_TRUSTED_SHADERS=1,
as benches/bench.py --trusted). With --sweep, every tile shape of the planner's candidates is
timed at each (n, E) by APPROX_ATTN_COOP_EXACT_TILES, with the Q block staged in each of
--sweep-q-parts parts (APPROX_ATTN_COOP_EXACT_Q_PARTS). This is a benchmark: nothing here asserts.
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
from approx_attn import reference

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # --dry-run only
    torch = None

# name: (storage, unmasked key tiles)
VARIANTS = {
    "f32": ("float32", False),
    "f16": ("float16", False),
    "f32u": ("float32", True),
    "f16u": ("float16", True),
}


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


def ours(
    q,
    k,
    v,
    causal: bool,
    runs: int,
    tiles: str | None,
    variant: str = "f32",
    tensor_cores: bool = True,
    q_parts: int | None = None,
):
    if tiles is None:
        os.environ.pop("APPROX_ATTN_COOP_EXACT_TILES", None)
    else:
        os.environ["APPROX_ATTN_COOP_EXACT_TILES"] = tiles
    if q_parts is None:
        os.environ.pop("APPROX_ATTN_COOP_EXACT_Q_PARTS", None)
    else:
        os.environ["APPROX_ATTN_COOP_EXACT_Q_PARTS"] = str(q_parts)
    storage, unmasked = VARIANTS[variant]
    os.environ["APPROX_ATTN_COOP_EXACT_UNMASKED"] = "1" if unmasked else "0"
    secs, rep = [], None
    for i in range(runs + 1):
        t0 = time.perf_counter()
        out, rep = approx_attn.attention(
            q,
            k,
            v,
            method="exact",
            is_causal=causal,
            tensor_cores=tensor_cores,
            storage=storage,
            return_report=True,
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
    ap.add_argument(
        "--sweep-q-parts",
        type=int,
        nargs="+",
        default=[1],
        help="with --sweep: also stage the Q block in these numbers of parts (2: 8 subgroups fit "
        "48 KiB at E = 128)",
    )
    ap.add_argument("--autotune", action="store_true", help="tune the tiles per class first")
    ap.add_argument(
        "--f32-at", type=int, nargs="*", default=[], help="also time the f32 kernel at these n"
    )
    ap.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=list(VARIANTS),
        help="our kernel's variants to time (the first is the one --sweep and --f32-at use)",
    )
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="check the script without torch/CUDA: n=256 and E=64 unless given, SDPA skipped",
    )
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.dry_run:
        given = set(sys.argv)
        args.n = args.n if "--n" in given else [256]
        args.E = args.E if "--E" in given else [64]
        args.heads = args.heads if "--heads" in given else 2
        args.runs = 1
        args.sweep_n = 256
    if args.autotune:
        os.environ["APPROX_ATTN_AUTOTUNE"] = "1"
        os.environ["APPROX_ATTN_TUNE_LOG"] = "1"
    cuda = torch is not None and torch.cuda.is_available()
    if not cuda and not args.dry_run:
        sys.exit("needs torch with CUDA (SDPA); --dry-run checks the script without them")
    if cuda:
        torch.zeros(1, device="cuda")  # hold a CUDA context: clocks up
    info = approx_attn.device_info()
    print(json.dumps(info), flush=True)
    tensor_cores = bool(info["coop_f16"])
    if not tensor_cores and not args.dry_run:
        sys.exit(f"{info['adapter']} has no cooperative matrices (device_info()['coop_f16'])")
    results = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.node(),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "torch": torch.__version__ if torch is not None else None,
        "dry_run": args.dry_run,
        "tensor_cores": tensor_cores,
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
                    for qp in args.sweep_q_parts:
                        row = {"n": n, "E": E, "causal": causal, "tiles": s, "q_parts": qp}
                        try:
                            _, rep, secs = ours(
                                q, k, v, causal, 2, s, args.variants[0], tensor_cores, qp
                            )
                            row["kernel_s"] = min(secs)
                        except ValueError as e:  # shapes that do not fit are refused
                            row["error"] = str(e)[:200]
                        print(json.dumps(row), flush=True)
                        results["sweep"].append(row)
        for n in args.n:
            q, k, v = (
                rng.standard_normal((1, args.heads, n, E), dtype=np.float32) for _ in range(3)
            )
            for causal in causals:
                flops = 4.0 * n * n * E * args.heads * (0.5 if causal else 1.0)
                row = {"n": n, "E": E, "heads": args.heads, "causal": causal, "variants": {}}
                for name in args.variants:
                    out, rep, secs = ours(q, k, v, causal, args.runs, None, name, tensor_cores)
                    var = {
                        "kernel_s": secs,
                        "plan": rep.plan,
                        "tensor_cores": rep.tensor_cores,
                        "storage": rep.storage,
                        "elapsed_s": rep.elapsed_s,
                        "tflops": flops / min(secs) / 1e12,
                        "f16_rounding": rep.f16_rounding,
                        "error_bound": rep.error_bound,
                        "input_rounding": rep.input_rounding,
                        "io_words": rep.io_words,
                        "host_to_device_bytes": rep.host_to_device_bytes,
                    }
                    if n <= 65536:
                        var["sampled_max_err"] = sampled_error(out, q, k, v, causal)
                    del out
                    row["variants"][name] = var
                    print(json.dumps({"n": n, "E": E, "causal": causal, name: var}), flush=True)
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
                if cuda:
                    for name, dtype in (
                        ("sdpa_bf16", torch.bfloat16),
                        ("sdpa_fp16", torch.float16),
                    ):
                        s = sdpa_seconds(q, k, v, causal, dtype, 5)
                        row[f"{name}_s"] = s
                        row[f"{name}_tflops"] = flops / min(s) / 1e12
                    for var in row["variants"].values():
                        var["ratio_vs_sdpa_bf16"] = min(var["kernel_s"]) / min(row["sdpa_bf16_s"])
                print(json.dumps(row), flush=True)
                results["rows"].append(row)
            del q, k, v
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    for r in results["rows"]:
        sdpa = (
            f"SDPA bf16 {min(r['sdpa_bf16_s']):.4f} s ({r['sdpa_bf16_tflops']:.0f} TFLOP/s)"
            if "sdpa_bf16_s" in r
            else "SDPA skipped"
        )
        print(f"n={r['n']} E={r['E']} causal={r['causal']}: {sdpa}")
        for name, var in r["variants"].items():
            ratio = var.get("ratio_vs_sdpa_bf16")
            print(
                f"  {name:5s} {min(var['kernel_s']):.4f} s ({var['tflops']:.1f} TFLOP/s)"
                + ("" if ratio is None else f", ratio {ratio:.2f}")
                + ("" if var["tensor_cores"] else " [f32 kernel: no cooperative matrices]")
            )


if __name__ == "__main__":
    main()
