#!/bin/sh
# Runs in the test guest while the host kills and restarts the appliance
# under it: a verified fio run must finish without a single IO error.
set -e
. /rig/fio-check.sh
D=/dev/vda
[ -b $D ] || { echo "no $D"; exit 1; }
echo "FIO-START"
fio --name=restart --filename=$D --rw=randwrite --bs=4k --iodepth=16 --ioengine=io_uring --direct=1 \
    --size=96M --verify=crc32c --do_verify=1 --verify_fatal=1 > /tmp/fio.out 2>&1 \
  || { tail -30 /tmp/fio.out; echo "FIO-VERIFY FAILED"; exit 1; }
fio_verified /tmp/fio.out || { cat /tmp/fio.out; exit 1; }
echo "FIO-VERIFY OK"
if dmesg | grep -i "I/O error"; then echo "GUEST SAW IO ERRORS"; exit 1; fi
echo "GUEST-ALL-OK"
