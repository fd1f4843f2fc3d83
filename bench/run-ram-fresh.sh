#!/usr/bin/env bash
# A fresh RAM export's first writes against the same export once every
# page was written, and against qemu-storage-daemon over a fresh file in
# /dev/shm (its RAM-backed peer), in one run: 4 KiB random writes, QD 32,
# backend on core 0, the blkio client (vhostbench) on core 1, no warm-up,
# so the measured writes are the first to most pages. Reports IOPS,
# backend CPU per IO and page faults per IO (minflt, /proc/PID/stat).
#
#   bench/run-ram-fresh.sh         writes bench/results/ram-fresh-DATE.{jsonl,md}
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/install-deps.sh bench
cargo build --release -q -p bench -p appliance
app=target/release/appliance
vb=target/release/vhostbench
SECS=${SECS:-3}
date=$(date -u +%Y-%m-%dT%H%M)
out=bench/results/ram-fresh-$date
sock=$(mktemp -u /tmp/ramfresh-XXXX.sock)
qsd_version=$(qemu-storage-daemon --version | head -1 | awk '{print $3}')
trap 'kill ${PID:-} 2>/dev/null || true; rm -f "$sock" /dev/shm/ramfresh-qsd.img' EXIT
wait_sock() { for _ in $(seq 400); do [ -S "$sock" ] && return 0; sleep 0.05; done; echo "no socket" >&2; exit 1; }
: > "$out.jsonl"
for round in 1 2 3; do
  # The appliance: fresh, then the same device again (every page written).
  rm -f "$sock"
  t0=$(date +%s%N)
  taskset -c 0 $app serve --socket "$sock" --device ram:2G --cores 0 >/dev/null 2>&1 &
  PID=$!; wait_sock
  attach=$(( ($(date +%s%N) - t0) / 1000000 ))
  $vb --socket "$sock" --backend-pid $PID --rw randwrite --core 1 --seconds "$SECS" --warmup 0 --label "appliance fresh (attach ${attach} ms)" >> "$out.jsonl"
  $vb --socket "$sock" --backend-pid $PID --rw randwrite --core 1 --seconds 6 --warmup 0 --label fill >/dev/null
  $vb --socket "$sock" --backend-pid $PID --rw randwrite --core 1 --seconds "$SECS" --warmup 0 --label "appliance written" >> "$out.jsonl"
  kill $PID; wait $PID 2>/dev/null || true; PID=
  # qemu-storage-daemon over a fresh 2 GiB file in /dev/shm.
  rm -f "$sock" /dev/shm/ramfresh-qsd.img; truncate -s 2G /dev/shm/ramfresh-qsd.img
  taskset -c 0 qemu-storage-daemon \
    --blockdev driver=file,node-name=f0,filename=/dev/shm/ramfresh-qsd.img,aio=io_uring,cache.direct=off \
    --export type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path="$sock",writable=on,num-queues=1 >/dev/null 2>&1 &
  PID=$!; wait_sock
  $vb --socket "$sock" --backend-pid $PID --rw randwrite --core 1 --seconds "$SECS" --warmup 0 --label "qemu-storage-daemon $qsd_version fresh /dev/shm file" >> "$out.jsonl"
  kill $PID; wait $PID 2>/dev/null || true; PID=
done
python3 - "$out.jsonl" "$out.md" <<'PY'
import json, statistics, sys, os, platform
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = {}
for r in rows:
    key = r["label"].split(" (attach")[0]
    by.setdefault(key, []).append(r)
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
md = [f"# Fresh RAM export writes ({os.cpu_count()} cores, {cpu}, kernel {platform.release()})", "",
      "4 KiB random writes, QD 32, 1 queue, no warm-up, 3 rounds (median, min-max).", "",
      "| backend | IOPS | backend CPU ns/IO | minor faults/IO |", "|---|---|---|---|"]
for k, rs in by.items():
    f = lambda field: sorted(r[field] for r in rs)
    i, c, m = f("iops"), f("backend_cpu_ns_per_io"), f("backend_minflt_per_io")
    md.append(f"| {k} | {statistics.median(i):.0f} ({i[0]:.0f}-{i[-1]:.0f}) | {statistics.median(c):.0f} | {statistics.median(m):.3f} |")
attach = [r["label"].split("attach ")[1].rstrip(" ms)") for r in rows if "attach" in r["label"]]
md += ["", f"From starting the daemon to its socket, with the 2 GiB RAM device allocated and touched: {', '.join(attach)} ms.",
       "'appliance written' is the same export after 6 s more of random writes (nearly every page written)."]
open(sys.argv[2], "w").write("\n".join(md) + "\n")
print("\n".join(md))
PY
