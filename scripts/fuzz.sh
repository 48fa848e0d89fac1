#!/usr/bin/env bash
# Bounded fuzzing of the inputs strangers control: the Vortex decoder, the scheduler's
# AnnouncePeer handling of arbitrary message sequences, config parsing, and task-ID/URL
# derivation. cargo-fuzz (libFuzzer) on the nightly toolchain.
#
# Usage: scripts/fuzz.sh [--seconds 60] [target ...]
# A crash leaves its input under fuzz/artifacts/<target>/; add it to fuzz/regressions/ and
# to the regression test of the code it crashed.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=60
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=(vortex_decode announce_peer config_parse task_id)
if ! rustup toolchain list | grep -q '^nightly'; then
  rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  cargo install --locked cargo-fuzz
fi
# Builds every target (sanitizers make this a separate build from the workspace's).
cargo +nightly fuzz build --fuzz-dir fuzz
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  seeds=()
  [ -d "fuzz/regressions/$t" ] && seeds+=("fuzz/regressions/$t")
  echo "fuzzing $t for ${seconds}s"
  cargo +nightly fuzz run --fuzz-dir fuzz "$t" "fuzz/corpus/$t" "${seeds[@]}" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=4096 -print_final_stats=1 \
    2>&1 | tail -4
done
