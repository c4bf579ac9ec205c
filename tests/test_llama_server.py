"""llama-server as a deployment target, for real: the llama-server built from the pinned llama.cpp
sources runs the exported configs on 127.0.0.1 (started and stopped by each test, bounded in time).

- the merged GGUF's config: /apply-template renders every probe conversation exactly as transformers'
  apply_chat_template does, and a bounded chat reply ends at the template's end of turn;
- the runtime-LoRA config: one process with both adapters loaded; a chat request per adapter, naming its
  scale, answers with the same greedy tokens as llama-cpp-python running that adapter.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from converters.chat_probes import PROBES
from converters.llama_runtime import greedy_generate, tokenize_with_llama_cpp
from converters.llama_server import LlamaServer, running_llama_server
from converters.llama_tools import LlamaTools, locate_llama_tools
from exporter.deploy.serve_config import read_serve_config
from tests.conftest import DemoExport, DemoInputs, RuntimeExport

MAX_TOKENS = 48


@pytest.fixture(scope="module")
def tools() -> LlamaTools:
    return locate_llama_tools()  # built by `make vendor`; a missing build fails with the fix


def server_arguments(config: dict[str, Any]) -> list[str]:
    """The config's command without the program, host and port (the test picks a free port)."""
    command = list(config["command"][1:])
    for flag in ("--host", "--port"):
        at = command.index(flag)
        del command[at : at + 2]
    return command


def chat(server: LlamaServer, question: str, **extra: Any) -> dict[str, Any]:
    body = {
        "messages": [{"role": "user", "content": question}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "cache_prompt": False,
        **extra,
    }
    return server.post("/v1/chat/completions", body)


def test_merged_gguf_serves_its_own_template(
    demo_export: DemoExport, tools: LlamaTools, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    config = read_serve_config(demo_export.out / "smollm2-pirate-Q8_0.llama-server.json")
    assert config["command"][:4] == ["llama-server", "-m", "./smollm2-pirate-Q8_0.gguf", "--jinja"]
    tokenizer = AutoTokenizer.from_pretrained(demo_export.out / "merged")
    with running_llama_server(
        tools, server_arguments(config), demo_export.out, tmp_path / "server.log"
    ) as server:
        for probe in PROBES:
            if probe.needs:
                continue  # the demo template has no tools and no thinking
            expected = tokenizer.apply_chat_template(
                probe.hf_messages(), tokenize=False, add_generation_prompt=True
            )
            assert server.post("/apply-template", probe.server_request())["prompt"] == expected, probe.kind
        reply = chat(server, "What is the capital of France?")
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "stop", choice  # ended at the template's <|im_end|>, not at max_tokens
    assert 0 < reply["usage"]["completion_tokens"] < MAX_TOKENS
    assert "Paris" in choice["message"]["content"]


def test_runtime_adapters_serve_from_one_process(
    runtime_export: RuntimeExport, demo_inputs: DemoInputs, tools: LlamaTools, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    out = runtime_export.out
    config = read_serve_config(out / "smollm2-Q4_K_M.llama-server.json")
    command = config["command"]
    assert command.count("--lora") == 2 and "--lora-init-without-apply" in command and "--jinja" in command
    assert [a["name"] for a in config["adapters"]] == ["pirate-rslora", "pirate-alpha"]
    assert not list(out.glob("*.Modelfile"))  # Ollama 0.34.1 refuses ADAPTER: no such Modelfiles
    question = "What is the capital of France?"
    tokenizer = AutoTokenizer.from_pretrained(demo_inputs.base)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    base = out / "smollm2-Q4_K_M.gguf"
    prompt_ids = tokenize_with_llama_cpp(base, [prompt], add_special=True)[0]
    replies = {}
    with running_llama_server(tools, server_arguments(config), out, tmp_path / "server.log") as server:
        assert [a["path"] for a in server.get("/lora-adapters")] == [
            "./pirate-rslora.lora.gguf",
            "./pirate-alpha.lora.gguf",
        ]
        for name, request in [
            *config["requests"].items(),
            ("base", {"lora": [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 0.0}]}),
        ]:
            replies[name] = chat(server, question, lora=request["lora"])["choices"][0]["message"]["content"]
    expected = {
        adapter["name"]: tokenizer.decode(
            greedy_generate(base, [prompt_ids], MAX_TOKENS, lora=out / adapter["path"])[0],
            skip_special_tokens=True,
        )
        for adapter in config["adapters"]
    }
    for name, own in expected.items():
        reply = replies[name]
        # The server and llama-cpp-python batch their arithmetic differently, so a near tie late in the reply
        # may go either way; the reply must still be this adapter's: the same as llama-cpp-python's for most
        # of its length, closer to it than to the other adapter's, and not the base's.
        agreed = len(os.path.commonprefix([reply, own]))
        assert reply == own or agreed >= len(own) // 2, (name, reply, own)
        for other, theirs in expected.items():
            if other != name and theirs != own:
                assert agreed >= len(os.path.commonprefix([reply, theirs])), (name, reply, theirs)
        assert reply != replies["base"]
