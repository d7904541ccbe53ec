"""Side-by-side speed figures for the engine (issue 3's list), on serve.tiny_model.BENCH_SPEC
(hidden 512, 8 layers, rank 16 on all attention + MLP linears), on this machine's CPU:

  1. decode throughput, batch 32: ours with 32 distinct adapters vs PEFT generate(adapter_names=...)
  2. ours 32 distinct vs ours with all 32 rows on one adapter, next to the bytes bound
  3. ours one adapter vs PEFT with that one adapter active
  4. ours 32 distinct vs the original way: swap one adapter in, run its request, next
  5. learn tokens/s vs a plain PEFT training loop on the same data
  6. host memory of 1,000 adapters in the host tier vs their tensors' bytes

Every generation run makes exactly --new-tokens tokens per row (eos ignored), greedy, short prompts;
throughput = generated tokens / wall time (prefill included, the same for every system). Each figure
is the best of --repeats runs. Usage: python benchmarks/bench_engine.py [--threads 1] [--json out]
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import subprocess
import sys
import time

import torch

from adapters_store.testing import random_lora
from serve.engine import Engine
from serve.tiny_model import BENCH_SPEC, TinyModelSpec, build_tiny_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA, BATCH = 16, 32.0, 32
WORDS = "the capital of france is blue green sky ocean river mountain city country language".split()
logger = logging.getLogger("bench_engine")


def _prompts(n: int) -> list[str]:
    """n distinct short prompts (4-7 words)."""
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(4 + i % 4)) for i in range(n)]


def _rounds(systems: dict, repeats: int) -> dict[str, float]:
    """Best tokens/s of each system; one call of each per round, so load on the shared machine hits
    every system alike. Each value of `systems` is a function returning tokens/s."""
    best = {name: 0.0 for name in systems}
    for _ in range(repeats):
        for name, run_once in systems.items():
            best[name] = max(best[name], run_once())
    return best


def _shapes(engine: Engine) -> dict:
    return {path: (m.in_features, m.out_features) for path, m in engine.modules.items()}


# ---------------------------------------------------------------------------------------- ours
def ours_decode(engine: Engine, adapters: list, new_tokens: int):
    """A function that runs one batch through our engine and returns tokens/s (warmed up once)."""
    prompts = _prompts(len(adapters))

    def run() -> float:
        start = time.perf_counter()
        results = asyncio.run(engine.generate_batch(prompts, adapters, max_tokens=new_tokens,
                                                    temperature=0, ignore_eos=True))
        elapsed = time.perf_counter() - start
        assert all(r.completion_tokens == new_tokens for r in results)
        return len(adapters) * new_tokens / elapsed
    run()  # warm-up: slots written, caches allocated
    return run


# ---------------------------------------------------------------------------------------- PEFT
def peft_model(model_path: str, adapters: dict[str, dict]):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0)
    model = None
    for name, tensors in adapters.items():
        if model is None:
            model = get_peft_model(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        set_peft_model_state_dict(model, tensors, adapter_name=name)
    model.add_adapter("swap", config)  # the one slot the swap-at-a-time baseline copies weights into
    return model.eval()


def peft_decode(model, tokenizer, adapter_names: list[str] | None, new_tokens: int, n_rows: int,
                active: str | None = None):
    """A function that runs PEFT generate on the batch (mixed via adapter_names, or the `active`
    adapter set for all rows) and returns tokens/s."""
    tokenizer.padding_side = "left"
    batch = tokenizer(_prompts(n_rows), return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=tokenizer.pad_token_id)
    if adapter_names is not None:
        kwargs["adapter_names"] = adapter_names

    def run() -> float:
        if active is not None:
            model.set_adapter(active)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**batch, **kwargs)
        elapsed = time.perf_counter() - start
        assert out.shape[1] - batch["input_ids"].shape[1] == new_tokens
        return n_rows * new_tokens / elapsed
    run()
    return run


def swap_one_at_a_time(model, tokenizer, adapters: dict[str, dict], new_tokens: int) -> float:
    """The original system: one adapter's weights copied into the model, its request run, next."""
    from peft import set_peft_model_state_dict

    names = list(adapters)
    model.set_adapter("swap")
    prompts = _prompts(len(names))
    start = time.perf_counter()
    for name, prompt in zip(names, prompts):
        set_peft_model_state_dict(model, adapters[name], adapter_name="swap")  # swap weights in
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id)
    return len(names) * new_tokens / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------------- learning
