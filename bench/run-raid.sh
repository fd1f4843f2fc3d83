#!/usr/bin/env bash
# RAID figures: XOR parity against memcpy on the same buffers (64 KiB, 1 MiB,
# 64 MiB), and RAID1/RAID5 over RAM members against one member alone on one
# reactor (4 KiB random read and write, full-stripe writes), RAID5 also over
# software NVMe namespaces. Writes
# bench/results/raid-DATE.{json,md}.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p bench
mb=target/release/microbench
out=bench/results
mkdir -p "$out"
date=$(date -u +%Y-%m-%dT%H%M)
json="$out/raid-$date.json"
: > "$json"
secs=${SECONDS_PER_RUN:-3}
xref=$(mktemp)
trap 'rm -f "$xref"' EXIT
gcc -O3 -march=native -o "$xref" bench/xor-ref.c
for size in 65536 1048576 67108864; do
  $mb xor --size $size --sources 4 >> "$json"
  "$xref" $size >> "$json"
done
for level in 1 5; do
  for rw in randread randwrite seqwrite; do $mb raid --level $level --rw $rw --seconds "$secs" >> "$json"; done
done
# RAID5 over namespaces of the software NVMe controller (storing nothing,
# on core 1): the RAID's own cost when its members DMA in place.
for rw in randread randwrite seqwrite; do $mb raid --level 5 --rw $rw --nvme --seconds "$secs" >> "$json"; done
# The journal (RAM journal device), write-through and write-back, against
# no journal; 4 KiB random writes also over a 16 MiB hot set.
for rw in randwrite seqwrite; do
  $mb raid --level 5 --rw $rw --journal --seconds "$secs" >> "$json"
  $mb raid --level 5 --rw $rw --journal --write-back --seconds "$secs" >> "$json"
done
for j in "" "--journal" "--journal --write-back"; do
  $mb raid --level 5 --rw randwrite --span-mib 16 $j --seconds "$secs" >> "$json"
done
# Slow members (100 us per IO) behind the RAM journal: where write-back pays.
for span in 16 0; do
  for j in "" "--journal" "--journal --write-back"; do
    $mb raid --level 5 --rw randwrite --span-mib $span --member-latency-us 100 $j --seconds "$secs" >> "$json"
  done
done
# The journal on a file on the root disk: its flush is an fdatasync, paid
# once per group of records (group commit).
jfile=${JOURNAL_FILE:-/var/tmp/appliance-bench-journal.img}
for j in "--journal" "--journal --write-back"; do
  $mb raid --level 5 --rw randwrite $j --journal-file "$jfile" --seconds "$secs" >> "$json"
