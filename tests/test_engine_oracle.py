"""Correctness oracle: a batch mixing several adapters (different ranks) and the base model gives the
same logits and the same greedy generations as peft.PeftModel running each adapter on its own."""
from __future__ import annotations

import pytest
import torch

from adapters_store.testing import random_lora
from serve.engine import Engine

ADAPTER_RANKS = {"alpha": 4, "beta": 8, "gamma": 16, "delta": 8, "eps": 2}
PROMPTS = ["the capital of france is", "blue sky over the ocean", "what is the number",
           "python code for the", "a man came home", "where is the river"]


@pytest.fixture(scope="module")
def engine(tiny_model_path):
    eng = Engine(model=tiny_model_path, cpu_threads=1, max_slots=8)
    shapes = {path: (m.in_features, m.out_features) for path, m in eng.modules.items()}
    eng.test_tensors = {name: random_lora(shapes, rank, seed=i, scale=0.3)
                        for i, (name, rank) in enumerate(ADAPTER_RANKS.items())}
    for name, tensors in eng.test_tensors.items():
        eng.install(name, tensors)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def peft_model(tiny_model_path, engine):
    from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model: PeftModel | None = None
    for name, rank in ADAPTER_RANKS.items():
        config = LoraConfig(r=rank, lora_alpha=engine.config.lora_alpha, target_modules=targets,
                            lora_dropout=0.0)
        if model is None:
            model = get_peft_model(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        result = set_peft_model_state_dict(model, engine.test_tensors[name], adapter_name=name)
        assert not [k for k in result.unexpected_keys if "lora" in k]
    return model.eval()


def _peft_logits(peft_model, tokenizer, prompt: str, adapter: str | None) -> torch.Tensor:
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        if adapter is None:
            with peft_model.disable_adapter():
                return peft_model(input_ids=ids).logits[0]
        peft_model.set_adapter(adapter)
        return peft_model(input_ids=ids).logits[0]


def test_mixed_batch_logits_match_peft(engine, peft_model):
    adapters = ["alpha", None, "beta", "gamma", "delta", "eps"]
    ours = engine.prompt_logits(PROMPTS, adapters)
    base_logits = _peft_logits(peft_model, engine.tokenizer, PROMPTS[0], None)
    for prompt, adapter, logits in zip(PROMPTS, adapters, ours):
        expected = _peft_logits(peft_model, engine.tokenizer, prompt, adapter)
        torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-4)
    # the adapters really change the output, so the comparison above can fail
    alpha_on_base_prompt = engine.prompt_logits([PROMPTS[0]], ["alpha"])[0]
    assert (alpha_on_base_prompt - base_logits).abs().max() > 1e-2


async def test_mixed_batch_greedy_generation_matches_peft(engine, peft_model):
    adapters = [None, "alpha", "beta", "gamma", "delta", "eps"]
    results = await engine.generate_batch(PROMPTS, adapters, max_tokens=12, temperature=0)
    eos = set(engine.loaded.eos_ids)
    for prompt, adapter, result in zip(PROMPTS, adapters, results):
        ids = torch.tensor([engine.tokenizer(prompt)["input_ids"]])
        if adapter is None:
            with peft_model.disable_adapter():
                out = peft_model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
        else:
            peft_model.set_adapter(adapter)
            out = peft_model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
        expected = [t for t in out[0, ids.shape[1]:].tolist()]
        while expected and expected[-1] in eos:
            expected.pop()
        assert result.token_ids == expected, (adapter, result.text)
        assert result.adapter == (None if adapter is None else engine.resolve(adapter))
    assert len({tuple(r.token_ids) for r in results}) > 2  # adapters lead to different text


def test_single_adapter_batch_matches_peft(engine, peft_model):
    """All rows on one adapter take the single-slot fast path; it must agree too."""
    ours = engine.prompt_logits(PROMPTS[:3], ["gamma"] * 3)
    for prompt, logits in zip(PROMPTS[:3], ours):
        torch.testing.assert_close(logits, _peft_logits(peft_model, engine.tokenizer, prompt, "gamma"),
                                   atol=2e-4, rtol=1e-4)


def _other_architecture(tiny_model_path: str, dest, family: str) -> str:
    """A tiny random model of another family, sharing the tiny model's tokenizer."""
    from transformers import (AutoTokenizer, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
               "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    config_cls, model_cls = classes[family]
    config = config_cls(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model_cls(config).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return str(dest)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
async def test_other_model_families_match_peft(tiny_model_path, tmp_path, family):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    path = _other_architecture(tiny_model_path, tmp_path / family, family)
    eng = Engine(model=path, cpu_threads=1, max_slots=2)
    try:
        shapes = {p: (m.in_features, m.out_features) for p, m in eng.modules.items()}
        tensors = random_lora(shapes, 4, seed=1, scale=0.3)
        eng.install("fam", tensors)
        ours = eng.prompt_logits(PROMPTS[:2], ["fam", None])
        results = await eng.generate_batch(PROMPTS[:2], ["fam", None], max_tokens=6, ignore_eos=True)
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=eng.config.lora_alpha, lora_dropout=0.0,
                                               target_modules=sorted({p.rsplit(".", 1)[-1] for p in shapes})))
        set_peft_model_state_dict(peft, tensors)
        ids = torch.tensor([eng.tokenizer(PROMPTS[0])["input_ids"]])
        with torch.no_grad():
            torch.testing.assert_close(ours[0], peft(input_ids=ids).logits[0], atol=2e-4, rtol=1e-4)
            out = peft.generate(input_ids=ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert results[0].token_ids == out[0, ids.shape[1]:].tolist()
        assert len(shapes) == 14  # q, k, v, o, gate, up, down in both layers
    finally:
        eng.shutdown()
