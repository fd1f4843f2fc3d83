#!/usr/bin/env bash
# What dirty logging for live migration costs, against qemu-storage-daemon
# in the same run. logbench (a vhost-user frontend that turns logging on as
# a migrating QEMU does, and syncs the log every 100 ms) on core 1, the
# backend on core 0; 4 KiB random reads and writes at QD 32, one queue;
# logging off and on, the backends interleaved, REPS rounds (3 by default).
# Appliance: a 1 GiB RAM volume exported with live_migration; peer: an
# io_uring file on /dev/shm (null-co would write no read data to log).
# Writes bench/results/dirtylog-DATE.{jsonl,md}.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p bench -p appliance
app=target/release/appliance
lb=target/release/logbench
secs=${SECONDS_PER_RUN:-3}
reps=${REPS:-3}
out=bench/results
mkdir -p "$out"
date=$(date -u +%Y-%m-%dT%H%M)
jsonl="$out/dirtylog-$date.jsonl"
: > "$jsonl"
sock=/tmp/logbench.sock
qsd_version=$(qemu-storage-daemon --version | head -1)
work=$(mktemp -d)
trap 'kill $PID 2>/dev/null || true; rm -rf "$work" /dev/shm/lb-qsd.img' EXIT
PID=

start_backend() { # appliance|qsd
  rm -f "$sock"
  case $1 in
    appliance)
      rm -rf "$work/state" && mkdir -p "$work/state"
      printf '[[device]]\nname = "m"\nspec = "ram:1G"\n\n[[volume]]\nname = "v"\nlevel = "single"\nmembers = ["m"]\n\n[[export]]\nname = "v"\nvolume = "v"\nsocket = "%s"\nlive_migration = true\n' \
        "$sock" > "$work/state/bench.toml"
      $app daemon --reactors 1 --cores 0 --api "$work/state/api.sock" \
        --state "$work/state/state.toml" --config "$work/state/bench.toml" >/dev/null 2>&1 & ;;
    qsd)
      truncate -s 1G /dev/shm/lb-qsd.img
      taskset -c 0 qemu-storage-daemon \
        --blockdev driver=file,node-name=f0,filename=/dev/shm/lb-qsd.img,aio=io_uring,cache.direct=on \
        --export type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=$sock,writable=on >/dev/null 2>&1 & ;;
  esac
  PID=$!
  for _ in $(seq 400); do [ -S $sock ] && return 0; sleep 0.05; done
  echo "backend $1 did not come up" >&2; return 1
}

stop_backend() {
  kill "$PID" 2>/dev/null || true
  wait "$PID" 2>/dev/null || true
  PID=
}

for rep in $(seq "$reps"); do
  for rw in randread randwrite; do
    for backend in appliance qsd; do
      for log in off on; do
        start_backend "$backend"
        flag=()
        [ "$log" = on ] && flag=(--log)
        $lb --socket "$sock" --backend-pid "$PID" --rw "$rw" --qd 32 --seconds "$secs" \
          --core 1 --label "$backend log=$log rep=$rep" "${flag[@]}" >> "$jsonl"
        stop_backend
      done
    done
  done
done

python3 - "$jsonl" "$qsd_version" > "$out/dirtylog-$date.md" <<'EOF'
import json, sys, statistics as st
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(backend, rw, log, key):
    v = [r[key] for r in rows if r["label"].startswith(f"{backend} log={log} ") and r["rw"] == rw]
    return st.median(v)
print("# Dirty logging for live migration: its cost\n")
print(f"logbench on core 1 (logging on: SET_LOG_BASE, LOG_ALL, the log synced every 100 ms), backend on core 0; 4 KiB, QD 32, one queue; medians of {len(rows)//8} runs. Peer: {sys.argv[2]}, io_uring file on /dev/shm.\n")
print("| backend | IO | IOPS off | IOPS on | on/off | CPU/IO off | CPU/IO on | added |")
print("|---|---|---|---|---|---|---|---|")
for b, name in [("appliance", "appliance (RAM volume)"), ("qsd", "qemu-storage-daemon")]:
    for rw in ["randread", "randwrite"]:
        i0, i1 = med(b, rw, "off", "iops"), med(b, rw, "on", "iops")
        c0, c1 = med(b, rw, "off", "backend_cpu_ns_per_io"), med(b, rw, "on", "backend_cpu_ns_per_io")
        print(f"| {name} | {rw} | {i0/1e3:.0f} K | {i1/1e3:.0f} K | {i1/i0:.2f}x | {c0:.0f} ns | {c1:.0f} ns | {c1-c0:+.0f} ns |")
print()
print("Errors:", sum(r["errors"] for r in rows), "; pages the logs showed (logging on):",
      sum(r.get("pages_synced", 0) for r in rows if r.get("dirty_log")))
EOF
cat "$out/dirtylog-$date.md"
