"""``incseg serve``: the API and one training worker on one machine, all state in one data directory.

Without ``INCSEG_REDIS_URL`` nothing else is needed: the worker takes tasks from the filesystem broker
under the data directory, the task table is SQLite there, the API notices new versions by polling the
registry's pointer file, and models are served by ONNX Runtime on the CPU (TensorRT where present).

The worker runs as a child process in its own session (Ctrl-C in the terminal reaches only this process)
and is stopped after the API: a warm shutdown first (an idle worker exits at once), then, after a grace
period, a cold one. A step cut short that way is recovered on the next start: its holder is gone, so the
task is requeued and runs again from the start (``attempts`` + 1).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from service.settings import Settings
from service.worker import prepare_data_dir, worker_argv

WARM_SHUTDOWN_S = 10.0
COLD_SHUTDOWN_S = 10.0


def start_worker_process(settings: Settings) -> subprocess.Popen:
    """Starts ``celery -A service.celery_app worker`` with ``settings`` in its environment."""
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "service.celery_app", *worker_argv(settings)],
        env={**os.environ, **settings.to_env()},
        start_new_session=True,
    )


def stop_worker_process(worker: subprocess.Popen) -> int:
    """Warm shutdown (SIGTERM), then cold (SIGQUIT), then SIGKILL to its process group; returns its code."""
    for sig, grace_s in ((signal.SIGTERM, WARM_SHUTDOWN_S), (signal.SIGQUIT, COLD_SHUTDOWN_S)):
        if worker.poll() is not None:
            break
        worker.send_signal(sig)
        try:
            return worker.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            print(
                f"incseg: the worker is still running after {grace_s:.0f} s; stopping it harder", flush=True
            )
    if worker.poll() is None:
        os.killpg(worker.pid, signal.SIGKILL)
    return worker.wait()


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def serve(settings: Settings, host: str, port: int) -> int:
    """Runs the API in this process and one worker beside it until Ctrl-C (or SIGTERM).

    Returns:
        The process exit code (0 after a clean stop).
    """
    import uvicorn

    from service.api.main import create_app

    prepare_data_dir(settings)
    worker = start_worker_process(settings)
    url = f"http://{host}:{port}"
    mode = "embedded (no Redis)" if settings.embedded else f"Redis at {settings.redis_url}"
    print(
        f"incseg serving on {url}  (API docs: {url}/docs)\n"
        f"  data directory {settings.data_dir.resolve()}, broker: {mode}, worker pid {worker.pid}\n"
        "  Ctrl-C stops the API and the worker",
        flush=True,
    )
    # uvicorn answers the requests in flight, then re-raises the signal it caught with the handler it
    # found: make SIGTERM, like SIGINT, a KeyboardInterrupt so that the worker is always stopped below
    signal.signal(signal.SIGTERM, _interrupt)
    server = None
    try:
        server = uvicorn.Server(uvicorn.Config(create_app(settings), host=host, port=port, log_level="info"))
        server.run()
    except KeyboardInterrupt:
        pass  # the stop the user asked for
    finally:
        code = stop_worker_process(worker)
        print(f"incseg: API stopped, worker stopped (exit code {code})", flush=True)
    return 0 if server is not None and server.started else 1
