"""The server as a process: SIGTERM loses no prediction, --workers shares the port, and
the Prometheus multiprocess folder starts clean."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.deploy.conftest import TOKEN, Project, image_bytes, server_process


def predict(url: str, i: int) -> list[str]:
    if i % 3 == 0:
        files = [("f", (f"{k}.png", image_bytes(i * 10 + k), "image/png")) for k in range(3)]
        r = httpx.post(f"{url}/v1/models/vehicles/predict?camera_id=c{i}", files=files)
    else:
        r = httpx.post(f"{url}/v1/models/vehicles/predict?camera_id=c{i}",
                       content=image_bytes(i), headers={"Content-Type": "image/png"})  # fmt: skip
    assert r.status_code == 200, r.text
    return [p["prediction_id"] for p in r.json()["predictions"]]


def logged_ids(project: Project) -> set[str]:
    store = project.store()
    try:
        return {p.id for p in store.predictions.find("vehicles", 1)}
    finally:
        store.close()


def test_sigterm_flushes_every_prediction(fresh_project: Project) -> None:
    # A long flush interval: whatever is logged got there through the graceful stop.
    with server_process(fresh_project, "--flush-interval-s", "600") as server:
        with ThreadPoolExecutor(8) as pool:
            ids = [pid for batch in pool.map(lambda i: predict(server.url, i), range(60))
                   for pid in batch]  # fmt: skip
        assert len(ids) == len(set(ids)) == 100
        assert logged_ids(fresh_project) == set()
        assert server.stop() in (0, -15)  # uvicorn re-raises SIGTERM after a clean stop
    assert logged_ids(fresh_project) == set(ids)


def children(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.add(int(stat.parent.name))
    return out


def predictions_by_pid(metrics: str) -> dict[int, float]:
    """``loopline_process_predictions`` per worker pid, from a /metrics page."""
    out = {}
    for line in metrics.splitlines():
        if line.startswith("loopline_process_predictions{"):
            pid = re.search(r'pid="(\d+)"', line)
            assert pid is not None, line
            out[int(pid.group(1))] = float(line.rsplit(" ", 1)[1])
    return out


def test_two_workers_share_the_port_and_the_log(fresh_project: Project) -> None:
    with server_process(fresh_project, "--workers", "2", "--flush-interval-s", "0.2") as server:
        # Each request on a new connection, which the kernel hashes to either worker.
        with ThreadPoolExecutor(4) as pool:
            ids = [pid for batch in pool.map(lambda i: predict(server.url, i), range(1, 41))
                   for pid in batch]  # fmt: skip
        metrics = httpx.get(f"{server.url}/metrics").text
        assert "loopline_requests_total" in metrics
        served = predictions_by_pid(metrics)
        # (the spawn context's resource tracker is a child too, and serves nothing)
        assert len(served) == 2 and set(served) <= children(server.proc.pid), served
        assert all(n > 0 for n in served.values()), served  # both workers answered
        assert sum(served.values()) == len(ids)
        # Right after predicting: some ids still wait in the other worker's buffer.
        feedback = [{"prediction_id": pid, "label": "car"} for pid in ids]
        r = httpx.post(f"{server.url}/v1/feedback", json=feedback,
                       headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)  # fmt: skip
        assert r.status_code == 200 and r.json()["recorded"] == len(ids), r.text
        assert server.stop() in (0, -15)  # uvicorn re-raises SIGTERM after a clean stop
    assert logged_ids(fresh_project) == set(ids)


STALE = """
from prometheus_client import Counter
c = Counter("loopline_requests", "", ["model", "version", "endpoint", "code"])
c.labels("vehicles", "1", "/v1/models/{name}/predict", "200").inc(1000)
"""


def requests_counted(metrics: str) -> float:
    pattern = r'^loopline_requests_total\{.*endpoint="/v1/models/\{name\}/predict".*\} (\S+)$'
    return sum(float(m) for m in re.findall(pattern, metrics, re.M))


def test_metric_files_of_an_earlier_run_are_removed_at_start(
    fresh_project: Project, tmp_path: Path
) -> None:
    prom = tmp_path / "prom"
    prom.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(prom)}
    subprocess.run([sys.executable, "-c", STALE], env=env, check=True)  # an earlier run
    (stale,) = prom.glob("counter_*.db")
    with server_process(fresh_project, "--workers", "2",
                        env={"PROMETHEUS_MULTIPROC_DIR": str(prom)}) as server:  # fmt: skip
        assert not stale.exists()
        for i in range(6):
            predict(server.url, i + 1)
        metrics = httpx.get(f"{server.url}/metrics").text
        assert requests_counted(metrics) == 6  # not 1006
        assert server.stop() in (0, -15)
    # After the stop no worker is live: their live gauges are gone with them.
    assert not list(prom.glob("gauge_live*"))


def test_a_metrics_folder_holding_other_files_is_refused(
    fresh_project: Project, tmp_path: Path
) -> None:
    prom = tmp_path / "prom"
    prom.mkdir()
    (prom / "notes.txt").write_text("mine")
    out = subprocess.run(
        [sys.executable, "-m", "loopline.deploy.server", "vehicles:1", "--config",
         str(fresh_project.config), "--workers", "2", "--port", "0"],
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(prom)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    assert "notes.txt" in out.stderr and "an empty folder of its own" in out.stderr
    assert (prom / "notes.txt").exists()


def test_workers_stop_when_the_supervisor_is_killed(fresh_project: Project) -> None:
    import signal
    import time

    with server_process(fresh_project, "--workers", "2") as server:
        predict(server.url, 1)
        workers = {p for p in children(server.proc.pid) if b"spawn_main" in _cmdline(p)}
        assert len(workers) == 2
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(30)
        deadline = time.monotonic() + 60
        while any(_running(p) for p in workers):
            assert time.monotonic() < deadline, "orphaned workers still running"
            time.sleep(0.2)


def _running(pid: int) -> bool:
    """Whether ``pid`` still runs: a zombie (state Z or X) has ended, though nobody has
    reaped it yet (a container without an init process may never reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rpartition(")")[2].split()[0]  # after the command name, which may hold spaces
    return state not in ("Z", "X")


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
