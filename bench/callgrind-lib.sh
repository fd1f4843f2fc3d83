# Sourced by the callgrind benchmarks: a backend's userspace instructions
# per 4 KiB random read it serves over vhost-user-blk on $sock. Each
# backend runs under valgrind once idle (baseline) and once driven by this
# tree's vhostbench; (driven - idle) / IOs is its cost per IO.

count() { # label, drive(0/1), backend command... -> "instructions ios"
  local label=$1 drive=$2; shift 2
  rm -f "$sock"
  valgrind --tool=callgrind --callgrind-out-file=/dev/null "$@" >/dev/null 2>/tmp/cg.$label.$drive &
  local pid=$!
  for _ in $(seq 600); do [ -S "$sock" ] && break; sleep 0.1; done
  local ios=0
  if [ "$drive" = 1 ]; then
    ios=$(target/release/vhostbench --socket "$sock" --backend-pid $pid --rw randread --core 1 --seconds 5 --warmup 0 | python3 -c 'import json,sys; print(json.load(sys.stdin)["ios"])')
  else
    sleep 1
  fi
  kill -TERM $pid; wait $pid 2>/dev/null || true
  local ir
  ir=$(sed -n 's/.*Collected : \([0-9]*\).*/\1/p' /tmp/cg.$label.$drive)
  echo "$ir $ios"
}

per_io() { # label, backend command... -> "instructions-per-io ios"
  local label=$1; shift
  local i0 i1 n
  read -r i0 _ < <(count "$label" 0 "$@")
  read -r i1 n < <(count "$label" 1 "$@")
  echo "$(( (i1 - i0) / n )) $n"
}
