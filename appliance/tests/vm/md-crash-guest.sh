#!/bin/sh
# md's RAID5 with a bitmap crashes: /rig/phase says which step.
# crash: md makes the array (vda vdb vdc, 64K chunks, 1 MiB bitmap chunks),
#   writes /rig/p1.bin at 0 and 64 MiB in, and the guest reboots at once
#   (sysrq), the bits still set and the array active.
# verify: md assembles what the appliance resynchronised: clean, the data
#   there, its check finding no mismatch.
set -e
modprobe raid456
mkdir -p /run/mdadm
echo 200000 > /proc/sys/dev/raid/speed_limit_min
phase=$(cat /rig/phase)
run() { "$@" > /tmp/out 2>&1 || { echo "FAILED: $*"; cat /tmp/out; exit 1; }; }
P1=$(stat -c %s /rig/p1.bin)
MB=1048576
if [ "$phase" = crash ]; then
  run mdadm --create /dev/md0 --run --metadata=1.2 --name=crash --level=5 --raid-devices=3 \
      --chunk=64 --bitmap=internal --bitmap-chunk=1M /dev/vda /dev/vdb /dev/vdc
  mdadm --wait /dev/md0 > /dev/null 2>&1 || true
  # md clears the initial resync's bits a few daemon passes later.
  echo 1 > /sys/block/md0/md/bitmap/time_base 2>/dev/null || true
  n=0
  until mdadm --examine-bitmap /dev/vda | grep -q ", 0 dirty"; do
    n=$((n + 1)); [ $n -lt 300 ] || { echo "FAILED: bits never cleared"; exit 1; }
    sleep 0.2
  done
  dd if=/rig/p1.bin of=/dev/md0 bs=1M oflag=direct conv=fsync 2>/dev/null
  dd if=/rig/p1.bin of=/dev/md0 bs=1M seek=64 oflag=direct conv=fsync 2>/dev/null
  mdadm --examine-bitmap /dev/vda | grep -E "Bitmap :" | sed "s/^/BITMAP /"
  echo "MD-CRASHING"
  echo 1 > /proc/sys/kernel/sysrq
  echo b > /proc/sysrq-trigger
  sleep 10
else
  run mdadm --assemble /dev/md0 /dev/vda /dev/vdb /dev/vdc
  mdadm --detail /dev/md0 | grep -E "State :" | sed "s/^/DETAIL /"
  for at in 0 64; do
    dd if=/dev/md0 of=/tmp/back bs=1M skip=$at count=$((P1 / MB)) iflag=direct 2>/dev/null
    cmp /tmp/back /rig/p1.bin && echo "MD-READS-P1-AT-$at OK"
  done
  echo check > /sys/block/md0/md/sync_action
  while ! grep -q idle /sys/block/md0/md/sync_action; do sleep 1; done
  echo "MISMATCH md0 $(cat /sys/block/md0/md/mismatch_cnt)"
  run mdadm --stop /dev/md0
  echo "MD-VERIFIED OK"
fi
