"""What Build steps may reach besides their inputs and params, and the wiring behind it.

``BuildResources`` is the build's wiring: the config, the stores and the data source.
Steps never see it: they get ``StepResources``, a read-only view holding the data source,
the artifact store (to fetch registered bundles by sha256) and a lookup of a model version by
alias. No config and no metadata writes: a step reads only what its cache key names, and
what it produces is written by the recorder (``loopline.builder.record``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from loopline.config import Config
from loopline.drivers.artifacts import ArtifactStore
from loopline.drivers.data import DataSource, open_source
from loopline.drivers.metadata.store import MetadataStore


@dataclass(frozen=True)
class StepResources:
    """Read-only resources of a Build step."""

    source: DataSource
    artifacts: ArtifactStore
    # (model name, alias) -> that model version, or None when the alias is not set.
    find_model: Callable[[str, str], Any]


@dataclass
class BuildResources:
    """A build's config and stores; ``for_steps()`` is what its steps get."""

    config: Config
    store: MetadataStore
    artifacts: ArtifactStore
    actor: str = "loopline"

    @cached_property
    def source(self) -> DataSource:
        return open_source(self.config)

    def find_model(self, name: str, alias: str) -> Any:
        """The version of ``name`` that ``alias`` points at, or None."""
        from loopline.errors import NotFound

        try:
            return self.store.models.get(name, alias=alias)
        except NotFound:
            return None

    def for_steps(self) -> StepResources:
        return StepResources(self.source, self.artifacts, self.find_model)
