#!/usr/bin/env bash
# Sets up this checkout: Mesa's software Vulkan driver (lavapipe) when no Vulkan driver is
# present, Mesa's EGL/OpenGL driver (llvmpipe, for the GL backend) when no EGL driver is, a
# virtual environment in .venv, and the package built in release mode into it.
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
have_gl_driver() {
    # wgpu's GL backend (APPROX_ATTN_BACKEND=gl): glvnd's libEGL, Mesa's EGL library, and Mesa's
    # DRI drivers, whose swrast_dri.so is llvmpipe (OpenGL on the CPU, reached headless via EGL).
    ldconfig -p 2>/dev/null | grep 'libEGL\.so\.1' >/dev/null || return 1
    ldconfig -p 2>/dev/null | grep 'libEGL_mesa\.so\.0' >/dev/null || return 1
    compgen -G '/usr/lib/*/dri/swrast_dri.so' >/dev/null || compgen -G '/usr/lib/dri/swrast_dri.so' >/dev/null
}
packages=()
if ! have_vulkan_driver; then
    echo "setup: no Vulkan driver found; installing Mesa's software driver (lavapipe)" >&2
    packages+=(mesa-vulkan-drivers libvulkan1)
fi
if ! have_gl_driver; then
    echo "setup: no EGL/OpenGL driver found; installing Mesa's (llvmpipe) for the GL backend" >&2
    packages+=(libegl1 libegl-mesa0 libgl1-mesa-dri)
fi
if [ ${#packages[@]} -gt 0 ]; then
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${packages[@]}" >/dev/null
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
