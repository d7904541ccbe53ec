"""Routing simulation: adapter loads and load imbalance of our router vs random, round-robin and Serve's.

Run: `python benchmarks/bench_routing.py` (full grid, ~3 min on 2 cores) or `--quick` (smoke run).

What is modelled (a discrete-event simulation; time unit = mean service time of one request):
- Traffic: Poisson arrivals at `utilization * workers` requests per unit (so a perfectly balanced
  router keeps every worker `utilization` busy before load costs); each request names one of
  `adapters` adapters drawn from a Zipf law with exponent `zipf_s` (rank k has weight k^-s).
- Workers: one FIFO server each with exponential service time (mean 1). Each holds an LRU of `slots`
  device adapter slots (`serve.routing.ResidentLRU`). A request for a non-resident adapter loads it
  when the worker admits it (evicting the least recently used slot) and adds `load_cost` units to
  its service time. Queue length = requests admitted and not yet finished (ongoing + queued).
- Routers see exact, current queue lengths and resident sets (no staleness), and decide on arrival:
  * ours: `serve.routing.AffinityPolicy` (the project's own policy), head of `rank`.
  * random: a uniformly random worker.
  * round-robin: workers in turn.
  * serve-multiplex: Ray Serve's default multiplexed routing as documented in "Model Multiplexing"
    (docs.ray.io serve/model-multiplexing, MultiplexMixin.apply_multiplex_routing) and implemented in
    ray 2.60's ray/serve/_private/request_router (PowerOfTwoChoicesRequestRouter + MultiplexMixin;
    replicas unload models LRU past max_num_models_per_replica, here = slots): candidates are the
    replicas that already hold the model id; two are sampled and the one with the shorter queue is taken
    if its queue is under `max_ongoing_requests`. When no replica holds the id, or the sampled holders
    are full (Serve retries after a back-off), the candidates become the replicas with the fewest loaded
    models, then all replicas. If every sampled replica is full, the request still goes to the shorter
    of the two (Serve would keep it waiting in the router; here it waits in that worker's queue
    instead). Serve's wall-clock matching timeout and back-off delays are not modelled.
    `max_ongoing_requests` is set to our spill threshold so both routers use the same notion of "full".
  * hash-affinity (reference, not a candidate): every request for an adapter goes to one fixed worker
    (rendezvous hash), ignoring load: a static partition of adapters over workers. It shows how many
    loads strict affinity still pays with LRU slots (the tail evicts the head), and what ignoring
    load costs in imbalance and latency. Its busiest workers are overloaded (queues grow without
    bound), so its queue and latency figures are not steady-state values.
- Metrics over the measured window (after the first `warmup` fraction of requests, so cold-start loads
  that every policy pays once are left out):
  * loads per 1,000 requests (adapter loads into a device slot);
  * imbalance: per-worker time-averaged queue length (sampled at arrivals, which for Poisson arrivals
    gives time averages), then max over workers / mean over workers;
  * mean queue length and mean latency (queueing + service + load), for context.

Not modelled: batching inside a worker, host-memory tiers (every load costs the same), stale queue
information at the router, network delays, learn requests.
"""
from __future__ import annotations

import argparse
import itertools
import random
import sys
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from serve.routing import AffinityPolicy, ReplicaView, ResidentLRU  # noqa: E402


@dataclass(frozen=True)
class SimConfig:
    """One simulated cluster and workload."""

    adapters: int
    workers: int
    slots: int
    requests: int
    zipf_s: float = 1.1
    utilization: float = 0.75  # offered load per worker, in requests per mean service time
    load_cost: float = 0.2  # extra service time when the adapter must be loaded
    spill_queue_threshold: int = 8
    warmup: float = 0.3  # fraction of requests before measuring starts
    seed: int = 0


@dataclass
class Worker:
    """One simulated replica: its adapter slots and the finish times of admitted requests (FIFO)."""

    lru: ResidentLRU
    finish_times: deque = field(default_factory=deque)
    busy_until: float = 0.0

    def queue_len(self, now: float) -> int:
        while self.finish_times and self.finish_times[0] <= now:
            self.finish_times.popleft()
        return len(self.finish_times)


@dataclass
class SimResult:
    """One policy's measurements over the measured window of one configuration."""

    policy: str
    loads_per_1k: float
    imbalance: float
    mean_queue: float
    mean_latency: float


