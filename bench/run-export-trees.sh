#!/usr/bin/env bash
# What a tree's export path costs against another tree's and against
# qemu-storage-daemon, in instructions per 4 KiB random read (callgrind:
# steady on a shared machine). Each backend serves a null device over
# vhost-user-blk on one core, runs once idle and once driven by this
# tree's vhostbench; (driven - idle) / IOs is its cost per IO.
# Usage: bench/run-export-trees.sh OLD_REV [NEW_REV=HEAD]. Builds each tree
# in a worktree under /tmp; appends a table to
# bench/results/export-trees-DATE.md.
set -euo pipefail
cd "$(dirname "$0")/.."
old=${1:?old revision}; new=${2:-HEAD}
deploy/install-deps.sh bench
cargo build --release -q -p bench
sock=/tmp/export-trees.sock
count() { # label, drive(0/1), backend command...
  local label=$1 drive=$2; shift 2
  rm -f $sock
  valgrind --tool=callgrind --callgrind-out-file=/dev/null "$@" >/dev/null 2>/tmp/cg.$label.$drive &
  local pid=$!
  for _ in $(seq 600); do [ -S $sock ] && break; sleep 0.1; done
  local ios=0
  if [ "$drive" = 1 ]; then
    ios=$(target/release/vhostbench --socket $sock --backend-pid $pid --rw randread --core 1 --seconds 5 --warmup 0 | python3 -c 'import json,sys; print(json.load(sys.stdin)["ios"])')
  else
    sleep 1
  fi
  kill -TERM $pid; wait $pid 2>/dev/null || true
  local ir
  ir=$(sed -n 's/.*Collected : \([0-9]*\).*/\1/p' /tmp/cg.$label.$drive)
  echo "$ir $ios"
}
per_io() { # label, backend command...
  local label=$1; shift
  local i0 i1 n
  read -r i0 _ < <(count "$label" 0 "$@")
  read -r i1 n < <(count "$label" 1 "$@")
  echo "$(( (i1 - i0) / n )) $n"
}
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
