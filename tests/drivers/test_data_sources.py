"""Data sources: the lake (manifest, Parquet, folders) and the warehouse (SQLite, PostgreSQL)."""

from __future__ import annotations

import csv
import io
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sqlalchemy import create_engine, text

from loopline.config import parse_config
from loopline.drivers.data import open_source
from loopline.drivers.data.lake import Lake
from loopline.drivers.data.warehouse import Warehouse
from loopline.errors import DataSourceError


def _png(seed: int, size: tuple[int, int] = (8, 6)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def folder_lake(tmp_path: Path) -> Path:
    """One folder per class, plus files that are not records; a secret file beside the lake."""
    root = tmp_path / "lake"
    for i, rel in enumerate(["car/0.png", "car/1.PNG", "van/a/2.jpg", "truck/3.jpeg"]):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(_png(i))
    (root / "README.txt").write_text("not an image")
    (root / "top.png").write_bytes(_png(9))  # no class folder: not a record
    (root / "car" / "notes.txt").write_text("not an image either")
    (tmp_path / "x.png").write_bytes(b"outside the lake")
    return root


# -- lake: manifest ----------------------------------------------------------------------
def test_manifest_lake_lists_every_row(tiny_lake: Path) -> None:
    with open(tiny_lake / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for layout in ("manifest", "auto"):
        df = Lake(str(tiny_lake), layout=layout).list_records()
        assert list(df.columns) == ["path", "label", "camera_id", "captured_at", "condition"]
        assert len(df) == len(rows) == 300
        assert df["path"].tolist() == [r["path"] for r in rows]
        assert df["label"].tolist() == [r["label"] for r in rows]
        assert "" in set(df["label"]) and "nan" not in set(df["label"])  # unlabelled rows
        assert list(df.index) == list(range(len(df)))


def test_manifest_lake_reads_bytes(tiny_lake: Path) -> None:
    lake = Lake(str(tiny_lake))
    first = lake.list_records()["path"].iloc[0]
    assert lake.read_bytes(first) == (tiny_lake / first).read_bytes()
    with pytest.raises(DataSourceError, match="listed but missing"):
        lake.read_bytes("images/none.png")


def test_parquet_manifest(tmp_path: Path) -> None:
    root = tmp_path / "lake"
    (root / "img").mkdir(parents=True)
    for i in range(3):
        (root / "img" / f"{i}.png").write_bytes(_png(i))
    pd.DataFrame(
        {
            "path": ["img/0.png", "img/1.png", "img/2.png"],
            "label": ["car", None, "bus"],
            "camera_id": ["c1", "c2", "c1"],
        }
    ).to_parquet(root / "manifest.parquet")
    lake = Lake(str(root), manifest="manifest.parquet")
    df = lake.list_records()
    assert df["path"].tolist() == ["img/0.png", "img/1.png", "img/2.png"]
    assert df["label"].tolist() == ["car", "", "bus"]  # a null label is unlabelled
    assert df["camera_id"].tolist() == ["c1", "c2", "c1"]
    assert lake.read_bytes("img/2.png") == _png(2)


def test_manifest_without_label_column_names_it(tmp_path: Path) -> None:
    (tmp_path / "manifest.csv").write_text("path,camera_id\na.png,c1\n")
    with pytest.raises(DataSourceError, match=r"lacks column\(s\) label"):
        Lake(str(tmp_path)).list_records()


def test_missing_or_broken_manifest(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="manifest manifest.csv not found"):
        Lake(str(tmp_path), layout="manifest").list_records()
    (tmp_path / "m.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataSourceError, match="cannot read manifest m.parquet"):
        Lake(str(tmp_path), manifest="m.parquet").list_records()


def test_a_missing_lake_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="loopline datagen") as info:
        Lake(str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in str(info.value)


# -- lake: folders -----------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["folders", "auto"])
def test_folders_layout(folder_lake: Path, layout: str) -> None:
    lake = Lake(str(folder_lake), layout=layout)
    df = lake.list_records()
    assert df.to_dict("records") == [
        {"path": "car/0.png", "label": "car"},
        {"path": "car/1.PNG", "label": "car"},
        {"path": "truck/3.jpeg", "label": "truck"},
        {"path": "van/a/2.jpg", "label": "van"},
    ]
    assert lake.read_bytes("van/a/2.jpg") == _png(2)


def test_auto_prefers_a_manifest(folder_lake: Path) -> None:
    (folder_lake / "manifest.csv").write_text("path,label\ncar/0.png,van\n")
    assert Lake(str(folder_lake)).list_records().to_dict("records") == [
        {"path": "car/0.png", "label": "van"}
    ]
    assert len(Lake(str(folder_lake), layout="folders").list_records()) == 4


def test_folders_without_images(tmp_path: Path) -> None:
    (tmp_path / "car").mkdir()
    (tmp_path / "car" / "a.txt").write_text("x")
    with pytest.raises(DataSourceError, match="no images found"):
        Lake(str(tmp_path)).list_records()


# -- lake: paths stay inside -------------------------------------------------------------
@pytest.mark.parametrize(
    "path",
    [
        "../x.png",
        "/etc/passwd",
        "a/../../x.png",
        "car/../../x.png",
        "..",
        "",
        "C:/x.png",
        "file:///etc/passwd",
        "..\\x.png",
    ],
)
def test_paths_escaping_the_lake_are_refused(folder_lake: Path, path: str) -> None:
    with pytest.raises(DataSourceError, match="relative|escapes"):
        Lake(str(folder_lake)).read_bytes(path)


def test_a_symlink_pointing_outside_is_refused(folder_lake: Path, tmp_path: Path) -> None:
    (folder_lake / "car" / "link.png").symlink_to(tmp_path / "x.png")
    (folder_lake / "outside").symlink_to(tmp_path, target_is_directory=True)
    lake = Lake(str(folder_lake))
    with pytest.raises(DataSourceError, match="via a link"):
        lake.read_bytes("car/link.png")
    with pytest.raises(DataSourceError, match="via a link"):
        lake.read_bytes("outside/x.png")


def test_a_symlink_inside_the_lake_is_fine(folder_lake: Path) -> None:
    (folder_lake / "van" / "alias.png").symlink_to(folder_lake / "car" / "0.png")
    assert Lake(str(folder_lake)).read_bytes("van/alias.png") == _png(0)


def test_a_normalised_path_inside_is_fine(folder_lake: Path) -> None:
    assert Lake(str(folder_lake)).read_bytes("van/../car/./0.png") == _png(0)


# -- lake: fingerprint -------------------------------------------------------------------
def test_fingerprint_changes_when_files_change(folder_lake: Path) -> None:
    lake = Lake(str(folder_lake))
    before = lake.fingerprint()
    assert lake.fingerprint() == before
    target = folder_lake / "car" / "0.png"
    stat = target.stat()

    target.write_bytes(_png(100, size=(9, 9)))  # new size
    resized = lake.fingerprint()
    assert resized != before

    same_size = bytearray(target.read_bytes())
    same_size[-20] ^= 0xFF
    target.write_bytes(bytes(same_size))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    assert lake.fingerprint() != resized  # same size, new mtime

    touched = lake.fingerprint()
    (folder_lake / "bus").mkdir()
    (folder_lake / "bus" / "9.png").write_bytes(_png(9))
    added = lake.fingerprint()
    assert added != touched
    (folder_lake / "bus" / "9.png").unlink()
    assert lake.fingerprint() != added


# -- warehouse ---------------------------------------------------------------------------
ROWS = [
    {"path": "car/0.png", "label": "car", "camera_id": "c1"},
    {"path": "car/1.PNG", "label": None, "camera_id": "c2"},
    {"path": "van/a/2.jpg", "label": "van", "camera_id": "c1"},
]


def _fill(url: str, table: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {table} (path TEXT, label TEXT, camera_id TEXT)"))
        conn.execute(text(f"INSERT INTO {table} VALUES (:path, :label, :camera_id)"), ROWS)
    engine.dispose()


@pytest.fixture
def sqlite_warehouse(tmp_path: Path) -> tuple[str, str]:
    url = f"sqlite:///{tmp_path / 'warehouse.db'}"
    _fill(url, "images")
    return url, "images"


@pytest.fixture
def pg_warehouse(pg_url: str) -> Iterator[tuple[str, str]]:
    table = f"wh_images_{uuid.uuid4().hex[:10]}"
    _fill(pg_url, table)
    yield pg_url, table
    engine = create_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def warehouse_table(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(SQLAlchemy URL, table name) of a small image table, on each backend."""
    fixture = "sqlite_warehouse" if request.param == "sqlite" else "pg_warehouse"
    return request.getfixturevalue(fixture)  # type: ignore[no-any-return]


def test_warehouse_lists_records_and_reads_bytes(
    warehouse_table: tuple[str, str], folder_lake: Path
) -> None:
    url, table = warehouse_table
    wh = Warehouse(
        url, f"SELECT path, label, camera_id FROM {table} ORDER BY path", str(folder_lake)
    )
    df = wh.list_records()
    assert df.to_dict("records") == [
        {"path": "car/0.png", "label": "car", "camera_id": "c1"},
        {"path": "car/1.PNG", "label": "", "camera_id": "c2"},  # NULL: unlabelled
        {"path": "van/a/2.jpg", "label": "van", "camera_id": "c1"},
    ]
    assert wh.read_bytes(df["path"].iloc[2]) == _png(2)
    with pytest.raises(DataSourceError, match="escapes"):
        wh.read_bytes("../x.png")


def test_warehouse_fingerprint_follows_the_rows(
    warehouse_table: tuple[str, str], folder_lake: Path
) -> None:
    url, table = warehouse_table
    wh = Warehouse(url, f"SELECT path, label FROM {table} ORDER BY path", str(folder_lake))
    before = wh.fingerprint()
    assert wh.fingerprint() == before
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE {table} SET label = 'bus' WHERE path = 'car/0.png'"))
    engine.dispose()
    assert wh.fingerprint() != before


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("SELECT * FROM no_such_table", "warehouse query failed"),
        ("SELEKT path FROM {table}", "warehouse query failed"),
        ("SELECT path, camera_id FROM {table}", "must return columns path,label; missing label"),
    ],
)
def test_a_bad_warehouse_query(
    warehouse_table: tuple[str, str], folder_lake: Path, query: str, message: str
) -> None:
    url, table = warehouse_table
    wh = Warehouse(url, query.format(table=table), str(folder_lake))
    with pytest.raises(DataSourceError, match=message) as info:
        wh.list_records()
    assert "\n" not in str(info.value)


def test_an_unreachable_warehouse(folder_lake: Path) -> None:
    wh = Warehouse("postgresql+psycopg://postgres@127.0.0.1:1/x", "SELECT 1", str(folder_lake))
    with pytest.raises(DataSourceError, match="warehouse query failed"):
        wh.list_records()


# -- from the config ---------------------------------------------------------------------
def test_open_source_resolves_paths_against_the_project(
    tmp_path: Path, folder_lake: Path, sqlite_warehouse: tuple[str, str]
) -> None:
    lake_cfg = parse_config({"data": {"source": {"uri": "lake"}}}, tmp_path)
    lake = open_source(lake_cfg)
    assert isinstance(lake, Lake) and lake.root == str(folder_lake)
    url, table = sqlite_warehouse
    source = {
        "kind": "warehouse",
        "url": url,
        "query": f"SELECT * FROM {table}",
        "images_root": "lake",
    }
    wh = open_source(parse_config({"data": {"source": source}}, tmp_path))
    assert isinstance(wh, Warehouse)
    assert len(wh.list_records()) == 3
    assert wh.read_bytes("car/0.png") == _png(0)


def test_a_warehouse_needs_url_and_query(tmp_path: Path, folder_lake: Path) -> None:
    cfg = parse_config({"data": {"source": {"kind": "warehouse", "uri": "lake"}}}, tmp_path)
    with pytest.raises(DataSourceError, match="data.source.url and data.source.query"):
        open_source(cfg)


# -- credentials ---------------------------------------------------------------------------
def test_a_warehouse_names_itself_without_its_password(
    pg_warehouse: tuple[str, str], folder_lake: Path
) -> None:
    from sqlalchemy.engine import make_url

    url, table = pg_warehouse
    pw = f"pw-{uuid.uuid4().hex[:8]}"
    with_pw = make_url(url).set(password=pw).render_as_string(hide_password=False)
    wh = Warehouse(with_pw, f"SELECT path, label FROM {table}", str(folder_lake))
    assert len(wh.list_records()) == 3  # trust auth: any password connects
    assert pw not in wh.uri and "postgres:***@127.0.0.1" in wh.uri
    # An error that would quote the secret (here: a database named like it) is scrubbed.
    bad = make_url(with_pw).set(database=pw).render_as_string(hide_password=False)
    with pytest.raises(DataSourceError, match="warehouse query failed") as info:
        Warehouse(bad, "SELECT 1", str(folder_lake)).list_records()
    assert pw not in str(info.value) and "***" in str(info.value)


def test_a_warehouse_password_from_the_environment(
    tmp_path: Path,
    folder_lake: Path,
    pg_warehouse: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sqlalchemy.engine import make_url

    from loopline.errors import ConfigError

    url, table = pg_warehouse
    ref = make_url(url).set(password="X").render_as_string(hide_password=False)
    ref = ref.replace(":X@", ":${LOOPLINE_TEST_PW}@")
    source = {"kind": "warehouse", "url": ref, "query": f"SELECT * FROM {table}", "uri": "lake"}
    cfg = parse_config({"data": {"source": source}}, tmp_path)
    with pytest.raises(ConfigError, match=r"\$\{LOOPLINE_TEST_PW\}, which is not set"):
        open_source(cfg)
    monkeypatch.setenv("LOOPLINE_TEST_PW", "s3cr3t@/x")
    wh = open_source(cfg)
    assert len(wh.list_records()) == 3
    assert "${LOOPLINE_TEST_PW}" in wh.uri and "s3cr3t" not in wh.uri
