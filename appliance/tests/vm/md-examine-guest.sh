#!/bin/sh
# Runs in the test guest with eight blank disks /dev/vda..vdh. Linux md
# creates three arrays the way an operator would (md's own superblocks,
# bitmaps, a spare, a write-mostly member, a missing member), writes to
# them, stops them, and prints what mdadm --examine and --examine-bitmap
# say of every disk, for the host to compare with its own decoding of the
# same bytes.
set -e
modprobe raid456
modprobe raid1
mkdir -p /run/mdadm
echo 200000 > /proc/sys/dev/raid/speed_limit_min
run() { "$@" > /tmp/out 2>&1 || { cat /tmp/out; exit 1; }; }
# RAID5, right-symmetric, 16 KiB chunks, internal bitmap, one spare.
run mdadm --create /dev/md0 --run --metadata=1.2 --name=r5 --level=5 --raid-devices=3 \
    --chunk=16 --layout=right-symmetric --bitmap=internal --bitmap-chunk=1M \
    /dev/vda /dev/vdb /dev/vdc --spare-devices=1 /dev/vdd
# RAID1 with a write-mostly member and write-behind.
run mdadm --create /dev/md1 --run --metadata=1.2 --name=r1 --level=1 --raid-devices=2 \
    --bitmap=internal --write-behind=256 /dev/vde --write-mostly /dev/vdf
# RAID5, left-asymmetric, 64 KiB chunks, no bitmap, one member missing.
run mdadm --create /dev/md2 --run --metadata=1.2 --name=degraded --level=5 --raid-devices=3 \
    --chunk=64 --layout=left-asymmetric --bitmap=none /dev/vdg /dev/vdh missing
mdadm --wait /dev/md0 /dev/md1 > /dev/null 2>&1 || true
for md in md0 md1 md2; do
  dd if=/dev/urandom of=/dev/$md bs=1M count=8 oflag=direct conv=fsync 2>/dev/null
done
cat /proc/mdstat
for md in md0 md1 md2; do run mdadm --stop /dev/$md; done
for d in a b c d e f g h; do
  echo "=== EXAMINE vd$d ==="
  mdadm --examine /dev/vd$d 2>&1 || true
  echo "=== BITMAP vd$d ==="
  mdadm --examine-bitmap /dev/vd$d 2>&1 || true
  echo "=== END vd$d ==="
done
echo "MD-EXAMINE DONE"
