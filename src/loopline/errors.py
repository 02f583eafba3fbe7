"""One exception hierarchy for Loopline.

Library code raises these with a message a user can act on (what is wrong and what is
allowed). The CLI turns them into one line and an exit code; the server into a JSON 4xx.
"""

from __future__ import annotations


class LooplineError(Exception):
    """Base class for every error Loopline raises on purpose."""

    exit_code = 1


class ConfigError(LooplineError):
    """The configuration file or an override is invalid."""


class DataSourceError(LooplineError):
    """A data lake or warehouse cannot be read, or a path escapes its root."""


class ValidationFailed(LooplineError):
    """Validation quarantined more records than the configured limit allows."""


class StoreError(LooplineError):
    """The metadata store cannot be reached or is inconsistent."""


class NotFound(LooplineError):
    """A run, dataset, model, version or alias does not exist."""


class Conflict(LooplineError):
    """The stored state forbids the change (an archived version, an alias still held)."""


class AliasConflict(Conflict):
    """A compare-and-set alias change found the alias no longer where it expected."""


class IntegrityError(LooplineError):
    """An artifact's content does not match its recorded sha256 (tampered or corrupt)."""


class MissingExtra(LooplineError):
    """An optional dependency is needed; the message names the extra to install."""


class PipelineError(LooplineError):
    """A pipeline step failed or a run cannot be resumed."""


class GateRejected(LooplineError):
    """The gate rejected a candidate model; the message lists the reasons."""

    exit_code = 3


class InvalidInput(LooplineError):
    """A client sent something the server cannot accept (maps to a 4xx)."""

    status_code = 400


class UnsupportedImage(InvalidInput):
    """An image is not JPEG or PNG (the server answers 415)."""

    status_code = 415


class ImageTooLarge(InvalidInput):
    """An image's header declares more pixels than accepted (the server answers 413)."""

    status_code = 413


class UndecodableImage(InvalidInput):
    """An image's decoder failed in a way Loopline does not expect (the server answers 400)."""


def require_extra(module: str, extra: str) -> None:
    """Raise MissingExtra unless ``module`` can be imported."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MissingExtra(
            f"{module} is not installed; install the extra: pip install 'loopline[{extra}]'"
        )