done
rm -f "$jfile"
# Replay time per GiB of log, and reclaim throughput.
$mb journal --log-mib 512 >> "$json"
# Rebuild onto a spare, idle and under guest IO, against one member's bandwidth.
$mb rebuild --member-mib "${REBUILD_MIB:-512}" >> "$json"
python3 - "$json" "$out/raid-$date.md" <<'PY'
import json, sys, os, platform, datetime
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
footnotes = []
cpu = next((l.split(":",1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
md = [f"# RAID benchmarks, {datetime.date.today()}", "", f"Machine: {os.cpu_count()} cores, {cpu}, kernel {platform.release()}.", "",
      "XOR of 4 sources into 1 (GB/s of source data) against memcpy of the same bytes:", "",
      "| buffer | kernel | XOR GB/s | memcpy GB/s | XOR / memcpy | C loop (gcc -O3 -march=native) GB/s | XOR / C |", "|---|---|---|---|---|---|---|"]
for r in rows:
    if r["bench"] == "xor":
        c = next((x["c_source_gbps"] for x in rows if x.get("bench") == "xor-c" and x["size"] == r["size"]), None)
        cs = f"{c:.1f} | {r['xor_gbps'] / c:.2f}" if c else "- | -"
        md.append(f"| {r['size']//1024} KiB | {r['kernel']} | {r['xor_gbps']:.1f} | {r['memcpy_gbps']:.1f} | {r['ratio']:.2f} | {cs} |")
md += ["", "RAID over 4 RAM members (RAID5: 64 KiB chunks, left-symmetric) against one member alone, one reactor, QD 32:", "",
       "| level | workload | IO size | volume IOPS | one member IOPS | volume / member | volume MB/s | CPU ns/IO | bounced cmds/IO |", "|---|---|---|---|---|---|---|---|---|"]
for r in rows:
    if r["bench"] == "raid":
        v, m = r["results"]["volume"], r["results"]["one_member"]
        j = r.get('journal')
        j = {True: 'write-through', False: ''}.get(j, j) if isinstance(j, bool) else (j or '')
        span = f" over {r['span_mib']} MiB" if r.get('span_mib') else ''
        span += f", members +{r['member_latency_us']} us" if r.get('member_latency_us') else ''
        where = ' on a file (root disk)' if r.get('journal_device') == 'file' else ''
        on = ' on soft NVMe' if r.get('members_on') == 'soft-nvme' else ''
        bounced = f"{v['bounced_per_io']:.2f}" if on else '-'
        md.append(f"| RAID{r['level']}{on}{' + ' + j + ' journal' + where if j else ''} | {r['rw']}{span} | {r['io_bytes']//1024} KiB | {v['iops']:,.0f} | {m['iops']:,.0f} | {v['iops']/m['iops']:.2f} | {v['mb_per_s']:,.0f} | {v['cpu_ns_per_io']:.0f} | {bounced} |")
        if 'same_footprint' in r['results']:
            f = r['results']['same_footprint']
            footnotes.append(f"RAID{r['level']} {r['rw']}: one RAM device as large as all members together (the volume's memory footprint) does {f['iops']:,.0f} IOPS; the volume is {v['iops']/f['iops']:.2f}x of it.")
# The journal against no journal on the same workload (RAID5 4 KiB
# random writes): the issue's figure.
jr = {}
for r in rows:
    if r["bench"] == "raid" and r["level"] == 5 and r["rw"] == "randwrite" and r.get('journal_device') != 'file' and r.get('members_on') != 'soft-nvme':
        key = (r.get('span_mib') or 0, r.get('member_latency_us') or 0)
        jr.setdefault(key, {})[r.get('journal') or 'none'] = r["results"]["volume"]["iops"]
if jr:
    md += ["", "RAID5 4 KiB random writes, the journal against no journal (same run):", "",
           "| span | members | no journal IOPS | write-through / none | write-back / none |", "|---|---|---|---|---|"]
    for (span, lat), x in sorted(jr.items()):
        if 'none' not in x:
            continue
        n = x['none']
        ratio = lambda m: f"{x[m] / n:.2f}" if m in x else "-"
        md.append(f"| {str(span) + ' MiB' if span else 'whole volume (768 MiB)'} | {'RAM +' + str(lat) + ' us' if lat else 'RAM'} | {n:,.0f} | {ratio('write-through')} | {ratio('write-back')} |")
for r in rows:
    if r["bench"] == "journal":
        res = r["results"]
        md += ["", f"RAID5 journal on RAM devices ({r['log_mib']} MiB log, 4 KiB random writes until 60 % full, then the replay a restart does; and a full write-back cache drained by a switch to write-through):", "",
               "| what | records | blocks | seconds | per GiB of log |", "|---|---|---|---|---|"]
        for m in ("write-through", "write-back"):
            x = res[f"replay_{m}"]
            md.append(f"| replay, {m} records | {x['records']:,} | {x['blocks']:,} | {x['seconds']:.2f} | {x['seconds_per_gib_of_log']:.2f} s |")
        x = res["reclaim"]
        md.append(f"| reclaim of a full cache | | {x['blocks']:,} | {x['seconds']:.3f} | {x['mb_per_second']:.0f} MB/s, {x['blocks_per_second']:,.0f} blocks/s |")
for r in rows:
    if r["bench"] == "rebuild":
        bw = r["member_write_bytes_per_sec"]
        md += ["", f"Rebuild onto a hot spare after a member failed, {r['member_mib']} MiB RAM members (one member alone takes sequential 1 MiB writes at {bw/1e6:,.0f} MB/s on one core):", "",
               "| level | members | on | guest IO meanwhile | rebuilt MB | seconds | MB/s | / member bandwidth | guest IOPS meanwhile | bounced cmds |", "|---|---|---|---|---|---|---|---|---|---|"]
        for x in r["results"]:
            on = 'soft NVMe (stores nothing)' if x.get('members_on') == 'soft-nvme' else 'RAM'
            md.append(f"| {x['level']} | {x['members']} | {on} | {'4 KiB QD 8, half reads' if x['under_load'] else 'none'} | {x['rebuilt_bytes']/1e6:,.0f} | {x['seconds']:.2f} | {x['bytes_per_sec']/1e6:,.0f} | {x['bytes_per_sec']/bw:.2f} | {x['guest_iops_meanwhile']:,.0f} | {x.get('bounced_cmds', 0):,} |")
md += [""] + footnotes
md += ["", "All members share one core's memory bandwidth here, so 'member bandwidth x (n-1)/n' is not reachable on RAM members; the ratio to one member on the same core is what this table shows."]
open(sys.argv[2], "w").write("\n".join(md) + "\n")
print("\n".join(md))
PY
