#!/usr/bin/env bash
# Image pull on emulated hosts (issue 10): through the Dragonfly swarm (each host's dfdaemon
# as registry mirror), straight from the registry, and through distribution's pull-through
# cache, side by side, with the Kumar-Ross bound. Needs root; installs docker-registry and
# skopeo when missing. Removes every namespace it made, also on Ctrl-C.
# Usage: scripts/bench_image.sh [--peers 4] [--layers-mib 128,96,64,48,32] [--rate 200mbit]
#        [--systems dragonfly,direct,pullthrough] [--out target/image-bench]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
cargo build --release --bins
cargo build --release -p d7y-testkit --example image_bench
. scripts/netns_cleanup.sh
trap 'netns_cleanup d7img' EXIT INT TERM
D7Y_BIN_DIR="$PWD/target/release" target/release/examples/image_bench "$@"
out=target/image-bench
for ((i = 1; i <= $#; i++)); do [ "${!i}" = "--out" ] && { j=$((i + 1)); out="${!j}"; }; done
if python3 -c 'import matplotlib' 2>/dev/null; then
  python3 scripts/plot_swarm.py "$out/results.json" "$out"
else
  echo "plots skipped: pip install matplotlib, then scripts/plot_swarm.py $out/results.json $out"
fi
