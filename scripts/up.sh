#!/usr/bin/env bash
# Runs a local Dragonfly cluster on this machine: a scheduler, a seed peer and a peer, all in
# one `dragonfly up` process with generated configs under ./.dragonfly (no external services
# needed). When it prints "dragonfly is up", `dfget URL -O PATH` works (add the `-e SOCKET` it
# prints when not running as root).
# Usage: scripts/up.sh [--release] [extra `dragonfly up` flags]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
profile=debug
if [ "${1:-}" = "--release" ]; then
  shift
  profile=release
  cargo build --release --bins
else
  cargo build --bins
fi
echo "dfget is target/$profile/dfget"
exec "target/$profile/dragonfly" up --dir "$PWD/.dragonfly" "$@"
