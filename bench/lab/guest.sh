#!/bin/sh
# Runs inside the lab guest (deploy/vmrig). /dev/vda is the appliance's
# volume; the peer's disks follow: for KIND=single /dev/vdb itself, for
# raid1 and raid5 Linux md in this guest over /dev/vdb, vdc, ... (each a
# plain disk the peer serves). Every job runs on both, alternating, its
# fio JSON between markers on the console.
. /rig/env
export RUNTIME
[ -b /dev/vda ] || { echo "no /dev/vda"; exit 3; }
case $KIND in
  single) PEER=/dev/vdb ;;
  raid1|raid5)
    modprobe raid1 2>/dev/null; modprobe raid456 2>/dev/null
    mkdir -p /run/mdadm
    DEVS=$(for d in b c d e f g h; do echo /dev/vd$d; done | head -n "$N")
    extra=
    [ "$KIND" = raid5 ] && extra="--chunk=${CHUNK_K} --layout=left-symmetric"
    # shellcheck disable=SC2086
    mdadm --create /dev/md0 --run --assume-clean --metadata=1.2 --bitmap=none \
      --level="${KIND#raid}" --raid-devices="$N" $extra $DEVS > /tmp/mdadm.out 2>&1 ||
      { cat /tmp/mdadm.out; exit 1; }
    cat /proc/mdstat
    PEER=/dev/md0 ;;
  *) echo "unknown KIND $KIND"; exit 2 ;;
esac
rc=0
for job in $JOBS; do
  for side in appliance peer; do
    dev=/dev/vda
    [ $side = peer ] && dev=$PEER
    sed "s#/dev/vda#$dev#; s#^size=.*#size=${SIZE_M}m#" "/rig/$job.fio" > /tmp/job.fio
    echo "LAB-BEGIN $side $job"
    if ! fio --output-format=json /tmp/job.fio; then
      echo "LAB-FAILED $side $job"
      rc=1
    fi
    echo "LAB-END $side $job"
  done
done
[ "$KIND" = single ] || mdadm --stop /dev/md0 > /dev/null 2>&1
exit $rc
