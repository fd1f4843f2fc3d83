#!/usr/bin/env bash
# What a tree's export path costs against another tree's and against
# qemu-storage-daemon, in instructions per 4 KiB random read (callgrind:
# steady on a shared machine; see callgrind-lib.sh). Each backend serves
# over vhost-user-blk on one core.
# Usage: bench/run-export-trees.sh OLD_REV [NEW_REV=HEAD]. Builds each tree
# in a worktree under /tmp; appends a table to
# bench/results/export-trees-DATE.md.
set -euo pipefail
cd "$(dirname "$0")/.."
old=${1:?old revision}; new=${2:-HEAD}
deploy/install-deps.sh bench
cargo build --release -q -p bench
sock=/tmp/export-trees.sock
# shellcheck source=bench/callgrind-lib.sh
source bench/callgrind-lib.sh
rows=()
for rev in "$old" "$new"; do
  short=$(git rev-parse --short "$rev")
  wt=/tmp/appliance-export-$short
  [ -d "$wt" ] || git worktree add -f "$wt" "$rev" >/dev/null
  (cd "$wt" && cargo build --release -q -p appliance)
  for dev in null:1G ram:1G; do
    read -r ipi n < <(per_io "$short-$dev" "$wt/target/release/appliance" serve --socket $sock --device $dev --cores 0)
    rows+=("| appliance $short $dev | $n | $ipi |")
  done
done
read -r qi qn < <(per_io qsd qemu-storage-daemon --blockdev driver=null-co,node-name=n0,size=1073741824 \
  --export type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=$sock,writable=on,num-queues=1)
out=bench/results/export-trees-$(date -u +%Y-%m-%dT%H%M).md
{
  echo "# Export path, instructions per 4 KiB random read: $old against $new ($(date -u +%Y-%m-%d))"
  echo
  echo "| backend | IOs counted | instructions per IO |"
  echo "|---|---|---|"
  printf '%s\n' "${rows[@]}"
  echo "| $(qemu-storage-daemon --version | head -1) null-co | $qn | $qi |"
  echo
  echo "Userspace instructions only (callgrind); the guest notification's eventfd write and other syscalls are not counted. One reactor, QD 32 from vhostbench on the other core."
} | tee "$out"
