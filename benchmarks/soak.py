"""Soak run of the Ray Serve app on loopback: mixed generate / learn / delete traffic over hundreds of
adapters for a bounded time, with one worker replica killed every `--kill-every` seconds.

It reports requests served, errors by kind, learns acknowledged vs revisions found in the store
afterwards (every acknowledged revision must be there; commits whose answer was lost to a killed worker
are counted apart), and the peak resident memory of every replica process. Operations on one adapter
are serialized by this client, so the expected store content is known exactly.

Not part of the test run. Usage: .venv/bin/python benchmarks/soak.py --minutes 3 [--adapters 300]
It knows the app only through HTTP, Serve's actor names and the store URL.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import os
import random
import sys
import tempfile
import threading
import time

import httpx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests", "faults")]
os.environ.setdefault("ONLINE_LLM_CACHE", os.path.join(REPO, ".cache"))

from faults_support import free_port, kill_replica, replica_actor_names, replica_pids, rss_bytes  # noqa: E402

logger = logging.getLogger("soak")
APP = "soak"
OPS = (("generate", 0.70), ("learn", 0.25), ("delete", 0.05))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="traffic duration (default 3)")
    parser.add_argument("--adapters", type=int, default=300, help="adapter names in the pool")
    parser.add_argument("--clients", type=int, default=8, help="concurrent client tasks")
    parser.add_argument("--kill-every", type=float, default=60.0, help="seconds between worker kills")
    parser.add_argument("--workers", type=int, default=2, help="worker replicas")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--store", default=None, help="store URL (default: a fresh temporary directory)")
    return parser.parse_args(argv)


class Ledger:
    """What the client saw: counts per op/outcome, acknowledged revisions per adapter, timings."""

    def __init__(self):
        self.outcomes: collections.Counter = collections.Counter()
        self.acked: dict[str, list[str]] = collections.defaultdict(list)
        self.unknown_learns: dict[str, int] = collections.Counter()  # learns that failed after sending
        self.latency: dict[str, list[float]] = collections.defaultdict(list)
        self.unsure_deletes: set[str] = set()

    def record(self, op: str, response: httpx.Response | None, seconds: float) -> None:
        if response is None:
            self.outcomes[f"{op} transport_error"] += 1
            return
        code = ""
        if response.status_code >= 400:
            try:
                code = " " + str(response.json()["error"].get("code"))
            except (ValueError, KeyError, TypeError):
                code = " (no OpenAI body)"
        self.outcomes[f"{op} {response.status_code}{code}"] += 1
        if response.status_code == 200:
            self.latency[op].append(seconds)


async def _call(client: httpx.AsyncClient, method: str, url: str, **kwargs):
    try:
        return await client.request(method, url, **kwargs)
    except httpx.TransportError:
        return None


async def one_operation(client, url: str, name: str, op: str, ledger: Ledger, rng: random.Random) -> None:
    started = time.monotonic()
    if op == "learn":
        body = {"examples": [f"{name} fact {rng.randint(0, 10**6)} is worth remembering"], "steps": 2}
        response = await _call(client, "POST", f"{url}/v1/adapters/{name}/learn", json=body)
        if response is not None and response.status_code == 200:
            ledger.acked[name].append(response.json()["revision"])
        elif response is None or response.status_code >= 500:
            ledger.unknown_learns[name] += 1  # may or may not have committed before the failure
    elif op == "delete":
        response = await _call(client, "DELETE", f"{url}/v1/adapters/{name}")
        if response is not None and response.status_code in (200, 404):
            ledger.acked.pop(name, None)
            ledger.unknown_learns.pop(name, None)
            ledger.unsure_deletes.discard(name)
        else:
            ledger.unsure_deletes.add(name)  # the store may or may not have dropped it
    else:
        model = name if ledger.acked.get(name) else _base_id()
        body = {"model": model, "prompt": f"Tell {name}", "max_tokens": 8}
        response = await _call(client, "POST", f"{url}/v1/completions", json=body)
    ledger.record(op, response, time.monotonic() - started)


def _base_id() -> str:
    from serve.tiny_model import TINY_MODEL_ID

    return TINY_MODEL_ID


async def client_loop(url: str, names: list[str], locks: dict, ledger: Ledger, stop_at: float, seed: int):
    rng = random.Random(seed)
    ops, weights = zip(*OPS)
    async with httpx.AsyncClient(timeout=120) as client:
        while time.monotonic() < stop_at:
            name = rng.choice(names)
            async with locks[name]:  # one operation per adapter at a time: exact expected store content
                await one_operation(client, url, name, rng.choices(ops, weights)[0], ledger, rng)


def killer(stop: threading.Event, every_s: float, kills: list) -> None:
    rng = random.Random(1)
    while not stop.wait(every_s):
        names = replica_actor_names(APP, "Worker")
        if names:
            kills.append((time.monotonic(), kill_replica(APP, "Worker", rng.randrange(len(names)))))


def memory_sampler(stop: threading.Event, peaks: dict) -> None:
    while not stop.wait(2.0):
        for name, rss in rss_bytes(replica_pids(APP)).items():
            peaks[name] = max(peaks.get(name, 0), rss)


def verify_store(store_url: str, ledger: Ledger) -> dict:
    """Acknowledged revisions vs the store's revisions, per adapter and in total."""
    from adapters_store import open_store

    store = open_store(store_url)
    acked_total = found_total = lost = extra = 0
    lost_examples = []
    for name in set(store.list_adapters()) | set(ledger.acked):
        stored = set(store.list_revisions(name)) if name in store.list_adapters() else set()
        acked = set(ledger.acked.get(name, []))
        acked_total += len(acked)
        found_total += len(stored)
        missing = set() if name in ledger.unsure_deletes else acked - stored
        lost += len(missing)
        lost_examples += [f"{name}@{rev}" for rev in sorted(missing)][:3]
        extra += len(stored - acked)
    unknown = sum(ledger.unknown_learns.values())
    return {"learns_acknowledged": acked_total, "revisions_in_store": found_total,
            "acknowledged_but_missing": lost, "missing_examples": lost_examples[:10],
            "in_store_not_acknowledged": extra, "learns_failed_after_sending": unknown,
            "deletes_failed": len(ledger.unsure_deletes),
            "learns_acknowledged_before_deletes_too": ledger.outcomes["learn 200"]}


