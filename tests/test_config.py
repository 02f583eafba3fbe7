"""Loading ``loopline.yaml``: defaults, files, overrides, one-line errors, env and paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from loopline.config import Config, load_config
from loopline.errors import ConfigError


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOOPLINE_DB_URL", raising=False)
    monkeypatch.delenv("LOOPLINE_ARTIFACTS_URL", raising=False)


def _write(folder: Path, text: str, name: str = "loopline.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def _error(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_defaults_load_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config()
    assert cfg.model_dump() == Config().model_dump()
    assert cfg.root == tmp_path.resolve()
    assert cfg.train.epochs == 10 and cfg.split.train == 0.7
    assert cfg.data.source.kind == "lake" and cfg.model.name == "vehicles"
    assert cfg.metadata_url() == f"sqlite:///{tmp_path.resolve() / '.loopline' / 'loopline.db'}"
    assert cfg.artifacts_url() == str(tmp_path.resolve() / ".loopline" / "artifacts")
    assert set(cfg.to_dict()) >= {"project", "validate", "train", "gate"}


def test_an_empty_file_is_the_defaults(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, ""))
    assert cfg.model_dump() == Config().model_dump()


def test_a_yaml_file_loads(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """\
project: tiny
model: {name: tiny}
data:
  labels: [car, van]
  filter: {condition: [day]}
validate: {max_quarantine_share: 0.3, channels: [RGB]}
split: {train: 0.8, val: 0.1, test: 0.1}
train:
  epochs: 2
  search: {sampler: random, space: {lr: [0.1, 0.01]}}
gate:
  rules: ["macro_f1 >= 0.5"]
  compare_to: null
""",
    )
    cfg = load_config(path)
    assert cfg.project == "tiny" and cfg.model.name == "tiny"
    assert cfg.data.labels == ["car", "van"]
    assert cfg.data.filter == {"condition": ["day"]}
    assert cfg.validate_.max_quarantine_share == 0.3
    assert cfg.section("validate").channels == ["RGB"]  # type: ignore[attr-defined]
    assert (cfg.split.train, cfg.split.val, cfg.split.test) == (0.8, 0.1, 0.1)
    assert cfg.train.epochs == 2 and cfg.train.depth == 3
    assert cfg.train.search.sampler == "random"
    assert cfg.train.search.space == {"lr": [0.1, 0.01]}
    assert cfg.gate.compare_to is None
    assert cfg.to_dict()["validate"]["max_quarantine_share"] == 0.3


def test_overrides_set_nested_keys_with_yaml_types(tmp_path: Path) -> None:
    path = _write(tmp_path, "train: {epochs: 5}\n")
    cfg = load_config(
        path,
        [
            "train.epochs=1",
            "train.lr=0.5",
            "train.augment=false",
            "train.search.space={lr: [0.1], width: [8, 16]}",
            "data.labels=[bus, car]",
            "data.source.uri=./other lake",
            "validate.min_width=16",
            "model.name=cars=trucks",  # only the first '=' splits
            "gate.compare_to=null",
        ],
    )
    assert cfg.train.epochs == 1 and cfg.train.lr == 0.5 and cfg.train.augment is False
    assert cfg.train.search.space == {"lr": [0.1], "width": [8, 16]}
    assert cfg.data.labels == ["bus", "car"]
    assert cfg.data.source.uri == "./other lake"
    assert cfg.validate_.min_width == 16
    assert cfg.model.name == "cars=trucks"
    assert cfg.gate.compare_to is None


def test_overrides_apply_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config(overrides=["split.seed=7"]).split.seed == 7


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs", "expected KEY=VALUE"),
        ("project.name=x", "'project' is not a section"),
        ("train.epoch=3", "train.epoch: unknown key"),
        ("train.epochs=zero", "train.epochs:"),
    ],
)
def test_bad_overrides(tmp_path: Path, override: str, message: str) -> None:
    assert message in _error(_write(tmp_path, "project: p\n"), [override])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train:\n  epoch: 3\n", ["train.epoch", "unknown key"]),
        ("nope: 1\n", ["nope: unknown key"]),
        ("validate: {bogus: 1}\n", ["validate.bogus: unknown key"]),
        ("train:\n  epochs: many\n", ["train.epochs", "integer"]),
        ("train: {input_size: 8}\n", ["train.input_size", "greater than or equal to 16"]),
        ("validate: {max_quarantine_share: 2}\n", ["validate.max_quarantine_share"]),
        (
            "train: {search: {sampler: bogus}}\n",
            ["train.search.sampler", "invalid value 'bogus'", "'grid'", "'random'", "'tpe'"],
        ),
        ("data: {source: {kind: ftp}}\n", ["data.source.kind", "'lake'", "'warehouse'"]),
        ("split: {train: 0.5, val: 0.2, test: 0.2}\n", ["split", "must be 1.0, got 0.9"]),
        ("- a\n- b\n", ["expected a mapping"]),
    ],
)
def test_invalid_values_are_one_line_errors(tmp_path: Path, text: str, expected: list[str]) -> None:
    path = _write(tmp_path, text)
    message = _error(path)
    assert message.startswith(str(path))
    for part in expected:
        assert part in message


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "project: x\ntrain:\n  epochs: 1\n bad: 2\n")
    message = _error(path)
    assert "invalid YAML (line 4)" in message and str(path) in message


def test_an_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    message = _error(tmp_path / "nope.yaml")
    assert "config file not found" in message and "nope.yaml" in message


def test_env_overrides_the_store_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(
        tmp_path / "proj",
        "store: {metadata_url: 'sqlite:////from/file.db', artifacts_url: /from/file}\n",
    )
    cfg = load_config(path)
    assert cfg.metadata_url() == "sqlite:////from/file.db"
    assert cfg.artifacts_url() == "/from/file"
    monkeypatch.setenv("LOOPLINE_DB_URL", "postgresql+psycopg://u@db.example/loopline")
    monkeypatch.setenv("LOOPLINE_ARTIFACTS_URL", "s3://bucket/artifacts")
    assert cfg.metadata_url() == "postgresql+psycopg://u@db.example/loopline"
    assert cfg.artifacts_url() == "s3://bucket/artifacts"
    monkeypatch.setenv("LOOPLINE_ARTIFACTS_URL", "relative/artifacts")
    assert cfg.artifacts_url() == str((tmp_path / "proj" / "relative" / "artifacts").resolve())


def test_relative_paths_resolve_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    path = _write(
        project,
        """\
