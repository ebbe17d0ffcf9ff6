"""Service benchmark: ``/segment`` latency and throughput on loopback, during a hot swap, and swap timing.

Command (a few minutes on 2 CPU cores)::

    .venv/bin/python benchmarks/service_bench.py --out benchmarks/service-cpu.json

One run, against a real ``uvicorn service.api.main:create_app --factory`` process on 127.0.0.1 serving the
demo-size model (BiSeNet ResNet-10, 64 / 128 channels, exported to ONNX at ``--serve-size``):

1. the runtime's own latency: ``SegmentationRuntime.predict`` on the decoded image in this process (same
   ONNX export, same thread count), the floor the service adds to; and the runtime's physical limit on
   these cores: images/s of ``incseg bench-runtime`` (``export.benchmark.benchmark_runtimes``, one
   session with a thread per physical core) at batch 1, 2, 4 and 8;
2. ``/segment`` (raw PNG body, PNG mask answer) at 1, 4 and 16 concurrent clients: p50, p99, answers/s
   and the mean batch (``incseg_segment_batch_size``), for each ``--ort-threads`` (the batcher runs
   physical cores // threads batches at once) and each ``--batching`` (``MAX_SIZE:WINDOW_MS``; ``1:0`` is
   batching off), one API process per pair in turn; the service overhead is the service p50 at
   concurrency 1 over the runtime p50 (goal <= 1.15), and what batching adds to a lone request is the p50
   at concurrency 1 with it minus without it (goal: at most the window);
3. the same load at ``--swap-clients`` clients, on the first pair, while a new version is activated the way
   a worker does it
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

from export.benchmark import benchmark_runtimes
from export.onnx_export import export_onnx
from export.runtime import OrtRuntime, physical_cores
from service.announce import announce_active
from service.registry import EXPORT_SUBDIR, MODEL_SUBDIR, Registry
from service.settings import Settings
from training.model_dir import ModelBundle
from training.models.bisenet import BiSeNet, BiSeNetConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["background", *(f"class{i}" for i in range(1, 7))]
API_KEY = "bench"
READ_HEADERS = {"X-API-Key": API_KEY}  # reads need the key too when the service has one
IMAGE_HEADERS = {"Content-Type": "image/png"}
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
        headers = {**IMAGE_HEADERS, **READ_HEADERS}
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


BATCH_COUNTERS = (
    "incseg_segment_batch_size_sum",  # images run
    "incseg_segment_batch_size_count",  # runtime calls
    "incseg_segment_batch_wait_seconds_sum",  # seconds images waited for their batch to start
    "incseg_segment_batch_wait_seconds_count",
)


def batch_counters(url: str) -> np.ndarray:
    """The server's ``BATCH_COUNTERS`` so far, in that order."""
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        name, _, value = line.partition(" ")
        values[name] = value
    return np.asarray([float(values[name]) for name in BATCH_COUNTERS])


@dataclass
class Window:
    """One measuring window of one server: its answers' latencies (s) and its batch counters' growth."""

    times: list[float]
    failures: int
    seconds: float
    counters: np.ndarray


def measure(url: str, image: bytes, clients: int, seconds: float) -> Window:
    """``clients`` concurrent clients for ``seconds`` (after a short warm-up): the answers within them."""
    with Load(url, image, clients) as load:
        time.sleep(1.0)
        before = batch_counters(url)
        begin = time.perf_counter()
        time.sleep(seconds)
        end = time.perf_counter()
        after = batch_counters(url)
    answers = [a for a in load.all() if a.started >= begin and a.ended <= end]
    return Window(
        [a.seconds for a in answers], sum(a.status != 200 for a in answers), end - begin, after - before
    )


def summary(clients: int, windows: list[Window]) -> dict:
    """Latency and throughput over the windows of one server at one concurrency."""
    times = [t for window in windows for t in window.times]
    images, calls, wait_s, waits = sum(window.counters for window in windows)
    return {
        "clients": clients,
        "windows": len(windows),
        "requests": len(times),
        "failures": sum(window.failures for window in windows),
        "p50_ms": 1000 * percentile(times, 50),
        "p99_ms": 1000 * percentile(times, 99),
        "per_s": len(times) / sum(window.seconds for window in windows),
        "mean_batch": images / max(1.0, calls),
        "mean_batch_wait_ms": 1000 * wait_s / max(1.0, waits),
    }


