"""The local target: a supervised server in the background, restarted, health-checked, stopped.

Real processes throughout: the supervisor is a detached process, and the server is the real
prediction server (``python -m loopline.deploy.server vehicles:1``) of a registered tiny
model, or, where a test is about supervision alone, a small stdlib HTTP server. The one test
that runs the target's own command (``--env ENV``) waits on the server's ``--env`` flag.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from loopline.config import load_config
from loopline.drivers.targets import TargetContext, get_target
from loopline.drivers.targets.local import LocalTarget, config_path, running_supervisor
from loopline.drivers.targets.supervisor import PID_FILE, STATE_FILE, SupervisorPolicy, read_json
from tests.deploy.conftest import Project, free_port, image_bytes, make_project, model_bytes

__all__ = ["model_bytes"]  # the fixture, imported to be found here

FAST = SupervisorPolicy(
    backoff_base_s=0.2, backoff_cap_s=5.0, jitter=0.2, health_interval_s=0.2, stop_timeout_s=20
)

# A tiny real HTTP server that is healthy as soon as it listens (for supervision tests).
HEALTH_SERVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path in ('/v2/health/live', '/v2/health/ready') else 404)
        self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()
"""


class ModelTarget(LocalTarget):
    """The local target running a registered model (the server's ``MODEL`` form)."""

    def __init__(self, ref: str = "vehicles:1", workers: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ref, self.workers = ref, workers

    def server_command(self, ctx: TargetContext) -> list[str]:
        return [sys.executable, "-m", "loopline.deploy.server", self.ref,
                "--config", str(config_path(ctx)), "--host", ctx.env.host,
                "--port", str(ctx.env.port), "--workers", str(self.workers),
                "--log-level", "warning"]  # fmt: skip


class CommandTarget(LocalTarget):
    """The local target running any command (``{port}`` stands for the environment's)."""

    def __init__(self, command: list[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.command = command

    def server_command(self, ctx: TargetContext) -> list[str]:
        return [arg.replace("{port}", str(ctx.env.port)) for arg in self.command]


def health_server() -> list[str]:
    return [sys.executable, "-c", HEALTH_SERVER, "{port}"]


def write_config(env_project: Project, port: int, extra: str = "") -> None:
    env_project.config.write_text(
        "project: vehicles\nmodel: {name: vehicles}\nenvironments:\n"
        f"  staging: {{port: {port}, serve: {{workers: 1}}{extra}}}\n"
    )


def context(env_project: Project, env: str = "staging", **extra: Any) -> TargetContext:
    cfg = load_config(env_project.config)
    return TargetContext(config=cfg, environment=env, env=cfg.environment(env),
                         extra={"config_path": env_project.config, **extra})  # fmt: skip


def alive(pid: int | None) -> bool:
    """Whether ``pid`` names a process (a zombie counts: it has not been reaped)."""
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def session_members(sid: int) -> list[int]:
    """Every process (zombies too) in session ``sid``: the supervisor and all it started."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid:
            found.append(int(entry.name))
    return found


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def wait_for(what: str, check: Callable[[], Any], timeout: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def state_of(ctx: TargetContext) -> dict[str, Any]:
    return read_json(LocalTarget().folder(ctx) / STATE_FILE) or {}


def assert_all_gone(supervisor: int, servers: list[int]) -> None:
    assert not alive(supervisor), f"supervisor {supervisor} still exists"
    for pid in servers:
        assert not alive(pid), f"server {pid} still exists"
    assert session_members(supervisor) == []


@pytest.fixture
def env_project(tmp_path: Path, model_bytes: bytes) -> Project:
    p = make_project(tmp_path / "project", model_bytes)
    write_config(p, free_port())
    return p


@pytest.fixture
def stopper() -> Iterator[Callable[[LocalTarget, TargetContext], None]]:
    """Register (target, ctx) pairs to bring down whatever a failed test left running."""
    started: list[tuple[LocalTarget, TargetContext]] = []
    yield lambda target, ctx: started.append((target, ctx))
    for target, ctx in started:
        pid = running_supervisor(target.folder(ctx))
        target.down(ctx)
        if pid and pid > 0:
            assert session_members(pid) == [], "processes left behind"


def predict(url: str) -> dict[str, Any]:
    r = httpx.post(f"{url}/v1/models/vehicles/predict", content=image_bytes(1),
                   headers={"Content-Type": "image/png"}, timeout=30)  # fmt: skip
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_up_serves_sigkill_restarts_and_down_leaves_nothing(
    env_project: Project, stopper: Any
) -> None:
    # Two workers: a killed server's workers are orphans, which the supervisor must stop.
    target, ctx = ModelTarget(workers=2, policy=FAST), context(env_project, wait_s=120)
    stopper(target, ctx)
    outcome = target.up(ctx)
    assert outcome.ok, (outcome.message, outcome.details)
    url = outcome.details["endpoint"]
    assert url.startswith("http://127.0.0.1:") and url in outcome.message
    assert predict(url)["model_version"] == 1
    status = target.status(ctx)
    assert status["running"] and status["healthy"] and status["restarts"] == 0
    first, supervisor = status["server_pid"], status["supervisor_pid"]
    assert alive(first) and first != supervisor
    workers = wait_for("two workers", lambda: len(w := children(first)) >= 2 and w)

    os.kill(first, signal.SIGKILL)
    state = wait_for("a restarted, healthy server", lambda: (s := state_of(ctx)).get("healthy")
                     and s.get("restarts", 0) >= 1 and s, timeout=120)  # fmt: skip
    assert state["server_pid"] != first and state["last_exit_code"] == -signal.SIGKILL
    assert state["pid"] == supervisor and not alive(first)
    wait_for("the old workers to be gone", lambda: not any(alive(w) for w in workers), 60)
    log = target.folder(ctx) / "supervisor.log"  # the supervisor reaped them itself
    wait_for("the supervisor to reap the orphans", lambda: all(
        f"reaped orphan {w} " in log.read_text() for w in workers), 30)  # fmt: skip
    assert predict(url)["model_version"] == 1

    again = target.up(ctx)  # already running: nothing new starts
    assert again.ok and "already running" in again.message
    assert again.details["supervisor_pid"] == supervisor

    down = target.down(ctx)
    assert down.ok and "stopped" in down.message
    assert_all_gone(supervisor, [first, state["server_pid"], *workers])
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/v2/health/ready", timeout=2)
    assert state_of(ctx)["phase"] == "stopped"
    assert not (target.folder(ctx) / PID_FILE).exists()
    assert target.status(ctx)["running"] is False

    twice = target.down(ctx)  # idempotent
    assert twice.ok and "nothing runs" in twice.message


def test_two_concurrent_ups_start_one_supervisor(env_project: Project, stopper: Any) -> None:
    target, ctx = CommandTarget(health_server(), policy=FAST), context(env_project, wait_s=60)
    stopper(target, ctx)
    outcomes: list[Any] = []
    barrier = threading.Barrier(2)

    def up() -> None:
        barrier.wait()
        outcomes.append(target.up(ctx))

    threads = [threading.Thread(target=up) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(outcomes) == 2 and all(o.ok for o in outcomes), outcomes
    pids = {o.details["supervisor_pid"] for o in outcomes}
    assert len(pids) == 1
    assert sorted("already running" in o.message for o in outcomes) == [False, True]
    (supervisor,) = pids
    supervisors = [p for p in session_members(supervisor) if p == supervisor]
    assert supervisors == [supervisor]
    # Exactly one supervisor process for this folder on the whole machine.
    folder = str(target.folder(ctx))
    running = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"loopline.drivers.targets.supervisor" in cmd and folder.encode() in cmd:
            running.append(int(entry.name))
    assert running == [supervisor]
    other = CommandTarget([*health_server(), "--unused"], policy=FAST).up(ctx)
    assert other.ok and "runs an earlier command line" in other.message
    assert other.details["supervisor_pid"] == supervisor
    server = target.status(ctx)["server_pid"]
    assert target.down(ctx).ok
    assert_all_gone(supervisor, [server])


def test_a_server_that_cannot_start_backs_off_and_up_shows_the_log(
    env_project: Project, stopper: Any
) -> None:
    target, ctx = ModelTarget("vehicles:99", policy=FAST), context(env_project, wait_s=120)
    stopper(target, ctx)
    outcome = target.up(ctx)
    assert not outcome.ok
    assert "3 failed starts in a row" in outcome.message
    assert "keeps retrying" in outcome.message and "loopline down --env staging" in outcome.message
    text = "\n".join(outcome.details["log_tail"])
    assert "error:" in text and "99" in text, text
    assert outcome.details["log"].endswith("server.log")

    state = wait_for("more restarts", lambda: (s := state_of(ctx)).get("restarts", 0) >= 3 and s)
    delays = state["delays_s"]
    assert len(delays) >= 3 and delays[0] < delays[1] < delays[2], delays
    assert state["last_exit_code"] == 1 and state["healthy"] is False
    supervisor = state["pid"]
    assert target.down(ctx).ok
    assert_all_gone(supervisor, [])


def test_a_stale_pid_file_is_replaced(env_project: Project, stopper: Any) -> None:
    target, ctx = CommandTarget(health_server(), policy=FAST), context(env_project, wait_s=60)
    stopper(target, ctx)
    folder = target.folder(ctx)
    folder.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (folder / PID_FILE).write_text(f"{dead.pid}\n")
    stale_state = {"pid": dead.pid, "healthy": True, "failures": 9}
    (folder / STATE_FILE).write_text(json.dumps(stale_state))
    assert target.status(ctx)["stale_pid_file"] is True

    outcome = target.up(ctx)
    assert outcome.ok, outcome
    assert f"stale pid file (supervisor {dead.pid} is gone)" in outcome.message
    supervisor = outcome.details["supervisor_pid"]
    assert supervisor != dead.pid and running_supervisor(folder) == supervisor
    assert (folder / PID_FILE).read_text().strip() == str(supervisor)
    assert target.down(ctx).ok
    assert_all_gone(supervisor, [])


def running(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie does not: nothing reaps orphans on some hosts)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_a_sigkilled_supervisor_takes_its_server_along_and_up_replaces_it(
    env_project: Project, stopper: Any
) -> None:
    target, ctx = CommandTarget(health_server(), policy=FAST), context(env_project, wait_s=60)
    stopper(target, ctx)
    first = target.up(ctx)
    assert first.ok, first
    supervisor, server = first.details["supervisor_pid"], first.details["server_pid"]
    os.kill(supervisor, signal.SIGKILL)
    os.waitpid(supervisor, 0)  # it is this process's child: reap it
    wait_for("the server to stop with its supervisor", lambda: not running(server), 30)
    assert target.status(ctx)["stale_pid_file"] is True
    again = target.up(ctx)
    assert again.ok, again
    assert f"replaced a stale pid file (supervisor {supervisor} is gone)" in again.message
    assert again.details["supervisor_pid"] != supervisor
    assert target.down(ctx).ok


def test_a_pid_file_naming_a_live_process_is_stale_when_the_lock_is_free(
    env_project: Project,
) -> None:
    target, ctx = CommandTarget(health_server()), context(env_project)
    folder = target.folder(ctx)
    folder.mkdir(parents=True)
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        (folder / PID_FILE).write_text(f"{bystander.pid}\n")
        status = target.status(ctx)
        assert status["running"] is False and status["stale_pid_file"] is True
        outcome = target.down(ctx)
        assert outcome.ok and f"stale pid file naming {bystander.pid}" in outcome.message
        assert bystander.poll() is None  # never signalled
        assert not (folder / PID_FILE).exists()
    finally:
        bystander.kill()
        bystander.wait()


def test_a_server_that_never_gets_healthy_and_ignores_sigterm_is_killed(
    env_project: Project, stopper: Any
) -> None:
    stubborn = [sys.executable, "-c",
                "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "print('stubborn up', flush=True); time.sleep(600)"]  # fmt: skip
    policy = SupervisorPolicy(backoff_base_s=0.2, health_interval_s=0.2, start_timeout_s=1.0,
                              stop_timeout_s=1.0)  # fmt: skip
    target, ctx = CommandTarget(stubborn, policy=policy), context(env_project, wait_s=0)
    stopper(target, ctx)
    outcome = target.up(ctx)
    assert outcome.ok and "not waiting" in outcome.message
    state = wait_for("two restarts", lambda: (s := state_of(ctx)).get("restarts", 0) >= 2 and s)
    assert state["last_exit_code"] == -signal.SIGKILL
    assert "not healthy within 1 s" in state["last_exit_reason"]
    supervisor = state["pid"]
    server = wait_for("a running server", lambda: state_of(ctx).get("server_pid"))
    assert target.down(ctx).ok
    assert_all_gone(supervisor, [server])
    assert "stubborn up" in (target.folder(ctx) / "server.log").read_text()


def test_up_refuses_a_port_another_process_holds(env_project: Project) -> None:
    import socket

    target, ctx = CommandTarget(health_server(), policy=FAST), context(env_project)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ctx.env.port))
        s.listen()
        outcome = target.up(ctx)
    assert not outcome.ok and f"127.0.0.1:{ctx.env.port} is in use" in outcome.message
    assert "environments.staging.port" in outcome.message
    assert running_supervisor(target.folder(ctx)) is None


def test_up_needs_the_token_variable(env_project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    from loopline.errors import ConfigError

    write_config(env_project, free_port(), ", token: '${LOOPLINE_TEST_LOCAL_TOKEN}'")
    monkeypatch.delenv("LOOPLINE_TEST_LOCAL_TOKEN", raising=False)
    target, ctx = CommandTarget(health_server()), context(env_project)
    with pytest.raises(ConfigError, match="LOOPLINE_TEST_LOCAL_TOKEN"):
        target.up(ctx)
    assert running_supervisor(target.folder(ctx)) is None


def test_render_writes_the_command_and_its_environment(
    env_project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(env_project, 8123, ", token: '${LOOPLINE_TEST_LOCAL_TOKEN}'")
    monkeypatch.setenv("LOOPLINE_TEST_LOCAL_TOKEN", "do-not-print-me")
    target = get_target("local")
    assert isinstance(target, LocalTarget)
    ctx = context(env_project)
    files = target.render(ctx, tmp_path / "out")
    assert sorted(f.name for f in files) == ["README.md", "run.sh"]
    script = (tmp_path / "out" / "run.sh").read_text()
    assert os.access(tmp_path / "out" / "run.sh", os.X_OK)
    subprocess.run(["sh", "-n", str(tmp_path / "out" / "run.sh")], check=True)
    assert (
        f"-m loopline.deploy.server --env staging --config {env_project.config.resolve()}" in script
    )
    assert "${LOOPLINE_TEST_LOCAL_TOKEN:?" in script and "do-not-print-me" not in script
    assert "export PYTHONUNBUFFERED=1" in script
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "http://127.0.0.1:8123" in readme and "loopline up --env staging" in readme
    # Without the variable the script stops before it runs anything, naming it.
    env = {k: v for k, v in os.environ.items() if k != "LOOPLINE_TEST_LOCAL_TOKEN"}
    run = subprocess.run(["sh", str(tmp_path / "out" / "run.sh")], capture_output=True,
                         text=True, env=env)  # fmt: skip
    assert run.returncode != 0 and "LOOPLINE_TEST_LOCAL_TOKEN" in run.stderr


def test_the_server_command_is_the_env_form(env_project: Project) -> None:
    cmd = LocalTarget().server_command(context(env_project))
    assert cmd == [sys.executable, "-m", "loopline.deploy.server", "--env", "staging",
                   "--config", str(env_project.config.resolve())]  # fmt: skip


def test_up_runs_the_real_env_command_and_says_what_it_serves(
    env_project: Project, stopper: Any
) -> None:
    ctx = context(env_project, wait_s=120)
    store = env_project.store()
    try:
        store.deployments.change("staging", expected_generation=0, action="deploy",
                                 actor="test", reason="test", model_name="vehicles",
                                 stable_version=1, target="local",
                                 endpoint=ctx.env.endpoint)  # fmt: skip
    finally:
        store.close()
    target = LocalTarget(policy=FAST)
    stopper(target, ctx)
    outcome = target.up(ctx)
    assert outcome.ok, (outcome.message, outcome.details.get("log_tail"))
    assert f"healthy at {ctx.env.endpoint}, serving vehicles:1" in outcome.message
    assert outcome.details["ready"] is True
    assert predict(ctx.env.endpoint)["model_version"] == 1
    supervisor, server = outcome.details["supervisor_pid"], outcome.details["server_pid"]
    assert target.down(ctx).ok
    assert_all_gone(supervisor, [server])


def test_an_environment_with_nothing_deployed_is_alive_waits_and_is_not_restarted(
    env_project: Project, stopper: Any
) -> None:
    """The supervisor checks liveness: a server with no deployment answers it (200) while
    it is not ready (503), so it is neither restarted nor a failed ``up``; a deployment
    made afterwards is served by the same process."""
    policy = SupervisorPolicy(backoff_base_s=0.2, health_interval_s=0.2, start_timeout_s=10,
                              stop_timeout_s=20)  # fmt: skip
    started = time.monotonic()
    target, ctx = LocalTarget(policy=policy), context(env_project, wait_s=120)
    stopper(target, ctx)
    outcome = target.up(ctx)
    assert outcome.ok, (outcome.message, outcome.details.get("log_tail"))
    assert (f"running at {ctx.env.endpoint}, waiting for a deployment (loopline promote "
            "NAME:VERSION --to staging)") in outcome.message  # fmt: skip
    assert outcome.details["ready"] is False
    url, server = ctx.env.endpoint, outcome.details["server_pid"]
    live = httpx.get(f"{url}/v2/health/live", timeout=5)
    assert live.status_code == 200 and live.json() == {"live": True}
    ready = httpx.get(f"{url}/v2/health/ready", timeout=5)
    assert ready.status_code == 503 and "no model deployed yet" in ready.json()["error"]
    assert state_of(ctx)["health_url"] == f"{url}/v2/health/live"
    status = target.status(ctx)
    assert status["healthy"] is True and status["ready"] is False
    # Past the start timeout: a readiness check would have restarted it by now.
    time.sleep(max(0.0, started + policy.start_timeout_s + 2 - time.monotonic()))
    state = state_of(ctx)
    assert state["restarts"] == 0 and state["server_pid"] == server and state["healthy"]

    store = env_project.store()
    try:
        store.deployments.change("staging", expected_generation=0, action="deploy",
                                 actor="test", reason="test", model_name="vehicles",
                                 stable_version=1, target="local", endpoint=url)  # fmt: skip
    finally:
        store.close()
    wait_for(
        "the deployment to be served",
        lambda: httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200,
    )
    assert predict(url)["model_version"] == 1
    again = target.up(ctx)
    assert again.ok and "already running" in again.message
    assert f"healthy at {url}, serving vehicles:1" in again.message
    state = state_of(ctx)
    assert state["restarts"] == 0 and state["server_pid"] == server
    assert target.down(ctx).ok
    assert_all_gone(outcome.details["supervisor_pid"], [server])


def test_a_deployment_that_cannot_be_served_fails_up_with_the_servers_reason(
    env_project: Project, stopper: Any
) -> None:
    """Alive, with a deployment it cannot load (its bundle was tampered with): ``up`` waits
    for readiness, then fails with the server's own reason, and leaves it running."""
    from loopline.drivers.artifacts.store import ArtifactStore

    ctx = context(env_project, wait_s=10)
    store = env_project.store()
    try:
        sha = store.models.get("vehicles", 1).bundle_sha256
        store.deployments.change("staging", expected_generation=0, action="deploy",
                                 actor="test", reason="test", model_name="vehicles",
                                 stable_version=1, target="local",
                                 endpoint=ctx.env.endpoint)  # fmt: skip
    finally:
        store.close()
    blob = Path(ArtifactStore(ctx.config.artifacts_url()).uri(sha))
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte changed: its sha256 no longer matches
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    target = LocalTarget(policy=FAST)
    stopper(target, ctx)
    outcome = target.up(ctx)
    assert not outcome.ok
    assert outcome.message.startswith(
        f"environment staging is running at {ctx.env.endpoint} but not serving vehicles:1 "
        "after 10 s: not ready: "
    ), outcome.message
    assert "refusing to serve vehicles:1" in outcome.message
    assert "`loopline down --env staging` stops it" in outcome.message
    assert outcome.details["ready"] is False and outcome.details["log"].endswith("server.log")
    assert state_of(ctx)["restarts"] == 0  # alive: not the supervisor's to restart
    assert target.down(ctx).ok
