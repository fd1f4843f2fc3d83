#!/usr/bin/env bash
# Per-volume IO limits against qemu-storage-daemon's throttle groups (the
# peer's QoS), in one run: a RAM-backed volume (the appliance's ram device;
# qsd's file on /dev/shm), 4 KiB random writes at QD 32 from the blkio
# client (vhostbench, core 1) against the backend on core 0. For each:
# no limit, a limit far above what it can do (the cost of the limiter on
# the IO path), and a binding limit (how close it holds).
#
#   bench/run-qos.sh          writes bench/results/qos-DATE.{jsonl,md}
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/install-deps.sh bench
cargo build --release -q -p bench -p appliance
app=target/release/appliance
vb=target/release/vhostbench
SECS=${SECS:-5}
LIMIT=${LIMIT:-50000}
date=$(date -u +%Y-%m-%dT%H%M)
out=bench/results/qos-$date
work=$(mktemp -d)
sock=$work/vol.sock
qsd_version=$(qemu-storage-daemon --version | head -1 | awk '{print $3}')
trap 'kill ${PID:-} 2>/dev/null || true; rm -rf "$work" /dev/shm/qos-qsd.img' EXIT
wait_sock() { for _ in $(seq 400); do [ -S "$sock" ] && return 0; sleep 0.05; done; echo "no socket" >&2; exit 1; }
appliance() { # iops limit (0: none)
  rm -rf "$work/state" && mkdir -p "$work/state"
  local qos=""
  [ "$1" != 0 ] && qos=$'\n[volume.qos]\ntotal_iops = '"$1"
  cat > "$work/state/lab.toml" <<TOML
[[device]]
name = "r0"
spec = "ram:1G"

[[volume]]
name = "v"
level = "single"
members = ["r0"]
$qos

[[export]]
name = "v"
volume = "v"
socket = "$sock"
TOML
  taskset -c 0 $app daemon --reactors 1 --cores 0 --api "$work/state/api.sock" \
    --state "$work/state/state.toml" --config "$work/state/lab.toml" >/dev/null 2>&1 &
  PID=$!; wait_sock
}
qsd() { # iops limit (0: none)
  rm -f /dev/shm/qos-qsd.img; truncate -s 1G /dev/shm/qos-qsd.img
  local args=(--blockdev driver=file,node-name=f0,filename=/dev/shm/qos-qsd.img,aio=io_uring,cache.direct=off)
  local node=f0
  if [ "$1" != 0 ]; then
    args+=(--object throttle-group,id=tg0,x-iops-total="$1" --blockdev driver=throttle,node-name=t0,throttle-group=tg0,file=f0)
    node=t0
  fi
  taskset -c 0 qemu-storage-daemon "${args[@]}" \
    --export type=vhost-user-blk,id=e0,node-name=$node,addr.type=unix,addr.path="$sock",writable=on,num-queues=1 >/dev/null 2>&1 &
  PID=$!; wait_sock
}
: > "$out.jsonl"
for round in 1 2 3; do
  for backend in appliance qsd; do
    for limit in 0 10000000 "$LIMIT"; do
      rm -f "$sock"
      "$backend" "$limit"
      name=$backend; [ $backend = qsd ] && name="qemu-storage-daemon $qsd_version"
      $vb --socket "$sock" --backend-pid $PID --rw randwrite --core 1 --seconds "$SECS" --warmup 1 \
        --label "$name|$limit" >> "$out.jsonl"
      kill $PID; wait $PID 2>/dev/null || true; PID=
    done
  done
done
python3 - "$out.jsonl" "$out.md" "$LIMIT" <<'PY'
import json, statistics, sys, os, platform
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
limit = int(sys.argv[3])
by = {}
for r in rows:
    by.setdefault(tuple(r["label"].split("|")), []).append(r)
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
what = {"0": "no limit", "10000000": "limit 10 M IOPS (not reached)", str(limit): f"limit {limit} IOPS"}
md = [f"# Per-volume IO limits against qemu-storage-daemon throttle groups ({os.cpu_count()} cores, {cpu}, kernel {platform.release()})", "",
      "4 KiB random writes, QD 32, 1 queue, RAM-backed; 3 rounds, median (min-max).", "",
      "| backend | limit | IOPS | of the limit | backend CPU ns/IO |", "|---|---|---|---|---|"]
for (b, l), rs in by.items():
    i = sorted(r["iops"] for r in rs)
    c = statistics.median(r["backend_cpu_ns_per_io"] for r in rs)
    of = f"{statistics.median(i) / int(l):.3f}" if l == str(limit) else "-"
    md.append(f"| {b} | {what[l]} | {statistics.median(i):.0f} ({i[0]:.0f}-{i[-1]:.0f}) | {of} | {c:.0f} |")
open(sys.argv[2], "w").write("\n".join(md) + "\n")
print("\n".join(md))
PY
