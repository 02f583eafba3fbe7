"""A missing train extra skips the trainer tests locally but fails them in CI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# pytest on the trainer tests, with torch made unimportable (as when the extra is missing).
SCRIPT = (
    "import sys; sys.modules['torch'] = None; import pytest; "
    "sys.exit(pytest.main(['-p', 'no:cacheprovider', '-q', '-rs', '--collect-only', "
    "'tests/builder/test_trainer.py']))"
)


def _collect(ci: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CI": ci}
    return subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True
    )


@pytest.mark.parametrize(("ci", "outcome"), [("true", "fails"), ("", "skips")])
def test_a_missing_train_extra(ci: str, outcome: str) -> None:
    result = _collect(ci)
    if outcome == "fails":
        assert result.returncode == pytest.ExitCode.INTERRUPTED, result.stdout
        assert "the train extra is required in CI but torch is missing" in result.stdout
    else:
        assert result.returncode == pytest.ExitCode.NO_TESTS_COLLECTED, result.stdout
        assert "the train extra is not installed (torch)" in result.stdout
