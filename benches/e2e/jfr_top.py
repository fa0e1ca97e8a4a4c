#!/usr/bin/env python3
"""Sums up a broker's Java Flight Recorder record (CDRGUARD_E2E_BROKER_JFR, see run.py):
CPU samples by thread kind, then the methods with the most samples, on top of the stack
(self) and anywhere in it (inclusive), as shares of all samples.

    benches/e2e/jfr_top.py FILE.jfr [--top N] [--thread SUBSTRING]

Thread names lose their numbers (data-plane-kafka-request-handler-3 counts as
data-plane-kafka-request-handler-N) so a pool is one line. Native method samples
(threads in native code: sockets, file channels) are counted apart from Java ones.
"""

import argparse
import collections
import re
import subprocess
import sys


def samples(path, event):
    """Yields (thread, [frames, top first]) for each sample of `event`."""
    out = subprocess.run(["jfr", "print", "--stack-depth", "64", "--events", event, path],
                         check=True, stdout=subprocess.PIPE, text=True).stdout
    thread, frames, in_stack = None, [], False
    for line in out.splitlines():
        s = line.strip()
        if s == f"{event} {{":
            thread, frames, in_stack = None, [], False
        elif s.startswith("sampledThread = "):
            m = re.match(r'sampledThread = "(.*)" \(', s)
            thread = re.sub(r"\d+", "N", m.group(1)) if m else "?"
        elif s.startswith("stackTrace = ["):
            in_stack = True
        elif in_stack and s == "]":
            in_stack = False
        elif in_stack and s and s != "...":
            frames.append(re.sub(r"\s+line: \d+.*$", "", s))
        elif s == "}" and thread is not None:
            yield thread, frames
            thread = None


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("file")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--thread", help="only threads whose name holds this")
    a = p.parse_args()
    for event in ["jdk.ExecutionSample", "jdk.NativeMethodSample"]:
        by_thread, self_, incl = collections.Counter(), collections.Counter(), collections.Counter()
        n = 0
        for thread, frames in samples(a.file, event):
            if a.thread and a.thread not in thread:
                continue
            n += 1
            by_thread[thread] += 1
            if frames:
                self_[frames[0]] += 1
            for f in set(frames):
                incl[f] += 1
        print(f"== {event}: {n} samples")
        if not n:
            continue
        for title, c in [("threads", by_thread), ("self", self_), ("inclusive", incl)]:
            print(f"-- {title}")
            for k, v in c.most_common(a.top):
                print(f"{100 * v / n:6.1f}%  {v:7d}  {k}")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
