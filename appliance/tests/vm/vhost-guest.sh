#!/bin/sh
# Runs in the test guest. /dev/vda: a file-backed export (pattern at 1 MiB,
# fio verification at 64 MiB); /dev/vdb: a RAM-backed export for ext4.
set -e
. /rig/fio-check.sh
D=/dev/vda E=/dev/vdb
[ -b $D ] && [ -b $E ] || { echo "missing disks: $(ls /sys/block)"; exit 1; }
echo "vda: $(cat /sys/block/vda/size) sectors, $(ls /sys/block/vda/mq | wc -l) queues, serial $(cat /sys/block/vda/serial 2>/dev/null), logical block $(cat /sys/block/vda/queue/logical_block_size)"
[ "$(ls /sys/block/vda/mq | wc -l)" = 2 ] || { echo "expected 2 queues"; exit 1; }
[ "$(cat /sys/block/vda/serial)" = "vm-test-vda" ] || { echo "wrong serial"; exit 1; }
dd if=/rig/pattern.bin of=$D bs=1M seek=1 oflag=direct conv=fsync 2>/dev/null
dd if=$D of=/tmp/back.bin bs=1M skip=1 count=16 iflag=direct 2>/dev/null
cmp /rig/pattern.bin /tmp/back.bin && echo "DD-VERIFY OK"
rm /tmp/back.bin
fio --name=verify --filename=$D --rw=randwrite --bs=4k --iodepth=16 --ioengine=io_uring --direct=1 \
    --offset=64M --size=32M --numjobs=2 --offset_increment=32M --group_reporting \
    --verify=crc32c --do_verify=1 --verify_fatal=1 > /tmp/fio.out 2>&1 \
  || { tail -30 /tmp/fio.out; echo "FIO-VERIFY FAILED"; exit 1; }
fio_verified /tmp/fio.out && echo "FIO-VERIFY OK"
# Discard and write-zeroes through the block layer.
blkdiscard -o $((128 << 20)) -l $((1 << 20)) $D 2>/dev/null && echo "DISCARD OK" || echo "DISCARD not available in busybox"
mkfs.ext4 -q -F $E
modprobe ext4
mkdir -p /mnt
mount -t ext4 $E /mnt
for i in 1 2 3 4; do dd if=/dev/urandom of=/mnt/f$i bs=64k count=$((i * 8)) 2>/dev/null; done
sync
md5sum /mnt/f* > /tmp/sums
umount /mnt
e2fsck -fn $E > /tmp/fsck.out 2>&1 || { cat /tmp/fsck.out; echo "FSCK FAILED"; exit 1; }
echo "FSCK OK"
mount -t ext4 $E /mnt
md5sum -c /tmp/sums >/dev/null || { echo "FILES DIFFER"; exit 1; }
echo "FILES OK"
umount /mnt
echo "GUEST-ALL-OK"
