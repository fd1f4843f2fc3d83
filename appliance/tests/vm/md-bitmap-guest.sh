#!/bin/sh
# The appliance's RAID5 (vda vdb vdc) lost power with writes in flight:
# md reads its bitmap, resyncs the chunks it marks, and checks parity.
set -e
modprobe raid456
mkdir -p /run/mdadm
echo 200000 > /proc/sys/dev/raid/speed_limit_min
run() { "$@" > /tmp/out 2>&1 || { echo "FAILED: $*"; cat /tmp/out; exit 1; }; }
mdadm --examine /dev/vda | grep -E "State :" | sed "s/^/EXAMINE /"
mdadm --examine-bitmap /dev/vda | grep -E "Bitmap :|Events" | sed "s/^/BITMAP /"
run mdadm --assemble /dev/md0 /dev/vda /dev/vdb /dev/vdc
while ! grep -q idle /sys/block/md0/md/sync_action; do sleep 0.2; done
echo check > /sys/block/md0/md/sync_action
while ! grep -q idle /sys/block/md0/md/sync_action; do sleep 1; done
dmesg | grep -E "bitmap|resync|data-check" | sed "s/^/DMESG /"
echo "MISMATCH md0 $(cat /sys/block/md0/md/mismatch_cnt)"
run mdadm --stop /dev/md0
echo "MD-BITMAP DONE"
