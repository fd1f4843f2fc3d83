#!/usr/bin/env bash
# Instructions per 4 KiB read served by a vhost-user-blk null backend, ours
# against qemu-storage-daemon's null-co, counted by callgrind (steady on a
# shared machine, unlike time). Each backend runs under valgrind once idle
# (baseline) and once driven by vhostbench; the difference divided by the
# IOs served is the cost per IO. Appends to bench/results/vhost-callgrind-DATE.md.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/install-deps.sh bench
cargo build --release -q -p bench -p appliance
sock=/tmp/vhost-callgrind.sock
out=bench/results/vhost-callgrind-$(date -u +%Y-%m-%dT%H%M).md
# shellcheck source=bench/callgrind-lib.sh
source bench/callgrind-lib.sh
app=(target/release/appliance serve --socket $sock --device null:1G --cores 0)
qsd=(qemu-storage-daemon --blockdev driver=null-co,node-name=n0,size=1073741824
     --export type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=$sock,writable=on,num-queues=1)
read -r ai an < <(per_io app "${app[@]}")
read -r qi qn < <(per_io qsd "${qsd[@]}")
{
  echo "# vhost-user-blk null backend, instructions per 4 KiB random read ($(date -u +%Y-%m-%d))"
  echo
  echo "| backend | IOs counted | instructions per IO |"
  echo "|---|---|---|"
  echo "| appliance null | $an | $ai |"
  echo "| $(qemu-storage-daemon --version | head -1) null-co | $qn | $qi |"
  echo
  echo "Ratio appliance / qsd: $(python3 -c "print(round($ai/$qi, 2))") (lower is better). Userspace instructions only (callgrind); syscalls such as the guest notification eventfd write are not counted."
} | tee "$out"
