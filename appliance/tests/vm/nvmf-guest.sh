#!/bin/sh
# Runs in the test guest: Linux's own NVMe/TCP host (nvme_tcp, nvme-cli)
# against the appliance on the host, reached through QEMU's user-mode
# network (10.0.2.2 is the host's loopback). /rig/params gives PORT, HOSTNQN,
# R5 (a RAID5 subsystem) and ONE (a single-device subsystem).
# The host acts when the guest prints FIO-START (fails a member),
# RESIZE-READY (grows ONE's device) and RESTART-READY (kills and restarts
# the appliance while fio runs).
set -e
. /rig/fio-check.sh
. /rig/params
modprobe virtio_net
modprobe nvme_tcp
modprobe ext4
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
mkdir -p /etc/nvme /run
echo "$HOSTNQN" > /etc/nvme/hostnqn
echo "$HOSTID" > /etc/nvme/hostid

nvme discover -t tcp -a 10.0.2.2 -s "$PORT" -q "$HOSTNQN" > /tmp/disc.out 2>&1 \
  || { cat /tmp/disc.out; echo "DISCOVER FAILED"; exit 1; }
cat /tmp/disc.out
grep -q "subnqn: *$R5" /tmp/disc.out && grep -q "subnqn: *$ONE" /tmp/disc.out \
  && ! grep -q "subnqn: *$HIDDEN" /tmp/disc.out && echo "DISCOVER OK"

connect() {
  n=$1; shift
  nvme connect -t tcp -a 10.0.2.2 -s "$PORT" -n "$n" -q "$HOSTNQN" -I "$HOSTID" \
    --ctrl-loss-tmo=120 --reconnect-delay=1 --nr-io-queues=2 "$@" || { echo "CONNECT $n FAILED"; exit 1; }
}
connect "$R5"
# Header and data digests (CRC32C) on this one.
connect "$ONE" --hdr-digest --data-digest
# nvme-cli's refusal for a subsystem this host may not use.
if nvme connect -t tcp -a 10.0.2.2 -s "$PORT" -n "$HIDDEN" -q "$HOSTNQN" -I "$HOSTID" 2>/tmp/hidden.err; then
  echo "HIDDEN CONNECTED"; exit 1
fi
echo "HIDDEN REFUSED: $(head -1 /tmp/hidden.err)"

# The namespace of a subsystem: its disk under the NVMe subsystem (native
# multipath) or under the controller.
dev_of() {
  for s in /sys/class/nvme-subsystem/nvme-subsys* /sys/class/nvme/nvme*; do
    [ "$(cat $s/subsysnqn 2>/dev/null)" = "$1" ] || continue
    for n in $s/nvme*n1; do [ -e "$n" ] && { basename $n; return; }; done
  done
}
t=0
while [ -z "$(dev_of "$R5")" ] || [ -z "$(dev_of "$ONE")" ]; do
  t=$((t + 1)); [ $t -lt 100 ] || { ls -l /sys/block; echo "NO NAMESPACES"; exit 1; }
  sleep 0.1
done
D=/dev/$(dev_of "$R5") E=/dev/$(dev_of "$ONE")
B=$(basename $E)
echo "R5 on $D ($(cat /sys/block/$(basename $D)/size) sectors), ONE on $E ($(cat /sys/block/$B/size) sectors)"
for c in /sys/class/nvme/nvme*; do echo "$(basename $c): $(cat $c/transport) $(cat $c/address) queues $(cat $c/queue_count) model $(cat $c/model | tr -s ' ')"; done

echo "FIO-START"
fio --name=verify --filename=$D --rw=randwrite --bs=4k --iodepth=16 --ioengine=io_uring --direct=1 \
    --size=48M --numjobs=2 --offset_increment=48M --group_reporting \
    --verify=crc32c --do_verify=1 --verify_fatal=1 > /tmp/fio.out 2>&1 \
  || { tail -30 /tmp/fio.out; echo "FIO-VERIFY FAILED"; exit 1; }
fio_verified /tmp/fio.out && echo "FIO-VERIFY OK"

mkfs.ext4 -q -F $E
mkdir -p /mnt
mount -t ext4 $E /mnt
for i in 1 2 3 4; do dd if=/dev/urandom of=/mnt/f$i bs=64k count=$((i * 8)) 2>/dev/null; done
sync
md5sum /mnt/f* > /tmp/sums
umount /mnt
e2fsck -fn $E > /tmp/fsck.out 2>&1 || { cat /tmp/fsck.out; echo "FSCK FAILED"; exit 1; }
echo "FSCK OK"

before=$(cat /sys/block/$B/size)
echo "RESIZE-READY $before"
t=0
while [ "$(cat /sys/block/$B/size)" = "$before" ]; do
  t=$((t + 1)); [ $t -lt 600 ] || { echo "RESIZE NOT SEEN"; exit 1; }
  sleep 0.1
done
echo "RESIZE OK $before -> $(cat /sys/block/$B/size)"
mount -t ext4 $E /mnt
md5sum -c /tmp/sums >/dev/null || { echo "FILES DIFFER"; exit 1; }
umount /mnt
echo "FILES OK"

# The appliance is killed and restarted under this fio; the host's
# controllers reconnect and the requests go again.
fio --name=restart --filename=$D --rw=randwrite --bs=16k --iodepth=8 --ioengine=io_uring --direct=1 \
    --offset=100M --size=32M --verify=crc32c --do_verify=1 --verify_fatal=1 > /tmp/fio2.out 2>&1 &
fio_pid=$!
sleep 1
echo "RESTART-READY"
wait $fio_pid || { tail -30 /tmp/fio2.out; echo "FIO-RESTART FAILED"; exit 1; }
fio_verified /tmp/fio2.out && echo "FIO-RESTART OK"
dmesg | grep -i "nvme" | tail -20
nvme disconnect-all >/dev/null 2>&1 || true
echo "GUEST-ALL-OK"
