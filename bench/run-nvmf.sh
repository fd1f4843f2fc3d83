#!/usr/bin/env bash
# NVMe/TCP export against the vhost-user-blk export of the same RAM volume,
# in one daemon, same run. The daemon's one reactor is pinned to core 0,
# the client to core 1; 4 KiB random IO at QD 32 on one queue; REPS
# rounds (3 by default), the two exports interleaved within each. NVMe/TCP
# runs over loopback with the project's host (nvmfbench), vhost-user-blk
# with the blkio client (vhostbench). Target CPU and minor page faults
# per IO from /proc. Writes bench/results/nvmf-DATE.{json,md}.
#
# SPDK's nvmf_tgt is not run beside it: building SPDK (with DPDK) is not
# possible on this machine in the time a run has, and the host kernel has
# no nvmet-tcp module (the kernel target); see the result's notes.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p bench -p appliance
app=target/release/appliance
vb=target/release/vhostbench
nb=target/release/nvmfbench
secs=${SECONDS_PER_RUN:-3}
reps=${REPS:-3}
out=bench/results
mkdir -p "$out"
date=$(date -u +%Y-%m-%dT%H%M)
json="$out/nvmf-$date.json"
: > "$json"
work=$(mktemp -d)
trap 'kill $PID 2>/dev/null || true; rm -rf "$work"' EXIT
sock=$work/v.sock
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
nqn=nqn.2026-12.io.appliance:bench
host=nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-00000000bead
cat > "$work/bench.toml" <<TOML
[[device]]
name = "m"
spec = "ram:1G"

[[volume]]
name = "v"
level = "single"
members = ["m"]

[[export]]
name = "v"
volume = "v"
socket = "$sock"

[[nvmf_export]]
nqn = "$nqn"
volume = "v"
listen = "127.0.0.1:$port"
hosts = ["$host"]
TOML
$app daemon --reactors 1 --cores 0 --api "$work/api.sock" --state "$work/state.toml" \
  --config "$work/bench.toml" >"$work/daemon.log" 2>&1 &
PID=$!
for _ in $(seq 400); do [ -S "$sock" ] && break; sleep 0.05; done
[ -S "$sock" ] || { cat "$work/daemon.log"; exit 1; }

for rep in $(seq "$reps"); do
  for rw in randread randwrite; do
    $nb --addr 127.0.0.1:$port --nqn $nqn --hostnqn $host --backend-pid $PID --rw $rw --core 1 \
      --seconds "$secs" --label nvmf-tcp >> "$json" || echo "nvmf $rw failed" >&2
    $vb --socket "$sock" --backend-pid $PID --rw $rw --queues 1 --core 1 --seconds "$secs" \
      --label vhost-user-blk >> "$json" || echo "vhost $rw failed" >&2
  done
done

python3 - "$json" "$out/nvmf-$date.md" <<'PY'
import json, sys, os, platform, datetime, statistics
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
cpu = next((l.split(":",1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
med = {}
for r in rows:
    med.setdefault((r["label"], r["rw"]), []).append(r)
def m(k, f):
    v = med.get(k); return statistics.median(x[f] for x in v) if v else None
def span(k, f):
    v = [x[f] for x in med[k]]; return f"{min(v):,.0f}-{max(v):,.0f}"
md = [f"# NVMe/TCP export vs vhost-user-blk export of the same RAM volume, {datetime.date.today()}", "",
      f"Machine: {os.cpu_count()} cores, {cpu}, kernel {platform.release()}.",
      "One daemon, one reactor pinned to core 0 serving both exports of a 1 GiB RAM volume; the client on core 1.",
      "4 KiB random IO, QD 32, one queue; medians of the runs. NVMe/TCP over loopback with the project's host (nvmfbench); vhost-user-blk with the blkio client (vhostbench).", "",
      "| export | rw | IOPS (min-max) | target CPU ns/IO | minor faults/IO | target cores busy |", "|---|---|---|---|---|---|"]
for (label, rw) in sorted(med):
    k = (label, rw)
    md.append(f"| {label} | {rw} | {m(k,'iops'):,.0f} ({span(k,'iops')}) | {m(k,'backend_cpu_ns_per_io'):.0f} | {m(k,'backend_minflt_per_io'):.4f} | {m(k,'backend_cpu_cores'):.2f} |")
md += ["", "Ratios (NVMe/TCP / vhost-user-blk, same run):", ""]
for rw in ("randread", "randwrite"):
    x, y = m(("nvmf-tcp", rw), "iops"), m(("vhost-user-blk", rw), "iops")
    cx, cy = m(("nvmf-tcp", rw), "backend_cpu_ns_per_io"), m(("vhost-user-blk", rw), "backend_cpu_ns_per_io")
    if x and y:
        md.append(f"- {rw}: IOPS x{x/y:.2f}, target CPU per IO x{cx/cy:.2f}")
md += ["", "The reactor polls, so the target's busy-core figure stays near 1.0 while a client drives it; CPU per IO is one core's time per IO served.",
       "SPDK's nvmf_tgt was not run beside it: SPDK (with DPDK) cannot be built on this machine within a run, and the host kernel has no nvmet-tcp module."]
open(sys.argv[2], "w").write("\n".join(md) + "\n")
print("\n".join(md))
PY
