#!/usr/bin/env bash
# The RAID IO path of two trees side by side, interleaved, 3 rounds of
# `microbench raid` (4 RAM members, one reactor, QD 32, 4 KiB unless
# seqwrite). Usage: bench/run-compare-trees.sh OLD_REV [NEW_REV=HEAD].
# Builds each tree in a worktree under /tmp and prints JSON lines.
set -euo pipefail
cd "$(dirname "$0")/.."
old=${1:?old revision}; new=${2:-HEAD}
for rev in "$old" "$new"; do
  wt=/tmp/appliance-bench-$(git rev-parse --short "$rev")
  [ -d "$wt" ] || git worktree add -f "$wt" "$rev" >/dev/null
  (cd "$wt" && cargo build --release -q -p bench)
done
for round in 1 2 3; do
  for rev in "$old" "$new"; do
    mb=/tmp/appliance-bench-$(git rev-parse --short "$rev")/target/release/microbench
    for args in "--level 1 --rw randread" "--level 1 --rw randwrite" "--level 5 --rw randread" \
                "--level 5 --rw randwrite" "--level 5 --rw seqwrite" \
                "--level 5 --rw randwrite --journal --write-back --span-mib 16"; do
      # shellcheck disable=SC2086
      echo "{\"tree\":\"$rev\",\"round\":$round,\"args\":\"$args\",\"r\":$($mb raid $args --seconds 3)}"
    done
  done
done
