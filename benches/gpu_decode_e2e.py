"""Two GPU measurements in one process (a benchmark, not a test; see benches/RESULTS.md):

1. Decoding: seconds per generated token of `PolyState.step` (Based, NumPy to NumPy) after
   contexts of 4K, 64K and 1M tokens, against PyTorch SDPA bf16 over a device-resident KV cache
   (one query row; CUDA events, and NumPy to NumPy for the new token's q, k, v in and out).
2. End to end: NumPy-to-NumPy seconds of causal and non-causal poly attention (certified, degree
   2, eps = 1e-2) at n = 262,144 and 2^20 against the time to move its inputs and output over the
   bus (a plain pinned-memory copy of the same bytes with torch, host to device and back).

    python benches/gpu_decode_e2e.py --out benches/results/gpu-decode-e2e.json

``--decode-only``: part 1 without PyTorch (our step only, on any adapter, e.g. lavapipe), with
the step on the device-resident state and, for comparison, the host-state path (the state up and
back every token through one `poly_attention` call).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import approx_attn
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench import beta_of, certified_beta, spread, versions, write_json

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # --decode-only runs without it
    torch = None  # type: ignore[assignment]


def step_seconds(state: Any, tok: list[np.ndarray], args: Any) -> list[float]:
    """NumPy-to-NumPy seconds of `state.step` on one token, after the warm-up."""
    times = []
    for t in range(args.warmup + args.tokens):
        t0 = time.perf_counter()
        state.step(*tok)
        if t >= args.warmup:
            times.append(time.perf_counter() - t0)
    return times


def decode(args: Any) -> list[dict[str, Any]]:
    rows = []
    rng = np.random.default_rng(0)
    h, e = args.heads, args.E
    for ctx in args.contexts:
        q, k, v = (rng.standard_normal((1, h, ctx, e), dtype=np.float32) for _ in range(3))
        _, state = approx_attn.poly_attention(
            q, k, v, coeffs="based", is_causal=True, return_state=True
        )
        tok = [rng.standard_normal((1, h, 1, e), dtype=np.float32) for _ in range(3)]
        host = approx_attn.PolyState.from_numpy(
            state.to_numpy(), coeffs="based", scale=state.scale, head_dim=e
        )
        host._host_only = True  # the path before the device-resident state
        ours = step_seconds(state, tok, args)
        ours_host = step_seconds(host, tok, args)
        row = {
            "context": ctx,
            "heads": h,
            "E": e,
            "state_bytes": state.nbytes,
            "ours_step_numpy_to_numpy_s": spread(ours),
            "ours_host_state_step_numpy_to_numpy_s": spread(ours_host),
        }
        if args.decode_only:
            rows.append(row)
            print(rows[-1], flush=True)
            continue
        dev = torch.device("cuda")
        kc, vc = (torch.from_numpy(x).to(dev, torch.bfloat16) for x in (k, v))
        del q, k, v
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        kern, e2e = [], []
        with torch.inference_mode():
            for t in range(args.warmup + args.tokens):
                t0 = time.perf_counter()
                qt = torch.from_numpy(tok[0]).to(dev, torch.bfloat16)
                start.record()
                o = F.scaled_dot_product_attention(qt, kc, vc)
                end.record()
                o.float().cpu().numpy()
                if t >= args.warmup:
                    kern.append(start.elapsed_time(end) * 1e-3)
                    e2e.append(time.perf_counter() - t0)
        del kc, vc
        torch.cuda.empty_cache()
        row["sdpa_bf16_kv_cache_kernel_s"] = spread(kern)
        row["sdpa_bf16_kv_cache_numpy_to_numpy_s"] = spread(e2e)
        rows.append(row)
        print(rows[-1], flush=True)
    return rows


def bus_seconds(nbytes_in: int, nbytes_out: int, repeats: int) -> dict[str, Any]:
    """A pinned host buffer copied to the device and the output's bytes back."""
    dev = torch.device("cuda")
    host_in = torch.empty(nbytes_in, dtype=torch.uint8).pin_memory()
    host_out = torch.empty(nbytes_out, dtype=torch.uint8).pin_memory()
    d_in = torch.empty(nbytes_in, dtype=torch.uint8, device=dev)
    d_out = torch.empty(nbytes_out, dtype=torch.uint8, device=dev)
    times = []
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        d_in.copy_(host_in, non_blocking=True)
        host_out.copy_(d_out, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return spread(times[1:])


def end_to_end(args: Any) -> list[dict[str, Any]]:
    rows = []
    rng = np.random.default_rng(1)
    h, e = args.heads, args.E
    beta = certified_beta(2, 1e-2)
    for n in args.n:
        q, k, v = (rng.standard_normal((1, h, n, e), dtype=np.float32) for _ in range(3))
        # q and k scaled so that degree 2 certifies eps = 1e-2 (beta at 0.9 of its limit: the
        # pre-pass widens beta for its float32 rounding).
        f = np.float32(math.sqrt(0.9 * beta / beta_of(q, k, 1.0 / math.sqrt(e))))
        q, k = q * f, k * f
        for causal in (False, True):
            times, kern = [], []
            for t in range(args.warmup + args.repeats):
                t0 = time.perf_counter()
                _, rep = approx_attn.attention(
                    q, k, v, method="poly", eps=1e-2, is_causal=causal, return_report=True
                )
                if t >= args.warmup:
                    times.append(time.perf_counter() - t0)
                    kern.append(rep.kernel_s)
            nin, nout = q.nbytes + k.nbytes + v.nbytes, q.nbytes // e * v.shape[-1]
            bus = bus_seconds(nin, nout, args.repeats)
            rows.append(
                {
                    "n": n,
                    "heads": h,
                    "E": e,
                    "causal": causal,
                    "degree": rep.degree,
                    "numpy_to_numpy_s": spread(times),
                    "kernel_s": spread(kern),
                    "bus_bytes": nin + nout,
                    "bus_s": bus,
                    "ratio_to_bus": float(np.median(times)) / bus["median"],
                    "host_s_last_run": dict(rep.host_s),  # where the host time went
                }
            )
            print(rows[-1], flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 65536, 1048576])
    p.add_argument("--n", type=int, nargs="+", default=[262144, 1048576])
    p.add_argument("--E", type=int, default=64)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--commit", default="unknown", help="where git is absent (the GPU machine)")
    p.add_argument("--out", default="benches/results/gpu-decode-e2e.json")
    p.add_argument(
        "--decode-only",
        action="store_true",
        help="part 1 without PyTorch: our step only (device-resident and host state)",
    )
    args = p.parse_args()
    if not args.decode_only:
        if torch is None:
            p.error("PyTorch is not installed: pass --decode-only for our step alone")
        torch.zeros(1, device="cuda")  # a CUDA context keeps the SM clock up
    doc: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True
        ).stdout.strip()
        or args.commit,
        "device": approx_attn.device_info(),
        "versions": versions(),
    }
    doc["decode"] = decode(args)
    write_json(Path(args.out), doc)
    if args.decode_only:
        return 0
    doc["end_to_end"] = end_to_end(args)
    write_json(Path(args.out), doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
