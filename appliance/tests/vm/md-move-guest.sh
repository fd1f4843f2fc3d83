#!/bin/sh
# Arrays move between Linux md and the appliance with no copy. Runs in the
# test guest with twenty disks /dev/vda..vdt; /rig/phase says which step.
#
# create: md makes three arrays as an operator would (no options beyond
#   the geometry), writes /rig/p1.bin to each, stops them.
#     md0 RAID5 left-asymmetric, 16K chunks, internal bitmap  vda vdb vdc,
#         a spare                                             vdt
#     md1 RAID5 right-symmetric, 64K chunks, no bitmap         vdd vde vdf
#     md2 RAID1, vdh write-mostly, internal bitmap            vdg vdh
#     md4 RAID5 right-asymmetric, 64K chunks, internal bitmap vdl vdm vdn
#     md5 RAID5 left-symmetric, 16K chunks, no bitmap         vdo vdp vdq
#     md6 RAID5 left-symmetric, 64K, degraded (one missing)   vdr vds
# assemble: md assembles those, and the RAID5 the appliance made on vdi
#   vdj vdk (md3), with plain `mdadm --assemble`; checks what the
#   appliance wrote, runs md's parity/mirror check, writes /rig/p4.bin.
set -e
modprobe raid456
modprobe raid1
mkdir -p /run/mdadm
echo 200000 > /proc/sys/dev/raid/speed_limit_min
phase=$(cat /rig/phase)
run() { "$@" > /tmp/out 2>&1 || { echo "FAILED: $*"; cat /tmp/out; exit 1; }; }
MB=1048576
if [ "$phase" = create ]; then
  run mdadm --create /dev/md0 --run --metadata=1.2 --name=r5a --level=5 --raid-devices=3 \
      --chunk=16 --layout=left-asymmetric --bitmap=internal --bitmap-chunk=1M /dev/vda /dev/vdb /dev/vdc \
      --spare-devices=1 /dev/vdt
  run mdadm --create /dev/md1 --run --metadata=1.2 --name=r5b --level=5 --raid-devices=3 \
      --chunk=64 --layout=right-symmetric --bitmap=none /dev/vdd /dev/vde /dev/vdf
  run mdadm --create /dev/md2 --run --metadata=1.2 --name=r1 --level=1 --raid-devices=2 \
      --bitmap=internal /dev/vdg --write-mostly /dev/vdh
  run mdadm --create /dev/md4 --run --metadata=1.2 --name=r5c --level=5 --raid-devices=3 \
      --chunk=64 --layout=right-asymmetric --bitmap=internal /dev/vdl /dev/vdm /dev/vdn
  run mdadm --create /dev/md5 --run --metadata=1.2 --name=r5d --level=5 --raid-devices=3 \
      --chunk=16 --layout=left-symmetric --bitmap=none /dev/vdo /dev/vdp /dev/vdq
  run mdadm --create /dev/md6 --run --metadata=1.2 --name=r5e --level=5 --raid-devices=3 \
      --chunk=64 --bitmap=none /dev/vdr /dev/vds missing
  mdadm --wait /dev/md0 /dev/md1 /dev/md2 /dev/md4 /dev/md5 > /dev/null 2>&1 || true
  for md in md0 md1 md2 md4 md5 md6; do
    dd if=/rig/p1.bin of=/dev/$md bs=1M oflag=direct conv=fsync 2>/dev/null
  done
  cat /proc/mdstat
  for md in md0 md1 md2 md4 md5 md6; do run mdadm --stop /dev/$md; done
  echo "MD-CREATED OK"
else
  run mdadm --assemble /dev/md0 /dev/vda /dev/vdb /dev/vdc /dev/vdt
  run mdadm --assemble /dev/md1 /dev/vdd /dev/vde /dev/vdf
  run mdadm --assemble /dev/md2 /dev/vdg /dev/vdh
  run mdadm --assemble /dev/md3 /dev/vdi /dev/vdj /dev/vdk
  run mdadm --assemble /dev/md4 /dev/vdl /dev/vdm /dev/vdn
  run mdadm --assemble /dev/md5 /dev/vdo /dev/vdp /dev/vdq
  run mdadm --assemble /dev/md6 /dev/vdr /dev/vds
  cat /proc/mdstat
  P1=$(stat -c %s /rig/p1.bin)
  for md in md0 md1 md2 md4 md5 md6; do
    dd if=/dev/$md of=/tmp/back bs=1M count=$((P1 / MB)) iflag=direct 2>/dev/null
    cmp /tmp/back /rig/p1.bin && echo "MD-READS-P1 $md OK"
    dd if=/dev/$md of=/tmp/back bs=1M skip=16 count=$((P1 / MB)) iflag=direct 2>/dev/null
    cmp /tmp/back /rig/p2.bin && echo "MD-READS-P2 $md OK"
  done
  dd if=/dev/md3 of=/tmp/back bs=1M count=$((P1 / MB)) iflag=direct 2>/dev/null
  cmp /tmp/back /rig/p3.bin && echo "MD-READS-P3 md3 OK"
  for md in md0 md1 md2 md3 md4 md5; do
    mdadm --detail /dev/$md | grep -E "Raid Level|State :|Active Devices|Spare Devices|Layout|Chunk Size|Intent Bitmap" | sed "s/^/DETAIL $md /"
    echo check > /sys/block/$md/md/sync_action
  done
  mdadm --detail /dev/md6 | grep -E "State :|Active Devices" | sed "s/^/DETAIL md6 /"
  for md in md0 md1 md2 md3 md4 md5; do
    while ! grep -q idle /sys/block/$md/md/sync_action; do sleep 1; done
    echo "MISMATCH $md $(cat /sys/block/$md/md/mismatch_cnt)"
    dd if=/rig/p4.bin of=/dev/$md bs=1M seek=32 oflag=direct conv=fsync 2>/dev/null
  done
  dd if=/rig/p4.bin of=/dev/md6 bs=1M seek=32 oflag=direct conv=fsync 2>/dev/null
  for md in md0 md1 md2 md3 md4 md5 md6; do run mdadm --stop /dev/$md; done
  echo "MD-ASSEMBLED OK"
fi
