"""The demo's project folder: a ``loopline.yaml`` tuned for speed, and the example lake.

``prepare`` makes (or resets) the folder ``loopline demo`` works in: ``loopline.yaml``,
``lake/`` (day images only, from ``datagen``), and ``.loopline/`` (the store) wiped from a
previous demo, whose servers are stopped first. A folder that holds anything else is left
alone (ConfigError). Afterwards it is an ordinary project: ``loopline alerts``,
``loopline models``, ``loopline runs`` work in it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loopline.demo.scenario import Scenario
from loopline.errors import ConfigError

if TYPE_CHECKING:
    from loopline.config import Config
    from loopline.drivers.targets import Target, TargetContext

MARKER = ".loopline-demo.json"
TOKEN_VAR = "LOOPLINE_DEMO_TOKEN"
MODEL = "vehicles"
ENVIRONMENTS = ("production", "staging")
# Settings of this process that would point the demo's servers at another store.
FOREIGN_ENV = ("LOOPLINE_DB_URL", "LOOPLINE_ARTIFACTS_URL")


@dataclass
class DemoProject:
    """Where the demo runs and how to reach its production environment."""

    root: Path
    config_path: Path
    lake: Path
    port: int
    lake_reused: bool = False

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token(self) -> str:
        return os.environ[TOKEN_VAR]

    def config(self) -> Config:
        from loopline.config import load_config

        return load_config(self.config_path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config_text(scenario: Scenario, port: int) -> str:
    """The demo's ``loopline.yaml``: the example's, tuned so the whole story takes minutes."""
    s = scenario
    return f"""\
# Written by `loopline demo`: the vehicle example, tuned to run the whole loop in minutes
# on 2 cores (small input, few epochs, one grid point). An ordinary project otherwise:
# `loopline alerts`, `loopline models`, `loopline runs` work here.
project: loopline-demo
model: {{name: {MODEL}}}

data:
  source: {{kind: lake, uri: ./lake}}   # day images only: v1 never saw fog or night
  labels: [car, van, truck, bus, motorcycle]

split: {{train: 0.7, val: 0.15, test: 0.15, seed: 42}}

train:
  input_size: {s.input_size}
  epochs: {s.epochs}
  patience: 4
  batch_size: 64
  threads: 1                 # the servers and the traffic share the 2 cores
  seed: {s.seed}
  search: {{sampler: grid, pruner: none, space: {{lr: [0.003]}}}}

evaluate: {{segments: [condition, camera_id]}}

gate:
  rules: ["macro_precision >= 0.70"]
  compare_to: production

environments:
  production:
    port: {port}
    token: ${{{TOKEN_VAR}}}    # feedback needs it; `loopline demo` sets it
    serve: {{workers: 1, flush_interval_s: 0.25}}   # the monitor sees predictions sooner
    reconcile_interval_s: 0.5
    canary: {{share: 0.1, min_requests: {s.canary_min_requests}, min_labels: {s.canary_min_labels},
             max_p95_ms: 1000}}
    capture: {{sample_rate: 1.0}}   # every frame kept: the retrain's labelled data
  staging:
    port: 0                    # the replica test picks a free port
    replica_test:
      max_test_images: 200
      load_requests: 60
      concurrency: 4
      max_p95_ms: 1000
      replay: 200                # the newest ~80 frames are not labelled yet: 120 are

monitor:
  environments: [production]
  interval_s: {s.monitor_interval_s:g}
  segments: [camera_id]
  owner: qa@example.com
  late_s: 15
  retrain:
    min_new_labels: {s.retrain_min_labels}   # labelled captures since v1 before retraining
    holdout_share: {s.holdout_share:g}
    set: ["train.epochs={s.retrain_epochs}"]
    strategy: canary
    release_timeout_s: 300
"""


def prepare(
    root: Path,
    scenario: Scenario,
    *,
    progress: Callable[[int], None] | None = None,
    on_lake: Callable[[int], None] | None = None,
) -> DemoProject:
    """Make ``root`` the demo's project: config, lake (kept when a previous demo made the
    same one), and a fresh store. ``on_lake(total)`` is called before the lake is written.

    Raises:
        ConfigError: ``root`` holds files that are not a previous demo's.
    """
    from loopline.examples.vehicles.datagen import generate_lake

    root = Path(root).resolve()
    marker = root / MARKER
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{root} is a file; the demo needs a folder (--dir)")
    if root.is_dir() and any(root.iterdir()) and not marker.is_file():
        raise ConfigError(
            f"{root} holds files that are not a previous demo's; choose an empty or new "
            "folder with --dir"
        )
    root.mkdir(parents=True, exist_ok=True)
    previous = _read_marker(marker)
    if previous is not None:
        stop_servers(root)
        shutil.rmtree(root / ".loopline", ignore_errors=True)
    os.environ.setdefault(TOKEN_VAR, secrets.token_hex(16))
    lake = root / "lake"
    wanted = _lake_params(scenario)
    reused = previous is not None and previous.get("lake") == wanted
    reused = reused and (lake / "manifest.csv").is_file()
    if not reused:
        if on_lake is not None:
            on_lake(scenario.lake_images)
        generate_lake(
            lake,
            images=scenario.lake_images,
            seed=scenario.seed,
            conditions=["day"],
            cameras=scenario.cameras,
            image_size=scenario.image_size,
            progress=progress,
            overwrite=True,
        )
    port = free_port()
    config_path = root / "loopline.yaml"
    config_path.write_text(config_text(scenario, port))
    marker.write_text(json.dumps({"lake": wanted}, indent=2) + "\n")
    return DemoProject(root, config_path, lake, port, lake_reused=reused)


def production_target(config: Config, project: DemoProject) -> tuple[Target, TargetContext]:
    """Production's target and context, as ``loopline up --env production`` makes them."""
    from loopline.drivers.targets import TargetContext, get_target

    settings = config.environment("production")
    ctx = TargetContext(
        config=config,
        environment="production",
        env=settings,
        extra={"config_path": project.config_path, "wait_s": 60.0},
    )
    return get_target(settings.target), ctx


@contextlib.contextmanager
def own_stores() -> Iterator[None]:
    """The demo's servers and monitor use the demo folder's store, whatever is exported."""
    saved = {k: os.environ.pop(k) for k in FOREIGN_ENV if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def stop_servers(root: Path) -> None:
    """Stop whatever a previous demo in ``root`` left running (its local supervisors)."""
    from loopline.drivers.targets import TargetContext
    from loopline.drivers.targets.local import LocalTarget, running_supervisor

    config_path = root / "loopline.yaml"
    if not config_path.is_file():
        return
    try:
        from loopline.config import load_config

        config = load_config(config_path)
    except ConfigError:
        return
    target = LocalTarget()
    for env in ENVIRONMENTS:
        if env not in config.environments:
            continue
        folder = config.state_dir / "envs" / env
        if folder.is_dir() and running_supervisor(folder) is not None:
            ctx = TargetContext(
                config=config,
                environment=env,
                env=config.environment(env),
                extra={"config_path": config_path},
            )
            target.down(ctx)


def _lake_params(scenario: Scenario) -> dict[str, object]:
    return {
        "images": scenario.lake_images,
        "seed": scenario.seed,
        "cameras": scenario.cameras,
        "image_size": list(scenario.image_size),
        "conditions": ["day"],
    }


def _read_marker(path: Path) -> dict[str, object] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
