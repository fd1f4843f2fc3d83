#!/usr/bin/env bash
# RAID5 parity: every XOR kernel this CPU has, the one the appliance chose
# at start (its calibration), and a plain C loop built with the system
# compiler (gcc -O3 -march=native, which vectorises it), at buffer sizes
# from 4 KiB to 64 MiB, 4 sources, 64-byte aligned buffers. Three rounds,
# interleaved; medians. Writes bench/results/xor-DATE.{jsonl,md}.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p bench
mb=target/release/microbench
date=$(date -u +%Y-%m-%dT%H%M)
out=bench/results/xor-$date
xref=$(mktemp)
trap 'rm -f "$xref"' EXIT
gcc -O3 -march=native -o "$xref" bench/xor-ref.c
kernels=$($mb xor --size 4096 | python3 -c 'import json,sys; print(" ".join(json.load(sys.stdin)["calibration_gbps"]["small"]))')
: > "$out.jsonl"
for round in 1 2 3; do
  for size in 4096 16384 65536 262144 1048576 4194304 16777216 67108864; do
    $mb xor --size $size --sources 4 | python3 -c 'import json,sys; d=json.load(sys.stdin); d["chosen"]=True; print(json.dumps(d))' >> "$out.jsonl"
    for k in $kernels; do $mb xor --size $size --sources 4 --kernel "$k" >> "$out.jsonl"; done
    "$xref" $size >> "$out.jsonl"
  done
done
python3 - "$out.jsonl" "$out.md" "$(gcc --version | head -1)" <<'PY'
import json, sys, os, platform, statistics, datetime
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
cpu = next((l.split(":",1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
sizes = sorted({r["size"] for r in rows})
kernels = list(next(r for r in rows if r.get("bench") == "xor")["calibration_gbps"]["small"])
def med(pred, f):
    v = [r[f] for r in rows if pred(r)]
    return statistics.median(v) if v else None
import collections
starts = [r for r in rows if r.get("chosen")]
def chosen_for(sizes):
    c = collections.Counter(r["kernel"] for r in starts if r["size"] in sizes)
    n = sum(c.values())
    return ", ".join(f"{k} ({m} of {n} runs)" for k, m in c.most_common())
cal = {cls: {k: statistics.median(r["calibration_gbps"][cls][k] for r in starts) for k in kernels} for cls in ("small", "large")}
md = [f"# XOR parity kernels against a plain C loop, {datetime.date.today()}", "",
      f"Machine: {os.cpu_count()} cores, {cpu}, kernel {platform.release()}. C: {sys.argv[3]}, -O3 -march=native.",
      "4 sources into 1, GB/s of source data, 64-byte aligned buffers; medians of 3 interleaved rounds.", "",
      "The calibration at start times every kernel on four 4 KiB sources (buffers up to 8 KiB use the fastest) and on four 64 KiB sources (larger buffers). Chosen: "
      f"small {chosen_for([s for s in sizes if s <= 8192])}; large {chosen_for([s for s in sizes if s > 8192])}. Calibration medians: "
      + "; ".join(f"{cls}: " + ", ".join(f"{k} {v:.0f}" for k, v in cal[cls].items()) + " GB/s" for cls in cal) + ".", "",
      "| buffer | chosen | " + " | ".join(kernels) + " | C loop | chosen / C |", "|---" * (len(kernels) + 4) + "|"]
for s in sizes:
    c = med(lambda r: r.get("bench") == "xor-c" and r["size"] == s, "c_source_gbps")
    ch = med(lambda r: r.get("chosen") and r["size"] == s, "xor_gbps")
    ks = [med(lambda r, k=k: r.get("bench") == "xor" and not r.get("chosen") and r["kernel"] == k and r["size"] == s, "xor_gbps") for k in kernels]
    label = f"{s // 1024} KiB" if s < 1 << 20 else f"{s >> 20} MiB"
    md.append(f"| {label} | {ch:.1f} | " + " | ".join(f"{k:.1f}" for k in ks) + f" | {c:.1f} | {ch / c:.2f} |")
open(sys.argv[2], "w").write("\n".join(md) + "\n")
print("\n".join(md))
PY
