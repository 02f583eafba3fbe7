"""The pipeline engine: steps, pipelines, runs, caching and lineage.

This layer imports no driver, no web framework and no torch; stores are handed to it.
"""

from loopline.pipeline.engine import Runner, RunResult
from loopline.pipeline.step import Pipeline, Step, StepContext

__all__ = ["Pipeline", "RunResult", "Runner", "Step", "StepContext"]
