"""autodeco.vllm: the engine's contract (the eval runner's Completion lists), the server, and bad input.

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0); the server in its own process group on a
free 127.0.0.1 port, with a bounded wait, stopped at the end. Skipped where vLLM is not installed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import fields
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from _vllm_models import build_autodeco  # noqa: E402

from autodeco import AutoDecoModelForCausalLM  # noqa: E402
from autodeco.evaluation.runner import Completion, GenerationRequest, generate_completions  # noqa: E402
from autodeco.testing import build_char_tokenizer  # noqa: E402
from autodeco.vllm.engine import VLLMEngine  # noqa: E402
from autodeco.vllm.layout import check_model_dir, supported_architectures  # noqa: E402
from autodeco.vllm.serve import server_command  # noqa: E402

LLM_KWARGS = dict(dtype="float32", max_model_len=256, enforce_eager=True, max_num_seqs=16,
                  kv_cache_memory_bytes=64 << 20, distributed_executor_backend="uni")


@pytest.fixture(scope="module")
def heads_only(tmp_path_factory):
    return build_autodeco(tmp_path_factory.mktemp("engine") / "heads", "qwen2", layout="heads-only")


# ------------------------------------------------------------------ bad input (no engine started)


def test_unsupported_architecture_names_it_and_the_supported_list(tmp_path):
    model_dir = build_autodeco(tmp_path / "m", "llama")
    config = json.loads((model_dir / "config.json").read_text())
    config["base_config"]["architectures"] = ["NoSuchForCausalLM"]
    (model_dir / "config.json").write_text(json.dumps(config))
    for attempt in (lambda: check_model_dir(model_dir), lambda: VLLMEngine(model_dir), lambda: server_command(model_dir)):
        with pytest.raises(ValueError) as err:
            attempt()
        assert "NoSuchForCausalLM" in str(err.value) and "Qwen2ForCausalLM" in str(err.value)
    assert "LlamaForCausalLM" in supported_architectures()


def test_heads_only_without_reachable_base_says_merge(tmp_path):
    model_dir = build_autodeco(tmp_path / "h", "llama", layout="heads-only")
    config = json.loads((model_dir / "config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (model_dir / "config.json").write_text(json.dumps(config))
    for attempt in (lambda: check_model_dir(model_dir), lambda: server_command(model_dir)):
        with pytest.raises(ValueError, match="autodeco merge"):
            attempt()


def test_methods_without_a_vllm_form_fail_instead_of_decoding_statically():
    with pytest.raises(ValueError, match="--engine hf"):
        VLLMEngine.plan({"temperature": 1.0, "top_p": 1.0, "logits_processor": object()})
    assert VLLMEngine.plan({}) == ("dynamic", {"temperature": 1.0, "top_p": 1.0, "top_k": 0}, "teacher")
    assert VLLMEngine.plan({"use_top_p_head": False})[0] == "temperature-only"
    assert VLLMEngine.plan({"temperature": 0.7, "top_p": 0.9})[0] == "base"
    assert VLLMEngine.plan({"do_sample": False})[1] == {"temperature": 0.0}


def test_server_command_decodes_dynamically_by_default(heads_only):
    command = server_command(heads_only, ["--port", "1"])
    assert command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    override = json.loads(command[command.index("--override-generation-config") + 1])
    assert override == {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
    assert command[-2:] == ["--port", "1"]


# ------------------------------------------------------------------ the engine, as the eval runner uses it


def test_engine_matches_the_runner_contract(heads_only):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    tokenizer = build_char_tokenizer()
    model = AutoDecoModelForCausalLM.from_pretrained(str(heads_only)).eval()
    requests = [GenerationRequest("ab", 3, seed=11), GenerationRequest("xyz", 2, seed=12, group="g"),
                GenerationRequest("qq", 2, seed=12, group="g")]
    greedy = [GenerationRequest("ab", 1), GenerationRequest("hello", 1)]
    with VLLMEngine(heads_only, **LLM_KWARGS) as engine:  # heads-only: the base comes from its recorded dir
        dynamic = engine.generate_completions(requests, generation_kwargs={}, max_new_tokens=12)
        vllm_greedy = engine.generate_completions(greedy, generation_kwargs={"do_sample": False}, max_new_tokens=12)
        again = engine.generate_completions(requests, generation_kwargs={}, max_new_tokens=12)
        static = engine.generate_completions(requests[:1], generation_kwargs={"temperature": 0.7, "top_p": 0.9},
                                             max_new_tokens=6)
    hf = generate_completions(model, tokenizer, requests, generation_kwargs={}, max_new_tokens=12, batch_size=4)
    hf_greedy = generate_completions(model, tokenizer, greedy, generation_kwargs={"do_sample": False},
                                     max_new_tokens=12, batch_size=4)

    assert [len(c) for c in dynamic] == [len(c) for c in hf] == [3, 2, 2]
    names = [f.name for f in fields(Completion)]
    for ours, theirs in zip(sum(dynamic, []), sum(hf, [])):
        assert type(ours) is Completion and [type(getattr(ours, n)) for n in names] == [type(getattr(theirs, n)) for n in names]
        assert len(ours.temperatures) == len(ours.top_ps) == len(ours.token_ids) > 0
        assert ours.text == tokenizer.decode(ours.token_ids, skip_special_tokens=True)
        assert ours.finished == (ours.token_ids[-1] == tokenizer.eos_token_id)
    assert [[c.token_ids for c in r] for r in dynamic] == [[c.token_ids for c in r] for r in again]  # seeded
    assert dynamic[1][0].token_ids != dynamic[2][0].token_ids or dynamic[1][0].token_ids[:1] != []
    # Greedy: the base's argmax in both engines, and the teacher-forced traces equal generate()'s records.
    for ours, theirs in zip(sum(vllm_greedy, []), sum(hf_greedy, [])):
        assert ours.token_ids == theirs.token_ids
        assert torch.allclose(torch.tensor(ours.temperatures), torch.tensor(theirs.temperatures), atol=1e-4)
        assert torch.allclose(torch.tensor(ours.top_ps), torch.tensor(theirs.top_ps), atol=1e-4)
    assert set(static[0][0].temperatures) == {0.7} and set(static[0][0].top_ps) == {0.9}


# ------------------------------------------------------------------ the OpenAI-compatible server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_server_answers_completions_and_rejects_bad_sampling(tmp_path):
    model_dir = build_autodeco(tmp_path / "served", "llama")
    port = _free_port()
    args = ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "256",
            "--enforce-eager", "--kv-cache-memory-bytes", str(64 << 20), "--max-num-seqs", "8"]
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(server_command(model_dir, args), stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 420
        while True:
            assert server.poll() is None, Path(tmp_path / "server.log").read_text()[-4000:]
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server did not become healthy in time"
            time.sleep(2)
        body = {"model": str(model_dir), "prompt": "abc", "max_tokens": 5, "seed": 3}
        status, answer = _post(f"{base}/v1/completions", body)
        assert status == 200, answer
        assert answer["choices"][0]["finish_reason"] in ("length", "stop")
        assert _post(f"{base}/v1/completions", {**body, "temperature": 0})[0] == 200
        assert _post(f"{base}/v1/completions", {**body, "top_p": 1.5})[0] == 400
        assert _post(f"{base}/v1/completions", {**body, "temperature": -1})[0] == 400
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
