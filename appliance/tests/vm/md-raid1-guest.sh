#!/bin/sh
# Two RAID1 members written by the appliance as /dev/vda, /dev/vdb: md
# builds a mirror over them (no superblock, data at the start), reads the
# appliance's data from each half, and writes its own.
set -e
modprobe raid1
mkdir -p /run/mdadm
mdadm --build /dev/md0 --run --level=1 --raid-devices=2 /dev/vda /dev/vdb > /tmp/mdadm.out 2>&1 || { cat /tmp/mdadm.out; exit 1; }
dd if=/dev/md0 of=/tmp/back.bin bs=1M count=16 iflag=direct 2>/dev/null
cmp /rig/ours.bin /tmp/back.bin && echo "MD-READS-APPLIANCE-DATA OK"
dd if=/rig/theirs.bin of=/dev/md0 bs=1M seek=16 oflag=direct conv=fsync 2>/dev/null
mdadm --stop /dev/md0 > /dev/null 2>&1
echo "MD-WROTE OK"
