#!/usr/bin/env bash
# The README's test command: builds every binary (the end-to-end tests run them) and runs
# the whole test suite with nextest (falls back to cargo test when nextest is absent).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --bins
if cargo nextest --version >/dev/null 2>&1; then
  profile=default
  [ "${CI:-}" = "true" ] && profile=ci
  cargo nextest run --workspace --profile "$profile"
else
  cargo test --workspace
fi
