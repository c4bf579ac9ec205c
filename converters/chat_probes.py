"""Probe conversations for chat templates, and what a template can do (as Ollama reads it).

Every probe is one chat request in the OpenAI shape llama-server takes (tool-call arguments as a JSON
string) and the same request in the shape transformers' apply_chat_template takes (arguments as a
dict): plain turns, a system prompt, several turns, tool definitions, a tool call with its result,
and thinking switched on and off. The capability checks are Ollama's own string tests on a GGUF's
chat template (server/images.go chatTemplateHasToolSupport, chatTemplateHasToolRoundTrip; the think
tags of thinking/chat_template.go), since they decide whether Ollama uses a Modelfile's TEMPLATE.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city's name."}},
            "required": ["city"],
        },
    },
}
THINK_TAGS = (
    ("<think>", "</think>"),
    ("<|channel>", "<channel|>"),
    ("<|START_THINKING|>", "<|END_THINKING|>"),
    ("<seed:think>", "</seed:think>"),
)
_TOOL_ROLE_TESTS = (
    "tool_response",
    "tool_results",
    "role'] == 'tool'",
    'role\'] == "tool"',
    "role\"] == 'tool'",
    'role"] == "tool"',
    "message.role == 'tool'",
    'message.role == "tool"',
    "ipython",
)


@dataclass(frozen=True)
class Probe:
    """One chat request; `kind` names what it exercises."""

    kind: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    thinking: bool | None = None  # None: the runtime's default
    needs: tuple[str, ...] = field(default=())  # capabilities the probe exercises ("tools", "thinking")
    extra: dict[str, Any] = field(default_factory=dict)  # more template variables, for transformers only

    def server_request(self) -> dict[str, Any]:
        """The request as llama-server's /apply-template and /v1/chat/completions take it."""
        request: dict[str, Any] = {"messages": self.messages, "add_generation_prompt": True}
        if self.tools:
            request["tools"] = self.tools
        if self.thinking is not None:
            request["chat_template_kwargs"] = {"enable_thinking": self.thinking}
        return request

    def hf_messages(self) -> list[dict[str, Any]]:
        """The messages as transformers takes them: tool-call arguments as a dict."""
        messages = copy.deepcopy(self.messages)
        for message in messages:
            for call in message.get("tool_calls") or ():
                arguments = call["function"].get("arguments")
                if isinstance(arguments, str):
                    call["function"]["arguments"] = json.loads(arguments)
        return messages


def _call(name: str, arguments: dict[str, Any], call_id: str) -> dict[str, Any]:
    # call_id: 9 letters and digits, the one shape Mistral's templates accept
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


PROBES: tuple[Probe, ...] = (
    Probe("plain", [{"role": "user", "content": "Hello, how are you?"}]),
    Probe(
        "system",
        [
            {"role": "system", "content": "You are a pirate.\nAnswer briefly."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
    ),
    Probe(
        "turns",
        [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4, matey."},
            {"role": "user", "content": "And 3+3?\nShow your work."},
        ],
    ),
    Probe(
        "tools",
        [{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER_TOOL],
        needs=("tools",),
    ),
    Probe(
        "tool-call",
        [
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [_call("get_weather", {"city": "Paris"}, "call12345")],
            },
            {"role": "tool", "tool_call_id": "call12345", "name": "get_weather", "content": "18 C, sunny"},
        ],
        tools=[WEATHER_TOOL],
        needs=("tools",),
    ),
    Probe(
        "thinking-on",
        [{"role": "user", "content": "Think, then answer: 17 * 3?"}],
        thinking=True,
        needs=("thinking",),
    ),
    Probe(
        "thinking-off",
        [{"role": "user", "content": "Answer at once: 17 * 3?"}],
        thinking=False,
        needs=("thinking",),
    ),
)


def template_has_tools(template: str) -> bool:
    """Ollama's chatTemplateHasToolSupport."""
    return "tools" in template or "tool_call" in template


def template_has_tool_round_trip(template: str) -> bool:
    """Ollama's chatTemplateHasToolRoundTrip: tool calls and the tool role are both rendered."""
    if not template_has_tools(template):
        return False
    calls = "tool_calls" in template or "assistant_tool_call" in template
    return calls and any(test in template for test in _TOOL_ROLE_TESTS)


def template_think_tags(template: str) -> tuple[str, str] | None:
    """Ollama's InferTagsFromChatTemplate: the tags a template renders reasoning between."""
    for opening, closing in THINK_TAGS:
        if opening in template and closing in template:
            return opening, closing
    for opening, closing in THINK_TAGS:
        if f"content.split('{closing}')" in template or f'content.split("{closing}")' in template:
            return opening, closing
    return None


def template_capabilities(template: str) -> tuple[str, ...]:
    """ "tools" and "thinking" where the template has them, in Ollama's terms."""
    found = []
    if template_has_tools(template):
        found.append("tools")
    if template_think_tags(template) is not None or "enable_thinking" in template:
        found.append("thinking")
    return tuple(found)


def typed_content(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with each text content as a list of typed parts ([{"type": "text", "text": …}]), the
    form vision-language processors take; parts already typed stay."""
    return [
        {**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m.get("content"), str) else m
        for m in messages
    ]


def render_either_content(
    render: Callable[[list[dict[str, Any]]], str], messages: list[dict[str, Any]]
) -> str:
    """`render(messages)`, or `render(typed_content(messages))` where the template reads every message's
    content as typed parts (SmolVLM's) and fails on, or drops, text content: as llama.cpp's Jinja engine
    does for a template that requires typed content."""
    from jinja2.exceptions import TemplateError

    failures = (TemplateError, TypeError, KeyError, IndexError)
    texts = [m["content"] for m in messages if isinstance(m.get("content"), str) and m["content"]]
    if not texts:
        return render(messages)
    try:
        text = render(messages)
    except failures as plain_error:
        try:
            return render(typed_content(messages))
        except failures:
            raise plain_error from None
    if all(t in text for t in texts):
        return text
    try:
        typed = render(typed_content(messages))
    except failures:
        return text
    return typed if all(t in typed for t in texts) else text
