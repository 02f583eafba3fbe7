"""`loopline models alias/archive/unarchive/--all`: thin shells over the registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.test_cli import invoke, one_line_error


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    """A project whose registry holds m:1, m:2 and m:3 (m:3 is the candidate)."""
    from loopline.drivers.metadata.store import MetadataStore

    cfg = tmp_path / "loopline.yaml"
    url = f"sqlite:///{tmp_path / 'm.db'}"
    cfg.write_text(f"store: {{metadata_url: '{url}'}}\n")
    store = MetadataStore(url)
    for i in (1, 2, 3):
        store.models.register(
            "m", bundle_uri=f"x{i}", bundle_sha256=f"{i}" * 64, metrics={"accuracy": 0.5}
        )
    store.close()
    return cfg


def aliases(cfg: Path, flag: str | None = None) -> dict[int, list[str]]:
    code, out, err = invoke("models", "-c", str(cfg), "--json", *([flag] if flag else []))
    assert code == 0, err
    return {m["version"]: m["aliases"] for m in json.loads(out)}


def test_alias_moves_unconditionally_and_with_compare_and_set(registry: Path) -> None:
    c = ["-c", str(registry)]
    code, out, err = invoke("models", "alias", "m:1", "production", *c)
    assert code == 0 and "m@production -> m:1" in out, err
    code, out, err = invoke("models", "alias", "m:2", "production", "--expect", "1", *c)
    assert code == 0, err
    assert aliases(registry)[2] == ["production"]
    # The alias is at 2 now: a move that expects 1 changes nothing and says where it is.
    code, _, err = invoke("models", "alias", "m:3", "production", "--expect", "1", *c)
    assert code == 1
    line = one_line_error(err)
    assert "m@production points at m:2" in line and "expected m:1" in line
    assert aliases(registry)[2] == ["production"]
    code, _, err = invoke("models", "alias", "m:3", "staging", "--expect", "none", *c)
    assert code == 0, err
    code, _, err = invoke("models", "alias", "m:1", "staging", "--expect", "none", *c)
    assert code == 1 and "points at m:3" in one_line_error(err)
    code, _, err = invoke("models", "alias", "m:1", "staging", "--expect", "two", *c)
    assert code == 1 and "--expect 'two'" in one_line_error(err)
    code, _, err = invoke("models", "alias", "m", "staging", *c)
    assert code == 1 and "explicit version" in one_line_error(err)


def test_alias_delete(registry: Path) -> None:
    c = ["-c", str(registry)]
    assert invoke("models", "alias", "m:2", "production", *c)[0] == 0
    code, _, err = invoke("models", "alias", "m", "production", "--delete", "--expect", "1", *c)
    assert code == 1 and "points at m:2" in one_line_error(err)
    code, _, err = invoke("models", "alias", "m:1", "production", "--delete", *c)
    assert code == 1 and "points at m:2" in one_line_error(err)  # NAME:VERSION = expect
    code, out, err = invoke("models", "alias", "m", "production", "--delete", *c)
    assert code == 0 and "deleted m@production (it pointed at m:2)" in out, err
    assert aliases(registry)[2] == []
    code, _, err = invoke("models", "alias", "m", "production", "--delete", *c)
    assert code == 1 and "no alias 'production'" in one_line_error(err)
    code, out, err = invoke("audit", "--json", *c)
    actions = [e["action"] for e in json.loads(out)]
    assert actions[0] == "model.alias.delete"


def test_archive_hides_a_version_until_unarchived(registry: Path) -> None:
    c = ["-c", str(registry)]
    code, _, err = invoke("models", "archive", "m:3", *c)  # m:3 holds candidate
    assert code == 1 and "holds aliases candidate" in one_line_error(err)
    code, out, err = invoke("models", "archive", "m:1", *c)
    assert code == 0 and "archived m:1" in out, err
    assert sorted(aliases(registry)) == [2, 3]
    code, out, err = invoke("models", "--all", "--json", *c)
    listed = {m["version"]: m["archived_at"] for m in json.loads(out)}
    assert sorted(listed) == [1, 2, 3] and listed[1] and not listed[2]
    code, out, _ = invoke("models", "--all", *c)
    assert code == 0 and "archived" in out
    code, out, _ = invoke("models", "show", "m:1", *c)
    assert code == 0 and "archived" in out
    code, _, err = invoke("models", "alias", "m:1", "production", *c)
    assert code == 1 and "archived" in one_line_error(err)
    code, out, err = invoke("models", "unarchive", "m:1", *c)
    assert code == 0 and "unarchived m:1" in out, err
    assert sorted(aliases(registry)) == [1, 2, 3]
    code, _, err = invoke("models", "archive", "m@candidate", *c)
    assert code == 1 and "explicit version" in one_line_error(err)
    code, _, err = invoke("models", "archive", "m:9", *c)
    assert code == 1 and "no model version m:9" in one_line_error(err)
