#!/usr/bin/env bash
# Runs upstream's dragonfly-client (dfdaemon + dfget) against our scheduler, seed peer and
# peers on loopback, and checks what issue 14 asks: (a) an upstream peer beside our
# scheduler and seed peer, (b) our peer fetching from an upstream peer, (c) a mixed swarm
# of two upstream and two of our peers with our seed. Every output must be byte-identical,
# the origin must serve one copy per file, and upstream's dfget must return within 2 s of
# its download finishing. Results go to stdout (Markdown) for INTEROP.md.
#
# Usage: scripts/interop_upstream.sh [--version 1.5.10]
#
# The upstream build (cargo install --locked dragonfly-client, about an hour on 2 cores)
# goes to target/upstream/<version>/ and is reused when present. CI does not run this
# script; run it whenever the wire changes.
set -euo pipefail
cd "$(dirname "$0")/.."
version=1.5.10
while [ $# -gt 0 ]; do
  case "$1" in
    --version) version="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
root="target/upstream/$version"
need=()
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
[ -e /usr/lib/llvm-14/lib/libclang.so ] || ls /usr/lib/x86_64-linux-gnu/libclang-*.so* >/dev/null 2>&1 || need+=(libclang-dev)
command -v nginx >/dev/null 2>&1 || need+=(nginx)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
if [ ! -x "$root/bin/dfdaemon" ]; then
  echo "building upstream dragonfly-client $version into $root (about an hour on 2 cores)" >&2
  cargo install --locked dragonfly-client --version "$version" \
    --root "$root" --target-dir target/upstream/build
fi
cargo build --release --bins
exec python3 scripts/interop_upstream.py --upstream "$root/bin" --ours target/release \
  --version "$version"
