"""The Build recorder: writes what the steps' outputs mean to the metadata store.

Steps only return values; the runner hands them to ``BuildRecorder.step_done`` after each
step, fresh or cached. After ``ingest`` it records the dataset version, after ``package``
it registers the bundle as a model version. Registration goes through the registry's
atomic dedup: a bundle equal to an existing version's registers nothing, and the recorder
remembers which version it equals.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loopline import __version__
from loopline.digest import sha256_bytes
from loopline.drivers.artifacts import ArtifactStore
from loopline.drivers.metadata.store import MetadataStore
from loopline.metrics import headline
from loopline.pipeline.step import Reporter, SilentReporter


def git_commit(root: Path) -> str | None:
    """The user project's git commit, if the project is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def record_dataset(
    store: MetadataStore, project: str, dataset: Mapping[str, Any], run_id: str | None
) -> None:
    """Record ingest's ``dataset`` output as a dataset version of ``project`` (idempotent)."""
    store.datasets.add(
        version=dataset["version"],
        name=project,
        source_uri=dataset["source"],
        n_records=dataset["n_records"],
        records_sha256=dataset["records_sha256"],
        stats=dataset["stats"],
        created_by_run=run_id,
    )


def registry_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """What the registry keeps of an evaluation report: headline, per class, per segment."""
    summary: dict[str, Any] = dict(headline(metrics))
    summary["per_class"] = metrics["per_class"]
    summary["segments"] = {
        column: {value: headline(r) for value, r in values.items()}
        for column, values in metrics.get("segments", {}).items()
    }
    return summary


@dataclass
class BuildRecorder:
    """Records a build's dataset version and model version; see the module docstring."""

    store: MetadataStore
    artifacts: ArtifactStore
    project: str
    model_name: str
    git_commit: str | None = None
    actor: str = "loopline"
    reporter: Reporter = field(default_factory=SilentReporter)
    # The version the bundle was registered as, or found equal to; and which of the two.
    version: Any = None
    created: bool = False

    def step_done(self, run_id: str, step: str, values: Mapping[str, Any]) -> None:
        if step == "ingest":
            record_dataset(self.store, self.project, values["dataset"], run_id)
            self.store.runs.update(run_id, dataset_version=values["dataset"]["version"])
        elif step == "package":
            self.register(run_id, values)

    def register(self, run_id: str, values: Mapping[str, Any]) -> None:
        bundle: bytes = values["bundle"]
        digest = sha256_bytes(bundle)  # the engine stored it under this digest already
        dataset, model = values["dataset"], values["model"]
        registration = self.store.models.register(
            self.model_name,
            actor=self.actor,
            metrics=registry_metrics(values["metrics"]),
            bundle_uri=self.artifacts.uri(digest),
            bundle_sha256=digest,
            dataset_version=dataset["version"],
            run_id=run_id,
            lineage={
                "dataset_version": dataset["version"],
                "dataset_source": dataset["source"],
                "run_id": run_id,
                "git_commit": self.git_commit,
                "loopline_version": __version__,
                "params": model["best_params"],
                "spec": model["spec"],
                "gate": values["decision"],
            },
        )
        mv = self.version = registration.version
        self.created = registration.created
        self.store.runs.update(run_id, model_name=mv.name, model_version=mv.version)
        if registration.created:
            self.reporter.log("register", f"registered {mv.name}:{mv.version} (alias candidate)")
        else:
            self.reporter.log(
                "register", f"the bundle equals {mv.name}:{mv.version}; nothing registered"
            )
