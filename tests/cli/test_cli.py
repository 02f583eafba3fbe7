"""The CLI's contract: commands, exit codes, one-line errors, JSON for scripts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loopline.cli.main import app

runner = CliRunner()


def invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error:"), stderr
    return lines[0]


def test_help_and_import_do_not_load_torch() -> None:
    code = (
        "import sys; from typer.testing import CliRunner; import loopline; "
        "from loopline.cli.main import app; r = CliRunner().invoke(app, ['--help']); "
        "assert r.exit_code == 0, r.output; assert 'build' in r.output; "
        "bad = [m for m in ('torch', 'onnx', 'optuna') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_init_writes_the_vehicle_config(tmp_path: Path) -> None:
    code, out, _ = invoke("init", str(tmp_path))
    assert code == 0
    text = (tmp_path / "loopline.yaml").read_text()
    assert "uri: ./lake" in text and "name: vehicles" in text
    code, _, err = invoke("init", str(tmp_path))
    assert code == 1 and "--force" in one_line_error(err)
    from loopline.config import load_config

    cfg = load_config(tmp_path / "loopline.yaml")
    assert cfg.model.name == "vehicles"
    assert cfg.data.source.uri == "./lake"


def test_datagen_json(tmp_path: Path) -> None:
    code, out, _ = invoke(
        "datagen", "--out", str(tmp_path / "lake"), "--images", "40", "--cameras", "2", "--json"
    )
    assert code == 0
    data = json.loads(out)
    assert data["images"] >= 40
    assert (tmp_path / "lake" / "manifest.csv").exists()
    code, _, err = invoke("datagen", "--out", str(tmp_path / "l2"), "--conditions", "snow")
    assert code == 1 and "snow" in one_line_error(err)


def test_build_missing_lake(tmp_path: Path) -> None:
    cfg = tmp_path / "loopline.yaml"
    cfg.write_text(
        f"data: {{source: {{uri: {tmp_path / 'nolake'}}}}}\n"
        f"store: {{metadata_url: 'sqlite:///{tmp_path}/m.db'}}\n"
    )
    code, _, err = invoke("build", "-c", str(cfg))
    assert code == 1
    assert "loopline datagen" in one_line_error(err)


@pytest.mark.parametrize(
    ("content", "sets", "needle"),
    [
        ("train: [unclosed\n", [], "invalid YAML"),
        ("train: {epochs: many}\n", [], "train.epochs"),
        ("train: {architecture: resnet9000}\n", [], "unknown architecture"),
        ("data: {source: {kind: ftp}}\n", [], "data.source.kind"),
        ("bogus: 1\n", [], "bogus"),
        ("", ["split.train=0.9"], "must be 1.0"),
        ("", ["gate.rules=[accuracy is high]"], "METRIC OP NUMBER"),
        ("", ["train.epochs"], "KEY=VALUE"),
    ],
)
def test_build_config_errors(
    tmp_path: Path, tiny_lake: Path, content: str, sets: list[str], needle: str
) -> None:
    cfg = tmp_path / "loopline.yaml"
    cfg.write_text(content)
    args = [
        "build",
        "-c",
        str(cfg),
        "--set",
        f"data.source.uri={tiny_lake}",
        "--set",
        f"store.metadata_url=sqlite:///{tmp_path}/m.db",
    ]
    for s in sets:
        args += ["--set", s]
    code, _, err = invoke(*args)
    assert code == 1, err
    assert needle in one_line_error(err)
    assert not (tmp_path / ".loopline" / "artifacts").exists() or not any(
        (tmp_path / ".loopline" / "artifacts" / "sha256").iterdir()
    )


def test_unreachable_database(project: Path) -> None:
    code, _, err = invoke(
        "build",
        "-c",
        str(project),
        "--set",
        "store.metadata_url=postgresql+psycopg://postgres@127.0.0.1:1/nope",
    )
    assert code == 1
    line = one_line_error(err)
    assert "cannot reach the metadata store" in line and "127.0.0.1:1" in line


def test_listings_on_an_empty_store(project: Path) -> None:
    for args in (["runs"], ["datasets"], ["models"]):
        code, out, _ = invoke(*args, "-c", str(project), "--json")
        assert code == 0 and json.loads(out) == []
    code, _, err = invoke("models", "show", "tiny:7", "-c", str(project))
    assert code == 1 and "no model version tiny:7" in one_line_error(err)
    code, _, err = invoke("runs", "show", "nope", "-c", str(project))
    assert code == 1 and "no run" in one_line_error(err)


def test_resume_refuses_overrides(project: Path) -> None:
    code, _, err = invoke("build", "-c", str(project), "--resume", "x", "--set", "train.epochs=2")
    assert code == 1 and "cannot be combined with --resume" in one_line_error(err)
