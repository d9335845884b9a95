#!/usr/bin/env bash
# The path a user takes: build the wheel (once; `maturin build --release` reuses the release build
# that setup.sh made), install it with pip into a new virtual environment whose PATH has no Rust
# toolchain, and run scripts/wheel_smoke.py there once per wgpu backend named (default: the one
# wgpu picks).
#
# Usage: bash scripts/wheel_smoke.sh [BACKEND ...]     e.g. bash scripts/wheel_smoke.sh vulkan gl
set -euo pipefail
cd "$(dirname "$0")/.."
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The same interpreter and flags as setup.sh's `maturin develop --release`: nothing recompiles.
.venv/bin/maturin build --release --interpreter .venv/bin/python --out "$work/wheel" --quiet
whl=$(ls "$work/wheel/"*.whl)
echo "wheel_smoke: $(basename "$whl") ($(($(stat -c %s "$whl") / 1024)) KiB)"

# The interpreter the project's venv was made from (not the venv: it has the editable install).
base_py=$(.venv/bin/python -c 'import sys; print(sys._base_executable)')
"$base_py" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --disable-pip-version-check "$whl"

# PATH without any directory that holds cargo, rustc or rustup.
clean_path="$work/venv/bin"
IFS=: read -ra dirs <<<"$PATH"
for d in "${dirs[@]}"; do
    [ -n "$d" ] || continue
    if [ -e "$d/cargo" ] || [ -e "$d/rustc" ] || [ -e "$d/rustup" ]; then
        continue
    fi
    clean_path="$clean_path:$d"
done
cp scripts/wheel_smoke.py "$work/"
backends=("$@")
[ ${#backends[@]} -gt 0 ] || backends=("")
for b in "${backends[@]}"; do
    # From an empty folder, so that nothing of the checkout is importable.
    (cd "$work" && env -u CARGO_HOME -u RUSTUP_HOME -u RUSTUP_TOOLCHAIN -u PYTHONPATH \
        PATH="$clean_path" APPROX_ATTN_BACKEND="$b" python wheel_smoke.py --no-rust-on-path)
done
