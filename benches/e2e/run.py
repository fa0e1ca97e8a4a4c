"""The end-to-end benchmark's driver (see benches/e2e/run.sh, which builds, starts the
broker and calls this; BENCHMARKS.md "End to end" says what each figure means).

Loads the input once, then runs each contender one after another, alternating, each
from the start of the input with a fresh group and fresh output topics:

  full  drain the preloaded input: sustained records/s from the group's committed
        offsets (polled every second), CPU and peak RSS from /proc, and for every copy
        of one route the time from its CreateTime to a read_committed probe seeing it;
  live  a paced producer feeds new records at half of cdrguard's measured rate into a
        fresh input topic: record-to-committed latency (send instant to copy seen).
"""

import argparse
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from datetime import datetime, timedelta, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
# The build profile's folder: release for figures; CI's smoke run uses the debug build
# `cargo test` made (CDRGUARD_E2E_PROFILE=debug), checking the script, not the speed.
PROFILE = os.environ.get("CDRGUARD_E2E_PROFILE", "release")
BIN = os.path.join(TARGET, PROFILE, "cdrguard")
RELAY = os.path.join(TARGET, PROFILE, "examples/relay")
METER = os.path.join(TARGET, PROFILE, "examples/e2e_meter")
PEER = os.path.join(ROOT, "benches/peers/kafka-streams/run.sh")
PURPOSES = ["billing", "fraud", "analytics", "marketing", "troubleshooting", "customer_care"]
INPUT = "e2e.raw"
CONTROL = "e2e.control"
PROBE_ROUTE = "billing"  # one copy per valid record, carries record_id
CLK_TCK = os.sysconf("SC_CLK_TCK")
WARMUP = 200
# Contenders that run as several cdrguard instances in one group (the scale run).
INSTANCES = {"cdrguard-eo-x2": 2}


# ---------------------------------------------------------------- configuration


def args_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--brokers", required=True)
    ap.add_argument("--work", required=True, help="scratch folder (configs, logs, generated files)")
    ap.add_argument("--broker-pid", type=int, help="the broker's pid, for its CPU")
    ap.add_argument("--records", type=int, default=5_000_000)
    ap.add_argument("--subscribers", type=int, default=1_000_000, help="consent for this many")
    ap.add_argument("--partitions", type=int, default=6)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--commit-interval-ms", type=int, default=100)
    ap.add_argument("--live-seconds", type=float, default=20)
    ap.add_argument("--live-rate", type=float, help="records/s of the live phase (default: half of cdrguard's)")
    ap.add_argument("--contenders", default="cdrguard-eo,cdrguard-alo,cdrguard-eo-x2,relay,relay-headers,kafka-streams")
    ap.add_argument("--out", required=True, help="where results.json (and the plots) go")
    ap.add_argument("--plots", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="a few thousand records, 1 repetition")
    ap.add_argument("--client-property", action="append", default=[], metavar="KEY=VALUE",
                    help="a librdkafka property for every client of every contender "
                         "(e.g. compression.type=lz4; repeatable)")
    ap.add_argument("--command", default="", help="the command line, for the results")
    return ap


def config_text(a, prefix, input_topic, guarantee):
    routes = "".join(f'{p} = "{prefix}.{p}"\n' for p in PURPOSES)
    return f"""[kafka]
brokers = "{a.brokers}"
group_id = "{prefix}.group"
transactional_id = "{prefix}.txn"
guarantee = "{guarantee}"

{client_properties(a)}
[topics]
input = "{input_topic}"
control = "{CONTROL}"
dead_letter = "{prefix}.dead"
retention_schedule = "{prefix}.schedule"
retention = "{prefix}.retention"

[topics.routes]
{routes}
[processing]
policy = "{ROOT}/policies/excedo.toml"
key_file = "{a.work}/keys.toml"
commit_interval_ms = {a.commit_interval_ms}

[telemetry]
listen = "127.0.0.1:0"
log_format = "json"
"""


def client_properties(a):
    """--client-property settings as the config's [kafka.properties], which cdrguard, the
    relay (it reads the same file) and the Kafka Streams peer (peer_client_properties)
    apply to every client alike."""
    if not a.client_property:
        return ""
    lines = ["[kafka.properties]"]
    for kv in a.client_property:
        k, _, v = kv.partition("=")
        lines.append(f'"{k}" = "{v}"')
    return "\n".join(lines) + "\n"


def write_config(a, prefix, input_topic=INPUT, guarantee="exactly_once"):
    path = os.path.join(a.work, f"{prefix}.toml")
    with open(path, "w") as f:
        f.write(config_text(a, prefix, input_topic, guarantee))
    return path


def output_topics(prefix):
    return [f"{prefix}.{p}" for p in PURPOSES] + [f"{prefix}.{t}" for t in ("dead", "schedule", "retention")]


def run_quiet(cmd, **kw):
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def create_topics(a, config):
    run_quiet([BIN, "topics", "--config", config, "--partitions", str(a.partitions), "--replication", "1"])


