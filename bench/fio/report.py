#!/usr/bin/env python3
"""Turn fio lab results (JSON lines) into a Markdown table and an SVG plot.

    report.py RESULTS.jsonl OUT.md OUT.svg

Each line: {"backend", "job", "iops", "bw_kib", "lat_p50_us", "lat_p99_us",
"backend_cpu_s", "ios", ...}. The table puts the appliance beside
qemu-storage-daemon per job with their ratio and the backend's CPU time per
IO (steadier than IOPS on a shared machine; under TCG the guest, not the
backend, limits IOPS)."""
import json
import sys
from collections import OrderedDict


def load(path):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    jobs = OrderedDict()
    for r in rows:
        jobs.setdefault(r["job"], {})[r["backend"]] = r
    backends = sorted({r["backend"] for r in rows}, key=lambda b: (not b.startswith("appliance"), b))
    return rows, jobs, backends


def cpu_per_io_us(r):
    return 1e6 * r["backend_cpu_s"] / r["ios"] if r.get("ios") else float("nan")


def markdown(jobs, backends, meta):
    out = [f"# fio lab: {meta}", ""]
    head = ["job"]
    for b in backends:
        head += [f"{b} IOPS", f"{b} p50 us", f"{b} p99 us", f"{b} CPU us/IO"]
    if len(backends) == 2:
        head += ["IOPS ratio", "CPU/IO ratio"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for job, per in jobs.items():
        cells = [job]
        for b in backends:
            r = per.get(b)
            if r is None:
                cells += ["-"] * 4
                continue
            cells += [f"{r['iops']:.0f}", f"{r['lat_p50_us']:.1f}", f"{r['lat_p99_us']:.1f}",
                      f"{cpu_per_io_us(r):.2f}"]
        if len(backends) == 2 and all(b in per for b in backends):
            a, q = per[backends[0]], per[backends[1]]
            cells.append(f"{a['iops'] / q['iops']:.2f}" if q["iops"] else "-")
            ca, cq = cpu_per_io_us(a), cpu_per_io_us(q)
            cells.append(f"{ca / cq:.2f}" if cq == cq and cq > 0 else "-")
        out.append("| " + " | ".join(cells) + " |")
    out += ["", f"Ratios are {backends[0]} / {backends[-1]}: above 1 is better for IOPS, "
            "below 1 is better for CPU per IO. CPU is the backend process's user+system "
            "time over the boot and the job (from /proc), divided by the IOs fio reported; "
            "it includes the appliance's polling: a polled backend spins while it waits for "
            "a slow (TCG) guest, which is where its lower latency comes from.", ""]
    return "\n".join(out)


COLORS = ["#2b6cb0", "#c05621", "#2f855a", "#6b46c1"]


def bars(jobs, backends, key, title, x0, y0, w, h):
    """One grouped bar chart as SVG elements."""
    vals = [per[b][key] for per in jobs.values() for b in backends if b in per]
    top = max(vals + [1e-9]) * 1.1
    n = len(jobs)
    gw = w / max(n, 1)
    bw = gw * 0.8 / max(len(backends), 1)
    e = [f'<text x="{x0 + w / 2}" y="{y0 - 8}" text-anchor="middle" font-size="14">{title}</text>',
         f'<line x1="{x0}" y1="{y0 + h}" x2="{x0 + w}" y2="{y0 + h}" stroke="black"/>']
    for t in range(5):
        v = top * t / 4
        y = y0 + h - h * t / 4
        e.append(f'<text x="{x0 - 4}" y="{y + 4}" text-anchor="end" font-size="10">{v:.3g}</text>')
        e.append(f'<line x1="{x0}" y1="{y}" x2="{x0 + w}" y2="{y}" stroke="#ddd"/>')
    for i, (job, per) in enumerate(jobs.items()):
        for k, b in enumerate(backends):
            if b not in per:
                continue
            v = per[b][key]
            bh = h * v / top
            x = x0 + i * gw + gw * 0.1 + k * bw
            e.append(f'<rect x="{x:.1f}" y="{y0 + h - bh:.1f}" width="{bw:.1f}" height="{bh:.1f}" '
                     f'fill="{COLORS[k % len(COLORS)]}"><title>{b} {job}: {v:.4g}</title></rect>')
        lx = x0 + i * gw + gw / 2
        e.append(f'<text x="{lx}" y="{y0 + h + 12}" font-size="9" text-anchor="end" '
                 f'transform="rotate(-35 {lx} {y0 + h + 12})">{job}</text>')
    return e


def svg(jobs, backends, meta):
    w, h = 900, 760
    e = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif">',
         f'<rect width="{w}" height="{h}" fill="white"/>',
         f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="15">fio lab: {meta}</text>']
    e += bars(jobs, backends, "iops", "IOPS (higher is better)", 80, 60, 780, 220)
    e += bars(jobs, backends, "lat_p99_us", "p99 completion latency, us (lower is better)", 80, 420, 780, 220)
    for k, b in enumerate(backends):
        e.append(f'<rect x="{80 + k * 220}" y="{h - 24}" width="12" height="12" fill="{COLORS[k % len(COLORS)]}"/>')
        e.append(f'<text x="{96 + k * 220}" y="{h - 14}" font-size="12">{b}</text>')
    e.append("</svg>")
    return "\n".join(e)


def main():
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    rows, jobs, backends = load(sys.argv[1])
    if not rows:
        print("no results", file=sys.stderr)
        return 1
    meta = rows[0].get("meta", "")
    open(sys.argv[2], "w").write(markdown(jobs, backends, meta))
    open(sys.argv[3], "w").write(svg(jobs, backends, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
