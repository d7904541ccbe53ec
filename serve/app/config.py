"""The application's configuration: one pydantic model (`AppConfig`) that `serve run` / `serve deploy`
pass to the app builder as `args`, plus small helpers that derive Serve options from it.

It knows how many workers to start and with which resources, the HTTP limits and the routing knobs.
It does not build deployments (builder.py) nor talk to the store or the engine.
"""
from __future__ import annotations

import logging
import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve.tiny_model import TINY_MODEL_ID

logger = logging.getLogger(__name__)


class LimitsConfig(BaseModel):
    """Per-request limits enforced by the HTTP/handle schemas (over a limit -> 4xx with a message)."""

    model_config = ConfigDict(extra="forbid")
    max_tokens: int = Field(512, ge=1, le=32768, description="Largest max_tokens a request may ask for.")
    max_prompt_chars: int = Field(32768, ge=1, le=10_000_000, description="Longest prompt (characters, "
                                  "all chat messages together).")
    max_learn_examples: int = Field(256, ge=1, le=100_000, description="Most examples in one learn call.")
    max_learn_steps: int = Field(500, ge=1, le=100_000, description="Most optimizer steps in one learn call.")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, le=1 << 30, description="Largest HTTP body.")


class QueueConfig(BaseModel):
    """Bounded queues: Serve's per-replica limits plus the ingress's own admission limit."""

    model_config = ConfigDict(extra="forbid")
    worker_max_ongoing_requests: int = Field(64, ge=1, le=4096, description="Requests one worker runs "
                                             "at once (its batch is built from these).")
    worker_max_queued_requests: int = Field(256, ge=1, le=100_000, description="Requests a handle queues "
                                            "for the workers before refusing (BackPressureError -> 503).")
    ingress_max_ongoing_requests: int = Field(256, ge=1, le=100_000, description="Per ingress replica.")
    ingress_max_queued_requests: int = Field(512, ge=1, le=100_000, description="Serve proxy queue per "
                                             "ingress; beyond it Serve answers 503 itself.")
    max_inflight: int = Field(256, ge=1, le=100_000, description="Admission limit of one ingress replica: "
                              "more concurrent generate/learn calls get 429 with Retry-After.")
    retry_after_s: int = Field(1, ge=1, le=600, description="Retry-After sent with 429/503.")


class RoutingConfig(BaseModel):
    """Knobs of the adapter-affinity request router and of the Directory."""

    model_config = ConfigDict(extra="forbid")
    spill_queue_threshold: int = Field(8, ge=1, le=10_000, description="Holder queue length at which a hot "
                                       "adapter spills to another worker.")
    max_holders: int | None = Field(None, ge=1, le=1024, description="Workers an adapter spreads to before "
                                    "spilling needs twice the threshold; None = no cap (the setting "
                                    "benchmarks/bench_routing.py measures).")
    lease_ttl_s: float = Field(30.0, gt=0, le=3600, description="A learn lease not renewed for this long "
                               "expires (its holder died).")
    report_interval_s: float = Field(1.0, gt=0, le=60, description="How often a worker reports its resident "
                                     "adapters and counters to the Directory.")