class OursRouter:
    """The project's AffinityPolicy, fed exact ReplicaViews."""

    name = "ours"

    def __init__(self, config: SimConfig, rng: random.Random):
        # The policy's own defaults for balance, spill margin and holder cap (none).
        self.policy = AffinityPolicy(spill_queue_threshold=config.spill_queue_threshold,
                                     seed=rng.randrange(2**32))

    def route(self, ref: str, workers: list[Worker], queues: list[int]) -> int:
        views = [ReplicaView(str(i), queues[i], w.lru.free_slots, w.lru.resident)
                 for i, w in enumerate(workers)]
        return int(self.policy.choose(ref, views))


class RandomRouter:
    """A uniformly random worker per request."""

    name = "random"

    def __init__(self, config: SimConfig, rng: random.Random):
        self.rng = rng

    def route(self, ref: str, workers: list[Worker], queues: list[int]) -> int:
        return self.rng.randrange(len(workers))


class RoundRobinRouter:
    """Workers in turn, whatever the adapter."""

    name = "round-robin"

    def __init__(self, config: SimConfig, rng: random.Random):
        self.next_index = 0

    def route(self, ref: str, workers: list[Worker], queues: list[int]) -> int:
        chosen = self.next_index % len(workers)
        self.next_index += 1
        return chosen


class ServeMultiplexRouter:
    """Ray Serve's default multiplexed routing (see the module docstring for what is modelled)."""

    name = "serve-multiplex"

    def __init__(self, config: SimConfig, rng: random.Random):
        self.rng = rng
        self.max_ongoing = config.spill_queue_threshold

    def route(self, ref: str, workers: list[Worker], queues: list[int]) -> int:
        holders = [i for i, w in enumerate(workers) if ref in w.lru]
        fewest_count = min(len(w.lru) for w in workers)
        fewest = [i for i, w in enumerate(workers) if len(w.lru) == fewest_count]
        sampled: list[int] = []
        for candidates in (holders, fewest, list(range(len(workers)))):
            if not candidates:
                continue
            sampled = self._sample_two(candidates)
            best = min(sampled, key=lambda i: queues[i])
            if queues[best] < self.max_ongoing:
                return best
        return min(sampled, key=lambda i: queues[i])

    def _sample_two(self, candidates: list[int]) -> list[int]:
        if len(candidates) <= 2:
            return list(candidates)
        return self.rng.sample(candidates, 2)


class HashAffinityRouter:
    """Reference: a fixed home worker per adapter (rendezvous hashing), whatever the queues."""

    name = "hash-affinity"

    def __init__(self, config: SimConfig, rng: random.Random):
        self.home: dict[str, int] = {}

    def route(self, ref: str, workers: list[Worker], queues: list[int]) -> int:
        if ref not in self.home:
            self.home[ref] = max(range(len(workers)), key=lambda i: zlib.crc32(f"{ref}/{i}".encode()))
        return self.home[ref]


ROUTERS = (OursRouter, RandomRouter, RoundRobinRouter, ServeMultiplexRouter, HashAffinityRouter)


def zipf_refs(config: SimConfig) -> list[str]:
    """The adapter ref of every request, Zipf-distributed over `config.adapters` adapters."""
    rng = np.random.default_rng(config.seed)
    weights = np.arange(1, config.adapters + 1, dtype=np.float64) ** -config.zipf_s
    ranks = rng.choice(config.adapters, size=config.requests, p=weights / weights.sum())
    return [f"adapter-{rank}@r1" for rank in ranks]


def arrival_times(config: SimConfig) -> np.ndarray:
    """Poisson arrival times, shape (requests,), at utilization * workers requests per unit time."""
    rng = np.random.default_rng(config.seed + 1)
    gaps = rng.exponential(1.0 / (config.utilization * config.workers), size=config.requests)
    return np.cumsum(gaps)


def simulate(config: SimConfig, router_cls, refs: list[str] | None = None,
             arrivals: np.ndarray | None = None) -> SimResult:
    """Run one policy on one workload; refs/arrivals may be passed in to share them across policies."""
    refs = zipf_refs(config) if refs is None else refs
    arrivals = arrival_times(config) if arrivals is None else arrivals
    rng = random.Random(config.seed + 2)
    service = np.random.default_rng(config.seed + 3).exponential(1.0, size=config.requests)
    workers = [Worker(ResidentLRU(config.slots)) for _ in range(config.workers)]
    router = router_cls(config, rng)
    measure_from = int(config.requests * config.warmup)
    loads, latency_sum = 0, 0.0
    queue_area = np.zeros(config.workers)
    for index, (ref, now) in enumerate(zip(refs, arrivals.tolist())):
        queues = [w.queue_len(now) for w in workers]
        chosen = router.route(ref, workers, queues)
        worker = workers[chosen]
        loaded, _ = worker.lru.serve(ref)
        start = max(now, worker.busy_until)
        worker.busy_until = start + service[index] + (config.load_cost if loaded else 0.0)
        worker.finish_times.append(worker.busy_until)
        if index >= measure_from:
            loads += loaded
            latency_sum += worker.busy_until - now
            queue_area += queues
    measured = config.requests - measure_from
    per_worker_queue = queue_area / measured  # time-averaged queue length per worker (PASTA)
    mean_queue = float(per_worker_queue.mean())
    return SimResult(router_cls.name, 1000.0 * loads / measured,
                     float(per_worker_queue.max() / mean_queue) if mean_queue > 0 else 1.0,
                     mean_queue, float(latency_sum) / measured)


