"""The worker supervisor: a worker that keeps crashing is restarted with growing delays."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from loopline.deploy.workers import RestartPolicy
from tests.deploy.conftest import free_port


def test_restart_delays_double_up_to_a_cap() -> None:
    policy = RestartPolicy(base_s=0.5, cap_s=30.0, healthy_s=60.0)
    assert [policy.delay(n) for n in range(1, 10)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]


def test_a_worker_that_ran_long_enough_starts_the_count_again() -> None:
    policy = RestartPolicy(base_s=1.0, cap_s=8.0, healthy_s=60.0)
    failures = 0
    delays = []
    for uptime in (0.3, 0.5, 2.0, 0.1, 61.0, 0.2):
        failures = policy.failures_after(failures, uptime)
        delays.append(policy.delay(failures))
    assert delays == [1, 2, 4, 8, 1, 2]


SUPERVISE = """
import logging, sys
from loopline.deploy.workers import RestartPolicy, run_workers
logging.basicConfig(level="INFO", format="%(message)s", stream=sys.stdout)
options = {"host": "127.0.0.1", "port": int(sys.argv[1]), "log_level": "critical"}
# An app factory that does not exist: every worker exits at start.
run_workers(1, options, "loopline.deploy.server:no_such_factory",
            policy=RestartPolicy(base_s=0.2, cap_s=0.8, healthy_s=600))
print("supervisor stopped", flush=True)
"""


def test_a_worker_that_crashes_at_start_is_restarted_with_backoff(tmp_path: Path) -> None:
    out = tmp_path / "supervisor.log"
    with open(out, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-c", SUPERVISE, str(free_port())], stdout=f,
            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    pattern = re.compile(r"worker \d+ exited with -?\d+; starting another in ([\d.]+) s")
    try:
        deadline = time.monotonic() + 120
        while len(pattern.findall(out.read_text())) < 5:
            assert proc.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.read_text()
    delays = [float(d) for d in pattern.findall(text)]
    assert delays[:5] == [0.2, 0.4, 0.8, 0.8, 0.8]
    assert "supervisor stopped" in text
