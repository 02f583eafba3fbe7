"""The Build pipeline: ingest, validate, split, train, evaluate, gate, package, register."""

from loopline.builder.pipeline import BuildResult, build, build_pipeline

__all__ = ["BuildResult", "build", "build_pipeline"]