def run_config(config: SimConfig) -> list[SimResult]:
    """All routers on one shared workload."""
    refs, arrivals = zipf_refs(config), arrival_times(config)
    return [simulate(config, router_cls, refs, arrivals) for router_cls in ROUTERS]


def grid(args: argparse.Namespace) -> list[SimConfig]:
    """The benchmark grid: adapters x workers x slots (one small configuration with --quick)."""
    common = dict(utilization=args.utilization, load_cost=args.load_cost, zipf_s=args.zipf_s)
    if args.quick:
        return [SimConfig(adapters=1000, workers=8, slots=8, requests=args.requests or 6000, **common)]
    return [SimConfig(adapters=adapters, workers=workers, slots=slots,
                      requests=args.requests or 100_000, **common)
            for adapters, workers, slots in itertools.product((1000, 10000), (8, 64), (8, 64))]


TABLE_HEADER = ("| adapters | workers | slots | policy | loads/1k req | loads vs random | imbalance (max/mean q)"
                " | mean queue | mean latency |\n|---:|---:|---:|---|---:|---:|---:|---:|---:|")


def format_rows(config: SimConfig, results: list[SimResult]) -> list[str]:
    """Markdown table rows, one per policy; loads also as a ratio to random routing's."""
    random_loads = next(r.loads_per_1k for r in results if r.policy == "random")
    rows = []
    for result in results:
        ratio = result.loads_per_1k / random_loads if random_loads else float("nan")
        rows.append(f"| {config.adapters} | {config.workers} | {config.slots} | {result.policy} "
                    f"| {result.loads_per_1k:.1f} | {ratio:.2f} | {result.imbalance:.2f} "
                    f"| {result.mean_queue:.2f} | {result.mean_latency:.2f} |")
    return rows


def check_targets(config: SimConfig, results: list[SimResult]) -> list[str]:
    """The issue's targets for our router: <= half of random's loads, imbalance <= 1.5."""
    by_name = {r.policy: r for r in results}
    ours, rand = by_name["ours"], by_name["random"]
    label = f"{config.adapters} adapters, {config.workers} workers, {config.slots} slots"
    missed = []
    if ours.loads_per_1k > 0.5 * rand.loads_per_1k:
        best = min((r for r in results if r.policy != "ours"), key=lambda r: r.loads_per_1k)
        missed.append(f"{label}: loads {ours.loads_per_1k / rand.loads_per_1k:.2f} x random > 0.5 "
                      f"(fewest of the others: {best.policy} {best.loads_per_1k / rand.loads_per_1k:.2f} x)")
    if ours.imbalance > 1.5:
        missed.append(f"{label}: imbalance {ours.imbalance:.2f} > 1.5")
    return missed


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small configuration (smoke run)")
    parser.add_argument("--requests", type=int, default=None, help="requests per configuration")
    parser.add_argument("--utilization", type=float, default=SimConfig.utilization,
                        help="offered load per worker (requests per mean service time)")
    parser.add_argument("--load-cost", type=float, default=SimConfig.load_cost,
                        help="extra service time of an adapter load, in mean service times")
    parser.add_argument("--zipf-s", type=float, default=SimConfig.zipf_s, help="Zipf exponent of traffic")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configs = grid(args)
    print(f"zipf s={args.zipf_s}, utilization {args.utilization}, load cost {args.load_cost}, "
          f"spill threshold {configs[0].spill_queue_threshold}, warm-up {configs[0].warmup:.0%} of "
          f"{configs[0].requests} requests per configuration\n")
    print(TABLE_HEADER)
    started, missed = time.perf_counter(), []
    for config in configs:
        results = run_config(config)
        print("\n".join(format_rows(config, results)), flush=True)
        missed += check_targets(config, results)
    print(f"\ntotal {time.perf_counter() - started:.1f} s")
    for line in missed:
        print("target missed:", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
