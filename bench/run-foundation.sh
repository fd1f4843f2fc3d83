#!/usr/bin/env bash
# Foundation figures: message round trip, quiesce latency under load, RAM
# and file device IOPS and CPU per IO, with fio (io_uring, same file, same
# queue depth) run beside the file device as the peer, and callgrind
# instruction counts for the RAM path. Writes bench/results/foundation-DATE.{md,json}.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/install-deps.sh bench
cargo build --release -q -p bench
mb=target/release/microbench
out=bench/results
mkdir -p "$out"
date=$(date -u +%Y-%m-%dT%H%M)
json="$out/foundation-$date.json"
: > "$json"
secs=${SECONDS_PER_RUN:-3}

$mb msg >> "$json"
$mb quiesce --reactors 2 --seconds "$secs" >> "$json"
$mb quiesce --reactors 1 --seconds "$secs" >> "$json"
for rw in randread randwrite; do
  # 1 GiB: the RAM export's size in run-vhost.sh.
  $mb device --kind ram --rw $rw --mib 1024 --seconds "$secs" | sed 's/"kind":"ram"/"kind":"ram-1GiB"/' >> "$json"
  $mb device --kind ram --rw $rw --mib 256 --seconds "$secs" | sed 's/"kind":"ram"/"kind":"ram-256MiB"/' >> "$json"
  $mb device --kind ram --rw $rw --mib 8 --seconds "$secs" | sed 's/"kind":"ram"/"kind":"ram-8MiB"/' >> "$json"
  $mb device --kind file --rw $rw --path /dev/shm/microbench.img --seconds "$secs" >> "$json"
  # The peer: fio's io_uring engine on the same kind of file, one job pinned
  # to one core, same queue depth and block size.
  head -c $((256 << 20)) /dev/zero | tr '\0' '\253' > /dev/shm/fio.img
  fio --name=peer --filename=/dev/shm/fio.img --ioengine=io_uring --direct=1 --rw=$rw \
      --bs=4k --iodepth=32 --numjobs=1 --cpus_allowed=0 --time_based --runtime="$secs" \
      --output-format=json > /tmp/fio-$rw.json
  rm -f /dev/shm/fio.img
  python3 - "$rw" /tmp/fio-$rw.json >> "$json" <<'PY'
import json, sys
rw, path = sys.argv[1], sys.argv[2]
j = json.load(open(path))["jobs"][0]
side = j["read"] if rw == "randread" else j["write"]
ios = side["total_ios"]
runtime_s = j["job_runtime"] / 1000.0
cpu_s = (j["usr_cpu"] + j["sys_cpu"]) / 100.0 * runtime_s
print(json.dumps({"bench": "device", "kind": "fio-io_uring", "rw": rw, "ios": ios,
                  "iops": side["iops"], "cpu_ns_per_io": cpu_s * 1e9 / max(ios, 1),
                  "busy_ns_per_io": None}))
PY
done

# Instructions per 4 KiB RAM read (submit + poll), from callgrind: the
# difference between 100000 IOs and none removes set-up costs.
ir() { valgrind --tool=callgrind --callgrind-out-file=/dev/null "$mb" ram-loop --ios "$1" 2>&1 >/dev/null | sed -n 's/.*Collected : \([0-9]*\).*/\1/p'; }
i0=$(ir 0); i1=$(ir 100000)
echo "{\"bench\":\"ram_callgrind\",\"instructions_per_io\":$(( (i1 - i0) / 100000 ))}" >> "$json"

python3 - "$json" "$out/foundation-$date.md" <<'PY'
import json, sys, platform, os, datetime
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
cpu = next((l.split(":",1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
md = [f"# Foundation benchmarks, {datetime.date.today()}", "",
      f"Machine: {os.cpu_count()} cores, {cpu}, kernel {platform.release()}.", ""]
for r in rows:
    if r["bench"] == "message_round_trip":
        md.append(f"- Cross-core message round trip (reactor 0 -> 1 -> 0): mean {r['mean_us']:.2f} us, p50 {r['p50_us']:.2f} us, p99 {r['p99_us']:.2f} us ({r['rounds']} rounds).")
    if r["bench"] == "quiesce_suspend_to_acked":
        md.append(f"- Quiesce suspend-to-all-acknowledged, {r['reactors']} reactor(s) with IO at QD 32 on each: p50 {r['p50_us']:.1f} us, p99 {r['p99_us']:.1f} us, max {r['max_us']:.0f} us ({r['suspends']} suspends, {r['ios_during']} IOs during).")
    if r["bench"] == "ram_callgrind":
        md.append(f"- RAM device 4 KiB read, submit + poll: {r['instructions_per_io']} instructions per IO (callgrind; includes the 4 KiB copy).")
md += ["", "4 KiB random IO at QD 32 on one reactor (one core):", "",
       "| device | rw | IOPS | CPU ns/IO (process) | reactor busy ns/IO | plain 4 KiB copy ns (same run) |", "|---|---|---|---|---|---|"]
for r in rows:
    if r["bench"] == "device":
        busy = "-" if r["busy_ns_per_io"] is None else f"{r['busy_ns_per_io']:.0f}"
        floor = r.get("plain_copy_ns_per_io")
        floor = "-" if floor is None else f"{floor:.0f}"
        md.append(f"| {r['kind']} | {r['rw']} | {r['iops']:,.0f} | {r['cpu_ns_per_io']:.0f} | {busy} | {floor} |")
dev = {(r["kind"], r["rw"]): r for r in rows if r["bench"] == "device"}
md += [""]
for rw in ("randread", "randwrite"):
    a, b = dev.get(("file", rw)), dev.get(("fio-io_uring", rw))
    if a and b:
        md.append(f"- file device vs fio io_uring, {rw}: IOPS ratio {a['iops']/b['iops']:.2f}, CPU per IO ratio {a['cpu_ns_per_io']/b['cpu_ns_per_io']:.2f} (lower is better).")
md.append("- plain 4 KiB copy: a loop copying a random 4 KiB block of a touched buffer of the device's size to (randwrite: from) 32 rotating buffers, as a RAM device request copies; the floor under a RAM request (DRAM-bound when the buffer is larger than the caches).")
open(sys.argv[2], "w").write("\n".join(md) + "\n")
print("\n".join(md))
PY
