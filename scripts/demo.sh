#!/usr/bin/env bash
# One command for a new machine: set up, then run the main job (`approx-attn demo`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
.venv/bin/approx-attn demo "$@"
