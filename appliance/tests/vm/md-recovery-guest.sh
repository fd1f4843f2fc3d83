#!/bin/sh
# An md recovery and an md resync that the appliance finishes. Disks
# /dev/vda..vdf; /rig/phase says which step.
#
# start: md makes a RAID5 on vda vdb vdc (64K chunks, no bitmap), writes
#   /rig/p1.bin at 0 and at 96 MiB, fails and removes vdc, adds vdd, and
#   stops the array once the recovery onto vdd has passed 4 MiB (md keeps
#   how far in vdd's recovery_offset). Then md makes a RAID1 on vde vdf
#   (no bitmap), writes /rig/p1.bin, and stops it once its first resync
#   has passed 4 MiB (resync_offset).
# verify: md assembles both with plain `mdadm --assemble`, checks the
#   data and runs its parity and mirror checks.
set -e
modprobe raid456
mkdir -p /run/mdadm
phase=$(cat /rig/phase)
run() { "$@" > /tmp/out 2>&1 || { echo "FAILED: $*"; cat /tmp/out; exit 1; }; }
P1=$(stat -c %s /rig/p1.bin)
MB=1048576
if [ "$phase" = start ]; then
  echo 200000 > /proc/sys/dev/raid/speed_limit_min
  run mdadm --create /dev/md0 --run --metadata=1.2 --name=rec --level=5 --raid-devices=3 \
      --chunk=64 --bitmap=none /dev/vda /dev/vdb /dev/vdc
  mdadm --wait /dev/md0 > /dev/null 2>&1 || true
  dd if=/rig/p1.bin of=/dev/md0 bs=1M oflag=direct conv=fsync 2>/dev/null
  dd if=/rig/p1.bin of=/dev/md0 bs=1M seek=96 oflag=direct conv=fsync 2>/dev/null
  run mdadm /dev/md0 --fail /dev/vdc
  run mdadm /dev/md0 --remove /dev/vdc
  # Slow, so that it is stopped half-way.
  echo 1000 > /proc/sys/dev/raid/speed_limit_min
  echo 2000 > /proc/sys/dev/raid/speed_limit_max
  run mdadm /dev/md0 --add /dev/vdd
  while :; do
    done_sectors=$(cut -d' ' -f1 /sys/block/md0/md/sync_completed)
    case $done_sectors in
      none|'') ;;
      *) [ "$done_sectors" -ge 8192 ] && break ;;
    esac
    sleep 0.2
  done
  echo "RECOVERY AT $(cat /sys/block/md0/md/sync_completed)"
  run mdadm --stop /dev/md0
  mdadm --examine /dev/vdd | grep -E "Recovery Offset|Device Role"
  echo "MD-STOPPED-MID-RECOVERY OK"
  run mdadm --create /dev/md1 --run --metadata=1.2 --name=mir --level=1 --raid-devices=2 \
      --bitmap=none /dev/vde /dev/vdf
  dd if=/rig/p1.bin of=/dev/md1 bs=1M oflag=direct conv=fsync 2>/dev/null
  while :; do
    done_sectors=$(cut -d' ' -f1 /sys/block/md1/md/sync_completed)
    case $done_sectors in
      none|'') ;;
      *) [ "$done_sectors" -ge 8192 ] && break ;;
    esac
    sleep 0.2
  done
  run mdadm --stop /dev/md1
  echo "RESYNC OFFSET $(dd if=/dev/vde bs=8 skip=$(( (4096 + 208) / 8 )) count=1 2>/dev/null | od -An -tu8 | tr -d ' ')"
  echo "MD-STOPPED-MID-RESYNC OK"
else
  run mdadm --assemble /dev/md0 /dev/vda /dev/vdb /dev/vdd
  run mdadm --assemble /dev/md1 /dev/vde /dev/vdf
  cat /proc/mdstat
  mdadm --detail /dev/md1 | grep -E "State :" | sed "s/^/DETAIL-MIR /"
  dd if=/dev/md1 of=/tmp/back bs=1M count=$((P1 / MB)) iflag=direct 2>/dev/null
  cmp /tmp/back /rig/p1.bin && echo "MD-READS-P1-MIRROR OK"
  echo check > /sys/block/md1/md/sync_action
  while ! grep -q idle /sys/block/md1/md/sync_action; do sleep 1; done
  echo "MISMATCH md1 $(cat /sys/block/md1/md/mismatch_cnt)"
  run mdadm --stop /dev/md1
  mdadm --detail /dev/md0 | grep -E "State :|Active Devices|Rebuild" | sed "s/^/DETAIL /"
  dd if=/dev/md0 of=/tmp/back bs=1M count=$((P1 / MB)) iflag=direct 2>/dev/null
  cmp /tmp/back /rig/p1.bin && echo "MD-READS-P1-AT-0 OK"
  dd if=/dev/md0 of=/tmp/back bs=1M skip=96 count=$((P1 / MB)) iflag=direct 2>/dev/null
  cmp /tmp/back /rig/p1.bin && echo "MD-READS-P1-AT-96M OK"
  echo check > /sys/block/md0/md/sync_action
  while ! grep -q idle /sys/block/md0/md/sync_action; do sleep 1; done
  echo "MISMATCH md0 $(cat /sys/block/md0/md/mismatch_cnt)"
  run mdadm --stop /dev/md0
  echo "MD-VERIFIED OK"
fi
