#!/usr/bin/env bash
# Replay as users run it, at scale: `cdrguard replay` over generated records, its peak
# RSS and its CPU time (user + sys, file I/O included) per record, against the pure JSON
# pipeline's time per record measured beside it (`examples/profile json 15`, before and
# after, same machine, same hour). Wall-clock figures move 3 to 4 times between these
# shared machines; the ratio is the figure that counts.
#
# Usage: benches/replay.sh [RECORDS] [SUBSCRIBERS]      (default 10000000 1000)
# Inputs are generated once and kept in $CDRGUARD_BENCH_DIR (default
# ~/.cache/cdrguard/bench): 10^7 records are 4.7 GB. The output (about 2.6 KB of copies
# per record: 26 GB for 10^7) is written beside them and removed afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

records=${1:-10000000}
subscribers=${2:-1000}
work=${CDRGUARD_BENCH_DIR:-$HOME/.cache/cdrguard/bench}/replay-$records-$subscribers
now=2026-02-01T00:00:00.000Z

cargo build --release --quiet --bin cdrguard --example profile
bin=target/release/cdrguard
profile=target/release/examples/profile
mkdir -p "$work"
if [ ! -f "$work/records.jsonl" ]; then
  echo "generating $records records of $subscribers subscribers into $work" >&2
  "$bin" generate --records "$records" --subscribers "$subscribers" \
    --out-records "$work/records.jsonl" --out-control "$work/control.jsonl" >&2
fi
[ -f "$work/keys.toml" ] || "$bin" keys generate --out "$work/keys.toml" >&2
rm -rf "$work/out"

# One child's CPU time and peak RSS, without GNU time (not on every machine).
measure() {
  python3 - "$@" <<'PY'
import resource, subprocess, sys, time
t = time.monotonic()
p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)
wall = time.monotonic() - t
r = resource.getrusage(resource.RUSAGE_CHILDREN)
print(p.returncode, r.ru_utime, r.ru_stime, r.ru_maxrss, wall)
PY
}

json_ns() { "$profile" json 15 | sed -E 's/^json: ([0-9]+) ns per record.*/\1/'; }

before=$(json_ns)
read -r status user sys rss_kb wall < <(measure "$bin" replay --policy policies/excedo.toml \
  --input "$work/records.jsonl" --control "$work/control.jsonl" --now "$now" \
  --out "$work/out" --keys "$work/keys.toml")
after=$(json_ns)
rm -rf "$work/out"
[ "$status" = 0 ] || { echo "replay failed with status $status" >&2; exit 1; }

python3 - "$records" "$subscribers" "$user" "$sys" "$rss_kb" "$wall" "$before" "$after" <<'PY'
import sys
records, subscribers = int(sys.argv[1]), int(sys.argv[2])
user, sys_, rss_kb, wall = map(float, sys.argv[3:7])
before, after = int(sys.argv[7]), int(sys.argv[8])
json_ns = (before + after) / 2
per_record = (user + sys_) / records * 1e9
print(f"replay of {records:,} records, {subscribers:,} subscribers (excedo, --now 2026-02-01):")
print(f"  peak RSS          {rss_kb / 1024:8.1f} MiB")
print(f"  wall              {wall:8.1f} s")
print(f"  CPU user + sys    {user:8.1f} + {sys_:.1f} s = {per_record:,.0f} ns per record")
print(f"  JSON pipeline     {json_ns:8.0f} ns per record (profile json 15: {before} before, {after} after)")
print(f"  ratio             {per_record / json_ns:8.2f} x (target <= 2.5)")
PY
