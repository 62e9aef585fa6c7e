#!/usr/bin/env python3
"""Where a freed slot's idle time goes, from a kept run of tests/e2e_queue.rs.

Usage: python3 benches/queue-gaps.py DIR [RUN]
  DIR: the test directory that NIXDISPATCH_E2E_KEEP=1 kept (it has log/hook-m*.log and
       stamps-*); RUN: the stamps directory's prefix, e.g. `stamps-queue` (default) or
       `stamps-direct`.

Pairs every slot freed while builds waited with the build that took it next on that
builder (as the test's `idle_gaps` does) and splits the gap with the hooks' log lines:
  copy-back   builder's end stamp -> the freeing hook's build-remote exited
  release     build-remote exited -> the freeing hook's `released`
  hand-over   released -> the next hook's `lease granted`
  claim+spawn lease granted -> the next hook's `starting build-remote`
  connect     starting build-remote -> `build-remote accepted` (SSH connection, remote Nix)
  to-start    accepted -> builder's start stamp (inputs copied, remote build started)
Hook logs carry wall-clock times and stamps the kernel's uptime; the offset between the
two is taken now (same boot, so it holds to well under a millisecond over a run).
"""
import glob
import os
import re
import statistics
import sys
import time
from datetime import datetime

d = sys.argv[1]
prefix = sys.argv[2] if len(sys.argv) > 2 else "stamps-queue"
offset = time.time() - float(open("/proc/uptime").read().split()[0])

stamps = []
for sd in glob.glob(os.path.join(d, prefix + "*")):
    for f in os.listdir(sd):
        name, host, s, e = open(os.path.join(sd, f)).read().split()
        stamps.append((name, host, float(s), float(e)))

line_re = re.compile(r"^(\S+)\s+\w+\s+hook\{pid=(\d+)\}.*?: (.*)$")
events = {}  # pid -> list of (t, text)
drv_of = {}  # pid -> derivation name
for log in glob.glob(os.path.join(d, "log/hook-m*.log")):
    for line in open(log, errors="replace"):
        m = line_re.match(line.strip())
        if not m:
            continue
        ts = datetime.fromisoformat(m.group(1).replace("Z", "+00:00")).timestamp() - offset
        pid, text = m.group(2), m.group(3)
        key = (log, pid)
        events.setdefault(key, []).append((ts, text))
        dm = re.search(r"drv=/nix/store/[a-z0-9]{32}-(\S+)\.drv", text)
        if dm:
            drv_of[key] = dm.group(1)

hook_of = {v: k for k, v in drv_of.items()}


def first(key, needle, after=None):
    for t, text in events.get(key, []):
        if needle in text and (after is None or t >= after):
            return t
    return None


def last(key, needle):
    ts = [t for t, text in events.get(key, []) if needle in text]
    return ts[-1] if ts else None


parts = {k: [] for k in ["copy-back", "release", "hand-over", "claim+spawn", "connect", "to-start", "gap"]}
shared = []
hosts = sorted({s[1] for s in stamps})
for h in hosts:
    ev = sorted([(s[2], 1, s) for s in stamps if s[1] == h] + [(s[3], 0, s) for s in stamps if s[1] == h],
                key=lambda x: (x[0], x[1]))
    free = [None, None]  # 2 slots
    for t, is_start, s in ev:
        if is_start:
            freed = free.pop(0) if free else None
            if freed is None:
                continue
            x, y = hook_of.get(freed[0]), hook_of.get(s[0])
            if not x or not y:
                continue
            e = freed[3]
            x_exit = last(x, "build-remote exited")
            x_rel = last(x, "released")
            y_grant = first(y, "lease granted") or first(y, "try answered")
            y_spawn = last(y, "starting build-remote")
            y_acc = last(y, "build-remote accepted")
            if None in (x_exit, x_rel, y_grant, y_spawn, y_acc):
                continue
            parts["copy-back"].append(x_exit - e)
            parts["release"].append(x_rel - x_exit)
            parts["hand-over"].append(y_grant - x_rel)
            parts["claim+spawn"].append(y_spawn - y_grant)
            parts["connect"].append(y_acc - y_spawn)
            parts["to-start"].append(s[2] - y_acc)
            parts["gap"].append(s[2] - e)
            shared.append(any("shared_connection=true" in text for _, text in events[y]))
        else:
            free.append(s)

n = len(parts["gap"])
print(f"{prefix}: {n} gaps paired with their hooks' logs"
      f" ({sum(shared)} of them through a shared SSH connection)")
print("| part | median (ms) | min (ms) | max (ms) |")
print("|---|---|---|---|")
for k, v in parts.items():
    if v:
        print(f"| {k} | {statistics.median(v) * 1000:.0f} | {min(v) * 1000:.0f} | {max(v) * 1000:.0f} |")
