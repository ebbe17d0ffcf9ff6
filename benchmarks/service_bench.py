"""Service benchmark: ``/segment`` latency and throughput on loopback, during a hot swap, and swap timing.

Command (a few minutes on 2 CPU cores)::

    .venv/bin/python benchmarks/service_bench.py --out benchmarks/service-cpu.json

One run, against a real ``uvicorn service.api.main:create_app --factory`` process on 127.0.0.1 serving the
demo-size model (BiSeNet ResNet-10, 64 / 128 channels, exported to ONNX at ``--serve-size``):

1. the runtime's own latency: ``SegmentationRuntime.predict`` on the decoded image in this process (same
   ONNX export, same thread count), the floor the service adds to;
2. ``/segment`` (raw PNG body, PNG mask answer) at 1, 4 and 16 concurrent clients: p50, p99, answers/s;
   the service overhead is the service p50 at concurrency 1 over the runtime p50 (goal <= 1.15);
3. the same load at ``--swap-clients`` clients while a new version is activated the way a worker does it
   (registry pointer + announcement): failures (goal 0) and p99 of the requests that overlapped the swap
   over the steady p99 at that concurrency (goal <= 2);
4. activation to first answer by the new version, split into notice, load and warm-up as the API process
   measured them (``GET /models`` ``last_swap``; goal: notice < 1 s), for the worker-style activation under
   load and for ``POST /models/{v}/activate`` on an idle service.

The clients are threads in this process, on the same machine as the server: on a small machine they take
CPU from it, so the figures are an upper bound of the service's own cost.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from export.onnx_export import export_onnx
from export.runtime import OrtRuntime
from service.announce import announce_active
from service.registry import EXPORT_SUBDIR, MODEL_SUBDIR, Registry
from service.settings import Settings
from training.model_dir import ModelBundle
from training.models.bisenet import BiSeNet, BiSeNetConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["background", *(f"class{i}" for i in range(1, 7))]
API_KEY = "bench"
DEMO_ARCHITECTURE = {"backbone": "resnet10", "context_channels": 64, "embed_channels": 128}


@dataclass
class Answer:
    """One ``/segment`` request as a client saw it."""

    started: float
    ended: float
    status: int
    version: str | None

    @property
    def seconds(self) -> float:
        return self.ended - self.started


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def publish(registry: Registry, classes: list[str], size: int, seed: int) -> str:
    """Publishes a randomly initialised demo-size model with its parity-checked ONNX export."""
    import torch

    torch.manual_seed(seed)
    with registry.staging() as stage:
        model = BiSeNet(BiSeNetConfig(len(classes), **DEMO_ARCHITECTURE))
        ModelBundle(model, classes, []).save(stage / MODEL_SUBDIR)
        export_onnx(stage / MODEL_SUBDIR, stage / EXPORT_SUBDIR, (size, size), parity_batches=(1,))
        return registry.publish(stage, metrics=None, task_id=None, base_version=None, engine="not built").name


def test_image(size: int) -> bytes:
    """A synthetic-looking RGB PNG of ``size`` x ``size`` (smooth noise, compresses like a photo)."""
    rng = np.random.default_rng(0)
    coarse = (rng.random((size // 8, size // 8, 3)) * 255).astype(np.uint8)
    pixels = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def runtime_latency(export_dir: Path, image: bytes, threads: int, iterations: int) -> dict:
    """p50 / p99 of ``predict`` on the decoded image, in this process (the service's floor)."""
    pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
    runtime = OrtRuntime(export_dir, threads=threads)
    runtime.warmup()
    times = []
    for _ in range(iterations):
        started = time.perf_counter()
        runtime.predict([pixels])
        times.append(time.perf_counter() - started)
    runtime.close()
    return {"p50_ms": 1000 * percentile(times, 50), "p99_ms": 1000 * percentile(times, 99), "n": iterations}


class Load:
    """``clients`` threads posting the image to ``/segment`` back to back until stopped."""

    def __init__(self, url: str, image: bytes, clients: int) -> None:
        self.url, self.image = url, image
        self.answers: list[list[Answer]] = [[] for _ in range(clients)]
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(a,), daemon=True) for a in self.answers]

    def _client(self, answers: list[Answer]) -> None:
        headers = {"Content-Type": "image/png"}
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self.stop.is_set():
                started = time.perf_counter()
                try:
                    response = client.post("/segment", content=self.image, headers=headers)
                    status, version = response.status_code, response.headers.get("X-Model-Version")
                except httpx.HTTPError:
                    status, version = 0, None
                answers.append(Answer(started, time.perf_counter(), status, version))

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)

    def all(self) -> list[Answer]:
        return [answer for answers in self.answers for answer in answers]


def steady(url: str, image: bytes, clients: int, seconds: float) -> dict:
    """Latency and throughput of ``clients`` concurrent clients over ``seconds`` (after a short warm-up)."""
    with Load(url, image, clients) as load:
        time.sleep(1.0)
        begin = time.perf_counter()
        time.sleep(seconds)
        end = time.perf_counter()
    answers = [a for a in load.all() if a.started >= begin and a.ended <= end]
    times = [a.seconds for a in answers]
    return {
        "clients": clients,
        "requests": len(answers),
        "failures": sum(a.status != 200 for a in answers),
        "p50_ms": 1000 * percentile(times, 50),
        "p99_ms": 1000 * percentile(times, 99),
        "per_s": len(answers) / (end - begin),
    }


