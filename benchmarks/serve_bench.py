"""Serving benchmark: Loopline's server against a bare FastAPI + ONNX Runtime baseline, one run.

For single-image PNG requests at each concurrency it measures throughput, p50/p99 latency
and the server's CPU time per request (all its threads and processes, from /proc) of

* ``loopline``: ``python -m loopline.deploy.server`` at its defaults (2 worker processes,
  prediction log and metrics on), with a bearer token required on predict (``--no-auth``:
  not), in these scenarios (``--scenarios``):

  - ``v1``: the PNG as the raw body of ``POST /v1/models/vehicles/predict``;
  - ``oip-json``: the same PNG as an Open Inference Protocol v2 BYTES tensor, base64 in JSON;
  - ``oip-binary``: the same, raw, in the binary tensor extension (4-byte length prefix);
  - ``oip-fp32``: the decoded pixels as an FP32 [1, 3, 64, 64] binary tensor (opt-in);

* ``bare-onnx-2w``, **the baseline**: a bare FastAPI server running the same ONNX model per
  request, no logging, run with two uvicorn workers: as many processes as Loopline uses
  (``baselines/bare_onnx_server.py``);
* ``bare-onnx``: the same bare server with one worker;
* ``naive-torch`` (opt-in): a naive FastAPI server running the torch model per request;
* ``loopline[NAME]``, one per ``--variant NAME=SPEC``: Loopline again with SPEC's extra
  environment (``VAR=VALUE`` words) and flags (the other words), measured on ``v1`` and
  compared with ``loopline`` (canary routing, capture: each is a variant).
  ``--loopline-args`` adds flags to every Loopline server.

and the in-process limit (PNG decode + ONNX Runtime at batch 1, no HTTP, one thread).
Every server is loaded by ``wrk`` (one client thread, so the cores are left to the server).
All servers run at once (an idle one costs next to nothing) and are measured in turn,
level by level, so that the two measurements a ratio compares are taken within a minute
of each other; with ``--rounds N`` all of it N times, a ratio is the median of the N
ratios measured within one round (minute-to-minute load on a shared machine cancels out),
and the table shows each row's median round. The model is the production default
size: 64x64 input, 3 conv layers of width 32; the image is a 96x72 PNG. The mean batch
size of Loopline's rows comes from its ``/metrics``. Afterwards it checks that Loopline
logged every prediction it made.

    python benchmarks/serve_bench.py [--duration 10] [--concurrency 1,8,32] [--rounds 3]
        [--servers loopline,bare-onnx-2w,bare-onnx] [--scenarios v1,oip-json,oip-binary]
        [--variant 'capture=LOOPLINE_SERVE_X=1 --some-flag'] [--loopline-args '...']

Needs torch (to export the model) and wrk: ``apt-get install wrk`` on Debian/Ubuntu.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "baselines"))

BASELINE = "bare-onnx-2w"
TOKEN = "bench-token"
LABELS_JSON = json.dumps(["car", "van", "truck", "bus", "motorcycle"])
LUA = """\
wrk.method = "POST"
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.body = f:read("*all")
f:close()
for line in string.gmatch(os.getenv("BENCH_HEADERS") or "", "[^\\n]+") do
  local k, v = line:match("^([^:]+):%s*(.*)$")
  wrk.headers[k] = v
end
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
    batch: float | None = None  # mean images per model run (Loopline only)


@dataclass(frozen=True)
class Scenario:
    """One kind of request: where it goes, its body and its headers."""

    name: str
    path: str
    body: Path
    headers: dict[str, str]


@dataclass
class Server:
    """One server to measure: how to start it and the scenarios to send it."""

    label: str
    cmd: list[str]
    env: dict[str, str]
    scenarios: list[Scenario]
    loopline: bool = False
    variant_of: str | None = None  # a variant's ratios are against this server's v1 rows
    rows: list[str] = field(default_factory=list)


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