LEARN_DATA = [{"prompt": f"question {i}: what is {w}?", "response": f" {w} is a word number {i}."}
              for i, w in enumerate(WORDS[:8])]


def ours_learn(engine: Engine, steps: int) -> float:
    report = asyncio.run(engine.learn(LEARN_DATA, adapter="bench-learn", steps=steps, lr=1e-3))
    return report.tokens / report.duration_s


def peft_learn_loop(model_path: str, engine: Engine, steps: int):
    """A plain PEFT loop on the same padded batch: forward, masked loss, backward, clip, AdamW.
    Returns a function that runs it once and gives tokens/s."""
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from serve.engine.data import build_examples
    from serve.engine.learn import _pad_batch

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS,
                                            lora_dropout=0.0)).eval()
    examples = build_examples(engine.tokenizer, LEARN_DATA, eos_id=engine.tokenizer.eos_token_id,
                              max_len=engine.loaded.max_len)
    ids, mask, labels = _pad_batch(examples, engine.loaded.pad_id, "cpu")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)

    def run() -> float:
        start = time.perf_counter()
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
        return int(mask.sum()) * steps / (time.perf_counter() - start)
    return run


def learn_side_by_side(engine: Engine, model_path: str, steps: int, repeats: int) -> tuple[float, float]:
    """Best tokens/s of ours and of plain PEFT, runs alternated so machine load hits both alike."""
    peft_run = peft_learn_loop(model_path, engine, steps)
    ours, theirs = [], []
    for _ in range(repeats + 1):  # the first pair warms both up
        ours.append(ours_learn(engine, steps))
        theirs.append(peft_run())
    return max(ours[1:]), max(theirs[1:])


# ---------------------------------------------------------------------------------------- memory
def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def host_tier_memory(count: int, threads: int) -> dict:
    """RSS growth of an engine holding `count` adapters (default tiny model) vs their tensor bytes."""
    engine = Engine(model=str(build_tiny_model(spec=TinyModelSpec())), host_cache_size=count + 1,
                    cpu_threads=threads)
    try:
        shapes = _shapes(engine)
        gc.collect()
        before = _rss_bytes()
        for i in range(count):
            engine.install(f"m{i}", random_lora(shapes, RANK, seed=i))
        gc.collect()
        grown = _rss_bytes() - before
        tensor_bytes = engine.stats()["host_bytes"]
        return {"adapters": count, "tensor_bytes": tensor_bytes, "rss_growth_bytes": grown,
                "ratio": round(grown / tensor_bytes, 3)}
    finally:
        engine.shutdown()


# ---------------------------------------------------------------------------------------- main
def bytes_bound(engine: Engine) -> dict:
    """Bytes a decode step must read: base weights + one adapter, vs base + 32 adapters."""
    base = sum(p.numel() * p.element_size() for p in engine.loaded.model.parameters())
    adapter = sum((m.in_features + m.out_features) * RANK * 4 for m in engine.modules.values())
    one, many = base + adapter, base + BATCH * adapter
    return {"base_bytes": base, "adapter_bytes": adapter, "bound_ratio": round(one / many, 3)}


