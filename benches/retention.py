"""The retention benchmark's runs (see benches/retention.sh, which builds, starts the
broker and calls this). Every figure printed is read from the product as it runs: its own
log lines (JSON), /proc for its memory, and an outside consumer for control-to-expiry."""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target/release/cdrguard")
LOAD = os.path.join(ROOT, "target/release/examples/retention_load")
PREFIX = "rb"


def instant(s):
    return datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)


def text(t):
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def config(a, name, clock_start):
    routes = "".join(
        f'{p} = "{PREFIX}.{p}"\n'
        for p in ["billing", "fraud", "analytics", "marketing", "troubleshooting", "customer_care"]
    )
    path = os.path.join(a.work, f"{name}.toml")
    with open(path, "w") as f:
        f.write(
            f"""[kafka]
brokers = "{a.brokers}"
group_id = "{PREFIX}.group"
transactional_id = "{PREFIX}.txn"

[topics]
input = "{PREFIX}.raw"
control = "{PREFIX}.control"
dead_letter = "{PREFIX}.dead"
retention_schedule = "{PREFIX}.schedule"
retention = "{PREFIX}.retention"

[topics.routes]
{routes}
[processing]
policy = "{ROOT}/policies/excedo.toml"
key_file = "{a.work}/keys.toml"

[retention]
clock_start = "{clock_start}"
"""
        )
    return path