def make_project(root: Path, canary_share: float = 0.1) -> tuple[Path, Path, Path]:
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
    store = MetadataStore(cfg.metadata_url())
    # vehicles:1 and vehicles:2: the same model in two bundles (version 2's metadata says
    # so), for the environments that route between versions.
    for variant in ("a", "b"):
        files["metadata.json"] = json.dumps({"name": "vehicles", "variant": variant}).encode()
        write_bundle(files, root / f"bundle-{variant}.tar")
        ref = ArtifactStore(cfg.artifacts_url()).put_file(root / f"bundle-{variant}.tar")
        store.models.register(
            "vehicles", metrics={}, bundle_uri=ref.uri, bundle_sha256=ref.sha256,
            dataset_version=None, run_id=None, lineage={},
        )  # fmt: skip
    # Two environments served in process: one version alone, and a canary that is never
    # judged (so it keeps routing for the whole run).
    policy = (
        "{min_requests: 1000000000, auto_promote: false, max_error_rate: 1.0, "
        f"share: {canary_share}}}"
    )
    config.write_text(
        "project: bench\nmodel: {name: vehicles}\nenvironments:\n"
        "  bench-direct: {capture: {enabled: false}}\n"
        f"  bench-canary: {{capture: {{enabled: false}}, canary: {policy}}}\n"
    )
    for env in ("bench-direct", "bench-canary"):
        store.deployments.change(env, expected_generation=0, action="promote", actor="bench",
                                 model_name="vehicles", stable_version=1)  # fmt: skip
    store.deployments.change("bench-canary", expected_generation=1, action="canary",
                             actor="bench", candidate_version=2, strategy="canary",
                             candidate_share=canary_share, candidate_since=None)  # fmt: skip
    store.close()
    return config, onnx_path, weights


def make_scenarios(root: Path, png: bytes, auth: bool) -> dict[str, Scenario]:
    """Every Loopline scenario: the same PNG through /v1 and through the v2 protocol."""
    from loopline.bundle import PreprocessSpec, decode_image, to_input

    bearer = {"Authorization": f"Bearer {TOKEN}"} if auth else {}
    infer = "/v2/models/vehicles/infer"
    as_json = {"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES",
                           "data": [base64.b64encode(png).decode()]}]}  # fmt: skip
    element = struct.pack("<I", len(png)) + png
    bytes_input = {"name": "input", "shape": [1], "datatype": "BYTES",
                   "parameters": {"binary_data_size": len(element)}}  # fmt: skip
    head = json.dumps({"inputs": [bytes_input]}).encode()
    x = to_input(decode_image(png, PreprocessSpec(height=64, width=64))[None]).astype("<f4")
    fp32_input = {"name": "input", "shape": list(x.shape), "datatype": "FP32",
                  "parameters": {"binary_data_size": x.nbytes}}  # fmt: skip
    head32 = json.dumps({"inputs": [fp32_input]}).encode()
    bodies = {
        "v1": png,
        "oip-json": json.dumps(as_json).encode(),
        "oip-binary": head + element,
        "oip-fp32": head32 + x.tobytes(),
    }
    for name, body in bodies.items():
        (root / f"body-{name}").write_bytes(body)
    octets = {"Content-Type": "application/octet-stream"}
    return {
        "v1": Scenario("v1", "/v1/models/vehicles/predict", root / "body-v1",
                       {"Content-Type": "image/png", **bearer}),
        "oip-json": Scenario("oip-json", infer, root / "body-oip-json",
                             {"Content-Type": "application/json", **bearer}),
        "oip-binary": Scenario("oip-binary", infer, root / "body-oip-binary",
                               {**octets, "Inference-Header-Content-Length": str(len(head)),
                                **bearer}),
        "oip-fp32": Scenario("oip-fp32", infer, root / "body-oip-fp32",
                             {**octets, "Inference-Header-Content-Length": str(len(head32)),
                              **bearer}),
    }  # fmt: skip


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
    """User + system CPU time of a process and its children (worker processes), from /proc."""
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


def batch_totals(base_url: str) -> tuple[float, float]:
    """(images, model runs) so far, from Loopline's ``loopline_batch_size`` histogram."""
    import httpx

    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    total = sum(
        float(v) for v in re.findall(r"^loopline_batch_size_sum\{[^}]*\} (\S+)", text, re.M)
    )
    runs = sum(
        float(v) for v in re.findall(r"^loopline_batch_size_count\{[^}]*\} (\S+)", text, re.M)
    )
    return total, runs


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


def parse_variant(text: str) -> tuple[str, dict[str, str], list[str]]:
    """``NAME=SPEC``: SPEC's ``VAR=VALUE`` words are environment, the other words flags."""
    name, sep, spec = text.partition("=")
    if not sep or not re.fullmatch(r"[\w.-]+", name):
        raise SystemExit(f"--variant {text!r}: expected NAME=SPEC, e.g. 'capture=--capture'")
    env: dict[str, str] = {}
    flags: list[str] = []
    for word in spec.split():
        if not word.startswith("-") and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", word):
            key, _, value = word.partition("=")
            env[key] = value
        else:
            flags.append(word)
    return name, env, flags


