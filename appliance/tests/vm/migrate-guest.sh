#!/bin/sh
# Runs in the test guest while the host live-migrates it to another QEMU
# (whose disk is another export of the same volume), and back: verified
# fio writes go on across every switch-over with no IO error.
set -e
. /rig/fio-check.sh
D=/dev/vda
[ -b $D ] || { echo "no $D"; exit 1; }
echo "FIO-START"
rc=0
fio --name=migrate --filename=$D --rw=randwrite --bs=4k --iodepth=16 --ioengine=io_uring --direct=1 \
    --size=64M --loops=6 --verify=crc32c --do_verify=1 --verify_fatal=1 > /tmp/fio.out 2>&1 || rc=$?
if [ $rc -ne 0 ] || ! fio_verified /tmp/fio.out; then
  tail -30 /tmp/fio.out
  grep -iE "verify|got signal|error" /tmp/fio.out | head -5
  # A block that reads back wrong is the disk's fault (every fio verify
  # message says "verify"). fio dying on a signal (a segfault, glibc's heap
  # checks aborting) with no block wrong is the guest's own memory going
  # wrong, which the host tells apart (see vm_migrate.rs).
  if grep -qi "verify" /tmp/fio.out; then
    echo "FIO-VERIFY FAILED"
  elif [ $rc -gt 128 ] || grep -q "got signal" /tmp/fio.out; then
    echo "FIO-KILLED (exit $rc)"
  else
    echo "FIO-FAILED (exit $rc)"
  fi
  exit 1
fi
echo "FIO-VERIFY OK"
if dmesg | grep -i "I/O error"; then echo "GUEST SAW IO ERRORS"; exit 1; fi
echo "GUEST-ALL-OK"
