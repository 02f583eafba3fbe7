"""Credentials in URLs: masked wherever recorded or shown, taken from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from loopline.config import parse_config
from loopline.credentials import expand_url, has_masked_secret, mask_url, scrub
from loopline.errors import ConfigError


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://u:hunter2@db:5432/x", "postgresql://u:***@db:5432/x"),
        ("postgresql+psycopg://u:p%40ss@db/x?sslmode=require", "postgresql+psycopg://u:***@db/x?sslmode=require"),
        ("postgresql://u:${PW}@db/x", "postgresql://u:${PW}@db/x"),
        ("postgresql://u@db/x", "postgresql://u@db/x"),
        ("postgresql://db/x?user=u&password=hunter2&x=1", "postgresql://db/x?user=u&password=***&x=1"),
        ("sqlite:////data/a@b.db", "sqlite:////data/a@b.db"),
        ("sqlite:///rel.db", "sqlite:///rel.db"),
        ("s3://bucket/artifacts", "s3://bucket/artifacts"),
        ("mysql://u:***@db/x", "mysql://u:***@db/x"),
        # The password ends at the last '@' before the host, as urllib splits it.
        ("postgresql://user:p@ss@host/db", "postgresql://user:***@host/db"),
        ("postgresql://u:p@s@s@host:5432/db?x=a@b", "postgresql://u:***@host:5432/db?x=a@b"),
        ("postgresql://u:p/ss@host/db", "postgresql://u:***@host/db"),
        ("postgresql://a@b:pw@host/db", "postgresql://a@b:***@host/db"),
        ("postgresql://u@db:5432/x", "postgresql://u@db:5432/x"),
        # A mistyped scheme is still a URL with a password.
        ("postgres ql://user:s3cret@host/db", "postgres ql://user:***@host/db"),
    ],
)  # fmt: skip
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked
    assert mask_url(masked) == masked  # idempotent


def test_expand_url_takes_the_secret_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WH_PW", "p@ss/word")
    monkeypatch.setenv("WH_HOST", "db.example")
    url = "postgresql://u:${WH_PW}@${WH_HOST}/x"
    assert expand_url(url, "data.source.url") == "postgresql://u:p%40ss%2Fword@db.example/x"
    from sqlalchemy.engine import make_url

    assert make_url(expand_url(url, "f")).password == "p@ss/word"
    monkeypatch.delenv("WH_PW")
    with pytest.raises(
        ConfigError, match=r"data.source.url refers to \$\{WH_PW\}, which is not set"
    ):
        expand_url(url, "data.source.url")


def test_a_masked_url_cannot_be_opened() -> None:
    assert has_masked_secret("postgresql://u:***@db/x")
    with pytest.raises(ConfigError, match="password masked"):
        expand_url("postgresql://u:***@db/x", "data.source.url")


def test_scrub_hides_plain_and_encoded_forms() -> None:
    assert scrub("auth p@ss failed (p%40ss)", "p@ss") == "auth *** failed (***)"


WAREHOUSE = {
    "data": {
        "source": {
            "kind": "warehouse",
            "url": "postgresql://u:hunter2@db/x",
            "query": "SELECT path, label FROM t",
        }
    },
    "store": {"metadata_url": "postgresql://m:s3cr3t@meta/x"},
}


def test_the_config_never_serialises_a_password(tmp_path: Path) -> None:
    cfg = parse_config(WAREHOUSE, tmp_path)
    assert cfg.data.source.url == "postgresql://u:hunter2@db/x"  # kept to connect with
    dumped = str(cfg.to_dict()) + str(cfg.data.model_dump()) + cfg.model_dump_json()
    assert "hunter2" not in dumped and "s3cr3t" not in dumped
    assert cfg.to_dict()["data"]["source"]["url"] == "postgresql://u:***@db/x"
    assert cfg.metadata_url() == "postgresql://m:s3cr3t@meta/x"


def test_a_stored_config_takes_its_passwords_from_the_current_one(tmp_path: Path) -> None:
    current = parse_config(WAREHOUSE, tmp_path)
    stored = parse_config(current.to_dict(), tmp_path, "run r1")
    assert stored.data.source.url == "postgresql://u:***@db/x"
    resumed = stored.with_credentials_from(current)
    assert resumed.data.source.url == "postgresql://u:hunter2@db/x"
    assert resumed.store.metadata_url == "postgresql://m:s3cr3t@meta/x"
    assert stored.data.source.url == "postgresql://u:***@db/x"  # a copy, not a change
    moved = {**WAREHOUSE, "data": {"source": {**WAREHOUSE["data"]["source"], "url": "postgresql://u:x@elsewhere/x"}}}  # type: ignore[dict-item]  # fmt: skip
    other = stored.with_credentials_from(parse_config(moved, tmp_path))
    assert other.data.source.url == "postgresql://u:***@db/x"  # not the same URL: stays masked


def test_a_lake_url_with_a_password_is_masked_too(tmp_path: Path) -> None:
    from loopline.drivers.data.lake import Lake

    cfg = parse_config({"data": {"source": {"uri": "https://u:hunter2@host/lake"}}}, tmp_path)
    assert cfg.to_dict()["data"]["source"]["uri"] == "https://u:***@host/lake"
    # What a lake records and shows as its name (here a local folder named by such a URL).
    lake = Lake(str(tmp_path), shown_uri="https://u:hunter2@host/lake")
    assert lake.uri == "https://u:***@host/lake"
