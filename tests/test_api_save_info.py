"""OnlineLLM with the real Engine: save_lora_to_disk returns False (never raises, never commits) for
tensors the model cannot load, and keeps an rsLoRA adapter's scaling; get_adapter_info reports an
unreachable store as disk_error also when the adapter is resident only as name@rev."""
from __future__ import annotations

import pytest
import torch

from adapters_store.errors import StoreUnavailableError
from serve import OnlineLLM
from serve.engine.validate import fresh_weights, to_peft

pytestmark = pytest.mark.timeout(120)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def llm(tiny_model_path, tmp_path_factory):
    api = OnlineLLM(tiny_model_path, store=str(tmp_path_factory.mktemp("save") / "adapters"),
                    max_tokens=4, batch_window_ms=0)
    yield api
    api.close()


@pytest.mark.parametrize("tensors", [
    {"base_model.model.foo.lora_A.weight": torch.tensor(1.0)},                       # 0-d
    {"base_model.model.not.a.module.lora_A.weight": torch.zeros(4, 7),                # no such module
     "base_model.model.not.a.module.lora_B.weight": torch.zeros(5, 4)},
], ids=["scalar", "unknown-module"])
def test_save_of_tensors_the_model_cannot_load_returns_false(llm, tensors):
    assert llm.save_lora_to_disk("unfit", tensors) is False
    assert llm.store.latest("unfit") is None                     # nothing committed as LATEST
    assert llm.generate("hi", adapter="unfit") == llm.generate("hi")


def test_save_keeps_rslora_of_the_stored_adapter(llm):
    shapes = {p: (m.in_features, m.out_features) for p, m in llm.engine.modules.items()}
    tensors = to_peft(fresh_weights(shapes, 16, seed=2))
    config = {"r": 16, "lora_alpha": 32, "use_rslora": True, "target_modules": TARGETS,
              "base_model_name_or_path": llm.model_id}
    llm.store.commit("rs", tensors, config=config, parent=None)
    assert llm.save_lora_to_disk("rs", tensors) is True
    latest = llm.store.latest("rs")
    assert llm.store.read("rs", latest).config["use_rslora"] is True
    assert llm.engine.adapters.get(f"rs@{latest}").scale == pytest.approx(32 / 16 ** 0.5)


def test_info_reports_unreachable_store_for_adapter_resident_as_name_at_rev(tiny_model_path, tmp_path):
    root = str(tmp_path / "adapters")
    with OnlineLLM(tiny_model_path, store=root, batch_window_ms=0) as writer:
        revision = writer.learn([{"prompt": "a", "response": "b"}], adapter="x", steps=1)["revision"]
    with OnlineLLM(tiny_model_path, store=root, batch_window_ms=0) as llm:
        llm.generate("hi", adapter=f"x@{revision}", max_tokens=1)     # resident only as x@rev

        def unreachable(*_args, **_kwargs):
            raise StoreUnavailableError("store unreachable")
        llm.store.latest = unreachable
        info = llm.get_adapter_info("x")
    assert info["in_memory"] is True
    assert "store unreachable" in info["disk_error"]
