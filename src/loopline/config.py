"""The project's configuration: pydantic models for ``loopline.yaml``.

Each pipeline step declares the keys it reads (its section, plus e.g. ``data.labels``) and
gets only those; its cache key includes only them, so changing ``train.epochs`` re-runs
training and what follows, not ingestion.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from loopline.credentials import expand_url, has_masked_secret, mask_url
from loopline.environments import EnvironmentConfig, with_defaults
from loopline.errors import ConfigError
from loopline.monitor.config import MonitorConfig

DEFAULT_CONFIG_FILE = "loopline.yaml"
STATE_DIR = ".loopline"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StoreConfig(Section):
    """Where metadata and artifacts live. Relative paths are relative to the project root."""

    metadata_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL; default sqlite file .loopline/loopline.db. "
        "LOOPLINE_DB_URL overrides it.",
    )
    artifacts_url: str | None = Field(
        default=None,
        description="fsspec URL or folder; default .loopline/artifacts. "
        "LOOPLINE_ARTIFACTS_URL overrides it.",
    )

    @field_serializer("metadata_url", "artifacts_url")
    def _hide_secrets(self, url: str | None) -> str | None:
        return mask_url(url) if url else url


class SourceConfig(Section):
    """A data lake (folder or fsspec URL) or a warehouse (SQL query over a SQLAlchemy URL)."""

    kind: Literal["lake", "warehouse", "captures"] = "lake"
    uri: str = "./lake"
    layout: Literal["auto", "manifest", "folders"] = "auto"
    manifest: str = "manifest.csv"
    # warehouse only
    url: str | None = None
    query: str | None = None
    # Root that relative paths returned by a warehouse query are resolved against.
    images_root: str | None = None
    # captures only: captured production images joined with their feedback labels, from
    # this store's metadata and artifacts; the environment and model they answered for,
    # and their prediction times (ISO-8601, ``until`` exclusive).
    environment: str | None = None
    model_name: str | None = None
    since: str | None = None
    until: str | None = None

    # Whatever records the config (a run, a step's params and cache key) gets the URL with
    # its password masked; an ${ENV} reference is kept and expanded only to connect.
    @field_serializer("url", "uri", "images_root")
    def _hide_secrets(self, url: str | None) -> str | None:
        return mask_url(url) if url else url


class DataConfig(Section):
    source: SourceConfig = SourceConfig()
    # More sources whose records are added to ``source``'s (the retrain loop adds labelled
    # production captures); ``filter`` applies to ``source`` only, as their columns differ.
    also: list[SourceConfig] = []
    labels: list[str] = ["car", "van", "truck", "bus", "motorcycle"]
    # Only keep records matching these metadata values, e.g. {"condition": ["day"]}.
    filter: dict[str, list[str]] = {}


class ValidateConfig(Section):
    min_width: int = 32
    min_height: int = 32
    channels: list[Literal["RGB", "RGBA", "L"]] = ["RGB", "RGBA", "L"]
    max_quarantine_share: float = Field(0.2, ge=0.0, le=1.0)
    # A class holding less than this share of the valid records is a validation error.
    min_class_share: float = Field(0.02, ge=0.0, le=1.0)


class SplitConfig(Section):
    train: float = Field(0.7, gt=0.0, lt=1.0)
    val: float = Field(0.15, gt=0.0, lt=1.0)
    test: float = Field(0.15, gt=0.0, lt=1.0)
    seed: int = 42

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitConfig:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1.0, got {total:g}")
        return self


class SearchConfig(Section):
    """Hyper-parameter search over ``space`` (each key a list of values)."""

    sampler: Literal["grid", "random", "tpe"] = "grid"
    pruner: Literal["median", "none"] = "median"
    n_trials: int | None = Field(None, ge=1, description="default: the grid's size")
    space: dict[str, list[Any]] = {"lr": [0.003], "width": [32]}


class TrainConfig(Section):
    architecture: str = Field(
        "cnn", description="'cnn' (the built-in family) or 'package.module:ClassName'"
    )
    input_size: int = Field(64, ge=16, le=512)
    depth: int = Field(3, ge=1, le=6)
    width: int = Field(32, ge=4, le=256)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    lr: float = Field(0.003, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    batch_size: int = Field(64, ge=1)
    epochs: int = Field(10, ge=1)
    patience: int = Field(3, ge=1)
    augment: bool = True
    seed: int = 0
    threads: int | None = Field(None, ge=1)
    search: SearchConfig = SearchConfig()


class EvaluateConfig(Section):
    segments: list[str] = ["condition", "camera_id"]


class GateConfig(Section):
    rules: list[str] = ["macro_precision >= 0.80"]
    compare_to: str | None = "production"
    metric: str = "macro_f1"
    max_regression: float = Field(0.02, ge=0.0)


class PackageConfig(Section):
    opset: int = Field(18, ge=13)
    tolerance: float = Field(1e-4, gt=0.0)


class ModelConfig(Section):
    name: str = "vehicles"


class Config(Section):
    project: str = "vehicles"
    model: ModelConfig = ModelConfig()
    store: StoreConfig = StoreConfig()
    data: DataConfig = DataConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    split: SplitConfig = SplitConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    gate: GateConfig = GateConfig()
    package: PackageConfig = PackageConfig()
    monitor: MonitorConfig = MonitorConfig()
    environments: dict[str, EnvironmentConfig] = Field(
        default_factory=lambda: {
            name: EnvironmentConfig.model_validate(env) for name, env in with_defaults(None).items()
        }
    )

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    # Where the config file lives; relative paths resolve against it. Not part of the YAML.
    _root: Path = Path(".")

    @field_validator("environments", mode="before")
    @classmethod
    def _environment_defaults(cls, value: Any) -> Any:
        return with_defaults(value)

    def environment(self, name: str) -> EnvironmentConfig:
        """The environment called ``name`` (ConfigError naming the configured ones)."""
        try:
            return self.environments[name]
        except KeyError:
            raise ConfigError(
                f"no environment {name!r} in the config; configured: "
                + ", ".join(self.environments)
            ) from None

    @property
    def root(self) -> Path:
        return self._root

    def section(self, name: str) -> BaseModel:
        return getattr(self, "validate_" if name == "validate" else name)

    def resolve(self, path: str) -> str:
        """Resolve a local relative path against the project root; URLs are left as they are."""
        if "://" in path:
            return path
        p = Path(path).expanduser()
        return str(p if p.is_absolute() else (self._root / p).resolve())

    @property
    def state_dir(self) -> Path:
        return self._root / STATE_DIR

    def metadata_url(self) -> str:
        """The metadata store's URL to connect with (``${ENV}`` references expanded)."""
        url = os.environ.get("LOOPLINE_DB_URL") or self.store.metadata_url
        if url:
            return _resolve_sqlite(expand_url(url, "store.metadata_url"), self._root)
        return f"sqlite:///{(self.state_dir / 'loopline.db').resolve()}"

    def artifacts_url(self) -> str:
        url = os.environ.get("LOOPLINE_ARTIFACTS_URL") or self.store.artifacts_url
        if not url:
            return str((self.state_dir / "artifacts").resolve())
        return self.resolve(expand_url(url, "store.artifacts_url"))

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON, as a run records it: URLs' passwords masked (``***``)."""
        return self.model_dump(mode="json", by_alias=True)

    def with_credentials_from(self, current: Config) -> Config:
        """This config (a stored run's) with each masked URL taken from ``current``.

        A run's stored config holds URLs with their literal passwords masked; to resume it,
        each such URL is taken from the current config when it is the same URL (equal once
        masked). A URL that does not match stays masked, and opening it names the fix.
        """
        out = self.model_copy(deep=True)
        for path in CREDENTIAL_FIELDS:
            section, _, name = path.rpartition(".")
            mine, theirs = _get(out, section), _get(current, section)
            stored, given = getattr(mine, name), getattr(theirs, name)
            if stored and given and has_masked_secret(stored) and mask_url(given) == stored:
                setattr(mine, name, given)
        return out