def steady(url: str, image: bytes, clients: int, seconds: float) -> dict:
    """Latency and throughput of ``clients`` concurrent clients over ``seconds`` on one server."""
    return summary(clients, [measure(url, image, clients, seconds)])


def models(url: str) -> dict:
    return httpx.get(f"{url}/models", headers=READ_HEADERS, timeout=30).json()


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
            response = client.post("/segment", content=image, headers={**IMAGE_HEADERS, **headers})
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


@dataclass(frozen=True)
class Serving:
    """One API configuration: ONNX Runtime threads per session and the batcher's largest batch and window."""

    ort_threads: int
    batch_max_size: int
    batch_window_ms: float

    @property
    def runs(self) -> int:
        """Model runs at once (``Settings.inference_runs``)."""
        return max(1, physical_cores() // self.ort_threads)

    def describe(self) -> dict:
        return {
            "ort_threads": self.ort_threads,
            "runs": self.runs,
            "batch_max_size": self.batch_max_size,
            "batch_window_ms": self.batch_window_ms,
        }


def servings(threads: str, batching: str) -> list[Serving]:
    """Every (threads, ``MAX_SIZE:WINDOW_MS``) pair of the comma-separated options, threads outermost."""
    pairs = [pair.split(":") for pair in batching.split(",")]
    return [
        Serving(int(count), int(size), float(window))
        for count in threads.split(",")
        for size, window in pairs
    ]


def lone_added_ms(configs: list[dict]) -> dict[str, dict[str, float]]:
    """What batching adds at 1 client, per thread count and batching pair: the p50 and the mean wait for a
    batch to start (``incseg_segment_batch_wait_seconds``), each minus that of batching off (``1:0``)."""
    added = {}
    for config in configs:
        serving = config["serving"]
        off = next(
            (
                other
                for other in configs
                if other["serving"]["ort_threads"] == serving["ort_threads"]
                and other["serving"]["batch_max_size"] == 1
            ),
            None,
        )
        single = [load for load in config["steady"] if load["clients"] == 1]
        off_single = [load for load in off["steady"] if load["clients"] == 1] if off else []
        if serving["batch_max_size"] > 1 and single and off_single:
            pair = f"{serving['batch_max_size']}:{serving['batch_window_ms']:g}"
            added[f"threads={serving['ort_threads']} {pair}"] = {
                key: single[0][key] - off_single[0][key] for key in ("p50_ms", "mean_batch_wait_ms")
            }
    return added


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/service-cpu.json"))
    parser.add_argument("--serve-size", type=int, default=256, help="export / serving size (px)")
    parser.add_argument("--image-size", type=int, default=256, help="side of the posted PNG (px)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring time per concurrency")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument(
        "--ort-threads", default=None, help="INCSEG_ORT_THREADS values, comma-separated (default: default)"
    )
    parser.add_argument(
        "--batching",
        default="1:0,8:2",
        help="INCSEG_BATCH_MAX_SIZE:INCSEG_BATCH_WINDOW_MS pairs, comma-separated (1:0 is batching off)",
    )
    parser.add_argument("--runtime-batches", default="1,2,4,8", help="batches of the runtime's own figure")
    parser.add_argument("--runtime-iters", type=int, default=20, help="timed runtime calls per figure")
    parser.add_argument("--rounds", type=int, default=3, help="measuring windows per server and concurrency")
    parser.add_argument("--no-swap", action="store_true", help="skip the swap and activation measurements")
    parser.add_argument("--swap-clients", type=int, default=4)
    parser.add_argument("--redis-url", default=None, help="announce on Redis pub/sub (default: pointer poll)")
    parser.add_argument("--poll-interval", type=float, default=0.5, help="pointer poll period of the API (s)")
    args = parser.parse_args()

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="incseg-bench-") as tmp:
        settings = Settings(
            _env_file=None,
            data_dir=Path(tmp) / "data",
            instance=f"bench-{os.getpid()}",
            serve_size=args.serve_size,
            poll_interval_s=args.poll_interval,
            redis_url=args.redis_url,
            api_key=API_KEY,
            # every client admitted: the default queue (8) answers 503 to clients beyond 10
            segment_queue=max(int(c) for c in args.clients.split(",")),
        )
        configurations = servings(args.ort_threads or str(settings.ort_threads), args.batching)
        registry = Registry(settings.registry_dir)
        print("exporting two demo-size versions ...", flush=True)
        first = publish(registry, CLASSES, args.serve_size, seed=0)
        second = publish(registry, [*CLASSES, "class7"], args.serve_size, seed=1)
        registry.activate(first)
        image = test_image(args.image_size)
        runtime = {
            str(count): runtime_latency(registry.export_dir(first), image, count, args.runtime_iters)
            for count in sorted({serving.ort_threads for serving in configurations})
        }
        print(f"runtime predict: {runtime}", flush=True)
        limit = benchmark_runtimes(
            registry.export_dir(first),
            (args.serve_size, args.serve_size),
            iters=args.runtime_iters,
            batches=[int(b) for b in args.runtime_batches.split(",")],
            backends=["ort-cpu"],
        )["backends"]["ort-cpu"]["batch"]
        best_batch = max(limit, key=lambda batch: limit[batch]["images_per_s"])
        best = limit[best_batch]["images_per_s"]
        servers: list[tuple[subprocess.Popen, str]] = []
        swap, idle = None, None
        try:
            for index, serving in enumerate(configurations):
                served = settings.model_copy(
                    update={
                        "ort_threads": serving.ort_threads,
                        "batch_max_size": serving.batch_max_size,
                        "batch_window_ms": serving.batch_window_ms,
                    }
                )
                servers.append(start_api(served, Path(tmp) / f"api-{index}.log"))
            windows: dict[tuple[int, int], list[Window]] = {}
            for clients in (int(c) for c in args.clients.split(",")):
                for _ in range(args.rounds):  # the servers in turn: a change of the machine's load hits all
                    for index, (_, url) in enumerate(servers):
                        windows.setdefault((index, clients), []).append(
                            measure(url, image, clients, args.seconds)
                        )
                for index, serving in enumerate(configurations):
                    print(f"{serving}: {summary(clients, windows[index, clients])}", flush=True)
            for process, _ in servers[1:]:  # the swap runs on the first server alone
                process.terminate()
                process.wait(30)
            if not args.no_swap:
                url = servers[0][1]
                steady_p99 = steady(url, image, args.swap_clients, args.seconds)["p99_ms"]
                swap = swap_under_load(url, image, args.swap_clients, settings, registry, second, steady_p99)
                print(f"swap under load: {swap}", flush=True)
                idle = api_activation(url, image, first, API_KEY)
                print(f"activation through the API (idle): {idle}", flush=True)
        finally:
            for process, _ in servers:
                process.terminate()
                process.wait(30)
        configs = []
        for index, serving in enumerate(configurations):
            loads = [summary(key[1], windows[key]) for key in windows if key[0] == index]
            configs.append(
                {
                    "serving": serving.describe(),
                    "steady": loads,
                    "per_s_over_runtime_best": {str(load["clients"]): load["per_s"] / best for load in loads},
                }
            )
    first_single = next(load for load in configs[0]["steady"] if load["clients"] == 1)
    results = {
        "machine": {
            "cpus": os.cpu_count(),
            "physical_cores": physical_cores(),
            "processor": platform.processor() or platform.machine(),
            "load_average_1m_before_after": [load_before[0], os.getloadavg()[0]],
        },
        "model": {**DEMO_ARCHITECTURE, "classes": len(CLASSES), "serve_size": args.serve_size},
        "image_size": args.image_size,
        "announce": "redis pub/sub" if args.redis_url else f"pointer poll every {args.poll_interval} s",
        "runtime_by_threads": runtime,
        "runtime_limit": {
            "command": f"incseg bench-runtime --model EXPORT --size {args.serve_size}x{args.serve_size} "
            f"--backends ort-cpu --iters {args.runtime_iters} "
            f"--batches {args.runtime_batches.replace(',', ' ')}",
            "threads": physical_cores(),
            "batch": limit,
            "best_batch": int(best_batch),
            "best_images_per_s": limit[best_batch]["images_per_s"],
        },
        "configs": configs,
        "overhead_ratio_c1": first_single["p50_ms"] / runtime[str(configurations[0].ort_threads)]["p50_ms"],
        "lone_request_added_ms": lone_added_ms(configs),
        "swap": swap,
        "idle_api_activation": idle,
    }
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
