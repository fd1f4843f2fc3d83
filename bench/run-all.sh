#!/usr/bin/env bash
# Every benchmark, one after the other (never two at once: they would
# share the two cores and the figures would mean nothing). Each writes
# its own dated files into bench/results/ with the machine in them.
#
#   bench/run-all.sh                  everything (about 20 minutes here)
#   SKIP="fio-lab vhost-callgrind" bench/run-all.sh
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/install-deps.sh bench
for b in foundation raid bitmap vhost vhost-callgrind nvme fio-lab lab; do
  case " ${SKIP:-} " in *" $b "*) echo "== $b skipped"; continue ;; esac
  echo "== $b"
  "bench/run-$b.sh"
done
echo "== results in bench/results/"
ls -t bench/results | head -12
