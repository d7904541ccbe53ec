"""The `adapters` command, driven as a user would: a subprocess per call, exit codes, --json output,
import of a PEFT directory and of a legacy .pt file, export, and one-line errors without tracebacks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapters_store import UnsafeFileError, open_store
from adapters_store.interop import load_legacy_pt
from adapters_store.safetensors_io import decode, encode
from adapters_store.testing import lora_config, lora_key, random_lora
from adapters_store.validate import MODEL_FILE

ADAPTERS = [str(Path(sys.executable).with_name("adapters"))]
if not Path(ADAPTERS[0]).exists():
    ADAPTERS = [sys.executable, "-m", "adapters_store.cli"]


def cli(*args: str, store: str | None = None, env: dict | None = None,
        expect: int = 0) -> subprocess.CompletedProcess:
    command = ADAPTERS + (["--store", store] if store else []) + list(args)
    environment = {k: v for k, v in os.environ.items() if k != "LORA_SAVE_PATH"} | (env or {})
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment)
    assert result.returncode == expect, (command, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    if expect:
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result


def cli_json(*args: str, store: str):
    return json.loads(cli("--json", *args, store=store).stdout)


class RunsCode:
    """A pickle payload that creates a file when unpickled without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def peft_dir(tmp_path) -> Path:
    directory = tmp_path / "peft-dir"
    directory.mkdir()
    (directory / MODEL_FILE).write_bytes(encode(random_lora(seed=5)))
    (directory / "adapter_config.json").write_text(json.dumps({**lora_config(), "peft_type": "LORA"}))
    return directory


@pytest.fixture
def legacy_pt(tmp_path) -> tuple[Path, dict]:
    """A `.pt` of the original system, with its key spellings ('<module>.lora_A' and '.weight')."""
    peft = random_lora(seed=6)
    state = {key.removeprefix("base_model.model.").replace(".weight", "") if "q_proj" in key
             else key.replace(".weight", ".default.weight"): value for key, value in peft.items()}
    path = tmp_path / "old_expert.pt"
    torch.save({"lora_state": state, "metadata": {"lora_rank": 4, "lora_alpha": 16.0,
                                                  "model_path": "toy-model", "steps": 30}}, path)
    return path, peft


def test_import_list_info_revisions_export_verify_rm(tmp_path, peft_dir, legacy_pt):
    store = str(tmp_path / "store")
    imported = cli_json("import", str(peft_dir), "expert", store=store)
    assert imported["name"] == "expert" and imported["revision"].startswith("000001-")
    assert cli("import", str(legacy_pt[0]), "old", store=store).stdout.startswith("old@000001-")
    assert cli_json("ls", store=store) == ["expert", "old"]
    info = cli_json("info", "old", store=store)
    assert info["meta"]["lora_alpha"] == 16.0 and info["meta"]["steps"] == 30
    assert cli("revisions", "expert", store=store).stdout.split() == [imported["revision"]]

    dest = tmp_path / "exported"
    cli("export", "old@1", str(dest), store=store)
    exported, _ = decode((dest / MODEL_FILE).read_bytes())
    assert set(exported) == set(legacy_pt[1])
    assert all(torch.equal(exported[key], legacy_pt[1][key]) for key in exported)
    assert json.loads((dest / "adapter_config.json").read_text())["lora_alpha"] == 16.0

    assert [row["ok"] for row in cli_json("verify", store=store)] == [True, True]
    model = tmp_path / "store" / "expert" / imported["revision"] / MODEL_FILE
    model.write_bytes(model.read_bytes()[:-8])
    failed = cli("verify", "expert", store=store, expect=1)
    assert "FAILED" in failed.stdout and "sha256 mismatch" in failed.stdout

    assert cli("rm", "old", store=store).stdout.strip() == "deleted old"
    assert "not found" in cli("rm", "old", store=store, expect=1).stderr
    assert cli("ls", store=store).stdout.split() == ["expert"]


def test_gc_prune_and_default_store_from_environment(tmp_path):
    store_path = tmp_path / "store"
    store = open_store(str(store_path))
    parent = None
    for seed in range(3):
        parent = store.commit("chain", random_lora(seed=seed), config=lora_config(), parent=parent)
    store.backend.write_bytes("chain/000004-0badf00d/adapter_model.safetensors", b"partial")
    environment = {"LORA_SAVE_PATH": str(store_path)}
    assert json.loads(cli("--json", "gc", "--grace", "0", env=environment).stdout) == [
        "chain/000004-0badf00d"]
    assert len(json.loads(cli("--json", "prune", "chain", "--keep", "1", env=environment).stdout)) == 2
    assert cli("revisions", "chain", env=environment).stdout.split() == [parent]


def test_errors_exit_non_zero_with_one_line(tmp_path):
    store = str(tmp_path / "store")
    open_store(store)
    assert "not found" in cli("info", "missing", store=store, expect=1).stderr
    assert "invalid adapter name" in cli("info", "../etc", store=store, expect=1).stderr
    assert "does not exist" in cli("ls", store=str(tmp_path / "absent"), expect=1).stderr
    assert "LORA_SAVE_PATH" in cli("ls", expect=2).stderr
    assert "not a PEFT adapter directory" in cli("import", str(tmp_path), "x", store=store,
                                                 expect=1).stderr


def test_a_pickle_that_runs_code_is_refused_and_runs_nothing(tmp_path):
    marker, proof = tmp_path / "was-run", tmp_path / "would-run"
    path = tmp_path / "evil.pt"
    torch.save({"lora_state": {lora_key("m.q_proj", "A"): torch.zeros(4, 16)},
                "metadata": {"x": RunsCode(marker)}}, path)
    store = str(tmp_path / "store")
    assert "refused" in cli("import", str(path), "evil", store=store, expect=1).stderr
    with pytest.raises(UnsafeFileError):
        load_legacy_pt(str(path))
    assert not marker.exists() and open_store(store).list_adapters() == []
    torch.save({"x": RunsCode(proof)}, tmp_path / "proof.pt")
    torch.load(tmp_path / "proof.pt", weights_only=False)  # the payload is real: unsafely loaded, it runs
    assert proof.exists()


def test_legacy_file_with_unknown_keys_is_refused(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"lora_state": {"model.layers.0.q_proj.lora_A": torch.zeros(4, 16),
                               "model.layers.0.q_proj.lora_B": torch.zeros(16, 4),
                               "model.layers.0.q_proj.magnitude": torch.zeros(16)},
                "metadata": {}}, path)
    error = cli("import", str(path), "odd", store=str(tmp_path / "store"), expect=1).stderr
    assert "magnitude" in error


def test_progress_bar_reports_every_byte_on_a_tty(monkeypatch, capsys):
    from adapters_store import cli as cli_module

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    with cli_module.progress_bar("t", 64 * 2**20) as update:
        assert update is not None
        for _ in range(4):
            update(16 * 2**20)
    assert "64.0M" in capsys.readouterr().err.replace("67.1M", "64.0M")
    with cli_module.progress_bar("t", 1024) as update:
        assert update is None  # small transfers: no bar


def test_listing_and_info_on_s3(s3_store_url):
    store = open_store(s3_store_url)
    revision = store.commit("remote", random_lora(), config=lora_config(), parent=None)
    assert cli_json("ls", store=s3_store_url) == ["remote"]
    assert cli_json("info", "remote", store=s3_store_url)["latest"] == revision
    assert [row["ok"] for row in cli_json("verify", "remote", store=s3_store_url)] == [True]
