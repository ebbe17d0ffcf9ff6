"""Settings of the service: environment variables with the ``INCSEG_`` prefix, or a ``.env`` file.

Every field is listed in the README. This module imports neither torch nor ``training``: the API process
reads it without the training stack.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Self

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (hyper-threads counted once)."""
    cpus = os.sched_getaffinity(0)
    cores = set()
    for cpu in cpus:
        try:
            siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
            cores.add(siblings.read_text().strip())
        except OSError:
            return len(cpus)
    return max(1, len(cores))


def default_ort_threads() -> int:
    """Half the physical cores: two sessions (old and new version during a swap) share the CPU."""
    return max(1, physical_cores() // 2)


class Settings(BaseSettings):
    """Configuration of the API and the workers (one set for both, read from the environment)."""

    model_config = SettingsConfigDict(env_prefix="INCSEG_", env_file=".env", extra="ignore")

    data_dir: Path = Field(
        Path("incseg-data"),
        description="Directory of all state: task table (SQLite), model registry, staged uploads, "
        "embedded broker. Must be shared by the API and the workers.",
    )
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the task table, e.g. postgresql+psycopg://user@host:5432/incseg; "
        "default: SQLite at DATA_DIR/tasks.db.",
    )
    redis_url: str | None = Field(
        None,
        description="Redis URL (broker, result backend and model announcements), e.g. "
        "redis://redis:6379/0; unset: embedded mode with a filesystem broker under DATA_DIR, no Redis.",
    )
    instance: str = Field(
        "incseg",
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="Name prefix of the train queue (INSTANCE.train), Redis keys and the announcement "
        "channel (INSTANCE:active); services sharing one Redis need different names.",
    )
    api_key: SecretStr | None = Field(
        None,
        description="When set, every endpoint but /health, /ready, /metrics and the docs requires this value "
        "in the X-API-Key header. Unset, a process listening beyond loopback uses DATA_DIR/api-key "
        "(generated on first start).",
    )
    api_read_key: SecretStr | None = Field(
        None,
        description="A second, read-only key: it may list and read tasks and models, /classes and /segment, "
        "but not post, cancel or activate.",
    )
    allow_unauthenticated: bool = Field(
        False,
        description="DANGEROUS: let a process listening beyond loopback run without an API key, so that "
        "anyone who reaches the port can post and cancel tasks, roll the model back and read every task.",
    )
    cors_allow_origins: list[str] = Field(
        default_factory=list,
        description='Web origins (e.g. ["https://console.example.com"]) whose pages may call the API from a '
        "browser (CORS, with the X-API-Key header); empty: none.",
    )
    serve_size: int = Field(512, ge=32, le=4096, description="Square input size of the exported model (px).")
    ort_threads: int = Field(
        default_factory=default_ort_threads,
        ge=1,
        description="Intra-op threads of each ONNX Runtime session (default: half the physical cores); "
        "/segment runs physical cores // this many batches at once.",
    )
    int8: bool = Field(
        False,
        description="Workers calibrate each step's export on its images (keeping activation ranges, not "
        "images) and write an INT8 model; API processes serve it (ONNX Runtime CPU, TensorRT) when it "
        "passed its gate (argmax agreement with FP32 >= 99 %, mIoU loss <= 1 point), else FP32, as GET "
        "/models says.",
    )
    poll_interval_s: float = Field(
        0.5, gt=0, description="How often an API process reads the active-version pointer (pub/sub fallback)."
    )
    model_wait_s: float = Field(
        30.0,
        ge=0,
        description="While the active version loads and no older one serves, /segment waits this long for "
        "it before answering 503 with Retry-After.",
    )
    model_retry_s: float = Field(
        1.0,
        gt=0,
        description="A failed load of the active version is tried again after this many seconds, doubled "
        "after each further failure.",
    )
    model_retry_max_s: float = Field(
        300.0, gt=0, description="Longest wait between two attempts to load a failed active version."
    )
    default_method: str = Field(
        "star",  # training.method_spec.DEFAULT_METHOD, not imported here; a test keeps the two equal
        description=(
            "Method of a task posted without one, when it can continue the active model (see "
            "BENCHMARKS.md; e.g. star, mib, mib+sdr, plop)."
        ),
    )
    default_epochs: int = Field(10, ge=1, le=1000, description="Epochs of a task posted without `epochs`.")
    default_size: int = Field(
        256, ge=32, le=4096, description="Training crop size of a task posted without `size` (px)."
    )
    default_batch_size: int = Field(
        8, ge=1, le=512, description="Batch size of a task posted without `batch_size`."
    )
    step_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Further training options every task uses (JSON object of `incseg step` options, "
        'e.g. {"backbone": "resnet18"}); a task\'s own options win. Without CUDA a step 0 builds the CPU '
        "model of BENCHMARKS.md (resnet10, 64/128 channels) unless these options say otherwise.",
    )
    max_upload_bytes: int = Field(2 << 30, ge=1, description="Largest accepted dataset archive (bytes).")
    max_archive_entries: int = Field(100_000, ge=1, description="Most members in a dataset archive.")
    max_uncompressed_bytes: int = Field(
        20 << 30, ge=1, description="Largest total size of an archive's extracted members (bytes)."
    )
    max_compression_ratio: float = Field(
        200.0, gt=1, description="Largest uncompressed/compressed size ratio of an archive (bomb guard)."
    )
    max_image_pixels: int = Field(
        64_000_000, ge=1, description="Largest image (width x height) accepted in a dataset or by /segment."
    )
    segment_concurrency: int = Field(
        2,
        ge=1,
        description="Most /segment requests decoding their image or encoding their answer at once in one "
        "API process (the model runs their images in batches in between).",
    )
    segment_queue: int = Field(
        8,
        ge=0,
        description="Most /segment requests reading their image, waiting for a work slot or waiting for "
        "the model in one API process, beyond INCSEG_SEGMENT_CONCURRENCY; more are answered 503 with "
        "Retry-After.",
    )
    batch_window_ms: float = Field(
        2.0,
        ge=0,
        le=1000,
        description="/segment requests arriving within this many milliseconds of the first waiting one run "
        "as one batch (the first never waits longer for others, and not at all when no other request is "
        "reading or decoding its image); 0: batch only requests already waiting.",
    )
    batch_max_size: int = Field(
        8,
        ge=1,
        le=256,
        description="Most images in one /segment batch (one runtime call); 1 turns batching off.",
    )
    task_soft_time_limit_s: int = Field(
        6 * 3600,
        ge=1,
        description="A step running longer is stopped and its task failed (Celery's soft time limit).",
    )
    task_time_limit_s: int = Field(
        6 * 3600 + 600, ge=1, description="Hard limit: the worker process of a longer step is killed."
    )
    visibility_timeout_s: int = Field(
        7 * 3600,
        ge=1,
        description="Redis visibility timeout: an unacknowledged step is redelivered after this; "
        "must exceed task_time_limit_s.",
    )
    max_deliveries: int = Field(
        3, ge=1, description="A task delivered this many times without finishing (worker died) is failed."
    )
    progress_interval_s: float = Field(
        1.0, ge=0, description="Least time between two progress writes of a task to the task table."
    )
    heartbeat_interval_s: float = Field(
        5.0, gt=0, description="How often a running task refreshes its heartbeat and checks for cancellation."
    )
    line_wait_s: float = Field(
        5.0,
        gt=0,
        description="A task delivered while another step holds the model line (or an older task waits) is "
        "delivered again after this many seconds.",
    )
    resend_after_s: float = Field(
        60.0,
        gt=0,
        description="A queued task whose message was neither sent nor delivered for this long while no step "
        "runs is sent again (its message was lost); must exceed twice line_wait_s.",
    )
    orphan_timeout_s: float = Field(
        60.0,
        gt=0,
        description="A running task whose worker runs on another host and whose heartbeat is older than this "
        "is orphaned (requeued, or failed after max_deliveries); on the worker's own host a dead process is "
        "noticed at once.",
    )

    stale_upload_s: float = Field(
        3600.0,
        ge=0,
        description="An upload in the staging folder (partial request body or extracted dataset) that no "
        "unfinished task owns and that nothing wrote to for this long is a leftover of a crashed or failed "
        "upload: deleted on API start and by the worker's orphan sweep.",
    )

    @model_validator(mode="after")
    def _check_limits(self) -> Self:
        if not self.task_soft_time_limit_s < self.task_time_limit_s < self.visibility_timeout_s:
            raise ValueError(
                "need task_soft_time_limit_s < task_time_limit_s < visibility_timeout_s, got "
                f"{self.task_soft_time_limit_s}, {self.task_time_limit_s}, {self.visibility_timeout_s}"
            )
        if self.model_retry_max_s < self.model_retry_s:
            raise ValueError(
                f"model_retry_max_s ({self.model_retry_max_s}) must be at least model_retry_s "
                f"({self.model_retry_s})"
            )
        if self.resend_after_s <= 2 * self.line_wait_s:
            raise ValueError(
                f"resend_after_s ({self.resend_after_s}) must exceed twice line_wait_s ({self.line_wait_s}), "
                "or the messages of waiting tasks would be sent again while they are redelivered"
            )
        if self.orphan_timeout_s <= 2 * self.heartbeat_interval_s:
            raise ValueError(
                f"orphan_timeout_s ({self.orphan_timeout_s}) must exceed twice heartbeat_interval_s "
                f"({self.heartbeat_interval_s}), or live tasks would look orphaned"
            )
        return self

    def to_env(self) -> dict[str, str]:
        """These settings as ``INCSEG_*`` environment variables (to start worker processes with them)."""
        env = {}
        for name, value in self.model_dump(mode="json").items():
            if value is None:
                continue
            if isinstance(secret := getattr(self, name), SecretStr):
                value = secret.get_secret_value()
            elif name == "data_dir":
                value = str(self.data_dir.resolve())  # the worker may start in another directory
            env[f"INCSEG_{name.upper()}"] = value if isinstance(value, str) else json.dumps(value)
        return env

    @property
    def inference_runs(self) -> int:
        """Model runs of /segment at once: as many sessions of ``ort_threads`` threads as the cores hold."""
        return max(1, physical_cores() // self.ort_threads)

    @property
    def registry_dir(self) -> Path:
        """The model registry (one directory per version and the ACTIVE pointer)."""
        return self.data_dir / "registry"

    @property
    def staging_dir(self) -> Path:
        """Uploaded archives and extracted datasets waiting for (or used by) a step."""
        return self.data_dir / "staging"

    @property
    def broker_dir(self) -> Path:
        """Message folder of the embedded (filesystem) broker."""
        return self.data_dir / "broker"

    @property
    def task_database_url(self) -> str:
        """``database_url``, or SQLite in the data directory."""
        return self.database_url or f"sqlite:///{self.data_dir.resolve() / 'tasks.db'}"

    @property
    def train_queue(self) -> str:
        """Celery queue of the training steps."""
        return f"{self.instance}.train"

    @property
    def active_channel(self) -> str:
        """Redis pub/sub channel on which a new active version is announced."""
        return f"{self.instance}:active"

    @property
    def embedded(self) -> bool:
        """No Redis: filesystem broker, pointer polling."""
        return self.redis_url is None


@functools.lru_cache
def get_settings() -> Settings:
    """The process's settings, read once from the environment (tests call ``get_settings.cache_clear()``)."""
    return Settings()