class AppConfig(BaseModel):
    """Everything `serve.app.builder:build_app` accepts as `args`."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(TINY_MODEL_ID, description="HF id or local model directory of the base model.")
    store_url: str | None = Field(None, description="Adapter store: path, file://, s3://bucket/prefix. "
                                  "None -> $LORA_SAVE_PATH; both unset -> memory only (one worker).")
    lora_rank: int = Field(16, ge=1, le=256, description="Rank of new adapters.")
    lora_alpha: float = Field(32.0, gt=0, le=4096, description="LoRA alpha of new adapters.")
    max_slots: int = Field(32, ge=1, le=4096, description="Device adapter slots per worker.")
    host_cache_size: int = Field(256, ge=1, le=1_000_000, description="Adapters kept in host memory per worker.")
    max_batch_size: int = Field(32, ge=1, le=4096, description="Sequences decoded together per worker.")
    batch_window_ms: float = Field(2.0, ge=0, le=1000, description="Wait for more requests before a batch.")
    num_workers: int | Literal["auto"] = Field("auto", description="Worker replicas; 'auto' = one per GPU "
                                               "in the cluster, or 1 without GPUs.")
    use_gpu: bool | None = Field(None, description="num_gpus=1 per worker; None = when the cluster has GPUs.")
    worker_num_cpus: float = Field(1.0, ge=0, le=256, description="CPUs reserved per worker replica.")
    ingress_replicas: int = Field(1, ge=1, le=1024, description="Ingress (HTTP/handle) replicas.")
    api_key: str | None = Field(None, min_length=8, description="Bearer token required on every endpoint; "
                                "None -> $ONLINE_LLM_API_KEY, both unset -> no auth.")
    engine_factory: str = Field("serve.engine:Engine", pattern=r"^[\w.]+:[\w.]+$", description="Import path "
                                "'module:callable' returning an Engine (config, store=...); tests inject fakes.")
    engine_options: dict = Field(default_factory=dict, description="Extra EngineConfig fields.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    queues: QueueConfig = Field(default_factory=QueueConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    graceful_shutdown_timeout_s: float = Field(30.0, ge=0, le=3600, description="Time a stopping worker "
                                               "gets to finish running requests.")
    health_check_period_s: float = Field(10.0, gt=0, le=3600, description="How often Serve calls each "
                                         "worker's check_health (engine.check_health).")

    @model_validator(mode="after")
    def _fill_from_environment(self) -> "AppConfig":
        # The environment is read once here, so every replica sees the same resolved values.
        if self.store_url is None and os.environ.get("LORA_SAVE_PATH"):
            self.store_url = os.environ["LORA_SAVE_PATH"]
        if self.store_url and "://" not in self.store_url:
            # Resolved once where the app is built, so every replica (whatever its cwd) uses one directory.
            self.store_url = os.path.abspath(os.path.expanduser(self.store_url))
        if self.api_key is None and os.environ.get("ONLINE_LLM_API_KEY"):
            self.api_key = os.environ["ONLINE_LLM_API_KEY"]
        return self

    def engine_config(self) -> dict:
        """Keyword arguments for EngineConfig (docs/INTERFACES.md)."""
        fields = dict(model=self.model, lora_rank=self.lora_rank, lora_alpha=self.lora_alpha,
                      max_slots=self.max_slots, host_cache_size=self.host_cache_size,
                      max_batch_size=self.max_batch_size, batch_window_ms=self.batch_window_ms)
        fields.update(self.engine_options)
        return fields


def is_local_store(url: str | None) -> bool:
    """True for a store only this node can see (plain path or file://); memory:// counts as local too."""
    if not url:
        return False
    scheme = url.split("://", 1)[0] if "://" in url else "file"
    return scheme in ("file", "local", "memory")


def resolve_workers(config: AppConfig, cluster_gpus: float) -> tuple[int, bool]:
    """(number of worker replicas, whether each takes one GPU) for a cluster with `cluster_gpus` GPUs."""
    use_gpu = config.use_gpu if config.use_gpu is not None else cluster_gpus >= 1
    if config.num_workers != "auto":
        count = config.num_workers
    else:
        count = int(cluster_gpus) if use_gpu else 1
    if count < 1:
        raise ValueError("num_workers='auto' with use_gpu=true needs at least one GPU in the cluster; "
                         "set num_workers explicitly (an autoscaling cluster reports 0 GPUs before scale-up)")
    if (not config.store_url or config.store_url.startswith("memory://")) and count > 1:
        raise ValueError(f"memory-only mode (no store_url, no LORA_SAVE_PATH, or a per-process memory:// "
                         f"store) allows one worker, got "
                         f"{count}: workers could not see each other's adapters. Configure a store "
                         "(a local directory on one node, s3://bucket/prefix on a cluster).")
    return count, use_gpu


def warn_if_local_store_on_cluster(url: str | None, alive_nodes: int) -> bool:
    """Log a warning when a node-local store is used by a multi-node cluster; True if it warned."""
    if alive_nodes > 1 and is_local_store(url):
        logger.warning("adapter store %s is a local path but the Ray cluster has %d nodes: workers on other "
                       "nodes will not see each other's revisions; use an s3:// store", url, alive_nodes)
        return True
    return False
