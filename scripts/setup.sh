#!/usr/bin/env bash
# Sets up this checkout: Mesa's software Vulkan driver (lavapipe) when no Vulkan driver is
# present, a virtual environment in .venv, and the package built in release mode into it.
set -euo pipefail
cd "$(dirname "$0")/.."

have_vulkan_driver() {
    # Any ICD manifest plus the loader; `grep` without -q so pipefail sees no SIGPIPE.
    local f
    for f in /usr/share/vulkan/icd.d/*.json /etc/vulkan/icd.d/*.json; do
        if [ -e "$f" ]; then
            ldconfig -p 2>/dev/null | grep 'libvulkan\.so\.1' >/dev/null && return 0
        fi
    done
    return 1
}
if ! have_vulkan_driver; then
    echo "setup: no Vulkan driver found; installing Mesa's software driver (lavapipe)" >&2
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "maturin>=1.7,<2" "numpy>=1.23" "pytest>=7" "matplotlib>=3.6" "hypothesis>=6.100" ruff
# shellcheck disable=SC1091
. .venv/bin/activate
maturin develop --release --quiet
# Headless machines have no XDG runtime dir; wgpu's GL probe complains without one.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
echo "setup: ready ($(python -c 'import approx_attn as a; i = a.device_info(); print(i["adapter"], "via", i["backend"])'))"
