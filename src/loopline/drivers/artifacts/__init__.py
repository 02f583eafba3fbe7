"""Content-addressed artifact store over fsspec."""

from loopline.drivers.artifacts.store import ArtifactRef, ArtifactStore

__all__ = ["ArtifactRef", "ArtifactStore"]
