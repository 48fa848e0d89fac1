#!/usr/bin/env bash
# Runs one emulated-host swarm row (Dragonfly alone) again and again with the daemons' debug
# logs kept, and keeps the logs only of the runs over a threshold: for catching a rare slow
# run (a stall) with the evidence. Prints each run's figure as it goes.
#
# Usage: scripts/bench_outliers.sh [--runs 30] [--over 1.5] [--column slowest|max]
#            [--keep target/outliers] [--count PATTERN]
#            -- <netns_bench arguments, e.g. --peers 8 --rates quarter>
#
# --count: also prints, for every run, how many log lines (all hosts) match PATTERN (grep -E),
# e.g. how often a rule fired.
# --column: the row's "slowest fast host / its bound" (slowest, the default) or "max / T*".
# Kept runs land in <keep>/run<N>/ (daemon logs, one directory per host) with the bench's
# report beside them (a run whose bench failed leaves its output as <keep>/run<N>/failed.txt);
# read them with scripts/swarm_trace.py. Needs root and the release
# binaries (scripts/bench_netns.sh builds them).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=30 over=1.5 column=slowest keep=target/outliers count=
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs=$2; shift 2 ;;
    --over) over=$2; shift 2 ;;
    --column) column=$2; shift 2 ;;
    --keep) keep=$2; shift 2 ;;
    --count) count=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "unknown option $1 (bench arguments go after --)" >&2; exit 2 ;;
  esac
done
case "$column" in
  slowest) field=9 ;;
  max) field=7 ;;
  *) echo "--column is slowest or max, not $column" >&2; exit 2 ;;
esac
bench=target/release/examples/netns_bench
[ -x "$bench" ] || { echo "build first: cargo build --release --bins && cargo build --release -p d7y-testkit --example netns_bench" >&2; exit 1; }
. scripts/netns_cleanup.sh
trap 'netns_cleanup d7bench' EXIT INT TERM
mkdir -p "$keep"
scratch=$(mktemp -d)
for ((i = 1; i <= runs; i++)); do
  rm -rf "$scratch/logs" "$scratch/out" # (the bench clears what a run before left)
  D7Y_KEEP_LOGS="$scratch/logs" "$bench" --systems dragonfly "$@" --out "$scratch/out" \
    >"$scratch/log" 2>&1 || {
    mkdir -p "$keep/run$i"
    cp "$scratch/log" "$keep/run$i/failed.txt"
    echo "run $i: the bench failed (its output: $keep/run$i/failed.txt)"
    continue
  }
  figure=$(awk -F'|' -v f="$field" '/^\| dragonfly/ {gsub(/ /, "", $f); print $f; exit}' "$scratch/log")
  if [ -z "$figure" ]; then
    echo "run $i: no dragonfly row in the report"
    continue
  fi
  if [ -n "$count" ]; then
    figure="$figure ($( (grep -rhcE -- "$count" "$scratch/logs" 2>/dev/null || true) | awk '{n += $1} END {print n + 0}') matching)"
  fi
  if awk -v x="${figure%% *}" -v t="$over" 'BEGIN {exit !(x > t)}'; then
    mkdir -p "$keep/run$i"
    mv "$scratch/logs" "$keep/run$i/logs"
    cp "$scratch/log" "$keep/run$i/report.txt"
    echo "run $i: $figure (over $over: kept in $keep/run$i)"
  else
    echo "run $i: $figure"
  fi
done
rm -rf "$scratch"
