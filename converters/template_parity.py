"""A chat template rendered by llama.cpp's C++ Jinja engine against transformers' apply_chat_template.

llama-server (and so Ollama 0.30+, for every model whose TEMPLATE it does not use) renders the GGUF's
`tokenizer.chat_template` with llama.cpp's own Jinja engine, not with Python's jinja2; the two differ
on some templates, and a template the C++ engine cannot parse stops llama-server from loading it.
Here the template is rendered on the probe conversations (converters.chat_probes) by
render_chat_template, which calls llama.cpp's chat code exactly as llama-server's /apply-template
does, and by transformers; every probe must give the same text, or the result says where they differ.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from converters.chat_probes import PROBES, Probe, render_either_content, template_capabilities
from converters.errors import StageError
from converters.llama_tools import LlamaTools

# render(probe) -> the text transformers renders (raises when the template refuses the conversation)
HFRender = Callable[[Probe], str]
RENDER_TIMEOUT_S = 120
# "date": equal but for the date llama.cpp fills in (see _judge); said in the summary.
PASSING = ("equal", "date", "refused", "not-applicable")


@dataclass(frozen=True)
class ProbeResult:
    """One probe: "equal", "differs", "date" (equal but for the date llama.cpp fills in), "refused"
    (transformers raises: the template rejects that conversation, so it is not compared) or
    "not-applicable" (the template lacks the capability)."""

    kind: str
    status: str
    detail: str | None = None


@dataclass(frozen=True)
class TemplateParity:
    """The C++ engine's renderings against transformers' on every probe."""

    llama_cpp_commit: str
    capabilities: tuple[str, ...]
    parse_error: str | None
    results: tuple[ProbeResult, ...]

    @property
    def passed(self) -> bool:
        return self.parse_error is None and all(r.status in PASSING for r in self.results)

    def problems(self) -> list[str]:
        """Each failure, one sentence each."""
        if self.parse_error is not None:
            return [f"llama.cpp's Jinja engine cannot parse it ({self.parse_error})"]
        return [f"{r.kind}: {r.detail}" for r in self.results if r.status == "differs"]

    def summary(self) -> str:
        if self.parse_error is not None:
            return f"llama.cpp's Jinja engine cannot parse the template ({self.parse_error})"
        compared = [r for r in self.results if r.status not in ("refused", "not-applicable")]
        equal = sum(r.status == "equal" for r in compared)
        dated = sum(r.status == "date" for r in compared)
        text = (
            f"{equal} of {len(compared)} probe conversations render identically in llama.cpp and transformers"
        )
        return text + (f", {dated} but for today's date" if dated else "")


def run_renderer(tools: LlamaTools, payload: dict[str, Any]) -> dict[str, Any]:
    """Run render_chat_template on one payload ({"gguf"|"template", "requests": [...]})."""
    try:
        result = subprocess.run(
            [str(tools.renderer)],
            input=json.dumps(payload),
            capture_output=True,
            text=True,
            timeout=RENDER_TIMEOUT_S,
            env=tools.env(),
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise StageError(
            f"llama.cpp's chat-template renderer did not finish in {RENDER_TIMEOUT_S} s."
        ) from exc
    if result.returncode not in (0, 3) or not result.stdout.strip():
        raise StageError(
            f"llama.cpp's chat-template renderer ({tools.renderer}) failed with exit code {result.returncode}: "
            f"{result.stderr.strip()[-800:]}"
        )
    output: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return output


def first_difference(expected: str, actual: str) -> str:
    """Where two renderings part, with some context on both sides."""
    at = next((i for i, (a, b) in enumerate(zip(expected, actual, strict=False)) if a != b), None)
    at = min(len(expected), len(actual)) if at is None else at
    line = expected[:at].count("\n") + 1
    return (
        f"at character {at} (line {line}) transformers renders {expected[max(0, at - 40) : at + 40]!r} "
        f"where llama.cpp renders {actual[max(0, at - 40) : at + 40]!r}"
    )


def _strip(text: str, bos: str) -> str:
    return text[len(bos) :] if bos and text.startswith(bos) else text


def compare_probes(
    template: str,
    hf_render: HFRender,
    cpp_source: dict[str, Any],
    tools: LlamaTools,
    bos_token: str = "",
    probes: tuple[Probe, ...] = PROBES,
) -> TemplateParity:
    """Render `template` on the probes through transformers and through llama.cpp.

    `cpp_source` is {"gguf": path} (the model's own template, BOS and EOS, as llama-server loads them) or
    {"template": text, "bos_token": …, "eos_token": …}. A leading BOS is compared without: llama.cpp
    leaves it to the tokenizer when the vocabulary adds one.
    """
    capabilities = template_capabilities(template)
    applicable = [p for p in probes if all(need in capabilities for need in p.needs)]
    output = run_renderer(tools, {**cpp_source, "requests": [p.server_request() for p in applicable]})
    if "parse_error" in output:
        return TemplateParity(tools.commit, capabilities, str(output["parse_error"]), ())
    results = [ProbeResult(p.kind, "not-applicable") for p in probes if p not in applicable]
    for probe, cpp in zip(applicable, output["results"], strict=True):
        try:
            expected = _strip(hf_render(probe), bos_token)
        except Exception as exc:  # noqa: BLE001 - a template may refuse a conversation (raise_exception): data
            results.append(ProbeResult(probe.kind, "refused", f"transformers: {exc}"))
            continue
        if "error" in cpp:
            results.append(
                ProbeResult(probe.kind, "differs", f"llama.cpp fails to render it: {cpp['error']}")
            )
            continue
        actual = _strip(str(cpp["prompt"]), bos_token)
        results.append(_judge(probe, expected, actual, hf_render, bos_token))
    order = {p.kind: i for i, p in enumerate(probes)}
    return TemplateParity(
        tools.commit, capabilities, None, tuple(sorted(results, key=lambda r: order[r.kind]))
    )


def _judge(probe: Probe, expected: str, actual: str, hf_render: HFRender, bos_token: str) -> ProbeResult:
    if actual == expected:
        return ProbeResult(probe.kind, "equal")
    # llama.cpp passes today's date as `date_string` and `datetime` (common_chat_extra_context); transformers
    # leaves them undefined, so a template with a date default (Llama-3.1: "26 Jul 2024") renders another date.
    now = datetime.now()
    dated = replace(
        probe, extra={"date_string": now.strftime("%d %b %Y"), "datetime": now.strftime("%b %d %Y")}
    )
    try:
        if _strip(hf_render(dated), bos_token) == actual:
            return ProbeResult(
                probe.kind,
                "date",
                "llama.cpp renders today's date (it sets date_string and datetime), transformers the template's "
                f"default: {first_difference(expected, actual)}",
            )
    except Exception:  # noqa: BLE001 - the dated rendering is only a diagnosis
        pass
    return ProbeResult(probe.kind, "differs", first_difference(expected, actual))


def hf_template_render(template: str, special_tokens: dict[str, str]) -> HFRender:
    """transformers' rendering of a bare template (as apply_chat_template renders it for a tokenizer)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    def render(probe: Probe) -> str:
        kwargs: dict[str, Any] = {**special_tokens, **probe.extra}
        if probe.thinking is not None:
            kwargs["enable_thinking"] = probe.thinking

        def rendered(messages: list[dict[str, Any]]) -> str:
            result: Any = render_jinja_template(
                conversations=[messages],
                tools=cast(Any, probe.tools),
                chat_template=template,
                add_generation_prompt=True,
                **kwargs,
            )
            return str(result[0][0])

        return render_either_content(rendered, probe.hf_messages())

    return render


def hf_tokenizer_render(tokenizer: Any) -> HFRender:
    """The tokenizer's own apply_chat_template."""

    def render(probe: Probe) -> str:
        kwargs: dict[str, Any] = dict(probe.extra)
        if probe.thinking is not None:
            kwargs["enable_thinking"] = probe.thinking

        def rendered(messages: list[dict[str, Any]]) -> str:
            return str(
                tokenizer.apply_chat_template(
                    messages, tools=probe.tools, tokenize=False, add_generation_prompt=True, **kwargs
                )
            )

        return render_either_content(rendered, probe.hf_messages())

    return render


def gguf_source(gguf: Path) -> dict[str, Any]:
    return {"gguf": str(gguf)}