def make_servers(
    args: argparse.Namespace, config: Path, onnx_path: Path, weights: Path,
    scenarios: dict[str, Scenario], env: dict[str, str],
) -> list[Server]:  # fmt: skip
    py = sys.executable
    chosen = [s for s in args.scenarios.split(",") if s]
    unknown = [s for s in chosen if s not in scenarios]
    if unknown:
        raise SystemExit(f"unknown scenario {unknown[0]!r}: use {', '.join(scenarios)}")
    auth = ["--require-token-for-predict"] if args.auth else []
    loop_env = {**env, "LOOPLINE_SERVE_TOKEN": TOKEN}

    def loopline(label: str, extra_env: dict[str, str], flags: list[str], names: list[str],
                 variant_of: str | None = None) -> Server:  # fmt: skip
        cmd = [py, "-m", "loopline.deploy.server", "vehicles:1", "--config", str(config),
               "--log-level", "warning", "--workers", str(args.workers), *auth,
               *args.loopline_args.split(), *flags]  # fmt: skip
        return Server(label, cmd, {**loop_env, **extra_env}, [scenarios[n] for n in names],
                      loopline=True, variant_of=variant_of)  # fmt: skip

    def environment(label: str, env_name: str, variant_of: str | None) -> Server:
        cmd = [py, "-m", "loopline.deploy.server", "--env", env_name, "--config", str(config),
               "--log-level", "warning", "--workers", str(args.workers), *auth,
               *args.loopline_args.split()]  # fmt: skip
        return Server(label, cmd, loop_env, [scenarios["v1"]], loopline=True,
                      variant_of=variant_of)  # fmt: skip

    bare = [py, str(HERE / "baselines/bare_onnx_server.py"), "--model", str(onnx_path),
            "--labels", LABELS_JSON]  # fmt: skip
    predict = Scenario("predict", "/predict", scenarios["v1"].body, {"Content-Type": "image/png"})
    torch_env = dict(env)
    if args.torch_threads:
        torch_env["OMP_NUM_THREADS"] = str(args.torch_threads)
    known: dict[str, Server] = {
        "loopline": loopline("loopline", {}, [], chosen),
        # --env servers: the deployment comes from the store; the canary's cost is read
        # against the same server serving one version.
        "env-direct": environment("loopline[env-direct]", "bench-direct", "loopline"),
        "env-canary": environment("loopline[env-canary]", "bench-canary", "loopline[env-direct]"),
        "bare-onnx-2w": Server("bare-onnx-2w", [*bare, "--workers", "2"], env, [predict]),
        "bare-onnx": Server("bare-onnx", bare, env, [predict]),
        "naive-torch": Server(
            "naive-torch",
            [
                py,
                str(HERE / "baselines/naive_torch_server.py"),
                "--weights",
                str(weights),
                "--labels",
                LABELS_JSON,
            ],
            torch_env,
            [predict],
        ),  # fmt: skip
    }
    servers = []
    for name in args.servers.split(","):
        if name not in known:
            raise SystemExit(f"unknown server {name!r}: use {', '.join(known)}")
        servers.append(known[name])
    for text in args.variant:
        name, extra_env, flags = parse_variant(text)
        servers.append(loopline(f"loopline[{name}]", extra_env, flags, ["v1"], "loopline"))
    return servers


