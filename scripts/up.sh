#!/usr/bin/env bash
# Runs a dfdaemon on this machine with a generated config under ./.dragonfly (no external
# services needed), so that `dfget URL -O PATH -e ./.dragonfly/dfdaemon.sock` works.
# Usage: scripts/up.sh [--release]
set -euo pipefail
cd "$(dirname "$0")/.."
profile=debug
if [ "${1:-}" = "--release" ]; then profile=release; cargo build --release --bins; else cargo build --bins; fi
bash scripts/setup.sh >/dev/null
root="$PWD/.dragonfly"
mkdir -p "$root"
cat > "$root/dfdaemon.yaml" <<YAML
host:
  ip: 127.0.0.1
download:
  server:
    socketPath: $root/dfdaemon.sock
storage:
  dir: $root/data
YAML
echo "dfdaemon: socket $root/dfdaemon.sock, config $root/dfdaemon.yaml"
echo "try:      target/$profile/dfget <URL> -O /tmp/file -e $root/dfdaemon.sock"
exec "target/$profile/dfdaemon" --config "$root/dfdaemon.yaml"