def delete_topics(a, topics):
    run_quiet([METER, "--brokers", a.brokers, "delete", "--topics", ",".join(topics)])


# ---------------------------------------------------------------- the input


def recent_start(days):
    return (datetime.now(timezone.utc) - timedelta(days=days)).strftime("%Y-%m-%dT00:00:00.000Z")


def generate(a, records, subscribers, seed, name):
    out_records = os.path.join(a.work, f"{name}.jsonl")
    out_control = os.path.join(a.work, f"{name}-control.jsonl")
    run_quiet([BIN, "generate", "--records", str(records), "--subscribers", str(subscribers),
               "--days", "3", "--start", recent_start(3), "--seed", str(seed),
               "--out-records", out_records, "--out-control", out_control])
    return out_records, out_control


def load_input(a):
    """Consent for a.subscribers into the control topic, a.records records into the input
    topic: once for every run. Returns the number of input messages."""
    run_quiet([BIN, "keys", "generate", "--out", os.path.join(a.work, "keys.toml")])
    config = write_config(a, "e2e.load")
    create_topics(a, config)
    delete_topics(a, output_topics("e2e.load"))
    t = time.monotonic()
    # The generator draws records from at most as many subscribers as records, so the
    # consent comes from a generation of its own when there are fewer records.
    records_file, control_file = generate(a, a.records, min(a.records, a.subscribers), 8, "input")
    if a.records < a.subscribers:
        consent_records, control_file = generate(a, a.subscribers, a.subscribers, 8, "consent")
        os.remove(consent_records)
    print(f"generated in {time.monotonic() - t:.0f} s", flush=True)
    t = time.monotonic()
    out = run_quiet([BIN, "produce", "--config", config, "--control", control_file, "--records", records_file]).stdout
    print(f"produced in {time.monotonic() - t:.0f} s: {out.strip()}", flush=True)
    os.remove(records_file)
    os.remove(control_file)
    return a.records


# ---------------------------------------------------------------- /proc


def tree(pid):
    """pid and its descendants."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids):
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total / CLK_TCK


def peak_rss_kb(pids):
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


# ---------------------------------------------------------------- contenders


def fanout_args(fanout, prefix):
    """--route arguments for the relay: the same messages per record, per topic."""
    args = []
    for suffix, rate in sorted(fanout.items()):
        if rate > 0:
            args += ["--route", f"{prefix}.{suffix}={rate:.6f}"]
    return args


# What cdrguard's librdkafka producer sets (src/adapters/kafka/mod.rs, producer_config)
# and Kafka Streams sets otherwise by default: Streams lingers 100 ms, cdrguard 5 ms.
# The rest already agree under exactly_once_v2 (acks=all, idempotence, read_committed,
# earliest, transaction.timeout.ms 10,000); librdkafka's prefetch and queue settings
# have no Java equivalent.
PEER_CLIENT_SETTINGS = {"producer.linger.ms": "5"}
PEER_GUARANTEE = {"exactly_once": "exactly_once_v2", "at_least_once": "at_least_once"}


def peer_client_properties(kafka):
    """cdrguard's client properties in Kafka Streams' terms: [kafka.properties] go to
    every client, consumer_ and producer_properties under Streams' prefixes."""
    out = dict(kafka.get("properties", {}))
    out.update({f"consumer.{k}": v for k, v in kafka.get("consumer_properties", {}).items()})
    out.update({f"producer.{k}": v for k, v in kafka.get("producer_properties", {}).items()})
    return out


def peer_args(config):
    """The Kafka Streams peer's arguments (BOOTSTRAP KEY=VALUE...) for the TOML that
    cdrguard runs with, so that both read the same settings from the same file."""
    with open(config, "rb") as f:
        cfg = tomllib.load(f)
    kafka, topics, processing = cfg["kafka"], cfg["topics"], cfg["processing"]
    if os.path.basename(processing["policy"]) != "excedo.toml":
        raise ValueError(f"the Kafka Streams peer implements Excedo only, not {processing['policy']}")
    settings = {
        "application.id": kafka["group_id"],  # also its consumer group, which the poller reads
        "processing.guarantee": PEER_GUARANTEE[kafka.get("guarantee", "exactly_once")],
        "input.topic": topics["input"],
        "control.topic": topics["control"],
        "dead.letter.topic": topics["dead_letter"],
        "key.file": processing["key_file"],
        "commit.interval.ms": str(processing.get("commit_interval_ms", 100)),
        # Fresh per run, beside the config: each run reads the consent table anew, as cdrguard does.
        "state.dir": os.path.splitext(config)[0] + ".state",
    }
    settings.update({f"topic.{p}": t for p, t in topics["routes"].items()})
    settings.update(PEER_CLIENT_SETTINGS)
    settings.update(peer_client_properties(kafka))
    return [kafka["brokers"]] + [f"{k}={v}" for k, v in settings.items()]


