#!/usr/bin/env bash
# The fio lab, one line: each volume kind against the peer a user would
# pick instead, on the same RAM-backed files, in the same guest, repeated
# (medians and spread), with a table and a plot. See bench/lab/lab.py.
#
#   bench/run-lab.sh                                   everything, 3 repeats
#   bench/run-lab.sh --kinds raid5 --repeats 5 --runtime 10
#   bench/run-lab.sh --report-only bench/results/lab-DATE.jsonl   redraw
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/install-deps.sh test
deploy/install-deps.sh bench
if [[ " $* " != *" --report-only "* ]]; then
  cargo build --release -q -p appliance
fi
guest=$(deploy/vmrig/build-guest.sh | tail -1)
# The distribution's python sees python3-matplotlib (a pyenv one may not).
py=/usr/bin/python3
[ -x "$py" ] || py=python3
exec "$py" bench/lab/lab.py --guest "$guest" "$@"
