# Sourced by the guest scripts (tests/common's boot copies it into /rig).
# fio_verified OUT: whether the verified fio run whose output is in OUT
# checked every block it wrote: no error, no job process killed by a
# signal (fio then still exits 0 and prints "err= 0"), and as many blocks
# read back as written (with --group_reporting for more than one job).
fio_verified() {
  grep -q "err= 0" "$1" || return 1
  if grep -q "got signal" "$1"; then return 1; fi
  set -- $(sed -n 's/.*issued rwts: total=\([0-9]*\),\([0-9]*\),.*/\1 \2/p' "$1")
  [ -n "$1" ] && [ "$1" = "$2" ]
}