def contender_command(name, config, fanout, prefix):
    if name.startswith("cdrguard"):
        # CDRGUARD_E2E_PERF=DIR records a perf profile of each cdrguard run into DIR (its
        # figures then include perf's overhead: for finding costs, not for quoting).
        perf = os.environ.get("CDRGUARD_E2E_PERF")
        # CDRGUARD_E2E_PERF_ARGS replaces the sampling options (e.g. "-F 199 --call-graph dwarf").
        opts = os.environ.get("CDRGUARD_E2E_PERF_ARGS", "-F 499 -g").split()
        wrap = ["perf", "record", *opts, "-o", os.path.join(perf, f"{prefix}.data"), "--"] if perf else []
        return wrap + [BIN, "run", "--config", config]
    if name == "relay":
        return [RELAY, "--config", config] + fanout_args(fanout, prefix)
    if name == "relay-headers":
        return [RELAY, "--config", config, "--copy-headers"] + fanout_args(fanout, prefix)
    if name == "kafka-streams":
        return [PEER] + peer_args(config)
    raise ValueError(name)


class Instances:
    """The processes of one contender that runs as several instances in one consumer
    group (cdrguard-eo-x2): polled, measured and stopped together."""

    def __init__(self, procs):
        self.procs = procs
        self.pid = procs[0].pid
        self.log_path = procs[0].log_path
        self.log_paths = [p.log_path for p in procs]
        self.returncode = None

    def poll(self):
        for p in self.procs:
            code = p.poll()
            if code is not None:
                self.returncode = code
                return code
        return None


def instance_config(config, n):
    """A copy of a cdrguard TOML file for instance n (n > 1): same group, its own
    transactional id."""
    with open(config) as f:
        text = f.read()
    path = config.replace(".toml", f".{n}.toml")
    with open(path, "w") as f:
        f.write(re.sub(r'^transactional_id = "(.*)"$', rf'transactional_id = "\1-{n}"', text, flags=re.M))
    return path


