#!/bin/sh
# Runs in the test guest (q35 + intel-iommu, five emulated NVMe
# controllers). Binds every NVMe controller to vfio-pci and runs the
# appliance's demo on them: a RAID5 over the first four (one of which QEMU
# makes fail after a few hundred IOs), the fifth as hot spare, exported over
# vhost-user-blk to an in-guest blkio client that verifies every block.
export LD_LIBRARY_PATH=/rig
modprobe vfio_pci && modprobe vfio_iommu_type1 || exit 1
. /rig/vfio-bind-nvme.sh
bind_nvme 5 || exit 1
set -- $BDFS
echo 32 > /proc/sys/vm/nr_hugepages
RUST_LOG=info /rig/appliance demo --reactors 1 --before-failure 3 \
  --members nvme:$1,nvme:$2,nvme:$3,nvme:$4 --spare nvme:$5 --no-pull \
  --socket /tmp/demo.sock 2>&1
rc=$?
echo "DMAR-FAULTS $(dmesg | grep -c -i 'DMAR.*fault')"
exit $rc
