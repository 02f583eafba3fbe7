"""`loopline models import`: a thin shell over ``import_onnx``; `models show` says imported."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli.test_cli import invoke, one_line_error
from tests.deploy.test_importing import make_onnx


def test_import_show_and_import_again(tmp_path: Path) -> None:
    cfg = tmp_path / "loopline.yaml"
    cfg.write_text("project: pets\n")
    model = make_onnx(tmp_path / "pets.onnx")
    c = ["-c", str(cfg)]
    code, out, err = invoke("models", "import", str(model), "--name", "pets",
                            "--labels", "cat,dog,bird", *c)  # fmt: skip
    assert code == 0, err
    assert "imported pets.onnx as pets:1 (alias candidate)" in out
    code, out, err = invoke("models", "show", "pets:1", *c)
    assert code == 0, err
    assert "imported from pets.onnx" in out and "no metrics" in out
    code, out, err = invoke("models", "import", str(model), "--name", "pets",
                            "--labels", "cat,dog,bird", "--json", *c)  # fmt: skip
    assert code == 0, err
    data = json.loads(out)
    assert (data["version"], data["created"]) == (1, False)
    assert data["input_size"] == [24, 20] and data["labels"] == ["cat", "dog", "bird"]
    code, out, _ = invoke("models", "--json", *c)
    assert [(m["name"], m["version"], m["aliases"]) for m in json.loads(out)] == [
        ("pets", 1, ["candidate"])
    ]
    # The listing shows no made-up metrics for it, and says where it came from.
    code, out, err = invoke("models", *c)
    assert code == 0, err
    (row,) = [line.split() for line in out.splitlines() if line.strip().startswith("pets")]
    assert row[:6] == ["pets", "1", "candidate", "-", "-", "imported"], row
    assert "0.000" not in out


def test_import_errors_are_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "loopline.yaml"
    cfg.write_text("project: pets\n")
    model = make_onnx(tmp_path / "pets.onnx")
    dynamic = make_onnx(tmp_path / "dyn.onnx", size=("H", "W"))
    c = ["-c", str(cfg)]
    cases = [
        ([str(model), "--name", "pets", "--labels", "cat,dog"], "has 3 outputs per image"),
        ([str(model), "--name", "pets", "--labels", "cat"], "two or more class names"),
        ([str(dynamic), "--name", "pets", "--labels", "a,b,c"], "give --input-size H,W"),
        ([str(dynamic), "--name", "p", "--labels", "a,b,c", "--input-size", "x"], "give H,W"),
        ([str(tmp_path / "no.onnx"), "--name", "p", "--labels", "a,b"], "is not a file"),
    ]
    for args, message in cases:
        code, _, err = invoke("models", "import", *args, *c)
        assert code == 1, args
        assert message in one_line_error(err), args
    code, _, err = invoke("models", "import", str(dynamic), "--name", "p", "--labels", "a,b,c",
                          "--input-size", "16,16", *c)  # fmt: skip
    assert code == 0, err
