"""A committed revision directory is an ordinary PEFT adapter: PeftModel.from_pretrained on the tiny
model gives the logits of applying the committed tensors by hand (W x + alpha/r * B A x)."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from adapters_store import open_store
from adapters_store.interop import export_revision, import_peft_dir
from adapters_store.testing import lora_config, random_lora

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def base_model(tiny_model_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    return model.eval()


def lora_modules(model) -> dict[str, tuple[int, int]]:
    """Every targeted Linear of the model: path -> (in_features, out_features)."""
    return {name: (module.in_features, module.out_features) for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in PROJECTIONS}


def logits_with_merged_lora(model, tensors: dict[str, torch.Tensor], input_ids) -> torch.Tensor:
    """Reference: W + (alpha / r) * B @ A applied to a private copy of the base weights."""
    originals = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            key = f"base_model.model.{name}.lora_A.weight"
            if key in tensors:
                lora_a, lora_b = tensors[key], tensors[key.replace("lora_A", "lora_B")]  # [r,in],[out,r]
                originals[name] = module.weight.detach().clone()
                module.weight += (ALPHA / RANK) * lora_b @ lora_a
        try:
            return model(input_ids).logits
        finally:
            for name, module in model.named_modules():
                if name in originals:
                    module.weight.copy_(originals[name])


def test_revision_directory_loads_in_peft_with_the_committed_logits(base_model, tiny_model_path,
                                                                     tmp_path):
    from peft import PeftModel

    modules = lora_modules(base_model)
    assert len(modules) == 7 * base_model.config.num_hidden_layers
    tensors = random_lora(modules, rank=RANK, seed=3, scale=0.2)
    store = open_store(str(tmp_path / "store"))
    revision = store.commit("expert", tensors, parent=None,
                            config=lora_config(RANK, ALPHA, list(PROJECTIONS), tiny_model_path))
    input_ids = torch.tensor([[1, 17, 42, 99, 7, 256, 3]])
    with torch.no_grad():
        base_logits = base_model(input_ids).logits
    expected = logits_with_merged_lora(base_model, tensors, input_ids)
    assert (expected - base_logits).abs().max() > 1e-2  # the adapter really changes the output

    peft_model = PeftModel.from_pretrained(base_model, store.revision_url("expert", revision))
    try:
        with torch.no_grad():
            got = peft_model(input_ids).logits
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        peft_model.save_pretrained(str(tmp_path / "saved-by-peft"))  # "trained elsewhere"
    finally:
        peft_model.unload()  # give the module-scoped base model back without LoRA layers

    other = open_store(str(tmp_path / "other"))
    import_peft_dir(other, str(tmp_path / "saved-by-peft"), "from-peft")
    exported = tmp_path / "exported"
    export_revision(store, "expert", str(exported))
    assert json.loads((exported / "adapter_config.json").read_text())["r"] == RANK
    import_peft_dir(other, str(exported), "round-trip")
    for name in ("from-peft", "round-trip"):
        loaded = other.read(name)
        assert set(loaded.tensors) == set(tensors) and loaded.alpha == ALPHA
        assert all(torch.equal(loaded.tensors[key], tensors[key]) for key in tensors)
