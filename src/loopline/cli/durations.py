"""Durations on the command line: ``500ms``, ``5s``, ``2m``, ``1h``, ``2d``, ``1h30m``.

One parser for every option that takes a duration (``loopline monitor --interval``,
``loopline predictions --since``), so they accept the same forms and say the same thing
when a value is wrong.
"""

from __future__ import annotations

import re

from loopline.errors import ConfigError

UNITS: dict[str, float] = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
FORMS = "a number with a unit ms, s, m, h or d, or several such as 1h30m (e.g. 500ms, 5s, 2d)"
# One part: a number and a unit (``ms`` before ``m``, so ``500ms`` is not 500 minutes).
_PART = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)")
_NUMBER = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*")


def parse_duration(text: str, option: str = "duration") -> float:
    """Seconds in ``text``: parts such as ``1h30m`` or ``500ms`` added up (a bare number is
    seconds); ConfigError naming ``option`` and the allowed forms otherwise (also for 0)."""
    raw = text.strip().lower()
    seconds, pos = 0.0, 0
    bare = _NUMBER.fullmatch(raw)
    if bare is not None:
        seconds, pos = float(bare.group(1)), len(raw)
    else:
        while pos < len(raw):
            match = _PART.match(raw, pos)
            if match is None:
                break
            seconds += float(match.group(1)) * UNITS[match.group(2)]
            pos = match.end()
    if not raw or pos != len(raw) or seconds <= 0:
        raise ConfigError(f"invalid {option} {text!r}: use a positive duration, {FORMS}")
    return seconds
