# Sourced by the scripts: cargo on PATH and one target directory outside the clone, shared by
# CI and developers so builds stay incremental.
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/myelin/target}"
