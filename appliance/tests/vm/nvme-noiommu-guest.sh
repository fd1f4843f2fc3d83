#!/bin/sh
# Runs in the test guest (q35 without an IOMMU, four emulated NVMe
# controllers). Loads a vfio built with the no-IOMMU mode, binds the
# controllers to vfio-pci (groups /dev/vfio/noiommu-N) and runs the
# appliance's demo on them: a RAID5 over three, the fourth as hot spare, one
# member pulled mid-run and rebuilt onto the spare, every block verified by
# an in-guest blkio client. DMA goes by physical address.
export LD_LIBRARY_PATH=/rig
insmod /rig/vfio-noiommu.ko enable_unsafe_noiommu_mode=1 || exit 1
echo "no-IOMMU mode: $(cat /sys/module/vfio/parameters/enable_unsafe_noiommu_mode)"
modprobe vfio_pci || exit 1
. /rig/vfio-bind-nvme.sh
bind_nvme 4 || exit 1
set -- $BDFS
echo "vfio groups: $(ls /dev/vfio | tr '\n' ' ')"
echo 96 > /proc/sys/vm/nr_hugepages
RUST_LOG=info /rig/appliance demo --reactors 1 --before-failure 3 \
  --members nvme:$1,nvme:$2,nvme:$3 --spare nvme:$4 \
  --socket /tmp/demo.sock 2>&1
rc=$?
echo "hugepages left: $(grep HugePages_Free /proc/meminfo)"
exit $rc
