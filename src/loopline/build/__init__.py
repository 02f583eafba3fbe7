"""The Build pipeline: ingest, validate, split, train, evaluate, gate, package, register."""

from loopline.build.pipeline import BuildResult, build, build_pipeline

__all__ = ["BuildResult", "build", "build_pipeline"]
