"""Guard: every ``tests/**/test_*.py`` file is collected by pytest.

pytest's default ``norecursedirs`` skips folders such as ``build`` and ``dist``; a test file
there, or one that fails to import, would silently never run in CI.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def collected_files(root: Path) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, f"collection failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return {line.split("::", 1)[0] for line in out.stdout.splitlines() if "::" in line}


def test_every_test_file_is_collected() -> None:
    on_disk = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").rglob("test_*.py")}
    missing = sorted(on_disk - collected_files(ROOT))
    assert not missing, f"test files pytest never collects: {missing}"


def test_guard_notices_a_skipped_folder(tmp_path: Path) -> None:
    """The guard itself can fail: a test file in a folder named ``build`` is not collected."""
    (tmp_path / "tests" / "build").mkdir(parents=True)
    (tmp_path / "tests" / "test_a.py").write_text("def test_a():\n    pass\n")
    (tmp_path / "tests" / "build" / "test_b.py").write_text("def test_b():\n    pass\n")
    assert collected_files(tmp_path) == {"tests/test_a.py"}
