#!/usr/bin/env bash
# The whole test suite, from a fresh machine with only the Rust toolchain:
# installs what it needs, then formatting, lints, and every test.
set -euo pipefail
cd "$(dirname "$0")/.."

deploy/install-deps.sh test

# Reserve a few 2 MiB hugepages (as root) so the DMA pool's hugepage path is
# tested, not only its fallback. Best effort: without them the tests check
# the fallback instead.
if [ -w /proc/sys/vm/nr_hugepages ] && [ "$(cat /proc/sys/vm/nr_hugepages)" -lt 32 ]; then
  echo 32 > /proc/sys/vm/nr_hugepages || true
fi

echo "== cargo fmt"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --all-features -- -D warnings
echo "== tests"
# The command-line tests run applctl, a binary of another package.
cargo build -q -p mgmt --bin applctl
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --all-features --no-fail-fast
else
  cargo test --workspace --all-features --no-fail-fast
fi
echo "== all tests passed"
