"""Loopline: closed-loop MLOps. Build, deploy and monitor models as one loop.

Nothing heavy is imported here: ``import loopline`` stays fast and torch-free.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