def start(a, name, config, fanout, prefix, tag):
    if name in INSTANCES:
        procs = [start(a, "cdrguard-eo", config if n == 1 else instance_config(config, n), fanout, prefix,
                       tag if n == 1 else f"{tag}.{n}") for n in range(1, INSTANCES[name] + 1)]
        return Instances(procs)
    log = open(os.path.join(a.work, f"{tag}.log"), "w")
    proc = subprocess.Popen(contender_command(name, config, fanout, prefix), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    proc.log_path = log.name
    return proc


def pids_of(proc):
    """The process trees of a contender's processes."""
    if isinstance(proc, Instances):
        return [p for q in proc.procs for p in tree(q.pid)]
    return tree(proc.pid)


def stop(proc, timeout=60):
    if isinstance(proc, Instances):
        # Both at once: a rebalance onto the one still running would only slow the stop.
        for p in proc.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = [stop(p, timeout) for p in proc.procs]
        return next((c for c in codes if c), 0)
    if proc.poll() is None:
        if os.environ.get("CDRGUARD_E2E_PERF"):
            os.killpg(proc.pid, signal.SIGTERM)  # perf and the contender under it
        else:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def stop_meter(proc):
    """Stops an instrument and returns its last JSON line."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    lines = [l for l in out.splitlines() if l.startswith("{")]
    if not lines:
        raise RuntimeError(f"instrument gave no result: {err.strip()}")
    return json.loads(lines[-1])


def counters(text):
    """The integer NAME=N tokens of a counter line (cdrguard's and the peer's shape:
    "records=N dead_letters=N copies[billing=N ...] ...")."""
    out = {}
    for tok in text.replace("copies[", "").replace("]", "").split():
        k, _, v = tok.partition("=")
        if v.isdigit():
            out[k] = int(v)
    return out


def cdrguard_stats(log_path):
    """The counters of cdrguard's "stopped" (or last "progress") log line."""
    stats = None
    with open(log_path) as f:
        for line in f:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            fields = ev.get("fields", ev)
            if fields.get("message") in ("stopped", "progress") and "stats" in fields:
                stats = fields["stats"]
    return None if stats is None else counters(stats)


def peer_stats(log_path):
    """The counters of the Kafka Streams peer's last counter line (its "stopped" line).
    They count messages handed to Kafka Streams, so work redone after an abort twice."""
    with open(log_path) as f:
        lines = [l for l in f if " cdrguard-streams-peer " in l and "records=" in l]
    return counters(lines[-1]) if lines else None


def relay_stats(log_path):
    """The relay's last JSON line."""
    with open(log_path) as f:
        relayed = [json.loads(l) for l in f if l.startswith("{")]
    return relayed[-1] if relayed else None


def contender_stats(name, log_path, log_paths=None):
    if name in INSTANCES:
        # The instances' counters added up: each counts what it committed.
        total = {}
        for path in log_paths or [log_path]:
            for k, v in (cdrguard_stats(path) or {}).items():
                total[k] = total.get(k, 0) + v
        return total or None
    if name.startswith("cdrguard"):
        return cdrguard_stats(log_path)
    if name.startswith("relay"):
        return relay_stats(log_path)
    return peer_stats(log_path)


def fanout_of(stats):
    """Messages per input record, by topic suffix, from cdrguard's counters."""
    consumed = stats["records"] + stats["dead_letters"]
    f = {p: stats.get(p, 0) / consumed for p in PURPOSES}
    f["schedule"] = stats.get("windows", 0) / consumed
    f["dead"] = stats["dead_letters"] / consumed
    f["retention"] = stats.get("expiries", 0) / consumed
    return f


def topic_bytes(a, topics):
    """Bytes on the broker's disk of these topics' logs."""
    data = os.path.join(a.work, "kafka", "data")
    total = 0
    for d in os.listdir(data) if os.path.isdir(data) else []:
        if d.rsplit("-", 1)[0] in topics:
            for root, _, files in os.walk(os.path.join(data, d)):
                total += sum(os.path.getsize(os.path.join(root, x)) for x in files if x.endswith(".log"))
    return total


# ---------------------------------------------------------------- phases


def sustained(series, total):
    """Records/s and CPU between 10% and 90% of the input committed."""
    def first_at(share):
        return next((s for s in series if s["committed"] >= share * total), None)

    lo, hi = first_at(0.1), first_at(0.9)
    if lo is None or hi is None or hi["t"] <= lo["t"]:
        # Too short for a window of its own (smoke runs): first to last progress.
        moved = [s for s in series if s["committed"] > 0]
        if len(moved) < 1:
            return None
        lo, hi = series[0], moved[-1]
        if hi["t"] <= lo["t"]:
            return None
    records = hi["committed"] - lo["committed"]
    secs = hi["t"] - lo["t"]
    return {
        "records_per_s": records / secs,
        "cpu_s_per_million": (hi["cpu"] - lo["cpu"]) / max(records, 1) * 1e6,
        "broker_cpu_s_per_million": (hi["broker_cpu"] - lo["broker_cpu"]) / max(records, 1) * 1e6,
        "window_s": secs,
    }


def broker_counts(a):
    """The broker's own request, message and byte counters (BrokerRequests.java, over
    JMX), or None where they cannot be read (no JDK's attach API, no broker pid)."""
    if not a.broker_pid:
        return None
    try:
        out = run_quiet(["java", os.path.join(ROOT, "benches", "e2e", "BrokerRequests.java"),
                         str(a.broker_pid)], timeout=60)
        return json.loads(out.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        print(f"broker counters not read: {e}", file=sys.stderr)
        return None


def counts_between(before, after):
    """What the broker served between two broker_counts readings."""
    if not before or not after:
        return None
    req = {k: v - before["requests"].get(k, 0) for k, v in after["requests"].items()}
    out = {k: after[k] - before[k] for k in ("messages_in", "bytes_in", "bytes_out")}
    out["requests"] = {k: v for k, v in sorted(req.items()) if v > 0}
    return out


class BrokerRecording:
    """CDRGUARD_E2E_BROKER_JFR=DIR: a Java Flight Recorder record of the broker for one
    phase of one run, written to DIR/<tag>.jfr (`jfr print --events jdk.ExecutionSample`
    reads it; benches/e2e/jfr_top.py sums it up). For finding where the broker's CPU
    goes, not for quoting figures: the recorder costs the broker a little."""

    def __init__(self, a, tag):
        self.dir = os.environ.get("CDRGUARD_E2E_BROKER_JFR")
        self.pid, self.tag = a.broker_pid, tag
        if self.dir and self.pid:
            os.makedirs(self.dir, exist_ok=True)
            # A sample every millisecond (the profile settings' 10 ms gives a few hundred
            # samples a run, too few to compare contenders by).
            run_quiet(["jcmd", str(self.pid), "JFR.start", f"name={tag}", "settings=profile",
                       "jdk.ExecutionSample#period=1ms", "jdk.NativeMethodSample#enabled=false"])

    def stop(self):
        if self.dir and self.pid:
            path = os.path.join(os.path.abspath(self.dir), f"{self.tag}.jfr")
            run_quiet(["jcmd", str(self.pid), "JFR.stop", f"name={self.tag}", f"filename={path}"])


def full_phase(a, name, rep, total, fanout):
    """Drains the preloaded input; returns the run's figures."""
    prefix = f"e2e.{rep}.{name}.full"
    guarantee = "at_least_once" if name == "cdrguard-alo" else "exactly_once"
    config = write_config(a, prefix, INPUT, guarantee)
    create_topics(a, config)
    probe = subprocess.Popen([METER, "--brokers", a.brokers, "probe", "--topic", f"{prefix}.{PROBE_ROUTE}"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    poller = subprocess.Popen([METER, "--brokers", a.brokers, "offsets", "--group", f"{prefix}.group",
                               "--topic", INPUT], stdout=subprocess.PIPE, text=True, bufsize=1)
    os.set_blocking(poller.stdout.fileno(), False)
    counts_before = broker_counts(a)
    started = time.monotonic()
    recording = BrokerRecording(a, prefix)
    proc = start(a, name, config, fanout, prefix, prefix)
    series, rss, failed = [], 0, None
    deadline = started + max(180, total / 500)
    while True:
        time.sleep(0.25)
        pids = pids_of(proc)
        rss = max(rss, peak_rss_kb(pids))
        cpu = cpu_seconds(pids)
        bcpu = cpu_seconds([a.broker_pid]) if a.broker_pid else 0.0
        for line in poller.stdout.readlines() if poller.stdout else []:
            s = json.loads(line)
            series.append({"t": s["t_ms"] / 1000, "committed": s["committed"], "cpu": cpu, "broker_cpu": bcpu})
        if series and series[-1]["committed"] >= total:
            break
        if proc.poll() is not None:
            failed = f"exited with {proc.returncode} (log {proc.log_path})"
            break
        if time.monotonic() > deadline:
            failed = f"did not finish within {deadline - started:.0f} s (log {proc.log_path})"
            break
    recording.stop()
    code = stop(proc)
    time.sleep(1)  # the probe sees the last commit
    poller.send_signal(signal.SIGTERM)
    poller.wait(timeout=30)
    latency = stop_meter(probe)
    # Includes the probe's and the offsets poller's requests (a few per second, alike for
    # every contender) and the broker's own (heartbeats, metadata).
    requests = counts_between(counts_before, broker_counts(a))
    out_bytes = topic_bytes(a, output_topics(prefix))
    stats = contender_stats(name, proc.log_path, getattr(proc, "log_paths", None))
    delete_topics(a, output_topics(prefix))
    t0 = series[0]["t"] if series else 0
    result = {
        "contender": name, "rep": rep, "phase": "full", "failed": failed, "exit": code,
        "peak_rss_mb": rss / 1024, "latency": latency, "stats": stats, "broker": requests,
        "output_bytes_per_record": out_bytes / max(total, 1),
        "series": [[round(s["t"] - t0, 3), s["committed"]] for s in series],
        "cpu_s_total": series[-1]["cpu"] if series else None,
    }
    result.update(sustained(series, total) or {})
    return result


def live_phase(a, name, rep, rate, live_file, fanout):
    """Feeds records at `rate` into a fresh input topic; record-to-committed latency."""
    prefix = f"e2e.{rep}.{name}.live"
    guarantee = "at_least_once" if name == "cdrguard-alo" else "exactly_once"
    live_input = f"{prefix}.raw"
    config = write_config(a, prefix, live_input, guarantee)
    create_topics(a, config)
    proc = start(a, name, config, fanout, prefix, prefix)
    err_path = os.path.join(a.work, f"{prefix}.meter.err")
    with open(err_path, "w") as err:
        meter = subprocess.Popen(
            [METER, "--brokers", a.brokers, "live", "--input", live_input, "--records", live_file,
             "--rate", f"{rate:.1f}", "--warmup", str(WARMUP), "--probe-topic", f"{prefix}.{PROBE_ROUTE}"],
            stdout=subprocess.PIPE, stderr=err, text=True)
    lines, paced = [], threading.Event()

    def read_meter():
        for line in meter.stdout:
            lines.append(line)
            if line.startswith('{"event":"paced"'):
                paced.set()

    reader = threading.Thread(target=read_meter, daemon=True)
    reader.start()
    # cdrguard's histograms over the paced part only: one scrape when it begins, one
    # when the probe has seen the last copy (the contender still running).
    deadline = time.monotonic() + 600
    while meter.poll() is None and not paced.is_set() and time.monotonic() < deadline:
        time.sleep(0.05)
    logs = cdrguard_logs(name, proc)
    before = scrape_all(logs) if paced.is_set() else None
    recording = BrokerRecording(a, prefix)
    try:
        meter.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        meter.kill()
        meter.wait()
    reader.join(timeout=10)
    recording.stop()
    after = scrape_all(logs) if before is not None else None
    exited = proc.poll()
    code = stop(proc)
    delete_topics(a, output_topics(prefix) + [live_input])
    results = [l for l in lines if l.startswith("{") and '"event"' not in l]
    failed = None
    if exited is not None:
        failed = f"exited with {exited} during the live phase (log {proc.log_path})"
    elif not results:
        with open(err_path) as f:
            failed = f"live meter: {f.read().strip()}"
    metrics = live_metrics(before, after) if before is not None and after is not None else None
    stats = contender_stats(name, proc.log_path, getattr(proc, "log_paths", None)) if name.startswith("relay") else None
    return {"contender": name, "rep": rep, "phase": "live", "failed": failed, "exit": code,
            "rate": rate, "latency": json.loads(results[-1]) if results else None,
            "metrics": metrics, "relay_stats": stats}


# ---------------------------------------------------------------- /metrics


# What the live phase records of cdrguard's /metrics (see src/adapters/telemetry/names.rs):
# histograms, by their one label if they have one, and counters.
LIVE_HISTOGRAMS = [
    "cdrguard_record_commit_latency_seconds",
    "cdrguard_commit_duration_seconds",
    "cdrguard_commit_phase_seconds",
    "cdrguard_send_gate_wait_seconds",
    "cdrguard_record_processing_seconds",
]
LIVE_COUNTERS = [
    "cdrguard_transactions_total",
    "cdrguard_records_aborted_total",
    "cdrguard_partition_wakeups_missed_total",
]


def cdrguard_logs(name, proc):
    if not name.startswith("cdrguard"):
        return []
    return getattr(proc, "log_paths", None) or [proc.log_path]


def telemetry_addr(log_path):
    """The address cdrguard's /metrics listens on, from its "telemetry listening" line."""
    with open(log_path) as f:
        for line in f:
            try:
                fields = json.loads(line).get("fields", {})
            except ValueError:
                continue
            if fields.get("message") == "telemetry listening":
                return fields.get("addr")
    return None


SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(addr):
    """Every cdrguard_ sample of one /metrics page: {(name, ((label, value), ...)): value}."""
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if not m or not m.group(1).startswith("cdrguard_"):
            continue
        labels = tuple(sorted(LABEL.findall(m.group(2) or "")))
        try:
            out[(m.group(1), labels)] = float(m.group(3))
        except ValueError:
            pass
    return out


def scrape_all(logs):
    """The samples of every instance, added up (the scale run has two)."""
    total = {}
    for path in logs:
        addr = telemetry_addr(path)
        if not addr:
            continue
        try:
            page = scrape(addr)
        except OSError as e:
            print(f"metrics: {addr}: {e}", flush=True)
            continue
        for k, v in page.items():
            total[k] = total.get(k, 0.0) + v
    return total


def quantile(q, buckets, count):
    """histogram_quantile's estimate: linear within the bucket that holds it."""
    if count <= 0:
        return None
    rank, prev_le, prev_n = q * count, 0.0, 0.0
    for le, n in buckets:
        if n >= rank:
            if math.isinf(le):
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_n) / max(n - prev_n, 1e-12))
        prev_le, prev_n = le, n
    return prev_le


def live_metrics(before, after):
    """The histograms and counters of LIVE_* over the paced part (after minus before):
    count, mean, p50, p99 (ms, estimated from the buckets) and the share above 150 ms."""
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
    out = {}
    for family in LIVE_HISTOGRAMS:
        series = {}
        for (name, labels), v in delta.items():
            if name != f"{family}_bucket":
                continue
            other = tuple(kv for kv in labels if kv[0] != "le")
            le = float(dict(labels)["le"].replace("+Inf", "inf"))
            series.setdefault(other, []).append((le, v))
        for other, buckets in series.items():
            buckets.sort()
            count = delta.get((f"{family}_count", other), 0.0)
            total = delta.get((f"{family}_sum", other), 0.0)
            key = family.removeprefix("cdrguard_").removesuffix("_seconds")
            if other:
                key += "{" + ",".join(f"{k}={v}" for k, v in other) + "}"
            # Issue 12's bound (commit interval + 50 ms), where the family has a bucket there.
            at_target = next((n for le, n in buckets if abs(le - 0.15) < 1e-9), None)
            ms = lambda x: None if x is None else round(x * 1000, 3)
            out[key] = {
                "count": count,
                "mean_ms": ms(total / count) if count else None,
                "p50_ms": ms(quantile(0.5, buckets, count)),
                "p99_ms": ms(quantile(0.99, buckets, count)),
                "over_150ms": None if at_target is None else count - at_target,
            }
    for family in LIVE_COUNTERS:
        for (name, labels), v in delta.items():
            if name == family:
                key = family.removeprefix("cdrguard_") + ("{" + ",".join(f"{k}={v}" for k, v in labels) + "}" if labels else "")
                out[key] = v
    return out


def print_live_metrics(runs):
    """The live phase's /metrics figures, one block per run (and the relay's own)."""
    for r in runs:
        if r["phase"] != "live":
            continue
        if r.get("metrics"):
            print(f"\nrep {r['rep']} {r['contender']} live, from /metrics (ms: count mean p50 p99, >150 ms):")
            for k, v in r["metrics"].items():
                if isinstance(v, dict):
                    if not v["count"]:
                        continue
                    print(f"  {k:58} {v['count']:8.0f} {fmt(v['mean_ms'])} {fmt(v['p50_ms'])} {fmt(v['p99_ms'])}"
                          + (f"  >150: {v['over_150ms']:.0f}" if v.get("over_150ms") is not None else ""))
                else:
                    print(f"  {k:58} {v:8.0f}")
        if r.get("relay_stats"):
            print(f"\nrep {r['rep']} {r['contender']} live, its own counters: {json.dumps(r['relay_stats'])}")


def print_broker_requests(runs, total):
    """What each full-speed run asked of the broker, per 1,000,000 input records: the
    requests by API that any run made 1,000 of, messages and megabytes in and out."""
    full = [r for r in runs if r["phase"] == "full" and r.get("broker")]
    if not full or not total:
        return
    apis = sorted({k for r in full for k, v in r["broker"]["requests"].items() if v >= 1000})
    per = 1_000_000 / total
    cols = [f"{r['contender']} {r['rep']}" for r in full]
    print("\nthe broker's work in each full-speed run, per 1,000,000 input records:")
    print(f"  {'':24}" + "".join(f"{c:>22}" for c in cols))
    for api in apis:
        print(f"  {api + ' requests':24}" + "".join(f"{r['broker']['requests'].get(api, 0) * per:22,.0f}" for r in full))
    print(f"  {'messages in':24}" + "".join(f"{r['broker']['messages_in'] * per:22,.0f}" for r in full))
    for k in ("bytes_in", "bytes_out"):
        print(f"  {k.replace('_', ' ') + ' (MB)':24}" + "".join(f"{r['broker'][k] * per / 1e6:22,.1f}" for r in full))


# ---------------------------------------------------------------- summary


def spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


METRICS = [
    ("records_per_s", "input records/s", lambda r: r.get("records_per_s")),
    ("copies_per_s", "copies/s", lambda r: r.get("copies_per_s")),
    ("cpu_s_per_million", "CPU s / M records", lambda r: r.get("cpu_s_per_million")),
    ("broker_cpu_s_per_million", "broker CPU s / M", lambda r: r.get("broker_cpu_s_per_million")),
    ("peak_rss_mb", "peak RSS MB", lambda r: r.get("peak_rss_mb")),
    ("full_p50_ms", "full: p50 ms", lambda r: (r.get("latency") or {}).get("p50_ms")),
    ("full_p99_ms", "full: p99 ms", lambda r: (r.get("latency") or {}).get("p99_ms")),
    ("full_p999_ms", "full: p999 ms", lambda r: (r.get("latency") or {}).get("p999_ms")),
]
LIVE_METRICS = [
    ("half_p50_ms", "half: p50 ms", "p50_ms"),
    ("half_p99_ms", "half: p99 ms", "p99_ms"),
    ("half_p999_ms", "half: p999 ms", "p999_ms"),
]


def summarise(runs, contenders):
    summary = {}
    for c in contenders:
        full = [r for r in runs if r["contender"] == c and r["phase"] == "full" and not r["failed"]]
        live = [r for r in runs if r["contender"] == c and r["phase"] == "live" and not r["failed"]]
        if not full and not live:
            continue
        s = {key: spread([f(r) for r in full]) for key, _, f in METRICS}
        for key, _, field in LIVE_METRICS:
            s[key] = spread([(r.get("latency") or {}).get(field) for r in live])
        summary[c] = s
    return summary


def ratios(summary):
    out = {}
    pairs = [("cdrguard-eo", "relay"), ("cdrguard-eo", "kafka-streams"), ("cdrguard-eo-x2", "cdrguard-eo"),
             ("cdrguard-eo", "relay-headers"), ("relay-headers", "relay")]
    for one, other in pairs:
        b, o = summary.get(one), summary.get(other)
        if not b or not o:
            continue
        r = {}
        for key in ("records_per_s", "cpu_s_per_million", "peak_rss_mb", "half_p99_ms", "full_p99_ms"):
            if b.get(key) and o.get(key) and o[key]["median"]:
                r[key] = b[key]["median"] / o[key]["median"]
        out[f"{one}/{other}"] = r
    return out


def fmt(v):
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"


def print_table(summary):
    names = list(summary)
    rows = [(key, label) for key, label, _ in METRICS] + [(key, label) for key, label, _ in LIVE_METRICS]
    print("\n| metric (median [min-max]) | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for key, label in rows:
        cells = []
        for n in names:
            s = summary[n].get(key)
            cells.append("-" if not s else f"{fmt(s['median'])} [{fmt(s['min'])}-{fmt(s['max'])}]")
        print(f"| {label} | " + " | ".join(cells) + " |")


# ---------------------------------------------------------------- plots


def plot(out_dir, runs, summary, contenders):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.2))
    for c in contenders:
        full = [r for r in runs if r["contender"] == c and r["phase"] == "full" and not r["failed"] and r["series"]]
        if not full:
            continue
        # The repetition with the median rate.
        full.sort(key=lambda r: r.get("records_per_s") or 0)
        r = full[len(full) // 2]
        pts = r["series"]
        ts = [(pts[i][0] + pts[i - 1][0]) / 2 for i in range(1, len(pts))]
        rates = [(pts[i][1] - pts[i - 1][1]) / max(pts[i][0] - pts[i - 1][0], 1e-3) for i in range(1, len(pts))]
        left.plot(ts, rates, label=f"{c} (rep {r['rep']})")
    left.set_xlabel("seconds since the contender started (cdrguard first reads the consent table)")
    left.set_ylabel("input records committed per second")
    left.set_title("Throughput over time, full speed (median repetition)")
    left.grid(alpha=0.3)
    left.legend()

    groups = [("full", "full_p50_ms", "full_p99_ms", "full_p999_ms"), ("half", "half_p50_ms", "half_p99_ms", "half_p999_ms")]
    names = [c for c in contenders if c in summary]
    width = 0.8 / max(len(names), 1)
    labels = []
    for gi, (g, *keys) in enumerate(groups):
        for qi, k in enumerate(keys):
            labels.append(f"{g}\n{k.split('_')[1]}")
    for ci, c in enumerate(names):
        xs, ys, lo, hi = [], [], [], []
        for i, (g, *keys) in enumerate(groups):
            for qi, k in enumerate(keys):
                s = summary[c].get(k)
                xs.append(i * 3 + qi + ci * width - 0.4 + width / 2)
                ys.append(s["median"] if s else 0)
                lo.append((s["median"] - s["min"]) if s else 0)
                hi.append((s["max"] - s["median"]) if s else 0)
        right.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=c)
    right.set_xticks(range(6))
    right.set_xticklabels(labels)
    right.set_yscale("log")
    right.set_ylabel("ms (median, bars min-max)")
    right.set_title("Latency to committed: full speed (copy) and half load (record)")
    right.grid(alpha=0.3, axis="y")
    right.legend()
    fig.tight_layout()
    path = os.path.join(out_dir, "e2e.png")
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


# ---------------------------------------------------------------- main


def machine():
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        pass
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    return {"cpus": os.cpu_count(), "cpu_model": model, "memory_gib": round(mem_kb / 2**20, 1),
            "kernel": platform.release(), "load_at_start": os.getloadavg()[0]}


def main():
    a = args_parser().parse_args()
    if a.smoke:
        a.records, a.subscribers, a.reps, a.live_seconds = 3000, 2000, 1, 3
    contenders = [c for c in a.contenders.split(",") if c]
    if "kafka-streams" in contenders and not os.access(PEER, os.X_OK):
        print(f"kafka-streams: skipped ({os.path.relpath(PEER, ROOT)} is missing or not executable)", flush=True)
        contenders.remove("kafka-streams")
    os.makedirs(a.out, exist_ok=True)
    began = time.monotonic()
    total = load_input(a)
    fanout, rate, live_file = None, a.live_rate, None
    runs = []
    for rep in range(1, a.reps + 1):
        for name in contenders:
            if name.startswith("relay") and fanout is None:
                sys.exit("the relay needs cdrguard-eo's fan-out: list cdrguard-eo before it")
            r = full_phase(a, name, rep, total, fanout)
            if name == "cdrguard-eo" and fanout is None and r["stats"]:
                fanout = fanout_of(r["stats"])
                print("fan-out (messages per input record): "
                      + ", ".join(f"{k}={v:.3f}" for k, v in sorted(fanout.items())), flush=True)
            if fanout and r.get("records_per_s"):
                r["copies_per_s"] = r["records_per_s"] * sum(fanout[p] for p in PURPOSES)
            if rate is None and name == "cdrguard-eo" and r.get("records_per_s"):
                rate = r["records_per_s"] / 2
            runs.append(r)
            print(f"rep {rep} {name} full: " + (r["failed"] or
                  f"{fmt(r.get('records_per_s'))} records/s, CPU {fmt(r.get('cpu_s_per_million'))} s/M, "
                  f"RSS {fmt(r['peak_rss_mb'])} MB, copy-to-visible p99 {r['latency'].get('p99_ms')} ms, "
                  f"duplicate ids {r['latency'].get('duplicate_ids')}"), flush=True)
            if rate:
                if live_file is None:
                    count = int(math.ceil(rate * a.live_seconds)) + WARMUP
                    live_file, control = generate(a, count, min(count, a.subscribers), 99, "live")
                    os.remove(control)
                l = live_phase(a, name, rep, rate, live_file, fanout)
                runs.append(l)
                lat = l["latency"] or {}
                print(f"rep {rep} {name} live at {rate:.0f}/s: " + (l["failed"] or
                      f"record-to-committed p50 {lat.get('p50_ms')} p99 {lat.get('p99_ms')} "
                      f"p999 {lat.get('p999_ms')} ms over {lat.get('count')} copies"), flush=True)
    summary = summarise(runs, contenders)
    rat = ratios(summary)
    print_live_metrics(runs)
    print_broker_requests(runs, total)
    print_table(summary)
    for k, v in rat.items():
        print(f"{k}: " + ", ".join(f"{m} {x:.2f}" for m, x in v.items()))
    result = {
        "command": a.command, "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "records": total, "subscribers": a.subscribers, "partitions": a.partitions,
        "commit_interval_ms": a.commit_interval_ms, "reps": a.reps, "fanout": fanout, "live_rate": rate,
        "live_seconds": a.live_seconds, "contenders": contenders, "summary": summary, "ratios": rat,
        "runs": runs, "wall_s": time.monotonic() - began,
    }
    path = os.path.join(a.out, "results.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"results: {path} ({time.monotonic() - began:.0f} s)")
    if a.plots:
        plot(a.out, runs, summary, contenders)
    failed = [r for r in runs if r["failed"]]
    for r in failed:
        print(f"FAILED: rep {r['rep']} {r['contender']} {r['phase']}: {r['failed']}")
    bad = [r for r in runs if r["phase"] == "full" and (r.get("latency") or {}).get("duplicate_ids")]
    for r in bad:
        print(f"DUPLICATES: rep {r['rep']} {r['contender']}: {r['latency']['duplicate_ids']} record ids seen twice")
    sys.exit(1 if failed or bad else 0)


if __name__ == "__main__":
    main()
