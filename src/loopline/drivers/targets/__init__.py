"""Deployment targets: where an environment's servers run, behind one small interface.

A target is picked by name from an environment's ``target`` (``loopline.yaml``) and loaded
only when used (the kubernetes client, say, is imported only by the kubernetes target).
Every target can ``render`` what it would apply into a folder; ``up`` and ``down`` start
and stop the environment's servers where the target can (a container engine, a cluster,
this machine), and say plainly what is missing where it cannot.

The desired state (which versions serve, with what traffic shares) is never part of what a
target applies: the servers read it from the metadata store and reconcile to it, so a
promotion needs no redeploy.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from loopline.errors import ConfigError

if TYPE_CHECKING:
    from loopline.config import Config
    from loopline.environments import EnvironmentConfig

TARGETS = {
    "local": "loopline.drivers.targets.local:LocalTarget",
    "container": "loopline.drivers.targets.container:ContainerTarget",
    "vm": "loopline.drivers.targets.vm:VmTarget",
    "kubernetes": "loopline.drivers.targets.kubernetes:KubernetesTarget",
    "edge": "loopline.drivers.targets.edge:EdgeTarget",
}


@dataclass
class TargetContext:
    """What a target needs to know: the project, the environment, and the model to serve.

    ``bundle_dir`` is a verified, extracted bundle of ``model_name:model_version`` (its
    registered sha256 is ``bundle_sha256``), or None when no version is deployed yet.
    """

    config: Config
    environment: str
    env: EnvironmentConfig
    model_name: str | None = None
    model_version: int | None = None
    bundle_sha256: str | None = None
    bundle_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    """What ``up``/``down`` did, in words, plus anything a script needs (``--json``)."""

    ok: bool
    message: str
    details: dict[str, Any] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)  # what to run where we cannot


class Target(Protocol):
    name: str

    def render(self, ctx: TargetContext, out: Path) -> list[Path]:
        """Write what this target would apply into ``out``; return the files written."""
        ...

    def up(self, ctx: TargetContext) -> Outcome:
        """Start (or update) the environment's servers."""
        ...

    def down(self, ctx: TargetContext) -> Outcome:
        """Stop the environment's servers."""
        ...

    def status(self, ctx: TargetContext) -> dict[str, Any]:
        """What runs for this environment, as the target sees it."""
        ...


def get_target(name: str) -> Target:
    """The target called ``name`` (ConfigError naming the known ones)."""
    try:
        path = TARGETS[name]
    except KeyError:
        raise ConfigError(f"unknown target {name!r}; known: {', '.join(TARGETS)}") from None
    module, _, cls = path.partition(":")
    try:
        loaded = importlib.import_module(module)
    except ModuleNotFoundError as err:  # this target's module, not one it imports
        if not err.name or not module.startswith(err.name):
            raise
        raise ConfigError(
            f"the {name} target is not available in this installation ({module} is missing); "
            f"available: {', '.join(available_targets())}"
        ) from None
    target: Target = getattr(loaded, cls)()
    return target


def available_targets() -> list[str]:
    """The targets whose modules are installed."""
    import importlib.util

    return [
        name
        for name, path in TARGETS.items()
        if importlib.util.find_spec(path.partition(":")[0]) is not None
    ]


def render(
    config: Config,
    environment: str,
    ref: str,
    target: str,
    out: Path,
    extra: dict[str, Any] | None = None,
) -> list[Path]:
    """Write what ``target`` would apply for ``environment`` serving ``ref`` into ``out``.

    See ``loopline.drivers.targets.context.render``; nothing is applied.
    """
    from loopline.drivers.targets.context import render as render_into

    return render_into(config, environment, ref, target, out, extra)