class Run:
    """`cdrguard run` in the background, its JSON log lines read as they come."""

    def __init__(self, a, name, clock_start):
        self.log_path = os.path.join(a.work, f"{name}.log")
        self.log = open(self.log_path, "w")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [BIN, "run", "--config", config(a, name, clock_start), "--log-format", "json"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.reader = open(self.log_path)
        self.lines = []
        self.peak_rss_kb = 0

    def poll(self):
        """New log lines, parsed; samples the RSS too."""
        for line in self.reader.readlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            fields = ev.get("fields", ev)
            fields["_at"] = time.monotonic() - self.started
            self.lines.append(fields)
        self.peak_rss_kb = max(self.peak_rss_kb, self.status("VmHWM"))
        if self.proc.poll() is not None:
            sys.exit(f"cdrguard run stopped early; see {self.log_path}")

    def status(self, field):
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def wait_for(self, what, done, timeout):
        """Polls until `done(lines)` gives a value."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.poll()
            got = done(self.lines)
            if got:
                return got
            time.sleep(0.1)
        self.stop()
        sys.exit(f"timed out after {timeout} s waiting for {what}; see {self.log_path}")

    def stop(self):
        self.poll()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


def messages(lines, msg):
    return [l for l in lines if l.get("message") == msg]


def wait_read_back(run, partitions):
    lines = run.wait_for(
        "every partition's timers read back",
        lambda ls: (m := messages(ls, "retention timers read back")) and len(m) >= partitions and m,
        600,
    )
    return lines[:partitions]


def load_records(a, seed, clock):
    """200,000 generated records of 20,000 subscribers over the day before `clock`'s."""
    records = os.path.join(a.work, f"records-{seed}.jsonl")
    day = clock.replace(hour=0, minute=0, second=0, microsecond=0)
    subprocess.run(
        [BIN, "generate", "--records", "200000", "--subscribers", "20000", "--days", "1",
         "--seed", str(seed), "--start", text(day - timedelta(days=1)), "--out-records", records,
         "--out-control", os.path.join(a.work, "control-unused.jsonl")],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    return records


def bursts(lines):
    return messages(lines, "expiry burst worked off")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--brokers", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--subscribers", type=int, default=1_000_000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--due", type=int, default=1_000_000, help="expiries due at once in run B")
    ap.add_argument("--runs", default="ABC", help="which runs (A, B, C) to make")
    a = ap.parse_args()
    keys = os.path.join(a.work, "keys.toml")
    subprocess.run([BIN, "keys", "generate", "--out", keys], check=True, stdout=subprocess.DEVNULL)
    topics = config(a, "topics", "2026-01-01T00:00:00.000Z")
    subprocess.run(
        [BIN, "topics", "--config", topics, "--partitions", str(a.partitions), "--replication", "1"],
        check=True,
        stdout=subprocess.DEVNULL,
    )

    print(f"filling {PREFIX}.schedule: {a.subscribers} subscribers, {a.partitions} partitions", flush=True)
    out = subprocess.run(
        [LOAD, "fill", "--brokers", a.brokers, "--topic", f"{PREFIX}.schedule",
         "--partitions", str(a.partitions), "--subscribers", str(a.subscribers), "--keys", keys,
         "--due", str(a.due)],
        check=True, capture_output=True, text=True,
    ).stdout
    print(out.strip(), flush=True)
    fill = dict(kv.split("=", 1) for kv in out.split())
    due_at = instant(fill["due_at"])
    next_at = instant(fill["next_deadline"])

    # A: rebuild, nothing due (the clock at the windows' first day).
    if "A" in a.runs:
        run_a(a, topics)
    if "B" in a.runs:
        run_b(a, topics, due_at)
    if "C" in a.runs:
        run_c(a, keys, next_at)


def run_a(a, topics):
    run = Run(a, "a", "2026-01-01T00:00:00.000Z")
    read = wait_read_back(run, a.partitions)
    all_read_s = read[-1]["_at"]
    time.sleep(5)
    run.poll()
    rss_holding_kb = run.status("VmRSS")
    a_peak = run.peak_rss_kb
    # The baseline for B: how long commits hold the copies back with records arriving
    # and nothing due (the same load B fires its burst under).
    before = len(run.lines)
    producer = subprocess.Popen(
        [BIN, "produce", "--config", topics, "--records", load_records(a, 4, instant("2026-01-01T00:00:00.000Z"))],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    while producer.poll() is None:
        run.poll()
        time.sleep(0.5)
    run.wait_for("a progress line after the load", lambda ls: len(messages(ls[before:], "progress")) >= 2, 60)
    baseline_hold = max(int(l.get("commit_hold_max_ms", 0)) for l in messages(run.lines[before:], "progress"))
    run.stop()
    took = [int(l["took_ms"]) for l in read]
    windows = sum(int(l["windows"]) for l in read)
    print(f"A rebuild: {windows} windows, {sum(int(l['messages']) for l in read)} messages; "
          f"per partition took_ms={took}; all read back {all_read_s:.1f} s after start; "
          f"peak RSS {a_peak / 1024:.0f} MiB, RSS holding them {rss_holding_kb / 1024:.0f} MiB; "
          f"then 200,000 records routed with nothing due: longest commit hold {baseline_hold} ms", flush=True)


def run_b(a, topics, due_at):
    """The first million (--due) due at once, records arriving meanwhile."""
    records = load_records(a, 3, due_at)
    run = Run(a, "b", text(due_at))
    wait_read_back(run, a.partitions)
    producer = subprocess.Popen(
        [BIN, "produce", "--config", topics, "--records", records],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    burst = run.wait_for(
        "the expiries due at once",
        lambda ls: [b for b in bursts(ls) if int(b["expiries"]) >= a.due],
        1200,
    )[0]
    producer.wait()
    time.sleep(12)  # one progress line after the burst
    run.stop()
    progress = messages(run.lines, "progress") or [{}]
    routed = re.search(r"records=(\d+)", progress[-1].get("stats", "")) if progress else None
    print(f"B fire: {burst['expiries']} expiries in {int(burst['took_ms']) / 1000:.1f} s "
          f"({burst['per_second']}/s) over {burst['commits']} commits; longest commit held the "
          f"copies {burst['commit_hold_max_ms']} ms (commit_interval_ms 100); "
          f"records routed meanwhile {routed.group(1) if routed else '?'}; peak RSS "
          f"{run.peak_rss_kb / 1024:.0f} MiB", flush=True)


def run_c(a, keys, next_at):
    """The next deadline at normal load, then rights."""
    run = Run(a, "c", text(next_at - timedelta(seconds=90)))
    wait_read_back(run, a.partitions)
    burst = run.wait_for("the next deadline's expiries", bursts, 300)[0]
    print(f"C next deadline: {burst['expiries']} expiries due at once, committed within "
          f"p99 {burst['lateness_p99_ms']} ms / max {burst['lateness_max_ms']} ms after it "
          f"({burst['took_ms']} ms to fire)", flush=True)
    out = subprocess.run(
        [LOAD, "rights", "--brokers", a.brokers, "--control", f"{PREFIX}.control",
         "--retention", f"{PREFIX}.retention", "--subscribers", str(a.subscribers),
         "--keys", keys, "--events", "200", "--at", text(next_at - timedelta(hours=1))],
        check=True, capture_output=True, text=True,
    ).stdout
    run.stop()
    print(f"C rights, erasure sent to expiry seen by a read_committed consumer: {out.strip()}", flush=True)


if __name__ == "__main__":
    main()
