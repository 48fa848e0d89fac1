#!/usr/bin/env bash
# Swarm benchmark on emulated hosts (issue 4): Dragonfly vs aria2 (BitTorrent) vs curl on the
# same network namespaces, with the Kumar-Ross bound. Needs root, nginx, aria2, mktorrent,
# curl (installed when missing). Removes every namespace and link it made, also on Ctrl-C.
# Usage: scripts/bench_netns.sh [--peers 4] [--size-mib 256] [--rate 200mbit]
#        [--systems dragonfly,aria2,curl] [--out target/netns-bench]
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for tool in nginx:nginx aria2c:aria2 mktorrent:mktorrent curl:curl ip:iproute2 tc:iproute2; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
bash scripts/setup.sh >/dev/null
cargo build --release --bins
cargo build --release -p d7y-testkit --example netns_bench
. scripts/netns_cleanup.sh
trap 'netns_cleanup d7bench' EXIT INT TERM
target/release/examples/netns_bench "$@"
out=target/netns-bench
for ((i = 1; i <= $#; i++)); do [ "${!i}" = "--out" ] && { j=$((i + 1)); out="${!j}"; }; done
if python3 -c 'import matplotlib' 2>/dev/null; then
  python3 scripts/plot_swarm.py "$out/results.json" "$out"
else
  echo "plots skipped: pip install matplotlib, then scripts/plot_swarm.py $out/results.json $out"
fi