def models(url: str) -> dict:
    return httpx.get(f"{url}/models", timeout=30).json()


def wait_serving(url: str, version: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while models(url)["serving"] != version:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{version} did not start serving within {timeout_s} s")
        time.sleep(0.05)


def swap_under_load(
    url: str,
    image: bytes,
    clients: int,
    settings: Settings,
    registry: Registry,
    new: str,
    steady_p99_ms: float,
) -> dict:
    """Activates ``new`` as a worker does while ``clients`` clients post; the swap's effect on them."""
    with Load(url, image, clients) as load:
        time.sleep(3.0)
        activated = time.perf_counter()
        registry.activate(new)
        announce_active(settings, new)
        wait_serving(url, new)
        time.sleep(3.0)
    answers = load.all()
    first_new = min((a.ended for a in answers if a.version == new), default=float("nan"))
    during = [a.seconds for a in answers if a.ended >= activated and a.started <= first_new]
    flips = [
        sum(1 for x, y in zip(seq, seq[1:], strict=False) if x.version != y.version) for seq in load.answers
    ]
    p99 = 1000 * percentile(during, 99)
    return {
        "clients": clients,
        "requests": len(answers),
        "failures": sum(a.status != 200 for a in answers),
        "requests_during_swap": len(during),
        "p99_during_swap_ms": p99,
        "steady_p99_ms": steady_p99_ms,
        "p99_ratio": p99 / steady_p99_ms,
        "version_flips_per_client": flips,
        "activation_to_first_answer_s": first_new - activated,
        "server_split": models(url)["last_swap"],
    }


def api_activation(url: str, image: bytes, version: str, api_key: str) -> dict:
    """``POST /models/{version}/activate`` on an idle service, then poll ``/segment`` until it answers."""
    headers = {"X-API-Key": api_key}
    with httpx.Client(base_url=url, timeout=60) as client:
        activated = time.perf_counter()
        client.post(f"/models/{version}/activate", headers=headers).raise_for_status()
        while True:
            response = client.post("/segment", content=image, headers={"Content-Type": "image/png"})
            if response.headers.get("X-Model-Version") == version:
                break
        first = time.perf_counter() - activated
    return {"activation_to_first_answer_s": first, "server_split": models(url)["last_swap"]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_api(settings: Settings, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, **settings.to_env()}
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "service.api.main:create_app",
        "--factory",
        "--port",
        str(port),
    ]
    with log.open("wb") as handle:
        process = subprocess.Popen(
            [*command, "--log-level", "warning"],
            cwd=REPO_ROOT,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"uvicorn exited: {log.read_text()}")
        time.sleep(0.2)
    process.terminate()
    raise RuntimeError(f"the API was not ready within 120 s: {log.read_text()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/service-cpu.json"))
    parser.add_argument("--serve-size", type=int, default=256, help="export / serving size (px)")
    parser.add_argument("--image-size", type=int, default=256, help="side of the posted PNG (px)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring time per concurrency")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--swap-clients", type=int, default=4)
    parser.add_argument("--redis-url", default=None, help="announce on Redis pub/sub (default: pointer poll)")
    parser.add_argument("--poll-interval", type=float, default=0.5, help="pointer poll period of the API (s)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="incseg-bench-") as tmp:
        settings = Settings(
            _env_file=None,
            data_dir=Path(tmp) / "data",
            instance=f"bench-{os.getpid()}",
            serve_size=args.serve_size,
            poll_interval_s=args.poll_interval,
            redis_url=args.redis_url,
            api_key=API_KEY,
        )
        registry = Registry(settings.registry_dir)
        print("exporting two demo-size versions ...", flush=True)
        first = publish(registry, CLASSES, args.serve_size, seed=0)
        second = publish(registry, [*CLASSES, "class7"], args.serve_size, seed=1)
        registry.activate(first)
        image = test_image(args.image_size)
        runtime = runtime_latency(registry.export_dir(first), image, settings.ort_threads, 100)
        print(f"runtime predict: {runtime}", flush=True)
        process, url = start_api(settings, Path(tmp) / "api.log")
        try:
            loads = []
            for clients in (int(c) for c in args.clients.split(",")):
                loads.append(steady(url, image, clients, args.seconds))
                print(f"steady: {loads[-1]}", flush=True)
            at_swap_clients = [load for load in loads if load["clients"] == args.swap_clients]
            if not at_swap_clients:
                at_swap_clients.append(steady(url, image, args.swap_clients, args.seconds))
            steady_p99 = at_swap_clients[0]["p99_ms"]
            swap = swap_under_load(url, image, args.swap_clients, settings, registry, second, steady_p99)
            print(f"swap under load: {swap}", flush=True)
            idle = api_activation(url, image, first, API_KEY)
            print(f"activation through the API (idle): {idle}", flush=True)
        finally:
            process.terminate()
            process.wait(30)
    single = next(load for load in loads if load["clients"] == 1)
    results = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "model": {**DEMO_ARCHITECTURE, "classes": len(CLASSES), "serve_size": args.serve_size},
        "image_size": args.image_size,
        "ort_threads": settings.ort_threads,
        "announce": "redis pub/sub" if args.redis_url else f"pointer poll every {args.poll_interval} s",
        "runtime": runtime,
        "steady": loads,
        "overhead_ratio_c1": single["p50_ms"] / runtime["p50_ms"],
        "swap": swap,
        "idle_api_activation": idle,
    }
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
