# Sourced by the NVMe guest scripts: `bind_nvme N` binds every NVMe
# controller to vfio-pci, failing unless there are at least N, and leaves
# their PCI addresses in BDFS.
bind_nvme() {
  BDFS=
  for d in /sys/bus/pci/devices/*; do
    [ "$(cat $d/class)" = 0x010802 ] && BDFS="$BDFS ${d##*/}"
  done
  want=$1
  set -- $BDFS
  [ $# -ge "$want" ] || { echo "expected $want NVMe controllers, found $#"; return 1; }
  for b in $BDFS; do
    DEV=/sys/bus/pci/devices/$b
    echo vfio-pci > $DEV/driver_override
    [ -e $DEV/driver ] && echo $b > $DEV/driver/unbind
    echo $b > /sys/bus/pci/drivers_probe
    echo "NVMe $b bound to $(basename $(readlink $DEV/driver)), group $(basename $(readlink $DEV/iommu_group))"
  done
}
