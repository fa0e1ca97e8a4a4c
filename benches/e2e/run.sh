#!/usr/bin/env bash
# The end-to-end benchmark (BENCHMARKS.md "End to end"): one real broker on this
# machine, the input loaded once (generated records and consent for 1,000,000
# subscribers), then, one after another and alternating, each contender from the start
# of the input with a fresh group and fresh output topics:
#
#   cdrguard-eo    cdrguard run, exactly once
#   cdrguard-alo   cdrguard run, at least once
#   cdrguard-eo-x2 two cdrguard instances in one group, exactly once (the scale run)
#   relay          the no-op exactly-once relay (benches/e2e/relay.rs)
#   relay-headers  the same relay with a cdrguard copy's nine Kafka headers on each copy
#                  (what the headers alone cost)
#   kafka-streams  the Kafka Streams peer (benches/peers/kafka-streams/run.sh), if present
#
# Usage: benches/e2e/run.sh [--smoke] [--records N] [--subscribers N] [--reps R]
#                           [--live-seconds S] [--live-rate R] [--contenders a,b,...]
#                           [--out DIR] [--no-plots] [--client-property KEY=VALUE]...
#   --client-property: a librdkafka property for every client of every contender (the
#   config's [kafka.properties]), e.g. compression.type=lz4.
#   --smoke: 3,000 records, consent for 2,000 subscribers, 1 repetition, no plots
#   (what CI runs, under 3 minutes).
#
# Results (results.json, e2e.png) go to --out (default benches/e2e/results, or the work
# folder's results-smoke for --smoke). Work files (the broker's log, generated input) go
# to $CDRGUARD_BENCH_DIR (default ~/.cache/cdrguard/bench)/e2e and are removed at the
# end; the runs' logs are kept in e2e-logs beside it. Plots need matplotlib, installed
# from PyPI into ~/.cache/cdrguard/e2e-venv on first use.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD

smoke=""; plots=1; out=""; pass=(); contenders=kafka-streams
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) smoke=1; plots=""; shift ;;
    --no-plots) plots=""; shift ;;
    --out) out=$2; shift 2 ;;
    --contenders) contenders=$2; pass+=("$1" "$2"); shift 2 ;;
    --records|--subscribers|--reps|--live-seconds|--live-rate|--partitions|--commit-interval-ms|--client-property)
      pass+=("$1" "$2"); shift 2 ;;
    *) echo "run.sh: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done

base=${CDRGUARD_BENCH_DIR:-$HOME/.cache/cdrguard/bench}
work=$base/e2e
if [ -z "$out" ]; then
  if [ -n "$smoke" ]; then out=$base/e2e-results-smoke; else out=$root/benches/e2e/results; fi
fi

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}
profile=${CDRGUARD_E2E_PROFILE:-release}
if [ "$profile" = debug ]; then
  cargo build --quiet --bin cdrguard --example relay --example e2e_meter
else
  cargo build --profile "$profile" --quiet --bin cdrguard --example relay --example e2e_meter
fi
# The Kafka Streams peer's jar (Maven), now rather than inside its first timed run.
if [[ ",$contenders," == *,kafka-streams,* ]]; then
  benches/peers/kafka-streams/run.sh --build
fi

python=python3
if [ -n "$plots" ]; then
  venv=${XDG_CACHE_HOME:-$HOME/.cache}/cdrguard/e2e-venv
  if ! "$venv/bin/python" -c 'import matplotlib' 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet matplotlib
  fi
  python=$venv/bin/python
fi

rm -rf "$work"
mkdir -p "$work"
brokers=$(deploy/kafka/broker.sh start "$work/kafka" ${CDRGUARD_BENCH_PORT:-} --watch $$)
trap 'deploy/kafka/broker.sh stop "$work/kafka" >/dev/null 2>&1 || true
      rm -rf "$work-logs"; mkdir -p "$work-logs"; cp "$work"/*.log "$work-logs/" 2>/dev/null; rm -rf "$work"' EXIT

status=0
"$python" benches/e2e/run.py --brokers "$brokers" --work "$work" --out "$out" \
  --broker-pid "$(cat "$work/kafka/broker.pid")" ${smoke:+--smoke} ${plots:+--plots} \
  --command "benches/e2e/run.sh${smoke:+ --smoke}${pass[*]:+ ${pass[*]}}" "${pass[@]}" || status=$?
echo
echo "smoke command (for CI): benches/e2e/run.sh --smoke"
exit $status
