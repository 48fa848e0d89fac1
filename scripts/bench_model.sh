#!/usr/bin/env bash
# A model-like repo (a few large shards, many small files) from an S3 store (s3s-fs) to N
# emulated hosts at once: through the swarm (dfget -r s3://...) and straight from the store
# (boto3), side by side, against the Kumar-Ross bound (issue 12). Needs root; installs what
# it needs. Removes every namespace it made, also on Ctrl-C.
# Usage: scripts/bench_model.sh [--peers 4] [--size-mib 2048] [--files 40] [--shards 4]
#        [--rate 200mbit] [--systems dragonfly,direct] [--out target/model-bench]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
cargo build --release --bins
cargo build --release -p d7y-testkit --example model_bench
. scripts/netns_cleanup.sh
trap 'netns_cleanup d7mdl' EXIT INT TERM
D7Y_BIN_DIR="$PWD/target/release" target/release/examples/model_bench "$@"
