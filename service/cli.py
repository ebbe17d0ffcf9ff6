"""``incseg serve``, ``incseg api`` and ``incseg worker``: the service's commands.

``add_subcommands`` registers them on the main CLI's subparsers; each handler takes the parsed namespace
and returns the exit code. Settings come from ``INCSEG_*`` environment variables (and ``.env``); the
options here override a few of them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from service.api_key import secure_settings
from service.settings import Settings, get_settings
from training.extra import require_train_extra

KEY_NOTE = (
    "; beyond loopback the API needs a key: INCSEG_API_KEY, else DATA_DIR/api-key (generated and printed on "
    "first start)"
)


def _settings(args: argparse.Namespace) -> Settings:
    """The environment's settings, with ``--data-dir`` applied."""
    data_dir = getattr(args, "data_dir", None)
    return get_settings() if data_dir is None else Settings(data_dir=data_dir)


def _listening_settings(args: argparse.Namespace) -> Settings:
    """The settings of a process listening on ``--host``: with an API key unless it stays on loopback."""
    return secure_settings(_settings(args), args.host)


def cmd_serve(args: argparse.Namespace) -> int:
    require_train_extra("incseg serve (it runs a training worker)")
    from service.embedded import serve

    return serve(_listening_settings(args), args.host, args.port)


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    from service.api.main import create_app

    uvicorn.run(create_app(_listening_settings(args)), host=args.host, port=args.port, log_level="info")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    require_train_extra("incseg worker")
    from service.celery_app import run_worker

    run_worker(_settings(args), args.loglevel.upper())
    return 0


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``serve``, ``api`` and ``worker``; each sets ``func`` to its handler."""
    serve = subparsers.add_parser(
        "serve",
        help="run the service on this machine: the HTTP API and one training worker (no Redis needed)",
        description="Starts the API and one worker with an embedded broker; all state (task table, model "
        "registry, uploads, broker) lives in the data directory. Prints the URL and the docs URL; Ctrl-C "
        "stops both. Settings: INCSEG_* environment variables (see the README).",
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help=f"address to listen on (default 127.0.0.1){KEY_NOTE}"
    )
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--data-dir", type=Path, default=None, help="data directory (default INCSEG_DATA_DIR)")
    serve.set_defaults(func=cmd_serve)

    api = subparsers.add_parser(
        "api",
        help="run one API process (scaled mode: INCSEG_REDIS_URL set, workers started with `incseg worker`)",
    )
    api.add_argument("--host", default="0.0.0.0", help=f"address to listen on (default 0.0.0.0){KEY_NOTE}")
    api.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    api.add_argument("--data-dir", type=Path, default=None, help="data directory (default INCSEG_DATA_DIR)")
    api.set_defaults(func=cmd_api)

    worker = subparsers.add_parser(
        "worker",
        help="run one training worker (one process; start one per GPU) on the INSTANCE.train queue",
    )
    worker.add_argument(
        "--data-dir", type=Path, default=None, help="data directory (default INCSEG_DATA_DIR)"
    )
    worker.add_argument("--loglevel", default="info", choices=["debug", "info", "warning", "error"])
    worker.set_defaults(func=cmd_worker)
