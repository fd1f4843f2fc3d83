#!/usr/bin/env bash
# vhost-user-blk export against qemu-storage-daemon, same client, same run.
# Backend pinned to core 0, the blkio client (vhostbench) to core 1; 4 KiB
# random IO at QD 32 per queue, 1 and 2 queues; REPS rounds (3 by default),
# the backends interleaved within each. Appliance: null, a RAM device (its
# memory populated at attach, so fresh is touched), a file on /dev/shm,
# RAID1 over 2 RAM members and RAID5 over 3 (served by the daemon); peer:
# null-co and an io_uring file on /dev/shm. Backend CPU and minor page
# faults per IO from /proc. Writes bench/results/vhost-DATE.{json,md}.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p bench -p appliance
app=target/release/appliance
vb=target/release/vhostbench
secs=${SECONDS_PER_RUN:-3}
reps=${REPS:-3}
out=bench/results
mkdir -p "$out"
date=$(date -u +%Y-%m-%dT%H%M)
json="$out/vhost-$date.json"
: > "$json"
sock=/tmp/vhostbench.sock
qsd_version=$(qemu-storage-daemon --version | head -1)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# A volume of `level` over `n` RAM members of `size`, exported with `queues`
# queues by the daemon.
daemon_volume() { # level n size queues
  rm -rf "$work/state" && mkdir -p "$work/state"
  {
    for i in $(seq "$2"); do printf '[[device]]\nname = "m%s"\nspec = "ram:%s"\n\n' "$i" "$3"; done
    printf '[[volume]]\nname = "v"\nlevel = "%s"\nmembers = [%s]\nchunk_kib = 64\n\n' "$1" \
      "$(seq -s, -f '"m%g"' "$2")"
    printf '[[export]]\nname = "v"\nvolume = "v"\nsocket = "%s"\nnum_queues = %s\n' "$sock" "$4"
  } > "$work/state/bench.toml"
  $app daemon --reactors 1 --cores 0 --api "$work/state/api.sock" \
    --state "$work/state/state.toml" --config "$work/state/bench.toml" >/dev/null 2>&1 &
}

start_backend() { # target queues -> sets PID
  rm -f "$sock"
  case $1 in
    appliance-null) $app serve --socket $sock --device null:1G --num-queues "$2" --cores 0 >/dev/null 2>&1 & ;;
    appliance-ram)  $app serve --socket $sock --device ram:1G --num-queues "$2" --cores 0 >/dev/null 2>&1 & ;;
    appliance-file) $app serve --socket $sock --device file:/dev/shm/vb-app.img:1G --num-queues "$2" --cores 0 >/dev/null 2>&1 & ;;
    appliance-raid1) daemon_volume raid1 2 1G "$2" ;;
    appliance-raid5) daemon_volume raid5 3 512M "$2" ;;
    qsd-null) taskset -c 0 qemu-storage-daemon \
        --blockdev driver=null-co,node-name=n0,size=1073741824 \
        --export type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=$sock,writable=on,num-queues="$2" & ;;
    qsd-file) truncate -s 1G /dev/shm/vb-qsd.img; taskset -c 0 qemu-storage-daemon \
        --blockdev driver=file,node-name=f0,filename=/dev/shm/vb-qsd.img,aio=io_uring,cache.direct=on \
        --export type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=$sock,writable=on,num-queues="$2" & ;;
  esac
  PID=$!
  for _ in $(seq 400); do [ -S $sock ] && return 0; sleep 0.05; done
  echo "backend $1 did not come up" >&2; return 1
}

for rep in $(seq "$reps"); do
  for rw in randread randwrite; do
    for q in 1 2; do
      for t in appliance-null qsd-null appliance-ram appliance-file qsd-file appliance-raid1 appliance-raid5; do
        start_backend $t $q
        $vb --socket $sock --backend-pid $PID --rw $rw --queues $q --core 1 --seconds "$secs" --label $t >> "$json" || echo "run $t $rw $q failed" >&2
        kill -TERM $PID; wait $PID 2>/dev/null || true
      done
    done
  done
done
rm -f /dev/shm/vb-app.img /dev/shm/vb-qsd.img "$sock"

python3 - "$json" "$out/vhost-$date.md" "$qsd_version" <<'PY'
import json, sys, os, platform, datetime, statistics
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
cpu = next((l.split(":",1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
med = {}
for r in rows:
    med.setdefault((r["label"], r["rw"], r["queues"]), []).append(r)
def m(k, f): 
    v = med.get(k); return statistics.median(x[f] for x in v) if v else None
md = [f"# vhost-user-blk export vs qemu-storage-daemon, {datetime.date.today()}", "",
      f"Machine: {os.cpu_count()} cores, {cpu}, kernel {platform.release()}. Peer: {sys.argv[3]}.",
      "Backend pinned to core 0, blkio client to core 1; 4 KiB random IO, QD 32 per queue; medians of the runs.", "",
      "| backend | rw | queues | IOPS (min-max) | backend CPU ns/IO | minor faults/IO | backend cores busy |", "|---|---|---|---|---|---|---|"]
def span(k, f):
    v = [x[f] for x in med[k]]; return f"{min(v):,.0f}-{max(v):,.0f}"
for (label, rw, q) in sorted(med):
    k = (label, rw, q)
    md.append(f"| {label} | {rw} | {q} | {m(k,'iops'):,.0f} ({span(k,'iops')}) | {m(k,'backend_cpu_ns_per_io'):.0f} | {m(k,'backend_minflt_per_io'):.4f} | {m(k,'backend_cpu_cores'):.2f} |")
md += ["", "Ratios (appliance / qemu-storage-daemon, same run):", ""]
for rw in ("randread", "randwrite"):
    for q in (1, 2):
        for a, b in (("appliance-null", "qsd-null"), ("appliance-ram", "qsd-null"), ("appliance-file", "qsd-file"),
                     ("appliance-raid1", "qsd-file"), ("appliance-raid5", "qsd-file"), ("appliance-raid5", "appliance-ram")):
            x, y = m((a, rw, q), "iops"), m((b, rw, q), "iops")
            cx, cy = m((a, rw, q), "backend_cpu_ns_per_io"), m((b, rw, q), "backend_cpu_ns_per_io")
            if x and y:
                md.append(f"- {rw}, {q} queue(s): {a} / {b}: IOPS x{x/y:.2f}, CPU per IO x{cx/cy:.2f}")
md += ["", "RAID1 and RAID5 are compared with qemu-storage-daemon's file export because that is what a user without the appliance serves a VM's disk from (qsd has no RAID); RAID5 / appliance-ram is what the RAID layer costs over one RAM device."]
md += ["", "Note: the appliance's reactor polls, so its busy-core figure stays near 1.0 under load; its CPU per IO is what one core costs per IO served."]
open(sys.argv[2], "w").write("\n".join(md) + "\n")
print("\n".join(md))
PY