def deploy(args, store_url: str) -> str:
    import ray
    from ray import serve

    from serve.app.builder import build_app

    env = {"PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests", "faults")]),
           "ONLINE_LLM_CACHE": os.environ["ONLINE_LLM_CACHE"], "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": env})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = {"store_url": store_url, "num_workers": args.workers, "ingress_replicas": 2,
              "worker_num_cpus": 0.5, "max_slots": 8, "host_cache_size": 64, "health_check_period_s": 2.0,
              "limits": {"max_tokens": 32, "max_learn_steps": 10},
              "routing": {"report_interval_s": 0.5, "lease_ttl_s": 10.0}}
    serve.run(build_app(config), name=APP, route_prefix="/")
    return f"http://127.0.0.1:{port}"


async def drive(url: str, args, ledger: Ledger) -> float:
    names = [f"soak-{i:04d}" for i in range(args.adapters)]
    locks = {name: asyncio.Lock() for name in names}
    started = time.monotonic()
    stop_at = started + args.minutes * 60
    await asyncio.gather(*(client_loop(url, names, locks, ledger, stop_at, args.seed + i)
                           for i in range(args.clients)))
    return time.monotonic() - started


def summarize(ledger: Ledger, seconds: float, kills: list, peaks: dict, store_check: dict) -> dict:
    served = sum(n for key, n in ledger.outcomes.items() if key.split()[1] == "200")
    errors = {key: n for key, n in sorted(ledger.outcomes.items()) if key.split()[1] != "200"}
    p50 = {op: round(sorted(v)[len(v) // 2], 3) for op, v in ledger.latency.items() if v}
    by_kind = collections.defaultdict(int)
    for name, rss in peaks.items():
        kind = name.split("#")[1]
        by_kind[kind] = max(by_kind[kind], rss)
    return {"duration_s": round(seconds, 1), "requests_served": served,
            "served_by_op": {k: n for k, n in sorted(ledger.outcomes.items()) if k.split()[1] == "200"},
            "errors_by_kind": errors, "p50_latency_s": p50, "worker_kills": len(kills),
            "store": store_check,
            "peak_rss_mib_per_process": {name.split("::", 1)[1]: rss >> 20
                                         for name, rss in sorted(peaks.items())},
            "peak_rss_mib_per_deployment": {k: v >> 20 for k, v in sorted(by_kind.items())}}


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    store_url = args.store or tempfile.mkdtemp(prefix="soak-store-")
    url = deploy(args, store_url)
    ledger, kills, peaks, stop = Ledger(), [], {}, threading.Event()
    threads = [threading.Thread(target=killer, args=(stop, args.kill_every, kills), daemon=True),
               threading.Thread(target=memory_sampler, args=(stop, peaks), daemon=True)]
    for thread in threads:
        thread.start()
    try:
        seconds = asyncio.run(drive(url, args, ledger))
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    summary = summarize(ledger, seconds, kills, peaks, verify_store(store_url, ledger))
    print(json.dumps(summary, indent=2))
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    return 0 if summary["store"]["acknowledged_but_missing"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
