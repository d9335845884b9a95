"""Sequence-sharded attention on Ray: time and bytes against the worker count on this
machine, and the modelled traffic at long sequences.

Not a test. Writes JSON (+ PNG where matplotlib imports) under benches/results/distributed/.

1. Measured: `approx_attn.distributed.attention` at one size (heads 2, E = Ev = 16, inputs
   scaled so that poly certifies eps = 1e-3 at a small degree) for 1, 2 and 4 workers, poly and
   exact (ring), causal and not: wall seconds NumPy to NumPy (median of the repeats after a
   warm-up call), bytes sent and received per worker, and the largest difference to the
   single-process `attention` of the same method.
2. Modelled: `distributed.traffic_model` for n = 2^20 ... 2^24, 8 workers, one head, E = Ev = 64,
   degree 2 (rank 2,145): poly's bytes per worker stay constant, ring attention's grow with n.

    python benches/distributed.py            # about a minute on 2 cores (lavapipe)
    python benches/distributed.py --quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")
os.environ.setdefault("APPROX_ATTN_AUTOTUNE", "0")

import approx_attn
import ray
from approx_attn import distributed as dist

OUT = Path(__file__).resolve().parent / "results" / "distributed"


def measure(n: int, workers: list[int], repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, n, 16), dtype=np.float32) for _ in range(3))
    q *= np.float32(0.25)
    k *= np.float32(0.25)
    rows = []
    for method in ("poly", "exact"):
        for causal in (False, True):
            one = approx_attn.attention(q, k, v, method=method, is_causal=causal, eps=1e-3)
            for w in workers:
                kw = {"num_workers": w, "method": method, "is_causal": causal, "eps": 1e-3}
                dist.attention(q, k, v, **kw)  # warm-up: actors, pipelines
                times = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    out, rep = dist.attention(q, k, v, return_report=True, **kw)
                    times.append(time.perf_counter() - t)
                rows.append(
                    {
                        "method": method,
                        "causal": causal,
                        "n": n,
                        "workers": w,
                        "seconds": statistics.median(times),
                        "bytes_sent": list(rep.bytes_sent),
                        "bytes_received": list(rep.bytes_received),
                        "model_matches": rep.bytes_sent == rep.model_bytes_sent
                        and rep.bytes_received == rep.model_bytes_received,
                        "max_diff_vs_single_process": float(np.abs(out - one).max()),
                        "error_bound": rep.error_bound,
                        "degree": rep.degree,
                        "rank": rep.rank,
                    }
                )
                print(json.dumps(rows[-1]))
    return rows


def model(workers: int = 8) -> list[dict]:
    rank = math.comb(64 + 2, 2)
    rows = []
    for p in range(20, 25):
        n = 2**p
        key_rows = [n * (i + 1) // workers - n * i // workers for i in range(workers)]
        poly = dist.traffic_model(
            "poly", key_rows=key_rows, kv_units=1, E=64, Ev=64, rank=rank, n_coeffs=3
        )
        ring = dist.traffic_model("exact", key_rows=key_rows, kv_units=1, E=64, Ev=64)
        rows.append(
            {
                "n": n,
                "workers": workers,
                "poly_received_per_worker": max(poly[1]),
                "ring_received_per_worker": max(ring[1]),
            }
        )
        print(json.dumps(rows[-1]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
    n, workers, repeats = (128, [1, 2], 1) if args.quick else (512, [1, 2, 4], 3)
    result = {
        "machine": approx_attn.device_info()["adapter"],
        "measured": measure(n, workers, repeats),
        "model": model(),
    }
    dist.shutdown()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "distributed.json").write_text(json.dumps(result, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    m = result["model"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ns = [r["n"] for r in m]
    ax.loglog(ns, [r["poly_received_per_worker"] for r in m], "o-", label="poly (states)")
    ax.loglog(ns, [r["ring_received_per_worker"] for r in m], "s-", label="exact (ring)")
    ax.set_xlabel("sequence length n")
    ax.set_ylabel("bytes received per worker")
    ax.set_title("8 workers, E = Ev = 64, poly degree 2 (model)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "traffic.png", dpi=120)


if __name__ == "__main__":
    main()
