"""The README's first set-up command, end to end: `online-llm serve` (what scripts/serve.sh runs) starts
Ray + Serve on the embedded tiny model with a local store, prints how to call it, answers HTTP, learns
an adapter into the store, and stops cleanly on Ctrl-C (SIGINT)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import httpx
import pytest

from testkit import free_port

pytestmark = pytest.mark.timeout(300)


def _read_until(proc: subprocess.Popen, marker: str, timeout_s: float) -> str:
    """Collect the process's stdout until `marker` appears (or fail with what it printed)."""
    seen: list[str] = []
    found = threading.Event()

    def pump():
        for line in proc.stdout:
            seen.append(line)
            if marker in line:
                found.set()
        found.set()

    threading.Thread(target=pump, daemon=True).start()
    found.wait(timeout_s)
    text = "".join(seen)
    assert marker in text, f"`online-llm serve` did not print {marker!r}:\n{text[-3000:]}"
    return text


def test_online_llm_serve_starts_prints_usage_and_serves(tmp_path, tiny_model_path):
    port = free_port()
    store = tmp_path / "adapters"
    env = dict(os.environ, LORA_SAVE_PATH=str(store), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "serve.cli", "serve", "--port", str(port), "--num-cpus", "2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        printed = _read_until(proc, "online-llm is serving", timeout_s=240)
        url = f"http://127.0.0.1:{port}"
        assert f"curl -s {url}/v1/completions" in printed
        models = httpx.get(f"{url}/v1/models", timeout=30).json()
        assert models["object"] == "list" and models["data"][0]["id"]
        learn = httpx.post(f"{url}/v1/adapters/readme/learn", timeout=120, json={
            "examples": [{"prompt": "What is my favourite colour?", "response": "Blue."}], "steps": 3})
        assert learn.status_code == 200, learn.text
        revision = learn.json()["revision"]
        assert (store / "readme" / "LATEST").read_text().strip() == revision
        answer = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": "readme", "prompt": "What is my favourite colour?", "max_tokens": 4})
        assert answer.status_code == 200 and answer.json()["choices"][0]["text"] is not None
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
