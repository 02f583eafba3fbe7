"""``store.loops``: see the class docstring."""

from __future__ import annotations

from loopline.drivers.metadata.database import Database


class LoopRepository:
    """(being written)"""

    def __init__(self, db: Database) -> None:
        self._db = db
