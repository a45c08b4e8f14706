#!/usr/bin/env bash
# Build Shale and start the host daemon with the embedded default: a local `thin` SR in the default state
# directory, RocksDB metadata, no config file and no external server. Extra arguments go to `shale serve`
# (e.g. --state-dir DIR --socket PATH).
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/shale-target}"

# Build dependencies: bindgen (RocksDB) needs libclang, the gRPC API needs protoc.
pkgs=(libclang-dev clang protobuf-compiler)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The dev profile optimises every dependency and the data path (see Cargo.toml); the first build compiles
# RocksDB from C++ and takes 10-15 minutes on 2 cores, later builds are incremental.
cargo build -p shale
echo "shale is at $CARGO_TARGET_DIR/debug/shale (add it to PATH: export PATH=\$CARGO_TARGET_DIR/debug:\$PATH)"
exec "$CARGO_TARGET_DIR/debug/shale" serve "$@"
