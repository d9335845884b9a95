#!/usr/bin/env bash
# Release artefacts for Linux into dist/: abi3 wheels (CPython >= 3.10, one wheel per
# architecture) tagged manylinux2014 (glibc >= 2.17: RHEL/Rocky 8+, Debian 10+, Ubuntu 18.04+),
# for x86_64 and aarch64, plus the sdist.
#
# The wheels are linked by zig (PyPI's `ziglang`) against glibc 2.17's symbol versions, so one
# build machine with any newer glibc makes wheels for old distributions and for aarch64 without a
# manylinux container or a cross toolchain; Rust only needs the target's standard library
# (`rustup target add`). Each wheel's tag is then checked by auditwheel (what PyPI's upload and pip
# trust: no symbol newer than glibc 2.17, no non-whitelisted shared library), and the sdist is
# checked by building a wheel from it, as pip does for a platform without a wheel.
#
# macOS and Windows wheels come from .github/workflows/release.yml (GitHub's runners).
#
# Usage: bash scripts/wheels.sh [TARGET ...]   (default: x86_64 aarch64)
# Needs: rustup with the target's rust-std (added here when it can be downloaded), Python >= 3.10.
set -euo pipefail
cd "$(dirname "$0")/.."

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(x86_64 aarch64)

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
py=.venv/bin/python
"$py" -m pip install -q "maturin>=1.7,<2" ziglang auditwheel
export PATH="$PWD/.venv/bin:$PATH"

mkdir -p dist
version=$("$py" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
rm -f "dist/approx_attn-$version-"*.whl "dist/approx_attn-$version.tar.gz"

built=()
for arch in "${targets[@]}"; do
    triple="$arch-unknown-linux-gnu"
    installed=$(rustup target list --installed)
    if ! grep -qx "$triple" <<<"$installed"; then
        echo "wheels: adding Rust's standard library for $triple" >&2
        if ! rustup target add "$triple"; then
            echo "wheels: cannot get rust-std for $triple (rustup could not download it);" \
                "no $arch wheel. Build it where rustup can, or on an $arch machine." >&2
            exit 1
        fi
    fi
    echo "wheels: building $triple (manylinux2014 via zig)" >&2
    # A target dir of their own: maturin stages the library in <target dir>/maturin/, which other
    # maturin builds of this checkout (setup.sh, the wheel smoke test) write too.
    CARGO_TARGET_DIR="$PWD/target/wheels" maturin build --release --zig \
        --compatibility manylinux2014 --target "$triple" --out dist --quiet
    for whl in "dist/approx_attn-$version-"*"_$arch.whl"; do
        built+=("$whl")
    done
done

echo "wheels: building the sdist" >&2
maturin sdist --out dist
sdist="dist/approx_attn-$version.tar.gz"

# --- checks -------------------------------------------------------------------------------------
fail=0
for whl in "${built[@]}"; do
    name=$(basename "$whl")
    arch=${name%.whl}
    case "$arch" in *x86_64) arch=x86_64 ;; *) arch=${arch##*_} ;; esac
    case "$name" in
        *-cp310-abi3-manylinux2014_"$arch".manylinux_2_17_"$arch".whl) ;;
        *-cp310-abi3-manylinux_2_17_"$arch".manylinux2014_"$arch".whl) ;;
        *) echo "wheels: $name: expected an abi3 manylinux2014 tag" >&2; fail=1 ;;
    esac
    # auditwheel reads the ELF files (any architecture) and names the most compatible policy the
    # wheel satisfies (symbol versions, and only the libraries every manylinux system has: wgpu
    # opens the Vulkan, EGL/GL, Metal or D3D libraries at run time). It must be manylinux_2_17.
    report=$(auditwheel show "$whl" 2>&1) || { echo "$report" >&2; fail=1; continue; }
    flat=$(tr -s ' \n' '  ' <<<"$report")
    if ! grep -q 'consistent with the following platform tag: "manylinux_2_17_'"$arch"'"' <<<"$flat"; then
        echo "$report" >&2
        echo "wheels: $name: auditwheel does not find it manylinux_2_17 compatible" >&2
        fail=1
    else
        echo "wheels: $name: auditwheel: manylinux_2_17_$arch" >&2
    fi
done

# The sdist must hold what the build needs (the shaders are compiled into the library) and build.
listing=$(tar -tzf "$sdist")
for need in Cargo.toml Cargo.lock pyproject.toml src/lib.rs shaders/ python/approx_attn/__init__.py; do
    if ! grep -q "^approx_attn-$version/$need" <<<"$listing"; then
        echo "wheels: $sdist lacks $need" >&2
        fail=1
    fi
done
echo "wheels: building a wheel from the sdist (as pip does where no wheel fits)" >&2
sdist_check=$(mktemp -d)
trap 'rm -rf "$sdist_check"' EXIT
tar -xzf "$sdist" -C "$sdist_check"
# target/ is shared so that the dependencies are not compiled again; the crate itself is built
# from the unpacked sdist alone.
(cd "$sdist_check/approx_attn-$version" &&
    CARGO_TARGET_DIR="$OLDPWD/target" maturin build --release --out "$sdist_check/out" --quiet) ||
    { echo "wheels: the sdist does not build" >&2; fail=1; }
ls "$sdist_check/out/"*.whl >/dev/null 2>&1 || fail=1

echo
echo "dist/:"
for f in "${built[@]}" "$sdist"; do
    printf '  %-70s %6s KiB\n' "$(basename "$f")" "$(($(stat -c %s "$f") / 1024))"
done
if [ "$fail" -ne 0 ]; then
    echo "wheels: FAILED checks (see above)" >&2
    exit 1
fi
echo "wheels: all tags valid (auditwheel: manylinux_2_17), sdist builds"