# Config fields holding URLs that may carry a password (see ``loopline.credentials``).
CREDENTIAL_FIELDS = (
    "data.source.url",
    "data.source.uri",
    "data.source.images_root",
    "store.metadata_url",
    "store.artifacts_url",
)


def _get(model: BaseModel, dotted: str) -> Any:
    node: Any = model
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _resolve_sqlite(url: str, root: Path) -> str:
    """Make a relative SQLite file path relative to the project root, like other paths.

    SQLAlchemy reads ``sqlite:///x.db`` relative to the working directory, which would put
    the store wherever the command happens to be run from.
    """
    scheme, sep, rest = url.partition(":///")
    if not sep or scheme.split("+")[0] != "sqlite":
        return url
    path, q, query = rest.partition("?")
    if not path or path.startswith(("/", ":memory:", "file:")) or Path(path).is_absolute():
        return url
    return f"{scheme}:///{(root / path).resolve()}{q}{query}"


def _parse_value(raw: str) -> Any:
    """Parse an override's value as YAML, so ``1``, ``0.5``, ``true``, ``[a, b]`` work."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``KEY=VALUE`` overrides (dotted keys) to a raw config dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.epochs=1")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section")
            node = child
        node[parts[-1]] = _parse_value(raw)
    return data


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    where = where.replace("validate_", "validate")
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "literal_error":
        msg = f"invalid value {first.get('input')!r}; {msg.lower()}"
    return f"{source}: {where}: {msg}"


def parse_config(data: dict[str, Any], root: Path, source: str = "config") -> Config:
    try:
        cfg = Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None
    cfg._root = root.resolve()
    return cfg


def require_project(path: str | Path | None = None, *, metadata_url: str | None = None) -> None:
    """ConfigError unless there is a project: a config file, or a store named elsewhere.

    A project is a given config ``path``, a ``loopline.yaml`` here, a ``metadata_url``, or
    a store named by ``LOOPLINE_DB_URL``. Whatever reads the registry calls this before it
    opens a store, so running in the wrong folder says so instead of creating an empty
    ``.loopline/`` there.
    """
    if (
        path is not None
        or metadata_url
        or Path(DEFAULT_CONFIG_FILE).is_file()
        or os.environ.get("LOOPLINE_DB_URL")
    ):
        return
    raise ConfigError(
        f"no Loopline project here: {Path.cwd()} has no {DEFAULT_CONFIG_FILE}; create one "
        "with `loopline init`, or pass --config FILE (or set LOOPLINE_DB_URL)"
    )


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load ``loopline.yaml`` (or the defaults when absent and no path is given)."""
    explicit = path is not None
    file = Path(path) if path is not None else Path(DEFAULT_CONFIG_FILE)
    data: dict[str, Any] = {}
    if file.exists():
        try:
            loaded = yaml.safe_load(file.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            raise ConfigError(
                f"{file}: invalid YAML{where}: {getattr(err, 'problem', err)}"
            ) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{file}: expected a mapping of sections at the top level")
        data = loaded or {}
    elif explicit:
        raise ConfigError(f"config file not found: {file} (create one with `loopline init`)")
    data = apply_overrides(data, overrides or [])
    return parse_config(data, file.parent if file.exists() else Path("."), str(file))
