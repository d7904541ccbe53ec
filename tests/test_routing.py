"""Tests of the adapter-affinity routing policy (serve.routing) and of the routing simulation.

Decisions are checked through `AffinityPolicy.rank` / `choose`, the calls the Ray request router makes;
the simulation test runs benchmarks/bench_routing.py at a small size and compares real load counts.
"""
from __future__ import annotations

import functools
import importlib.util
import random
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve.routing import AffinityPolicy, ReplicaView, ResidentLRU

HOT = "hot@r1"


def view(replica_id: str, queue_len: int = 0, free_slots: int = 0, resident=()) -> ReplicaView:
    return ReplicaView(replica_id, queue_len, free_slots, frozenset(resident))


@functools.cache
def load_bench():
    """benchmarks/ is not a package: import the simulation script by path."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_routing.py"
    spec = importlib.util.spec_from_file_location("bench_routing", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


# --- affinity -----------------------------------------------------------------------------------

def test_holder_wins_over_less_loaded_non_holder():
    replicas = [view("a", 1), view("b", 2, resident=[HOT]), view("c", 1, free_slots=3)]
    policy = AffinityPolicy(seed=0)
    assert policy.queue_limit(replicas) == 3  # ceil(1.5 * (4 + 1) / 3)
    assert policy.rank(HOT, replicas)[0] == "b"


def test_least_loaded_holder_first_then_other_holders():
    replicas = [view("a", 3, resident=[HOT]), view("b", 1, resident=[HOT]), view("c", 0, free_slots=1)]
    ranked = AffinityPolicy(balance=None, seed=0).rank(HOT, replicas)
    assert ranked == ["b", "a", "c"]


def test_without_balance_holder_is_kept_up_to_threshold():
    replicas = [view("a", 7, resident=[HOT])] + [view(f"idle{i}", 0, free_slots=4) for i in range(3)]
    assert AffinityPolicy(balance=None, spill_queue_threshold=8, seed=0).choose(HOT, replicas) == "a"
    # The same queue is far above the mean, so the bounded-load limit (default) spills it.
    assert AffinityPolicy(seed=0).choose(HOT, replicas) != "a"


# --- spill --------------------------------------------------------------------------------------

def test_hot_adapter_spills_to_non_holder_with_free_slot():
    replicas = [view("h1", 8, resident=[HOT]), view("h2", 9, resident=[HOT]),
                view("full", 0, free_slots=0), view("free", 1, free_slots=2), view("busy", 8, free_slots=5)]
    ranked = AffinityPolicy(balance=None, spill_queue_threshold=8, seed=0).rank(HOT, replicas)
    assert ranked[:2] == ["free", "full"]  # free slot beats a shorter queue; both beat the holders
    assert ranked[2:4] == ["h1", "h2"]
    assert ranked[4] == "busy"  # no shorter than the best holder: not a spill target


def test_no_spill_when_others_are_not_clearly_shorter():
    # Holder at the threshold, the other replica only one request shorter (spill_margin is 2).
    replicas = [view("h", 8, resident=[HOT]), view("o", 7, free_slots=4)]
    policy = AffinityPolicy(balance=None, spill_queue_threshold=8, spill_margin=2, seed=0)
    assert policy.choose(HOT, replicas) == "h"
    replicas = [view("h", 8, resident=[HOT]), view("o", 6, free_slots=4)]
    assert policy.choose(HOT, replicas) == "o"


def test_max_holders_needs_twice_the_limit_to_spill():
    policy = AffinityPolicy(balance=None, spill_queue_threshold=4, max_holders=2, seed=0)
    holders = [view("h1", 5, resident=[HOT]), view("h2", 6, resident=[HOT])]
    assert policy.choose(HOT, holders + [view("o", 0)]) == "h1"
    holders = [view("h1", 8, resident=[HOT]), view("h2", 9, resident=[HOT])]
    assert policy.choose(HOT, holders + [view("o", 0)]) == "o"


# --- first loads and base model -----------------------------------------------------------------

def test_first_load_prefers_free_slots_then_short_queue():
    replicas = [view("nofree", 0, free_slots=0), view("free_busy", 2, free_slots=1),
                view("free_idle", 1, free_slots=3)]
    ranked = AffinityPolicy(balance=None, seed=0).rank("new@r1", replicas)
    assert ranked == ["free_idle", "free_busy", "nofree"]


def test_first_load_skips_over_limit_replica_even_with_free_slots():
    replicas = [view("free_but_full", 9, free_slots=8), view("nofree", 3, free_slots=0)]
    assert AffinityPolicy(balance=None, seed=0).choose("new@r1", replicas) == "nofree"


def test_base_model_goes_to_least_loaded_whatever_is_resident():
    replicas = [view("a", 4, resident=[HOT]), view("b", 0), view("c", 2, free_slots=5)]
    assert AffinityPolicy(seed=0).rank(None, replicas) == ["b", "c", "a"]


def test_empty_replicas_and_bad_arguments():
    policy = AffinityPolicy(seed=0)
    assert policy.rank(HOT, []) == []
    with pytest.raises(ValueError):
        policy.choose(HOT, [])
    for kwargs in ({"spill_queue_threshold": 0}, {"max_holders": 0}, {"balance": 0.5},
                   {"spill_margin": 0}):
        with pytest.raises(ValueError):
            AffinityPolicy(**kwargs)


# --- determinism and invariants -----------------------------------------------------------------

def tied_replicas() -> list[ReplicaView]:
    return [view(f"r{i}", 0, free_slots=1) for i in range(16)]


def test_same_seed_same_rankings_different_seed_different_ties():
    calls = [("x@1", tied_replicas()), (None, tied_replicas()), ("y@2", tied_replicas())]
    first = [AffinityPolicy(seed=7).rank(ref, replicas) for ref, replicas in calls]
    again = [AffinityPolicy(seed=7).rank(ref, replicas) for ref, replicas in calls]
    other = [AffinityPolicy(seed=8).rank(ref, replicas) for ref, replicas in calls]
    assert first == again
    assert first != other


replica_views = st.lists(
    st.builds(lambda q, f, holds: (q, f, holds), st.integers(0, 20), st.integers(0, 4), st.booleans()),
    min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(replica_views, st.sampled_from([None, 1.0, 1.25, 2.0]), st.integers(1, 10))
def test_rank_is_a_permutation_and_head_follows_rules(specs, balance, threshold):
    replicas = [view(f"r{i}", q, f, [HOT] if holds else []) for i, (q, f, holds) in enumerate(specs)]
    policy = AffinityPolicy(balance=balance, spill_queue_threshold=threshold, seed=1)
    ranked = policy.rank(HOT, replicas)
    assert sorted(ranked) == sorted(v.replica_id for v in replicas)
    by_id = {v.replica_id: v for v in replicas}
    head, limit = by_id[ranked[0]], policy.queue_limit(replicas)
    holders = [v for v in replicas if HOT in v.resident]
    if holders and min(v.queue_len for v in holders) < limit:
        assert head in holders and head.queue_len == min(v.queue_len for v in holders)
    if HOT not in head.resident and holders:  # a spill must save at least spill_margin requests
        assert head.queue_len <= min(v.queue_len for v in holders) - policy.spill_margin


# --- the simulated slots -------------------------------------------------------------------------

def test_resident_lru_loads_and_evicts_least_recently_used():
    lru = ResidentLRU(2)
    assert lru.serve("a@1") == (True, None)
    assert lru.serve("b@1") == (True, None)
    assert lru.serve("a@1") == (False, None)  # a is now most recent
    assert lru.serve("c@1") == (True, "b@1")
    assert set(lru.resident) == {"a@1", "c@1"} and lru.snapshot() == frozenset({"a@1", "c@1"})
    assert (lru.loads, lru.evictions, lru.free_slots, len(lru)) == (3, 1, 0, 2)
    with pytest.raises(ValueError):
        ResidentLRU(0)


# --- the simulation -------------------------------------------------------------------------------

def test_simulation_ours_loads_far_less_than_random_and_stays_balanced():
    bench = load_bench()
    config = bench.SimConfig(adapters=1000, workers=16, slots=32, requests=8000)
    results = {result.policy: result for result in bench.run_config(config)}
    ours, rand = results["ours"], results["random"]
    assert ours.loads_per_1k < 0.5 * rand.loads_per_1k
    assert ours.imbalance < rand.imbalance
    assert ours.imbalance <= 1.5
    assert ours.mean_latency < results["serve-multiplex"].mean_latency  # balance buys latency


def test_simulated_serve_router_prefers_holder_until_full():
    bench = load_bench()
    config = bench.SimConfig(adapters=10, workers=4, slots=2, requests=10)
    workers = [bench.Worker(ResidentLRU(2)) for _ in range(4)]
    workers[2].lru.serve(HOT)
    router = bench.ServeMultiplexRouter(config, random.Random(0))
    assert router.route(HOT, workers, [0, 0, 5, 0]) == 2
    chosen = router.route(HOT, workers, [0, 0, config.spill_queue_threshold, 0])
    assert chosen in (0, 1, 3)  # the holder is full: fewest-models replicas take it