store: {metadata_url: 'sqlite:///state/loopline.db', artifacts_url: ./state/artifacts}
data: {source: {uri: ../lake, images_root: images}}
""",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(Path("..") / "project" / "loopline.yaml")
    assert cfg.root == project.resolve()
    assert cfg.resolve(cfg.data.source.uri) == str((tmp_path / "lake").resolve())
    assert cfg.resolve("images") == str(project.resolve() / "images")
    assert cfg.resolve("/abs/lake") == "/abs/lake"
    assert cfg.resolve("s3://bucket/lake") == "s3://bucket/lake"
    assert cfg.artifacts_url() == str(project.resolve() / "state" / "artifacts")
    assert cfg.metadata_url() == f"sqlite:///{project.resolve() / 'state' / 'loopline.db'}"
    assert cfg.state_dir == project.resolve() / ".loopline"
    assert load_config(path).root == project.resolve()


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:////abs/loopline.db",
        "sqlite://",
        "sqlite:///:memory:",
        "postgresql+psycopg://postgres@127.0.0.1:5432/loopline",
    ],
)
def test_other_metadata_urls_are_left_alone(tmp_path: Path, url: str) -> None:
    cfg = load_config(_write(tmp_path, f"store: {{metadata_url: '{url}'}}\n"))
    assert cfg.metadata_url() == url


# -- environments ------------------------------------------------------------------------
def test_staging_and_production_always_exist_and_more_may_be_added(tmp_path: Path) -> None:
    from loopline.config import parse_config

    cfg = parse_config({}, tmp_path)
    assert list(cfg.environments) == ["staging", "production"]
    assert cfg.environment("staging").replica_of == "production"
    assert (cfg.environment("staging").port, cfg.environment("production").port) == (8081, 8080)
    cfg = parse_config(
        {"environments": {"production": {"port": 9000}, "edge-a1": {"target": "edge"}}}, tmp_path
    )
    assert list(cfg.environments) == ["staging", "production", "edge-a1"]
    assert cfg.environment("production").port == 9000
    assert cfg.environment("production").canary.share == 0.1  # defaults kept
    assert cfg.environment("edge-a1").target == "edge"
    with pytest.raises(ConfigError, match="no environment 'prod'.*staging, production, edge-a1"):
        cfg.environment("prod")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"target": "mainframe"}, "environments.production.target"),
        ({"serve": {"bogus": 1}}, "unknown serve setting.*bogus; allowed:.*max_batch_size"),
        ({"serve": {"port": 1}}, "set port on the environment itself"),
        ({"token": "hunter2"}, "environment reference, e.g. \\$\\{LOOPLINE_PROD_TOKEN\\}"),
        ({"canary": {"share": 1.5}}, "environments.production.canary.share"),
    ],
)
def test_bad_environment_settings_are_one_line_errors(
    tmp_path: Path, env: dict[str, object], message: str
) -> None:
    from loopline.config import parse_config

    with pytest.raises(ConfigError, match=message) as info:
        parse_config({"environments": {"production": env}}, tmp_path)
    assert "\n" not in str(info.value)


def test_an_environment_token_is_read_from_the_environment_only_when_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loopline.config import parse_config

    cfg = parse_config({"environments": {"production": {"token": "${PROD_TOKEN}"}}}, tmp_path)
    assert "PROD_TOKEN}" in str(cfg.to_dict()["environments"]["production"]["token"])
    monkeypatch.delenv("PROD_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="PROD_TOKEN.*not set"):
        cfg.environment("production").serve_overrides()
    monkeypatch.setenv("PROD_TOKEN", "t0ken")
    assert cfg.environment("production").serve_overrides()["token"] == "t0ken"
    assert "t0ken" not in str(cfg.to_dict())
