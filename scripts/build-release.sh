#!/usr/bin/env bash
# Builds the distributable `myelin` binary for a target, with the `dist` profile (LTO, one
# codegen unit, stripped), and reports its size and linkage.
#
#   scripts/build-release.sh <target> [cargo feature flags...]
#
#   scripts/build-release.sh aarch64-unknown-linux-musl                  # robots: static, every plugin (feature `static`)
#   scripts/build-release.sh aarch64-unknown-linux-musl --no-default-features   # core only
#   scripts/build-release.sh x86_64-unknown-linux-musl --no-default-features --features static
#   scripts/build-release.sh aarch64-unknown-linux-gnu --features full   # Jetson GPU path (glibc, ai with ONNX Runtime)
#
# musl targets are linked fully statically with cargo-zigbuild (zig as the C/C++ cross
# compiler, from PyPI into a venv); aarch64-unknown-linux-gnu uses Debian's cross toolchain.
# The binary lands in $CARGO_TARGET_DIR/<target>/dist/myelin. Needs root only to install
# packages the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${1:?usage: scripts/build-release.sh <target> [cargo feature flags...]}
shift
# A fresh machine: the toolchain and build packages come from the project's setup.
command -v cargo >/dev/null 2>&1 || [ -x "$HOME/.cargo/bin/cargo" ] || scripts/setup.sh
. scripts/env.sh
ZIG_VENV=${MYELIN_ZIG_VENV:-/var/cache/myelin/zig}

need_apt() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    echo "build-release: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

if command -v rustup >/dev/null 2>&1; then
  rustup target list --installed | grep -qx "$TARGET" || rustup target add "$TARGET"
fi
need_apt build-essential pkg-config cmake libclang-dev file python3-venv

if [[ "$TARGET" == *-musl ]]; then
  # The default and `full` sets hold ai-onnxruntime, which dlopens libonnxruntime.so: a static
  # binary cannot. Without flags a musl build takes `static` (every plugin, ai on tract).
  if (($# == 0)); then
    set -- --no-default-features --features static
  elif [[ " $* " != *" --no-default-features "* || " $* " =~ (ai-onnxruntime|[ ,=]full([ ,]|$)) ]]; then
    echo "build-release: $TARGET is fully static and cannot load ONNX Runtime's shared library (feature ai-onnxruntime, part of default and full); use --no-default-features --features static, or build aarch64-unknown-linux-gnu for the Jetson GPU path" >&2
    exit 2
  fi
fi
echo "build-release: cargo features: ${*:-(default)}"
start=$(date +%s)
case "$TARGET" in
  *-unknown-linux-musl)
    if [ ! -x "$ZIG_VENV/bin/cargo-zigbuild" ]; then
      echo "build-release: installing cargo-zigbuild and zig into $ZIG_VENV"
      python3 -m venv "$ZIG_VENV"
      "$ZIG_VENV/bin/pip" install -q --disable-pip-version-check cargo-zigbuild==0.24.1 ziglang==0.17.1
    fi
    PATH="$ZIG_VENV/bin:$PATH" cargo zigbuild --locked --profile dist --target "$TARGET" "$@"
    ;;
  aarch64-unknown-linux-gnu)
    need_apt gcc-aarch64-linux-gnu g++-aarch64-linux-gnu libc6-dev-arm64-cross
    CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc \
    CXX_aarch64_unknown_linux_gnu=aarch64-linux-gnu-g++ \
    AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar \
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
    BINDGEN_EXTRA_CLANG_ARGS_aarch64_unknown_linux_gnu=--sysroot=/usr/aarch64-linux-gnu \
      cargo build --locked --profile dist --target "$TARGET" "$@"
    ;;
  x86_64-unknown-linux-gnu)
    cargo build --locked --profile dist --target "$TARGET" "$@"
    ;;
  *)
    echo "build-release: unsupported target $TARGET (aarch64/x86_64, -musl or -gnu)" >&2
    exit 2
    ;;
esac
BIN="$CARGO_TARGET_DIR/$TARGET/dist/myelin"
bytes=$(stat -c %s "$BIN")
echo "build-release: $BIN"
echo "build-release: $(awk -v b="$bytes" 'BEGIN { printf "%.1f MB (%d bytes)", b / 1e6, b }'), built in $(( $(date +%s) - start )) s"
file "$BIN"
if [[ "$TARGET" == *-musl ]] && ! file "$BIN" | grep -q "statically linked"; then
  echo "build-release: $BIN is not statically linked" >&2
  exit 1
fi
