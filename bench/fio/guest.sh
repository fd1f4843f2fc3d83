#!/bin/sh
# Runs inside the lab guest (deploy/vmrig): every job file in /rig against
# /dev/vda, each result printed as JSON between markers on the console.
. /rig/env
export RUNTIME
[ -b /dev/vda ] || { echo "no /dev/vda"; exit 3; }
rc=0
for job in $JOBS; do
  echo "FIO-BEGIN $job"
  if ! fio --output-format=json "/rig/$job.fio"; then
    echo "FIO-FAILED $job"
    rc=1
  fi
  echo "FIO-END $job"
done
exit $rc