def run(args) -> dict:
    torch.manual_seed(0)
    path = str(build_tiny_model(spec=BENCH_SPEC))
    engine = Engine(model=path, lora_rank=RANK, lora_alpha=ALPHA, max_slots=BATCH, max_batch_size=BATCH,
                    batch_window_ms=5.0, cpu_threads=args.threads)
    shapes = _shapes(engine)
    tensors = {f"a{i}": random_lora(shapes, RANK, seed=i, scale=0.05) for i in range(BATCH)}
    for name, t in tensors.items():
        engine.install(name, t)
    names, n, r = list(tensors), args.new_tokens, args.repeats
    out: dict = {"threads": torch.get_num_threads(), "batch": BATCH, "new_tokens": n}
    peft = peft_model(path, tensors)
    systems = {
        "ours_32_distinct": ours_decode(engine, names, n),
        "ours_one_adapter": ours_decode(engine, [names[0]] * BATCH, n),
        "ours_base": ours_decode(engine, [None] * BATCH, n),
        "peft_32_adapter_names": peft_decode(peft, engine.tokenizer, names, n, BATCH),
        "peft_one_adapter": peft_decode(peft, engine.tokenizer, None, n, BATCH, active=names[0]),
        "swap_one_at_a_time": lambda model=peft: swap_one_at_a_time(model, engine.tokenizer, tensors, n),
    }
    out.update(_rounds(systems, r))
    out.update(bytes_bound(engine))
    del peft, systems
    out["ours_learn_tok_s"], out["peft_learn_tok_s"] = learn_side_by_side(engine, path, args.learn_steps, r)
    engine.shutdown()
    out["host_tier"] = host_tier_in_fresh_process(args.host_adapters, args.threads)
    return out


def host_tier_in_fresh_process(count: int, threads: int) -> dict:
    """Run the memory figure in a new interpreter: freed heap from the runs above would hide growth."""
    command = [sys.executable, os.path.abspath(__file__), "--host-only", str(count), "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(out: dict) -> str:
    rows = [
        ("ours 32 distinct vs PEFT adapter_names (>= 3x)", out["ours_32_distinct"], out["peft_32_adapter_names"]),
        ("ours 32 distinct vs ours one adapter (>= 0.7x)", out["ours_32_distinct"], out["ours_one_adapter"]),
        ("ours one adapter vs PEFT one adapter (>= 0.95x)", out["ours_one_adapter"], out["peft_one_adapter"]),
        ("ours 32 distinct vs swap one at a time (>= 5x)", out["ours_32_distinct"], out["swap_one_at_a_time"]),
        ("learn tok/s ours vs plain PEFT loop (>= 0.9x)", out["ours_learn_tok_s"], out["peft_learn_tok_s"]),
    ]
    lines = [f"threads={out['threads']} batch={out['batch']} new_tokens={out['new_tokens']} "
             f"ours_base={out['ours_base']:.0f} tok/s"]
    for label, ours, theirs in rows:
        lines.append(f"{label:52s} {ours:9.0f} vs {theirs:9.0f}  = {ours / theirs:5.2f}x")
    lines.append(f"bytes bound for 32 distinct / one adapter: {out['bound_ratio']:.2f}x "
                 f"(base {out['base_bytes'] / 1e6:.0f} MB, adapter {out['adapter_bytes'] / 1e6:.1f} MB)")
    host = out["host_tier"]
    lines.append(f"host tier: {host['adapters']} adapters, tensors {host['tensor_bytes'] / 1e6:.1f} MB, "
                 f"RSS growth {host['rss_growth_bytes'] / 1e6:.1f} MB = {host['ratio']:.2f}x (<= 1.2x)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for every system")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--learn-steps", type=int, default=15)
    parser.add_argument("--host-adapters", type=int, default=1000)
    parser.add_argument("--json", default=None, help="also write the raw figures here")
    parser.add_argument("--host-only", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.host_only is not None:
        print(json.dumps(host_tier_memory(args.host_only, args.threads)))
        return
    out = run(args)
    print(report(out))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(out, handle, indent=2)


if __name__ == "__main__":
    main()
