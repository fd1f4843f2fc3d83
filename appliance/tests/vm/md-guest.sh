#!/bin/sh
# Runs in the test guest with $N RAID5 members as /dev/vda, vdb, ..., written
# by the appliance. Linux md assembles them with the same geometry
# (/rig/geometry), reads the appliance's data, checks every parity block,
# then writes data of its own for the appliance to read back.
set -e
. /rig/geometry
modprobe raid456
mkdir -p /run/mdadm
DEVS=$(for d in a b c d e f g h; do echo /dev/vd$d; done | head -n "$N")
# shellcheck disable=SC2086
mdadm --create /dev/md0 --run --assume-clean --metadata=1.2 --level=5 --raid-devices="$N" \
      --chunk="$CHUNK_K" --layout="$LAYOUT" --data-offset="${OFFSET_K}K" \
      $DEVS > /tmp/mdadm.out 2>&1 || { cat /tmp/mdadm.out; exit 1; }
cat /proc/mdstat
dd if=/dev/md0 of=/tmp/back.bin bs=1M count=16 iflag=direct 2>/dev/null
cmp /rig/ours.bin /tmp/back.bin && echo "MD-READS-APPLIANCE-DATA OK"
echo check > /sys/block/md0/md/sync_action
while ! grep -q idle /sys/block/md0/md/sync_action; do sleep 1; done
echo "MD-MISMATCH-CNT $(cat /sys/block/md0/md/mismatch_cnt)"
[ "$(cat /sys/block/md0/md/mismatch_cnt)" = 0 ] && echo "MD-PARITY-CHECK OK"
dd if=/rig/theirs.bin of=/dev/md0 bs=1M seek=32 oflag=direct conv=fsync 2>/dev/null
# Also a few small writes, which md serves by read-modify-write.
dd if=/rig/theirs.bin of=/dev/md0 bs=4k count=3 skip=5 seek=$((60 * 256 + 7)) oflag=direct conv=fsync 2>/dev/null
mdadm --stop /dev/md0 > /dev/null 2>&1
echo "MD-WROTE OK"
