#!/usr/bin/env bash
# The NVMe driver's cost per IO against the software controller (storing
# nothing, on core 1; the driver on core 0): time inside submit and
# productive polls per IO (clock cost subtracted), IOPS of the one driver
# core, and callgrind instructions per IO inside submit + poll (the steady
# figure). Registered memory is DMA'd in place; unregistered goes through
# bounce pages. SPDK's published figure is the bar: 13.85 M 512-byte IOs/s
# on one core, about 72 ns per IO (not measured on this machine).
# Writes bench/results/nvme-DATE.{json,md}.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/install-deps.sh bench
cargo build --release -q -p bench
mb=target/release/microbench
out=bench/results
mkdir -p "$out"
date=$(date -u +%Y-%m-%dT%H%M)
json="$out/nvme-$date.json"
: > "$json"
secs=${SECONDS_PER_RUN:-3}
for reg in "--registered" ""; do
  for rw in randread randwrite; do $mb nvme --rw $rw --seconds "$secs" $reg >> "$json"; done
done
$mb nvme --rw randread --io-bytes 512 --registered --seconds "$secs" >> "$json"
# Instructions per IO: polls only after the controller has had time to
# finish (--settle-us), so nearly every counted poll reaps completions.
cg() {
  local ios ir
  ios=$(valgrind --tool=callgrind --callgrind-out-file=/dev/null \
      --toggle-collect='*as bdev::device::IoChannel>::submit' \
      --toggle-collect='*as bdev::device::IoChannel>::poll' \
      $mb nvme --seconds 5 --settle-us 300 "$@" 2>/tmp/nvme-cg.err | python3 -c 'import json,sys; print(json.load(sys.stdin)["ios"])')
  ir=$(sed -n 's/.*Collected : \([0-9]*\).*/\1/p' /tmp/nvme-cg.err)
  echo "{\"bench\":\"nvme-callgrind\",\"args\":\"$*\",\"ios\":$ios,\"ir\":$ir,\"ir_per_io\":$((ir / ios))}" >> "$json"
}
cg --rw randread --registered
cg --rw randwrite --registered
cg --rw randread
python3 - "$json" "$out/nvme-$date.md" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
cpu = next((l.split(":",1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
o = [f"# NVMe driver against the software controller ({cpu})", "",
     "One channel, QD 32, random offsets over 1 GiB; driver on core 0, controller (stores nothing) on core 1.",
     "ns/IO = time inside submit + polls that reaped, per IO, minus the cost of the clock reads. SPDK's bar: 72 ns/IO (published, 512 B).", "",
     "| rw | IO size | memory | IOPS (1 driver core) | driver ns/IO | raw ns/IO | bounced cmds |", "|---|---|---|---|---|---|---|"]
for r in rows:
    if r["bench"] != "nvme-driver": continue
    o.append(f"| {r['rw']} | {r['io_bytes']} | {'registered' if r['registered_memory'] else 'bounced'} | {r['iops']/1e6:.2f} M | {r['driver_ns_per_io']:.0f} | {r['driver_ns_per_io_raw']:.0f} | {r['bounced_commands']} |")
o += ["", "| callgrind (submit + poll) | IOs | instructions per IO |", "|---|---|---|"]
for r in rows:
    if r["bench"] == "nvme-callgrind":
        o.append(f"| {r['args']} | {r['ios']} | {r['ir_per_io']} |")
open(sys.argv[2], "w").write("\n".join(o) + "\n")
print("\n".join(o))
PY
