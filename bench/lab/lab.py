#!/usr/bin/env python3
"""The fio lab: each volume kind against the peer a user would pick
instead, on the same backing store (RAM-backed files in /dev/shm), seen by
the same guest, in the same boot, repeated.

  single  the appliance's single volume on a file   vs  qemu-storage-daemon
          on a file of the same size (driver=file, io_uring)
  raid1   the appliance's RAID1 over 2 files        vs  Linux md RAID1 in the
  raid5   the appliance's RAID5 over 3 files            guest over 2 or 3 disks
                                                        qemu-storage-daemon
                                                        serves from files

One boot per kind and repeat: the guest gets the appliance's volume as
/dev/vda and the peer's disks after it, and runs every job on both,
alternating. The host samples each backend's CPU time at the job markers
on the serial console, so CPU per IO belongs to that job alone. md's own
work runs in the guest (its CPU is the guest's, not a backend's).

  bench/run-lab.sh [--kinds single,raid1,raid5] [--repeats 3] [--runtime 5]
                   [--jobs randread-4k-qd32,...] [--accel tcg|kvm]

Writes bench/results/lab-DATE.{jsonl,md,svg}.
"""
import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
APP = os.path.join(REPO, "target", "release", "appliance")
JOBS_DIR = os.path.join(REPO, "bench", "fio", "jobs")
HZ = os.sysconf("SC_CLK_TCK")
# Volume size: every kind exports this much, both sides.
SIZE_M = 512
MEMBERS = {"single": 1, "raid1": 2, "raid5": 3}


def member_mib(kind):
    n = MEMBERS[kind]
    return SIZE_M // (n - 1) if kind == "raid5" else SIZE_M


def cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 (1-based) of the whole line.
    return (int(fields[11]) + int(fields[12])) / HZ


def wait_socket(path, proc, what, timeout=30):
    t = time.time()
    while time.time() - t < timeout:
        if proc.poll() is not None:
            sys.exit(f"{what} stopped while starting")
        if os.path.exists(path):
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(path)
                return
            except OSError:
                pass
            finally:
                s.close()
        time.sleep(0.05)
    sys.exit(f"{what}: no socket {path}")


def start_appliance(work, kind):
    n = MEMBERS[kind]
    size = member_mib(kind)
    cfg = []
    for i in range(n):
        cfg.append(f'[[device]]\nname = "m{i}"\nspec = "file:{work}/a{i}.img:{size}M"\n')
    members = ", ".join(f'"m{i}"' for i in range(n))
    level = kind
    cfg.append(f'[[volume]]\nname = "lab"\nlevel = "{level}"\nmembers = [{members}]\nchunk_kib = 64\n')
    cfg.append(f'[[export]]\nname = "lab"\nvolume = "lab"\nsocket = "{work}/ours.sock"\n')
    with open(f"{work}/lab.toml", "w") as f:
        f.write("\n".join(cfg))
    log = open(f"{work}/appliance.log", "w")
    p = subprocess.Popen(
        ["taskset", "-c", "0", APP, "daemon", "--reactors", "1", "--cores", "0",
         "--api", f"{work}/api.sock", "--state", f"{work}/state.toml",
         "--config", f"{work}/lab.toml", "--allow-path", work],
        stdout=log, stderr=log)
    wait_socket(f"{work}/ours.sock", p, "the appliance")
    return p


def start_qsd(work, kind):
    n = MEMBERS[kind]
    size = member_mib(kind) if kind != "single" else SIZE_M
    args = ["taskset", "-c", "0", "qemu-storage-daemon"]
    for i in range(n):
        path = f"{work}/q{i}.img"
        with open(path, "wb") as f:
            f.truncate(size << 20)
        # tmpfs has no O_DIRECT: buffered, as the appliance's file device
        # is there.
        args += ["--blockdev",
                 f"driver=file,node-name=f{i},filename={path},aio=io_uring,cache.direct=off",
                 "--export",
                 f"type=vhost-user-blk,id=e{i},node-name=f{i},addr.type=unix,"
                 f"addr.path={work}/q{i}.sock,writable=on,num-queues=1"]
    log = open(f"{work}/qsd.log", "w")
    p = subprocess.Popen(args, stdout=log, stderr=log)
    for i in range(n):
        wait_socket(f"{work}/q{i}.sock", p, "qemu-storage-daemon")
    return p


