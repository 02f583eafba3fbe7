"""The agent's model: verified installs, and an atomic swap that never stops inference.

``install`` checks a downloaded bundle tar against the sha256 the hub announced, extracts
it (every member a plain file, each matching the manifest, nothing more), loads it into
ONNX Runtime and runs it once; only then does ``current`` point at the new model. That one
reference is the swap: a request reads it once and finishes on the model it read, so the
old model answers until the new one is ready, and no request sees half of either. A bundle
that fails any check is refused and the running model keeps serving.

The tar stays next to its extraction, so a restart (``restore``) verifies the extraction
against the tar's sha256 and manifest again before serving it, offline if need be.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loopline.bundle import PreprocessSpec, decode_image, extract_bundle, load_bundle, to_input
from loopline.deploy.runtime import ModelRuntime, softmax
from loopline.digest import sha256_file
from loopline.errors import IntegrityError, LooplineError
from loopline.images import DEFAULT_MAX_PIXELS, image_stats

log = logging.getLogger("loopline.edge")

CURRENT = "current.json"
KEEP = 2  # bundles kept on disk: the running one and the one before


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to answer, with its registry identity."""

    name: str
    version: int
    sha256: str
    generation: int
    runtime: ModelRuntime
    labels: list[str]
    spec: PreprocessSpec
    loaded_at: float

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


class ModelSlot:
    """The one model an agent serves, and the bundles it keeps in ``work_dir/bundles``."""

    def __init__(self, work_dir: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.folder = work_dir / "bundles"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.state_file = work_dir / CURRENT
        self.max_pixels = max_pixels
        self.current: LoadedModel | None = None

    def tar_path(self, sha256: str) -> Path:
        return self.folder / f"{sha256}.tar"

    def install(
        self, tar: Path, sha256: str, *, name: str, version: int, generation: int
    ) -> LoadedModel:
        """Verify, load and test the bundle, then swap it in; IntegrityError or
        LooplineError (and the old model still serving) when anything is wrong."""
        actual = sha256_file(tar)
        if actual != sha256:
            raise IntegrityError(
                f"bundle for {name}:{version} has sha256 {actual[:12]}, expected {sha256[:12]}; "
                "refusing it"
            )
        keep = self.tar_path(sha256)
        if tar != keep:
            os.replace(tar, keep)
        try:
            loaded = self._load(keep, sha256, name, version, generation)
        except LooplineError:
            keep.unlink(missing_ok=True)
            shutil.rmtree(self.folder / sha256, ignore_errors=True)
            raise
        self.current = loaded  # the swap
        _write_json(self.state_file, {"name": name, "version": version, "sha256": sha256,
                                      "generation": generation})  # fmt: skip
        self._prune(sha256)
        log.info("now serving %s (%s)", loaded.ref, sha256[:12])
        return loaded

    def restore(self) -> LoadedModel | None:
        """Serve what ran before the restart, verified again; None when nothing did."""
        try:
            state = json.loads(self.state_file.read_text())
            name, version, sha = str(state["name"]), int(state["version"]), str(state["sha256"])
            generation = int(state.get("generation") or 0)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        tar = self.tar_path(sha)
        if not tar.is_file() or sha256_file(tar) != sha:
            log.warning("the saved bundle of %s:%s is missing or altered; not serving it",
                        name, version)  # fmt: skip
            return None
        try:
            self.current = self._load(tar, sha, name, version, generation)
        except LooplineError as err:
            log.warning("cannot serve the saved %s:%s again: %s", name, version, err)
            return None
        return self.current

    def _load(self, tar: Path, sha: str, name: str, version: int, generation: int) -> LoadedModel:
        dest = self.folder / sha
        try:
            extract_bundle(tar, dest)
        except IntegrityError:
            if not dest.exists():
                raise
            # An altered earlier extraction: drop it and extract this verified tar afresh.
            shutil.rmtree(dest, ignore_errors=True)
            extract_bundle(tar, dest)
        bundle = load_bundle(dest)
        runtime = ModelRuntime(bundle.model_path, bundle.labels, bundle.preprocess)
        spec = bundle.preprocess
        probe = np.zeros((1, 3, spec.height, spec.width), dtype=np.float32)
        try:
            out = runtime.run(probe)
        except Exception as err:  # ORT raises its own types
            raise LooplineError(f"{name}:{version} fails on a test input: {err}") from None
        if out.shape != (1, len(bundle.labels)) or not np.isfinite(out).all():
            raise LooplineError(
                f"{name}:{version} answers a test input with shape {list(out.shape)} "
                f"(expected [1, {len(bundle.labels)}]) or non-finite values; refusing it"
            )
        return LoadedModel(name, version, sha, generation, runtime, list(bundle.labels), spec,
                           time.time())  # fmt: skip

    def set_generation(self, generation: int) -> None:
        """The deployment moved on (same version): remember its generation."""
        cur = self.current
        if cur is not None and cur.generation != generation:
            self.current = dataclasses.replace(cur, generation=generation)

    def _prune(self, keep_sha: str) -> None:
        tars = sorted(self.folder.glob("*.tar"), key=lambda p: p.stat().st_mtime, reverse=True)
        keep = {keep_sha} | {p.stem for p in tars[:KEEP]}
        for entry in self.folder.iterdir():
            sha = entry.name.removesuffix(".tar")
            if sha in keep or entry.name.startswith("."):
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    def predict(self, data: bytes) -> tuple[LoadedModel, dict[str, Any]]:
        """Top-1 of one encoded image on the current model (InvalidInput for a bad image)."""
        model = self.current  # read once: this request finishes on this model
        if model is None:
            raise LooplineError("no model is loaded yet")
        pixels = decode_image(data, model.spec, max_pixels=self.max_pixels)
        x = to_input(pixels[None])
        probs = softmax(model.runtime.run(x))[0]
        top = int(probs.argmax())
        stats = image_stats(x, channels_last=False)[0].tolist()
        return model, {
            "label": model.labels[top],
            "confidence": float(probs[top]),
            "probabilities": [round(float(p), 6) for p in probs],
            "input_stats": {"brightness": round(stats[0], 3), "contrast": round(stats[1], 3),
                            "mean_rgb": [round(v, 2) for v in stats[2:5]], "bytes": len(data),
                            "sharpness": round(stats[5], 3), "saturation": round(stats[6], 3),
                            "dark_share": round(stats[7], 3)},
        }  # fmt: skip


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
