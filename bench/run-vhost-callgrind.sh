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
count() { # label, drive(0/1), backend command...
  local label=$1 drive=$2; shift 2
  rm -f $sock
  valgrind --tool=callgrind --callgrind-out-file=/dev/null "$@" >/dev/null 2>/tmp/cg.$label.$drive &
  local pid=$!
  for _ in $(seq 300); do [ -S $sock ] && break; sleep 0.1; done
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
app=(target/release/appliance serve --socket $sock --device null:1G --cores 0)
qsd=(qemu-storage-daemon --blockdev driver=null-co,node-name=n0,size=1073741824
     --export type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=$sock,writable=on,num-queues=1)
read -r a0 _ < <(count app 0 "${app[@]}")
read -r a1 an < <(count app 1 "${app[@]}")
read -r q0 _ < <(count qsd 0 "${qsd[@]}")
read -r q1 qn < <(count qsd 1 "${qsd[@]}")
ai=$(( (a1 - a0) / an )); qi=$(( (q1 - q0) / qn ))
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
