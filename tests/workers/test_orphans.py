"""What a local Ray leaves running after its shutdown is ended: the process that started it adopts
its orphaned descendants (``workers.env.adopt_orphans``) and ends those that run for a Ray
(``end_orphans``), SIGKILLing one that ignores SIGTERM; other children are not touched. Real
processes, orphaned as a Ray worker is when its raylet ends first."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from workers.procfs import stat_fields

ROOT = Path(__file__).resolve().parents[2]

# The process under test: adopts orphans, starts a child that starts three grandchildren (two with
# the environment a raylet gives its workers, one of them ignoring SIGTERM; one without) and ends at
# once, orphaning them; then ends what runs for a Ray and prints what it ended.
SCRIPT = r"""
import json, os, subprocess, sys, time
from workers.env import adopt_orphans, end_orphans
assert adopt_orphans()
sleeper = "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN if sys.argv[1] == 'stubborn' else signal.SIG_DFL); time.sleep(600)"
starter = '''
import os, subprocess, sys
ray = {**os.environ, "RAY_RAYLET_PID": "4242"}
plain = {k: v for k, v in os.environ.items() if k != "RAY_RAYLET_PID"}
pids = [subprocess.Popen([sys.executable, "-c", sys.argv[1], kind], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid
        for kind, env in (("polite", ray), ("stubborn", ray), ("other", plain))]
print(" ".join(map(str, pids)), flush=True)
'''
out = subprocess.run([sys.executable, "-c", starter, sleeper], capture_output=True, text=True, check=True).stdout
polite, stubborn, other = map(int, out.split())
time.sleep(1.0)  # the grandchildren are this process's children now
from workers.procfs import stat_fields
ppids = {pid: int(stat_fields(pid)[1]) for pid in (polite, stubborn, other)}
t0 = time.monotonic()
ended = end_orphans(grace_s=1.0)
print(json.dumps({"polite": polite, "stubborn": stubborn, "other": other, "ppids": ppids, "ended": ended,
                  "took": time.monotonic() - t0}))
"""


def _alive(pid: int) -> bool:
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def test_orphans_that_run_for_a_ray_are_ended_and_reaped_and_others_left() -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_RAYLET_PID"}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    other = got["other"]
    try:
        # the orphans became children of the process that adopted them, not of init
        assert len(set(got["ppids"].values())) == 1 and 1 not in got["ppids"].values(), got
        ended = " ".join(got["ended"])
        assert f"(pid {got['polite']})" in ended and f"(pid {got['stubborn']})" in ended, got
        assert f"(pid {other})" not in ended, got
        assert "-c import signal, sys, time" in ended  # each named by its command line (its start)
        assert got["took"] >= 1.0, got  # the one that ignores SIGTERM was SIGKILLed after the grace
        assert not _alive(got["polite"]) and not _alive(got["stubborn"])
        assert _alive(other)  # not a Ray's: left as it was
    finally:
        os.kill(other, signal.SIGKILL)
    deadline = time.time() + 10
    while _alive(other) and time.time() < deadline:
        time.sleep(0.1)
