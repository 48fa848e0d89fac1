#!/usr/bin/env bash
# The README's test command: builds every binary (the end-to-end tests run them) and runs
# the whole test suite with nextest (falls back to cargo test when nextest is absent).
# The binaries are built in the same cargo run as the tests: the tests' dev-dependencies
# add features (tokio's test-util), and a separate `cargo build --bins` would build every
# dependency a second time with the other feature set (twice the time and the disk).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --bins --tests
if cargo nextest --version >/dev/null 2>&1; then
  profile=default
  [ "${CI:-}" = "true" ] && profile=ci
  cargo nextest run --workspace --profile "$profile"
else
  cargo test --workspace
fi
