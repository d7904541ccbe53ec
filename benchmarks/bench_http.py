"""HTTP overhead benchmark: the same load (N concurrent clients, requests spread over many adapters)
once in-process on one Engine, once over HTTP through the Ray Serve app (ingress -> Directory ->
worker) with one worker running the same engine config. Prints throughput and latency p50/p99 of
both, and the latency HTTP adds.

    .venv/bin/python benchmarks/bench_http.py --clients 8 --requests 200 --adapters 32 --max-tokens 16

It measures only; it does not change the app. Adapters are created once in a temporary local store
(1 learn step each) and read by both runs. Runs on CPU with the embedded tiny model by default.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _summary(latencies: list[float], tokens: int, wall_s: float) -> dict:
    return {"requests": len(latencies), "wall_s": round(wall_s, 2),
            "req_per_s": round(len(latencies) / wall_s, 2), "tokens_per_s": round(tokens / wall_s, 1),
            "p50_ms": round(1000 * _percentile(latencies, 0.5), 1),
            "p99_ms": round(1000 * _percentile(latencies, 0.99), 1),
            "mean_ms": round(1000 * statistics.fmean(latencies), 1)}


def _workload(args) -> list[list[str]]:
    """Per client, the adapter names of its requests (fixed seed: both runs get the same sequence)."""
    rng = random.Random(0)
    names = [f"bench-{i:04d}" for i in range(args.adapters)]
    per_client = args.requests // args.clients
    return [[rng.choice(names) for _ in range(per_client)] for _ in range(args.clients)]


async def _drive(workload, call) -> dict:
    """Run every client concurrently; `call(adapter)` returns completion tokens."""
    latencies: list[float] = []
    tokens = 0

    async def client(adapters):
        nonlocal tokens
        for adapter in adapters:
            started = time.perf_counter()
            tokens += await call(adapter)
            latencies.append(time.perf_counter() - started)
    started = time.perf_counter()
    await asyncio.gather(*(client(adapters) for adapters in workload))
    return _summary(latencies, tokens, time.perf_counter() - started)


def make_adapters(store_url: str, engine_kwargs: dict, count: int) -> dict[str, str]:
    from adapters_store import open_store
    from serve.engine import Engine

    engine = Engine(store=open_store(store_url), **engine_kwargs)

    async def learn_all():
        for i in range(count):
            await engine.learn([f"adapter {i} text for the benchmark"], f"bench-{i:04d}", steps=1)
    asyncio.run(learn_all())
    engine.shutdown()
    store = open_store(store_url)
    return {name: f"{name}@{store.latest(name)}" for name in store.list_adapters()}


def run_in_process(store_url: str, engine_kwargs: dict, workload, prompt: str, max_tokens: int) -> dict:
    from adapters_store import open_store
    from serve.engine import Engine

    engine = Engine(store=open_store(store_url), **engine_kwargs)

    async def call(adapter):
        result = await engine.generate(prompt, adapter=adapter, max_tokens=max_tokens, temperature=0)
        return result.completion_tokens
    try:
        asyncio.run(_drive([w[:2] for w in workload], call))  # warm-up: first loads and compiles
        return asyncio.run(_drive(workload, call))
    finally:
        engine.shutdown()


def run_over_http(store_url: str, engine_kwargs: dict, workload, prompt: str, max_tokens: int,
                  workers: int, pinned: dict[str, str] | None = None) -> dict:
    """The HTTP run; with `pinned`, requests name "name@rev" (no Directory lookup) instead of "name"."""
    import httpx
    import ray
    from ray import serve

    from serve.app.builder import build_app

    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, logging_level="ERROR")
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"store_url": store_url, "num_workers": workers, "worker_num_cpus": 1 / workers,
            "engine_options": {k: v for k, v in engine_kwargs.items()
                               if k not in ("max_slots", "host_cache_size", "max_batch_size")},
            "max_slots": engine_kwargs["max_slots"], "host_cache_size": engine_kwargs["host_cache_size"],
            "max_batch_size": engine_kwargs["max_batch_size"]}
    serve.run(build_app(args), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}/v1/completions"

    async def both():
        limits = httpx.Limits(max_connections=len(workload) * 2)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:
            async def call(adapter):
                model = pinned[adapter] if pinned else adapter
                response = await client.post(url, json={"model": model, "prompt": prompt,
                                                        "max_tokens": max_tokens, "temperature": 0})
                response.raise_for_status()
                return response.json()["usage"]["completion_tokens"]
            await _drive([w[:2] for w in workload], call)
            return await _drive(workload, call)
    try:
        return asyncio.run(both())
    finally:
        serve.shutdown()
        ray.shutdown()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200, help="total, split over the clients")
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1, help="worker replicas in the HTTP run")
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--pinned", action="store_true", help="HTTP requests name name@rev (skips the "
                        "Directory lookup), to measure what resolving costs")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    engine_kwargs = {"max_slots": args.slots, "host_cache_size": max(64, args.adapters),
                     "max_batch_size": 32}
    workload = _workload(args)
    prompt = "Q: Give a short answer about the weather today.\nA:"
    with tempfile.TemporaryDirectory() as store_dir:
        refs = make_adapters(store_dir, engine_kwargs, args.adapters)
        local = run_in_process(store_dir, engine_kwargs, workload, prompt, args.max_tokens)
        http = run_over_http(store_dir, engine_kwargs, workload, prompt, args.max_tokens, args.workers,
                             refs if args.pinned else None)
    added = {"p50_ms": round(http["p50_ms"] - local["p50_ms"], 1),
             "p99_ms": round(http["p99_ms"] - local["p99_ms"], 1)}
    print(json.dumps({"config": vars(args), "in_process": local, "http": http, "added": added}, indent=2))
    print("\n| run | req/s | tokens/s | p50 ms | p99 ms |\n|---|---|---|---|---|")
    for name, row in (("in-process, 1 engine", local), (f"HTTP, {args.workers} worker(s)", http)):
        print(f"| {name} | {row['req_per_s']} | {row['tokens_per_s']} | {row['p50_ms']} | {row['p99_ms']} |")
    print(f"| added by HTTP | | | {added['p50_ms']} | {added['p99_ms']} |")


if __name__ == "__main__":
    main()