def row_label(server: Server, scenario: Scenario) -> str:
    if not server.loopline or scenario.name == "v1":
        return server.label
    return f"{server.label} {scenario.name}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--servers", default="loopline,bare-onnx-2w,bare-onnx",
                    help="of loopline, bare-onnx-2w, bare-onnx, naive-torch")  # fmt: skip
    ap.add_argument("--scenarios", default="v1,oip-json,oip-binary",
                    help="Loopline's: v1, oip-json, oip-binary, oip-fp32")  # fmt: skip
    ap.add_argument(
        "--workers", type=int, default=2, help="Loopline server processes (the default)"
    )
    ap.add_argument("--loopline-args", default="", help="extra flags for every Loopline server")
    ap.add_argument(
        "--canary-share",
        type=float,
        default=0.1,
        help="share of the env-canary server's canary (default: the config's 0.1)",
    )
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=SPEC",
                    help="another Loopline server, e.g. 'capture=LOOPLINE_SERVE_CAPTURE=1' "
                    "or 'canary=--some-flag 5'; compared with loopline on v1")  # fmt: skip
    ap.add_argument("--auth", action=argparse.BooleanOptionalAction, default=True,
                    help="Loopline requires a bearer token on predict and infer")  # fmt: skip
    ap.add_argument(
        "--torch-threads",
        type=int,
        help="OMP_NUM_THREADS for naive-torch (default: "
        "torch's own choice, which collapses when other processes load the cores)",
    )
    ap.add_argument("--rounds", type=int, default=1, help="rounds (servers interleaved); "
                    "ratios are the median of the rounds' ratios")  # fmt: skip
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install wrk (Debian/Ubuntu) or brew install wrk")
        return 2
    levels = [int(c) for c in args.concurrency.split(",")]
    root = Path(tempfile.mkdtemp(prefix="loopline-bench-"))
    try:
        config, onnx_path, weights = make_project(root, args.canary_share)
        png = make_png(root / "image.png")
        lua = root / "post.lua"
        lua.write_text(LUA)
        scenarios = make_scenarios(root, png, args.auth)
        servers = make_servers(args, config, onnx_path, weights, scenarios, dict(os.environ))
        limit = in_process_limit(onnx_path, png, min(args.duration, 5.0))
        runs: dict[tuple[str, int], list[Result]] = {}
        sent = measure(servers, levels, args.duration, args.rounds, lua, runs)
        report(limit, servers, runs, levels)
        if any(s.loopline for s in servers):
            from loopline.config import load_config
            from loopline.drivers.metadata.store import MetadataStore

            store = MetadataStore(load_config(config).metadata_url())
            logged = store.predictions.count("vehicles")
            store.close()
            print(f"\nprediction log: {logged} rows for {sent} requests wrk completed "
                  "(rows >= requests: wrk does not count requests cut off at its end)")  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


@dataclass
class Running:
    server: Server
    proc: subprocess.Popen[bytes]
    base: str


def measure(
    servers: list[Server], levels: list[int], seconds: float, rounds: int, lua: Path,
    runs: dict[tuple[str, int], list[Result]],
) -> int:  # fmt: skip
    """Start every server, then measure every (server, scenario) at one level after the
    other, level by level, ``rounds`` times: the measurements a ratio compares are taken
    within a minute of each other. Returns the requests Loopline answered."""
    running: list[Running] = []
    sent = 0
    try:
        for server in servers:  # idle servers cost next to nothing while others are measured
            port = free_port()
            proc = start([*server.cmd, "--port", str(port)], port, server.env)
            running.append(Running(server, proc, f"http://127.0.0.1:{port}"))
        for run in running:
            for scenario in run.server.scenarios:
                label = row_label(run.server, scenario)
                if label not in run.server.rows:
                    run.server.rows.append(label)
                warm = run_wrk(run.base + scenario.path, 8, 1.0, lua, wrk_env(scenario))
                sent += (warm.requests - warm.errors) if run.server.loopline else 0
        for _ in range(rounds):
            for c in levels:
                for run in running:
                    for scenario in run.server.scenarios:
                        r = measure_one(run, scenario, c, seconds, lua)
                        sent += (r.requests - r.errors) if run.server.loopline else 0
                        runs.setdefault((r.server, c), []).append(r)
    finally:
        for run in running:
            stop(run.proc)
    return sent


def wrk_env(scenario: Scenario) -> dict[str, str]:
    headers = "\n".join(f"{k}: {v}" for k, v in scenario.headers.items())
    return {**os.environ, "BENCH_BODY": str(scenario.body), "BENCH_HEADERS": headers}


def measure_one(run: Running, scenario: Scenario, c: int, seconds: float, lua: Path) -> Result:
    """One wrk run of ``scenario`` at concurrency ``c``, with the server's CPU time and (for
    Loopline) its mean batch size over the run."""
    loopline = run.server.loopline
    cpu0 = cpu_seconds(run.proc.pid)
    b0 = batch_totals(run.base) if loopline else (0.0, 0.0)
    r = run_wrk(run.base + scenario.path, c, seconds, lua, wrk_env(scenario))
    r.cpu_ms = (cpu_seconds(run.proc.pid) - cpu0) * 1000 / max(r.requests, 1)
    if loopline:
        b1 = batch_totals(run.base)
        r.batch = (b1[0] - b0[0]) / max(b1[1] - b0[1], 1.0)
    r.server = row_label(run.server, scenario)
    batch = f"  batch {r.batch:4.1f}" if r.batch is not None else ""
    print(f"  {r.server:24} c={c:<3} {r.rps:8.0f} req/s  p50 {r.p50_ms:6.2f} ms  "
          f"p99 {r.p99_ms:6.2f} ms  cpu {r.cpu_ms:.3f} ms/req{batch}  errors {r.errors}",
          flush=True)  # fmt: skip
    return r


