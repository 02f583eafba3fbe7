"""What the Build steps may reach besides their inputs: the stores and the data source."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from loopline.config import Config
from loopline.drivers.artifacts import ArtifactStore
from loopline.drivers.data import DataSource, open_source
from loopline.drivers.metadata.store import MetadataStore


@dataclass
class BuildResources:
    config: Config
    store: MetadataStore
    artifacts: ArtifactStore
    actor: str = "loopline"

    @cached_property
    def source(self) -> DataSource:
        return open_source(self.config)

    @property
    def bundle_cache(self) -> Path:
        return self.config.state_dir / "bundles"

    def production_ref(self) -> Any:
        """The model version the gate compares against, or None."""
        from loopline.errors import NotFound

        alias = self.config.gate.compare_to
        if not alias:
            return None
        try:
            return self.store.get_model_version(self.config.model.name, alias=alias)
        except NotFound:
            return None
