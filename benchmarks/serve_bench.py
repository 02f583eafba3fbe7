"""Serving benchmark: Loopline's server against two baselines, same client, same run.

For single-image PNG requests at each concurrency, prints throughput and p50/p99 latency of

* ``loopline``: ``python -m loopline.deploy.server`` with the prediction log and metrics on;
* ``bare-onnx``: a bare FastAPI server running the same ONNX model per request, no logging
  (``baselines/bare_onnx_server.py``);
* ``naive-torch``: a naive FastAPI server running the torch model per request
  (``baselines/naive_torch_server.py``);

and the in-process limit (PNG decode + ONNX Runtime at batch 1, no HTTP, one thread).
Every server is loaded by ``wrk`` (one client thread, so the cores are left to the server).
Alongside throughput it reports each server's CPU time per request (all its threads and
processes), which moves much less than throughput when other jobs share the machine; with
``--rounds N`` the servers are measured in turn N times and the median round is reported.
The model is the production default size: 64x64 input, 3 conv layers of width 32; the
image is a 96x72 PNG. Afterwards it checks that Loopline logged every prediction it made.

    python benchmarks/serve_bench.py [--duration 10] [--concurrency 1,8,32]

Needs torch (to export the model) and wrk: ``apt-get install wrk`` on Debian/Ubuntu.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "baselines"))

LUA = """\
wrk.method = "POST"
wrk.headers["Content-Type"] = "image/png"
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.body = f:read("*all")
f:close()
"""


@dataclass
class Result:
    server: str
    concurrency: int
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_ms: float = 0.0  # server CPU time (all threads, all processes) per request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_png(path: Path) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = np.zeros((72, 96, 3), dtype=np.uint8)
    pixels[:] = (90, 110, 130)
    pixels[20:50, 15:70] = (200, 40, 40)
    pixels = np.clip(pixels + rng.integers(-25, 25, pixels.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def make_project(root: Path) -> tuple[Path, Path, Path]:
    """Export the model, register its bundle in a fresh project; return config, onnx, weights."""
    from vehicle_model import LABELS, export

    from loopline.bundle import PreprocessSpec, write_bundle
    from loopline.config import load_config
    from loopline.deploy.image import image_context_files
    from loopline.drivers.artifacts.store import ArtifactStore
    from loopline.drivers.metadata.store import MetadataStore

    onnx_path, weights = export(root)
    config = root / "loopline.yaml"
    config.write_text("project: bench\nmodel: {name: vehicles}\n")
    cfg = load_config(config)
    files = {
        "model.onnx": onnx_path.read_bytes(),
        "labels.json": json.dumps(LABELS).encode(),
        "preprocess.json": json.dumps(PreprocessSpec(height=64, width=64).to_dict()).encode(),
        "metadata.json": json.dumps({"name": "vehicles"}).encode(),
        **image_context_files(),
    }
    write_bundle(files, root / "bundle.tar")
    ref = ArtifactStore(cfg.artifacts_url()).put_file(root / "bundle.tar")
    store = MetadataStore(cfg.metadata_url())
    store.models.register(
        "vehicles", metrics={}, bundle_uri=ref.uri, bundle_sha256=ref.sha256,
        dataset_version=None, run_id=None, lineage={},
    )  # fmt: skip
    store.close()
    return config, onnx_path, weights


def in_process_limit(onnx_path: Path, png: bytes, seconds: float) -> Result:
    """PNG decode + ONNX Runtime at batch 1 in a loop: the ceiling without HTTP."""
    import onnxruntime as ort

    from loopline.bundle import PreprocessSpec, decode_image, to_input

    spec = PreprocessSpec(height=64, width=64)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    times = []
    cpu0 = time.process_time()
    end = time.perf_counter() + seconds
    while (t0 := time.perf_counter()) < end:
        session.run(None, {"input": to_input(decode_image(png, spec)[None])})
        times.append(time.perf_counter() - t0)
    cpu_ms = (time.process_time() - cpu0) * 1000 / len(times)
    ms = np.array(times) * 1000
    return Result(
        "in-process", 1, len(times), len(times) / seconds,
        float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), 0, cpu_ms,
    )  # fmt: skip


def start(cmd: list[str], port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    import httpx

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd} exited: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{cmd} not ready after 60 s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if m is None:
        raise ValueError(f"cannot parse wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children (uvicorn workers), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        this, ppid = int(stat.parent.name), int(fields[1])
        if this == pid or ppid == pid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def run_wrk(url: str, c: int, seconds: float, lua: Path, env: dict[str, str]) -> Result:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{c}", f"-d{seconds:g}s", "--latency", "-s", str(lua), url],
        capture_output=True, text=True, env=env, check=True,
    ).stdout  # fmt: skip
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non2xx.group(1)) if non2xx else 0) + (
        sum(int(g) for g in sock.groups()) if sock else 0
    )
    return Result("", c, requests, rps, p50, p99, errors)


def server_command(
    name: str, args: argparse.Namespace, port: int, config: Path, onnx_path: Path, weights: Path
) -> tuple[list[str], str]:
    """The command that starts server ``name``, and the path to POST images to."""
    py = sys.executable
    labels = json.dumps(["car", "van", "truck", "bus", "motorcycle"])
    if name == "loopline":
        return [py, "-m", "loopline.deploy.server", "vehicles:1", "--config",
                str(config), "--port", str(port), "--log-level", "warning",
                "--workers", str(args.workers), *args.loopline_args.split()], \
            "/v1/models/vehicles/predict"  # fmt: skip
    if name == "bare-onnx":
        return [py, str(HERE / "baselines/bare_onnx_server.py"), "--model", str(onnx_path),
                "--labels", labels, "--port", str(port)], "/predict"  # fmt: skip
    if name == "naive-torch":
        return [py, str(HERE / "baselines/naive_torch_server.py"), "--weights", str(weights),
                "--labels", labels, "--port", str(port)], "/predict"  # fmt: skip
    raise SystemExit(f"unknown server {name!r}: use loopline, bare-onnx or naive-torch")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--servers", default="loopline,bare-onnx,naive-torch")
    ap.add_argument(
        "--workers", type=int, default=2, help="Loopline server processes (the default)"
    )
    ap.add_argument("--loopline-args", default="", help="extra flags for Loopline's server")
    ap.add_argument(
        "--torch-threads",
        type=int,
        help="OMP_NUM_THREADS for naive-torch (default: "
        "torch's own choice, which collapses when other processes load the cores)",
    )
    ap.add_argument("--rounds", type=int, default=1, help="rounds (servers interleaved); "
                    "the median round is reported")  # fmt: skip
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install wrk (Debian/Ubuntu) or brew install wrk")
        return 2
    levels = [int(c) for c in args.concurrency.split(",")]
    servers = args.servers.split(",")
    root = Path(tempfile.mkdtemp(prefix="loopline-bench-"))
    try:
        config, onnx_path, weights = make_project(root)
        png = make_png(root / "image.png")
        lua = root / "post.lua"
        lua.write_text(LUA)
        env = {**os.environ, "BENCH_BODY": str(root / "image.png")}
        results = [in_process_limit(onnx_path, png, min(args.duration, 5.0))]
        runs: dict[tuple[str, int], list[Result]] = {}
        sent = 0
        for _ in range(args.rounds):
            for name in servers:
                port = free_port()
                cmd, path = server_command(name, args, port, config, onnx_path, weights)
                url = f"http://127.0.0.1:{port}{path}"
                server_env = dict(env)
                if name == "naive-torch" and args.torch_threads:
                    server_env["OMP_NUM_THREADS"] = str(args.torch_threads)
                proc = start(cmd, port, server_env)
                try:
                    warm = run_wrk(url, 8, 1.0, lua, env).requests
                    sent += warm if name == "loopline" else 0
                    for c in levels:
                        cpu0 = cpu_seconds(proc.pid)
                        r = run_wrk(url, c, args.duration, lua, env)
                        r.cpu_ms = (cpu_seconds(proc.pid) - cpu0) * 1000 / max(r.requests, 1)
                        r.server = name
                        sent += r.requests if name == "loopline" else 0
                        runs.setdefault((name, c), []).append(r)
                        print(f"  {name:12} c={c:<3} {r.rps:8.0f} req/s  p50 {r.p50_ms:6.2f} ms  "
                              f"p99 {r.p99_ms:6.2f} ms  cpu {r.cpu_ms:.3f} ms/req  "
                              f"errors {r.errors}", flush=True)  # fmt: skip
                finally:
                    stop(proc)
        for rs in runs.values():
            results.append(sorted(rs, key=lambda r: r.rps)[len(rs) // 2])  # the median round
        report(results, levels)
        if "loopline" in servers:
            from loopline.config import load_config
            from loopline.drivers.metadata.store import MetadataStore

            store = MetadataStore(load_config(config).metadata_url())
            logged = store.predictions.count("vehicles", 1)
            store.close()
            print(f"\nprediction log: {logged} rows for {sent} requests wrk completed "
                  "(rows >= requests: wrk does not count requests cut off at its end)")  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def report(results: list[Result], levels: list[int]) -> None:
    by = {(r.server, r.concurrency): r for r in results}
    print(f"\n{'server':14}{'conc':>5}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
          f"{'vs bare':>9}{'vs torch':>9}{'cpu ms/req':>11}")  # fmt: skip
    for r in results:
        bare = by.get(("bare-onnx", r.concurrency))
        torch_ = by.get(("naive-torch", r.concurrency))
        vb = f"{r.rps / bare.rps:.2f}x" if bare and r.server != "in-process" else ""
        vt = f"{r.rps / torch_.rps:.2f}x" if torch_ and r.server != "in-process" else ""
        print(f"{r.server:14}{r.concurrency:>5}{r.rps:>9.0f}{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}"
              f"{r.errors:>8}{vb:>9}{vt:>9}{r.cpu_ms:>11.3f}")  # fmt: skip
    print("(in-process: PNG decode + ONNX Runtime, batch 1, one thread, no HTTP)")


if __name__ == "__main__":
    sys.exit(main())
