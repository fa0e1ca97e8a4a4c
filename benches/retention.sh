#!/usr/bin/env bash
# The retention service at scale, as users run it: `cdrguard run` against a real broker
# on this machine, over a schedule topic holding 10,000,000 pending windows of 1,000,000
# subscribers. Three runs of the binary over the same topics:
#
#   A  rebuild: the time each partition takes to be read back (the run's own log line,
#      "retention timers read back", and the wall time from start until all are), and
#      the whole process's peak RSS (VmHWM) while holding the timers;
#   B  a million expiries due at once (the clock started at the deadline the first
#      million share or precede), fired while records keep arriving: sustained rate,
#      time to drain, and the longest a commit held the copies back (the run's
#      "expiry burst worked off" line);
#   C  the next deadline at normal load (about 1/365 of the windows), its lateness p99,
#      then control event to expiry committed, measured from outside by
#      `examples/retention_load.rs rights` (send an erasure, wait for its expiry as a
#      read_committed consumer).
#
# Usage: benches/retention.sh [SUBSCRIBERS] [PARTITIONS] [DUE]   (default 1000000 4 1000000)
# Work files (the broker's log, about 2 GB) go to $CDRGUARD_BENCH_DIR (default
# ~/.cache/cdrguard/bench)/retention and are removed at the end; the runs' logs are kept
# in retention-logs beside it.
set -euo pipefail
cd "$(dirname "$0")/.."

subscribers=${1:-1000000}
partitions=${2:-4}
due=${3:-1000000}
work=${CDRGUARD_BENCH_DIR:-$HOME/.cache/cdrguard/bench}/retention
port=${CDRGUARD_BENCH_PORT:-19392}

cargo build --release --quiet --bin cdrguard --example retention_load
rm -rf "$work"
mkdir -p "$work"
brokers=$(deploy/kafka/broker.sh start "$work/kafka" "$port" --watch $$)
# The runs' logs are kept beside the work folder; the broker's data is not.
trap 'deploy/kafka/broker.sh stop "$work/kafka" >/dev/null 2>&1 || true
      mkdir -p "$work-logs" && cp "$work"/*.log "$work-logs/" 2>/dev/null; rm -rf "$work"' EXIT

python3 benches/retention.py --brokers "$brokers" --work "$work" \
  --subscribers "$subscribers" --partitions "$partitions" --due "$due" --runs "${CDRGUARD_BENCH_RUNS:-ABC}"
