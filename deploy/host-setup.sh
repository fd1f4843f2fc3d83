#!/usr/bin/env bash
# Host preparation for the appliance (run as root):
#   host-setup.sh status                 hugepages, IOMMU, NVMe controllers and their drivers
#   host-setup.sh hugepages N            reserve at least N 2 MiB hugepages
#   host-setup.sh bind BDF...            hand NVMe controllers (e.g. 0000:01:00.0) to vfio-pci
#   host-setup.sh unbind BDF...          give them back to the kernel's nvme driver
#   host-setup.sh persist BDF...         bind them again at every boot (a oneshot unit before the appliance)
# Exit codes: 0 done, 1 failed, 2 bad arguments.
set -euo pipefail

die() { echo "host-setup: $*" >&2; exit 1; }
usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

check_bdf() {
  [[ $1 =~ ^[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$ ]] ||
    { echo "host-setup: $1 is not a PCI address like 0000:01:00.0" >&2; exit 2; }
  [ -d "/sys/bus/pci/devices/$1" ] || die "$1: no such PCI device"
}

iommu_groups() { find /sys/kernel/iommu_groups -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }

status() {
  echo "hugepages (2 MiB): $(cat /proc/sys/vm/nr_hugepages) reserved, $(awk '/HugePages_Free/ {print $2}' /proc/meminfo) free"
  local groups; groups=$(iommu_groups)
  if [ "$groups" -gt 0 ]; then
    echo "IOMMU: on ($groups groups)"
  elif [ -e /sys/module/vfio/parameters/enable_unsafe_noiommu_mode ]; then
    echo "IOMMU: off; vfio no-IOMMU mode available ($(cat /sys/module/vfio/parameters/enable_unsafe_noiommu_mode))"
  else
    echo "IOMMU: off (enable intel_iommu=on or amd_iommu=on to use vfio-pci)"
  fi
  local found=0
  for d in /sys/bus/pci/devices/*; do
    [ -e "$d/class" ] || continue
    # 0x010802: mass storage, non-volatile memory, NVMe.
    [ "$(cat "$d/class")" = 0x010802 ] || continue
    found=1
    local drv=none
    [ -e "$d/driver" ] && drv=$(basename "$(readlink "$d/driver")")
    echo "NVMe $(basename "$d"): driver $drv"
  done
  [ $found = 1 ] || echo "NVMe: no controllers"
}

hugepages() {
  local want=$1
  [[ $want =~ ^[0-9]+$ ]] || { echo "host-setup: hugepages wants a number, got $want" >&2; exit 2; }
  local have; have=$(cat /proc/sys/vm/nr_hugepages)
  if [ "$have" -lt "$want" ]; then
    echo "$want" > /proc/sys/vm/nr_hugepages
    have=$(cat /proc/sys/vm/nr_hugepages)
  fi
  echo "hugepages: $have reserved"
  # The allocator falls back to plain pages, so fewer is a warning, not an error.
  [ "$have" -ge "$want" ] || echo "host-setup: only $have of $want hugepages could be reserved" >&2
}

bind() {
  local bdf=$1; check_bdf "$bdf"
  [ "$(iommu_groups)" -gt 0 ] || [ -e /sys/module/vfio/parameters/enable_unsafe_noiommu_mode ] ||
    die "no IOMMU and no vfio no-IOMMU mode: vfio-pci cannot be used"
  modprobe vfio-pci
  local dev=/sys/bus/pci/devices/$bdf
  if [ -e "$dev/driver" ]; then
    [ "$(basename "$(readlink "$dev/driver")")" = vfio-pci ] && { echo "$bdf: already on vfio-pci"; return; }
    echo "$bdf" > "$dev/driver/unbind"
  fi
  echo vfio-pci > "$dev/driver_override"
  echo "$bdf" > /sys/bus/pci/drivers_probe
  [ "$(basename "$(readlink "$dev/driver")")" = vfio-pci ] || die "$bdf: vfio-pci did not take it"
  echo "$bdf: on vfio-pci (IOMMU group $(basename "$(readlink "$dev/iommu_group" 2>/dev/null || echo none)"))"
}

unbind() {
  local bdf=$1; check_bdf "$bdf"
  local dev=/sys/bus/pci/devices/$bdf
  [ -e "$dev/driver" ] && echo "$bdf" > "$dev/driver/unbind"
  echo > "$dev/driver_override"
  modprobe nvme || true
  echo "$bdf" > /sys/bus/pci/drivers_probe
  local drv=none
  [ -e "$dev/driver" ] && drv=$(basename "$(readlink "$dev/driver")")
  echo "$bdf: driver $drv"
}

# A oneshot unit that hands BDF... to vfio-pci at boot, before the
# appliance starts (the kernel's nvme driver takes them first otherwise).
# APPLIANCE_UNIT_DIR moves it (tests); systemctl enables it when systemd runs.
persist() {
  for b in "$@"; do check_bdf "$b"; done
  local dir=${APPLIANCE_UNIT_DIR:-/etc/systemd/system}
  local unit=$dir/appliance-vfio.service
  cat > "$unit.tmp" <<UNIT
# Written by appliance-host-setup persist; run it again to change the list.
[Unit]
Description=Hand the appliance's NVMe controllers to vfio-pci
Before=appliance.service
After=systemd-modules-load.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/appliance-host-setup bind $*

[Install]
WantedBy=multi-user.target
RequiredBy=appliance.service
UNIT
  mv "$unit.tmp" "$unit"
  echo "wrote $unit ($*)"
  if [ -z "${APPLIANCE_UNIT_DIR:-}" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload && systemctl enable appliance-vfio.service
  fi
}

[ $# -ge 1 ] || usage
cmd=$1; shift
case $cmd in
  status) status ;;
  hugepages) [ $# = 1 ] || usage; hugepages "$1" ;;
  bind) [ $# -ge 1 ] || usage; for b in "$@"; do bind "$b"; done ;;
  unbind) [ $# -ge 1 ] || usage; for b in "$@"; do unbind "$b"; done ;;
  persist) [ $# -ge 1 ] || usage; persist "$@" ;;
  -h|--help|help) usage ;;
  *) echo "host-setup: unknown command $cmd" >&2; usage ;;
esac