def stop(p):
    if p and p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def one_boot(args, guest, kind, repeat, qsd_version):
    work = tempfile.mkdtemp(prefix="lab-", dir="/dev/shm")
    app = qsd = None
    try:
        app = start_appliance(work, kind)
        qsd = start_qsd(work, kind)
        with open(f"{work}/env", "w") as f:
            f.write(f'RUNTIME={args.runtime}\nJOBS="{" ".join(args.jobs)}"\nKIND={kind}\n'
                    f'N={MEMBERS[kind]}\nCHUNK_K=64\nSIZE_M={SIZE_M - 16}\n')
        qemu = ["-chardev", f"socket,id=d0,path={work}/ours.sock",
                "-device", "vhost-user-blk-pci,chardev=d0,num-queues=1"]
        for i in range(MEMBERS[kind]):
            qemu += ["-chardev", f"socket,id=q{i},path={work}/q{i}.sock",
                     "-device", f"vhost-user-blk-pci,chardev=q{i},num-queues=1"]
        files = [a for j in args.jobs for a in ("--file", os.path.join(JOBS_DIR, f"{j}.fio"))]
        log = f"{work}/serial.log"
        timeout = 300 + 4 * len(args.jobs) * (args.runtime + 30)
        boot = subprocess.Popen(
            ["taskset", "-c", "1", os.path.join(REPO, "deploy/vmrig/boot.sh"),
             "--guest", guest, "--script", os.path.join(REPO, "bench/lab/guest.sh"),
             "--file", f"{work}/env", *files, "--mem", "512", "--accel", args.accel,
             "--timeout", str(timeout), "--log", log, "--", *qemu],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # CPU of each backend at each marker, as the console shows them.
        marks, seen = {}, 0
        while True:
            done = boot.poll() is not None
            if os.path.exists(log):
                with open(log, errors="replace") as f:
                    data = f.read()
                # Whole lines only: the last may still be being written.
                lines = data.split("\n")[:-1]
                for line in lines[seen:]:
                    for m in ("LAB-BEGIN ", "LAB-END "):
                        if m in line:
                            key = line[line.index(m):].strip()
                            marks[key] = (time.time(), cpu_s(app.pid), cpu_s(qsd.pid))
                seen = len(lines)
            if done:
                break
            time.sleep(0.02)
        text = open(log, errors="replace").read()
        if boot.returncode != 0:
            sys.stderr.write(text[-3000:])
            sys.exit(f"{kind} repeat {repeat}: the guest failed ({boot.returncode}); log {log}")
        rows = []
        for job in args.jobs:
            for side in ("appliance", "peer"):
                b, e = f"LAB-BEGIN {side} {job}", f"LAB-END {side} {job}"
                body = text.split(b, 1)[1].split(e, 1)[0]
                j = json.loads(body[body.index("{"):body.rindex("}") + 1])["jobs"][0]
                parts = [j[s] for s in ("read", "write") if j[s]["total_ios"] > 0]
                ios = sum(s["total_ios"] for s in parts)
                main = max(parts, key=lambda s: s["total_ios"])
                pct = main["clat_ns"].get("percentile", {})
                t0, t1 = marks[b], marks[e]
                cpu = (t1[1] - t0[1]) if side == "appliance" else (t1[2] - t0[2])
                rows.append({
                    "kind": kind, "job": job, "side": side, "repeat": repeat,
                    "backend": (f"appliance {kind}" if side == "appliance" else
                                f"qemu-storage-daemon {qsd_version} file" if kind == "single" else
                                f"md {kind} in the guest over qemu-storage-daemon {qsd_version}"),
                    "iops": sum(s["iops"] for s in parts),
                    "bw_kib": sum(s["bw"] for s in parts),
                    "lat_p50_us": pct.get("50.000000", 0) / 1000,
                    "lat_p99_us": pct.get("99.000000", 0) / 1000,
                    "ios": ios, "backend_cpu_s": cpu,
                    "cpu_us_per_io": 1e6 * cpu / ios if ios else None,
                })
        return rows
    finally:
        stop(app)
        stop(qsd)
        shutil.rmtree(work, ignore_errors=True)


def spread(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return None, None, None
    return statistics.median(vals), min(vals), max(vals)


def report(rows, meta, md_path, svg_path):
    kinds = [k for k in MEMBERS if any(r["kind"] == k for r in rows)]
    jobs = list(dict.fromkeys(r["job"] for r in rows))
    get = lambda k, j, s, f: [r[f] for r in rows if (r["kind"], r["job"], r["side"]) == (k, j, s)]
    out = [f"# fio lab: {meta}", "",
           "Median of the repeats, (min-max) beside it. Ratio: appliance / peer "
           "(IOPS: above 1 is better; CPU per IO: below 1 is better).", ""]
    for k in kinds:
        peer = next(r["backend"] for r in rows if r["kind"] == k and r["side"] == "peer")
        out += [f"## {k}: appliance against {peer}", "",
                "| job | appliance IOPS | peer IOPS | IOPS ratio | appliance p99 us | peer p99 us "
                "| appliance CPU us/IO | peer CPU us/IO |",
                "|---|---|---|---|---|---|---|---|"]
        for j in jobs:
            a, p = spread(get(k, j, "appliance", "iops")), spread(get(k, j, "peer", "iops"))
            if a[0] is None or p[0] is None:
                continue
            a99, p99 = spread(get(k, j, "appliance", "lat_p99_us")), spread(get(k, j, "peer", "lat_p99_us"))
            ac, pc = spread(get(k, j, "appliance", "cpu_us_per_io")), spread(get(k, j, "peer", "cpu_us_per_io"))
            fmt = lambda s, d=0: f"{s[0]:.{d}f} ({s[1]:.{d}f}-{s[2]:.{d}f})"
            out.append(f"| {j} | {fmt(a)} | {fmt(p)} | {a[0] / p[0]:.2f} | {fmt(a99)} | {fmt(p99)} "
                       f"| {fmt(ac, 1)} | {fmt(pc, 1)} |")
        out.append("")
    out += ["CPU per IO is the serving process's user+system time between the job's "
            "markers divided by the IOs fio reported. For md the parity and mirroring run "
            "in the guest, so its figure is only qemu-storage-daemon's share. Under TCG the "
            "emulated guest, not the backend, bounds IOPS; the appliance polls while IO is "
            "in flight, which is where its lower latency and higher CPU at low rates come from.", ""]
    with open(md_path, "w") as f:
        f.write("\n".join(out))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4.5), squeeze=False)
    for ax, k in zip(axes[0], kinds):
        xs = range(len(jobs))
        for off, side, color in ((-0.2, "appliance", "#1f77b4"), (0.2, "peer", "#ff7f0e")):
            med, lo, hi = zip(*[spread(get(k, j, side, "iops")) for j in jobs])
            med = [m or 0 for m in med]
            err = [[m - (l or m) for m, l in zip(med, lo)], [(h or m) - m for m, h in zip(med, hi)]]
            label = "appliance" if side == "appliance" else next(
                r["backend"] for r in rows if r["kind"] == k and r["side"] == "peer")
            ax.bar([x + off for x in xs], med, 0.4, yerr=err, capsize=3, color=color, label=label)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(jobs, rotation=35, ha="right", fontsize=8)
        ax.set_title(k)
        ax.set_ylabel("IOPS (median, min-max)")
        ax.legend(fontsize=7)
    fig.suptitle(meta, fontsize=8)
    fig.tight_layout()
    fig.savefig(svg_path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", default="single,raid1,raid5")
    ap.add_argument("--jobs", default="randread-4k-qd32,randwrite-4k-qd32,randrw70-4k-qd32,seqwrite-128k-qd32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--accel", default="tcg")
    ap.add_argument("--guest", required=True)
    ap.add_argument("--report-only", metavar="JSONL", help="redraw the table and plot of a run")
    args = ap.parse_args()
    args.jobs = args.jobs.split(",")
    kinds = args.kinds.split(",")
    for k in kinds:
        if k not in MEMBERS:
            sys.exit(f"unknown kind {k}")
    qsd_version = subprocess.run(["qemu-storage-daemon", "--version"], capture_output=True,
                                 text=True).stdout.split()[2]
    date = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H%M")
    base = os.path.join(REPO, "bench", "results", f"lab-{date}")
    if args.report_only:
        rows = [json.loads(l) for l in open(args.report_only) if l.strip()]
        base = args.report_only.rsplit(".", 1)[0]
        report(rows, rows[0]["meta"], base + ".md", base + ".svg")
        return
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    meta = (f"{os.uname().machine} {os.cpu_count()} cores, {cpu}, QEMU {args.accel}, "
            f"{args.runtime} s per job, {args.repeats} repeats, qemu-storage-daemon {qsd_version}, {date}")
    rows = []
    with open(base + ".jsonl", "w") as out:
        for repeat in range(args.repeats):
            for k in kinds:
                for r in one_boot(args, args.guest, k, repeat, qsd_version):
                    r["meta"] = meta
                    rows.append(r)
                    out.write(json.dumps(r) + "\n")
                    out.flush()
                print(f"{k} repeat {repeat + 1}/{args.repeats} done", file=sys.stderr)
    report(rows, meta, base + ".md", base + ".svg")
    print(base + ".md")


if __name__ == "__main__":
    main()