def median_ratio(
    runs: dict[tuple[str, int], list[Result]], a: str, b: str, c: int, what: str
) -> float | None:
    """The median over rounds of ``a``'s ``what`` divided by ``b``'s, in the same round."""
    ra, rb = runs.get((a, c)), runs.get((b, c))
    if not ra or not rb:
        return None
    ratios = [
        getattr(x, what) / getattr(y, what)
        for x, y in zip(ra, rb, strict=False)
        if getattr(y, what)
    ]
    return statistics.median(ratios) if ratios else None


def _x(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "-"


def report(
    limit: Result, servers: list[Server], runs: dict[tuple[str, int], list[Result]],
    levels: list[int],
) -> None:  # fmt: skip
    labels = [label for s in servers for label in s.rows]
    median = {k: sorted(rs, key=lambda r: r.rps)[len(rs) // 2] for k, rs in runs.items()}
    print(f"\n{'server':26}{'conc':>5}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
          f"{'cpu ms/req':>11}{'batch':>7}{'vs base':>9}")  # fmt: skip
    r = limit
    print(f"{r.server:26}{1:>5}{r.rps:>9.0f}{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}{0:>8}"
          f"{r.cpu_ms:>11.3f}")  # fmt: skip
    for label in labels:
        for c in levels:
            r = median[(label, c)]
            batch = f"{r.batch:.1f}" if r.batch is not None else ""
            vs = _x(median_ratio(runs, label, BASELINE, c, "rps"))
            print(f"{label:26}{c:>5}{r.rps:>9.0f}{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}{r.errors:>8}"
                  f"{r.cpu_ms:>11.3f}{batch:>7}{vs:>9}")  # fmt: skip
    print("(in-process: PNG decode + ONNX Runtime, batch 1, one thread, no HTTP; "
          f"vs base: throughput against {BASELINE}, the median of the rounds' ratios)")  # fmt: skip
    if "loopline" in labels and BASELINE in labels:
        print(f"\nLoopline /v1 against {BASELINE} (bare FastAPI + ONNX Runtime, 2 uvicorn "
              "workers), Loopline / baseline:")  # fmt: skip
        print(f"{'conc':>5}{'throughput':>12}{'p50':>8}{'p99':>8}{'cpu/req':>9}  target")
        for c in levels:
            t = median_ratio(runs, "loopline", BASELINE, c, "rps")
            p99 = median_ratio(runs, "loopline", BASELINE, c, "p99_ms")
            goal = ""
            if c == 1 and t is not None:
                goal = f"throughput >= 1.00x: {'met' if t >= 1.0 else 'NOT met'}"
            elif c >= 32 and t is not None and p99 is not None:
                ok = t >= 1.1 and p99 <= 1.0
                goal = f"throughput >= 1.10x, p99 <= 1.00x: {'met' if ok else 'NOT met'}"
            print(f"{c:>5}{_x(t):>12}{_x(median_ratio(runs, 'loopline', BASELINE, c, 'p50_ms')):>8}"
                  f"{_x(p99):>8}{_x(median_ratio(runs, 'loopline', BASELINE, c, 'cpu_ms')):>9}"
                  f"  {goal}")  # fmt: skip
    oip = [label for label in labels if label.startswith("loopline oip-")]
    if oip and "loopline" in labels:
        print("\nOpen Inference Protocol v2 against /v1 (throughput, target >= 0.90x; mean batch):")
        for label in oip:
            cells = []
            for c in levels:
                t = median_ratio(runs, label, "loopline", c, "rps")
                b, b1 = median[(label, c)].batch, median[("loopline", c)].batch
                cells.append(f"c={c} {_x(t)} (batch {b or 0:.1f} vs {b1 or 0:.1f})")
            print(f"  {label.removeprefix('loopline '):12} " + "   ".join(cells))
    variants = [(label, s.variant_of) for s in servers if s.variant_of for label in s.rows]
    if variants:
        print("\nVariants against plain Loopline (/v1 throughput):")
        for label, of in variants:
            cells = [f"c={c} {_x(median_ratio(runs, label, of or 'loopline', c, 'rps'))}"
                     for c in levels]  # fmt: skip
            print(f"  {label:24} " + "   ".join(cells))


if __name__ == "__main__":
    sys.exit(main())
