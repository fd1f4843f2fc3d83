#!/usr/bin/env bash
# The fio lab: a Linux guest (QEMU; TCG here, KVM where /dev/kvm works and
# ACCEL=kvm) runs the fio jobs in bench/fio/jobs against a vhost-user-blk
# disk served, in the same run, by the appliance and by
# qemu-storage-daemon. One boot per job and backend, so the backend's CPU
# time (from /proc) belongs to that job alone.
#
#   bench/run-fio-lab.sh                 all jobs, both backends, 5 s each
#   RUNTIME=10 JOBS="randread-4k-qd32" BACKENDS="appliance-ram qsd-null" bench/run-fio-lab.sh
#
# Backends: appliance-null, appliance-ram, appliance-raid5 (RAM members),
# qsd-null. Writes bench/results/fio-lab-DATE.{jsonl,md,svg}.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/install-deps.sh test
cargo build --release -q -p appliance
guest=$(deploy/vmrig/build-guest.sh | tail -1)
app=target/release/appliance
RUNTIME=${RUNTIME:-5}
ACCEL=${ACCEL:-tcg}
BACKENDS=${BACKENDS:-appliance-null qsd-null}
JOBS=${JOBS:-$(cd bench/fio/jobs && ls *.fio | sed 's/\.fio$//' | sort | tr '\n' ' ')}
date=$(date -u +%Y-%m-%dT%H%M)
out=bench/results/fio-lab-$date
work=$(mktemp -d)
trap 'kill ${PID:-} 2>/dev/null || true; rm -rf "$work"' EXIT
sock=$work/disk.sock
qsd_version=$(qemu-storage-daemon --version | head -1)
meta="$(uname -m) $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), QEMU $ACCEL, ${RUNTIME} s per job, $date"

start_backend() {
  rm -f "$sock"
  case $1 in
    appliance-null) taskset -c 0 $app serve --socket "$sock" --device null:1G --cores 0 >"$work/backend.log" 2>&1 & ;;
    appliance-ram) taskset -c 0 $app serve --socket "$sock" --device ram:1G --cores 0 >"$work/backend.log" 2>&1 & ;;
    appliance-raid5) taskset -c 0 $app serve --socket "$sock" --raid5 ram:512M,ram:512M,ram:512M --cores 0 >"$work/backend.log" 2>&1 & ;;
    qsd-null) taskset -c 0 qemu-storage-daemon \
        --blockdev driver=null-co,node-name=n0,size=1073741824 \
        --export type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path="$sock",writable=on,num-queues=1 \
        >"$work/backend.log" 2>&1 & ;;
    *) echo "unknown backend $1" >&2; exit 2 ;;
  esac
  PID=$!
  for _ in $(seq 200); do [ -S "$sock" ] && return 0; sleep 0.05; done
  echo "backend $1 did not come up:" >&2; cat "$work/backend.log" >&2; exit 1
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

: > "$out.jsonl"
for job in $JOBS; do
  for backend in $BACKENDS; do
    start_backend "$backend"
    printf 'RUNTIME=%s\nJOBS="%s"\n' "$RUNTIME" "$job" > "$work/env"
    t0=$(cpu_ticks "$PID")
    log=$work/serial-$job-$backend.log
    set +e
    taskset -c 1 deploy/vmrig/boot.sh --guest "$guest" --script bench/fio/guest.sh \
      --file "$work/env" --file "bench/fio/jobs/$job.fio" --mem 512 --accel "$ACCEL" \
      --timeout $((RUNTIME + 240)) --log "$log" -- \
      -chardev socket,id=disk,path="$sock" \
      -device vhost-user-blk-pci,chardev=disk,num-queues=1 >/dev/null
    rc=$?
    set -e
    t1=$(cpu_ticks "$PID")
    kill -TERM "$PID"; wait "$PID" 2>/dev/null || true; PID=
    if [ $rc != 0 ]; then echo "$job on $backend: guest exit $rc (log: $log)" >&2; tail -20 "$log" >&2; exit 1; fi
    python3 - "$log" "$job" "$backend" "$(( t1 - t0 ))" "$(getconf CLK_TCK)" "$meta" >> "$out.jsonl" <<'PY'
import json, sys
log, job, backend, ticks, hz, meta = sys.argv[1:7]
text = open(log, errors="replace").read()
body = text.split(f"FIO-BEGIN {job}", 1)[1].split(f"FIO-END {job}", 1)[0]
j = json.loads(body[body.index("{"):body.rindex("}") + 1])["jobs"][0]
sides = [j[s] for s in ("read", "write") if j[s]["total_ios"] > 0]
ios = sum(s["total_ios"] for s in sides)
pct = lambda s, p: s["clat_ns"].get("percentile", {}).get(p, 0) / 1000
main = max(sides, key=lambda s: s["total_ios"])
print(json.dumps({
    "job": job, "backend": backend, "meta": meta,
    "iops": sum(s["iops"] for s in sides),
    "bw_kib": sum(s["bw"] for s in sides),
    "lat_p50_us": pct(main, "50.000000"),
    "lat_p99_us": max(pct(s, "99.000000") for s in sides),
    "ios": ios,
    "backend_cpu_s": int(ticks) / int(hz),
}))
PY
    tail -1 "$out.jsonl"
  done
done
python3 bench/fio/report.py "$out.jsonl" "$out.md" "$out.svg"
cat "$out.md"
echo "plot: $out.svg"
