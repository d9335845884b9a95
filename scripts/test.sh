#!/usr/bin/env bash
# One command for a new machine: set up, then run every test (Rust, then Python).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
# Tests run the planner's default tiles; the autotune is for real use (see README).
export APPROX_ATTN_AUTOTUNE=0
# --release shares the dependency build with the wheel built by setup.sh.
cargo test --release
.venv/bin/python -m pytest -q tests
