#!/bin/sh
# Runs in the test guest on a 64 MiB export that the host grows to 128 MiB
# while the disk is in use: the kernel must see the new size without a
# reboot or reconnect (vhost-user CONFIG_CHANGE_MSG -> virtio config
# interrupt), and IO must work across the whole new disk.
set -e
. /rig/fio-check.sh
D=/dev/vda
[ -b $D ] || { echo "no $D"; exit 1; }
old=$(cat /sys/block/vda/size)
echo "vda: $old sectors"
[ "$old" = 131072 ] || { echo "expected 131072 sectors"; exit 1; }
dd if=/dev/urandom of=/tmp/head.bin bs=1M count=4 2>/dev/null
dd if=/tmp/head.bin of=$D bs=1M oflag=direct conv=fsync 2>/dev/null
echo "RESIZE-WAIT"
i=0
while [ "$(cat /sys/block/vda/size)" = "$old" ]; do
  i=$((i + 1))
  [ $i -lt 600 ] || { echo "the size never changed"; exit 1; }
  sleep 0.1
done
new=$(cat /sys/block/vda/size)
echo "vda grew to $new sectors"
[ "$new" = 262144 ] || { echo "expected 262144 sectors"; exit 1; }
dmesg | grep -i "new size\|capacity change" || true
fio --name=grown --filename=$D --rw=randwrite --bs=4k --iodepth=16 --ioengine=io_uring --direct=1 \
    --offset=96M --size=32M --verify=crc32c --do_verify=1 --verify_fatal=1 > /tmp/fio.out 2>&1 \
  || { tail -30 /tmp/fio.out; echo "FIO-VERIFY FAILED"; exit 1; }
fio_verified /tmp/fio.out || { cat /tmp/fio.out; exit 1; }
echo "FIO-VERIFY OK"
dd if=$D of=/tmp/back.bin bs=1M count=4 iflag=direct 2>/dev/null
cmp /tmp/head.bin /tmp/back.bin || { echo "THE HEAD CHANGED"; exit 1; }
echo "HEAD OK"
if dmesg | grep -i "I/O error"; then echo "GUEST SAW IO ERRORS"; exit 1; fi
echo "GUEST-ALL-OK"
