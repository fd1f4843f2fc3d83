#!/bin/sh
# Runs in the test guest while the host live-migrates it to another QEMU
# (whose disk is another export of the same volume), and back: verified
# fio writes go on across every switch-over with no IO error.
set -e
D=/dev/vda
[ -b $D ] || { echo "no $D"; exit 1; }
echo "FIO-START"
fio --name=migrate --filename=$D --rw=randwrite --bs=4k --iodepth=16 --ioengine=io_uring --direct=1 \
    --size=64M --loops=6 --verify=crc32c --do_verify=1 --verify_fatal=1 > /tmp/fio.out 2>&1 \
  || { tail -30 /tmp/fio.out; echo "FIO-VERIFY FAILED"; exit 1; }
grep -q "err= 0" /tmp/fio.out || { cat /tmp/fio.out; exit 1; }
echo "FIO-VERIFY OK"
if dmesg | grep -i "I/O error"; then echo "GUEST SAW IO ERRORS"; exit 1; fi
echo "GUEST-ALL-OK"
