#!/bin/sh
# Runs in the test guest on a RAID5 export while the host pulls a member
# and rebuilds a spare under it: a verified fio must see no error at all.
set -e
. /rig/fio-check.sh
D=/dev/vda
[ -b $D ] || { echo "no $D"; exit 1; }
echo "vda: $(cat /sys/block/vda/size) sectors, optimal io $(cat /sys/block/vda/queue/optimal_io_size), minimum io $(cat /sys/block/vda/queue/minimum_io_size)"
[ "$(cat /sys/block/vda/queue/minimum_io_size)" = 65536 ] || { echo "minimum io is not the chunk"; exit 1; }
[ "$(cat /sys/block/vda/queue/optimal_io_size)" = 196608 ] || { echo "optimal io is not the stripe"; exit 1; }
echo "FIO-START"
fio --name=raid --filename=$D --rw=randwrite --bs=4k --iodepth=16 --ioengine=io_uring --direct=1 \
    --size=64M --verify=crc32c --do_verify=1 --verify_fatal=1 > /tmp/fio.out 2>&1 \
  || { tail -30 /tmp/fio.out; echo "FIO-VERIFY FAILED"; exit 1; }
fio_verified /tmp/fio.out || { cat /tmp/fio.out; exit 1; }
echo "FIO-VERIFY OK"
if dmesg | grep -i "I/O error"; then echo "GUEST SAW IO ERRORS"; exit 1; fi
echo "GUEST-ALL-OK"
