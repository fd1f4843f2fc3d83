#!/usr/bin/env bash
# Boot the test guest, run one script in it, power off; exit with the
# script's exit code (99 if the guest never reported one).
#
#   deploy/vmrig/boot.sh --guest DIR --script FILE [--file SRC]... [--mem MiB]
#        [--smp N] [--accel tcg|kvm] [--timeout S] [--log FILE] [--append ARGS]
#        [--pin CPUS] [-- QEMU ARGS...]
#
# --append adds to the kernel command line (e.g. intel_iommu=on iommu=pt for
# the VFIO test, whose QEMU arguments add -machine kernel-irqchip=split and
# an intel-iommu device before the NVMe controllers).
#
# --pin runs QEMU on those host CPUs only (taskset -c): QEMU 7.2's TCG loses
# guest writes during a live migration when its vCPU and migration threads
# run at once (see appliance/tests/vm_migrate.rs).
#
# Guest RAM is a shared memfd, as vhost-user devices need.
set -euo pipefail
guest= script= mem=512 smp=1 accel=tcg timeout=600 log= append= pin=
files=()
while [ $# -gt 0 ]; do
  case $1 in
    --guest) guest=$2; shift ;;
    --script) script=$2; shift ;;
    --file) files+=("$2"); shift ;;
    --mem) mem=$2; shift ;;
    --smp) smp=$2; shift ;;
    --accel) accel=$2; shift ;;
    --timeout) timeout=$2; shift ;;
    --log) log=$2; shift ;;
    --append) append=$2; shift ;;
    --pin) pin=$2; shift ;;
    --) shift; break ;;
    *) echo "boot.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$guest" ] && [ -n "$script" ] || { echo "boot.sh: --guest and --script are required" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/x/rig"
[ -n "$log" ] || log=$work/serial.log
install -m755 "$script" "$work/x/rig/test.sh"
for f in "${files[@]}"; do cp -L "$f" "$work/x/rig/"; done
# The kernel unpacks concatenated archives in order: the test goes on top.
(cd "$work/x" && find . | "$guest/busybox" cpio -o -H newc 2>/dev/null) | gzip -1 > "$work/extra.cpio.gz"
cat "$guest/initramfs.cpio.gz" "$work/extra.cpio.gz" > "$work/initrd"
cpu=max
[ "$accel" = kvm ] && cpu=host
taskset=()
[ -z "$pin" ] || taskset=(taskset -c "$pin")
set +e
# --foreground keeps QEMU in boot.sh's process group, so a test that kills
# that group takes QEMU with it.
timeout --foreground -k 5 "$timeout" "${taskset[@]}" qemu-system-x86_64 -nodefaults -nographic -no-reboot \
  -machine q35,accel="$accel" -cpu "$cpu" -smp "$smp" -m "$mem" \
  -object memory-backend-memfd,id=mem,size="${mem}M",share=on -numa node,memdev=mem \
  -kernel "$guest/vmlinux" -initrd "$work/initrd" -serial stdio \
  -append "console=ttyS0 panic=-1 quiet loglevel=4 $append" "$@" </dev/null 2>&1 | tee "$log"
set -e
rc=$(grep -a -o 'RIG-EXIT=[0-9]*' "$log" | tail -1 | cut -d= -f2 || true)
[ -n "$rc" ] || exit 99
exit "$rc"
