"""Which Ollama release the Modelfiles are written for (--ollama-version), and what that release does.

Ollama's rendering changed at 0.30: from then on llama-server may render the GGUF's own Jinja template;
before it only the Modelfile's Go TEMPLATE is rendered. From 0.34.1 a Modelfile with ADAPTER is refused.
exporter.deploy.ollama_targets decides from these facts what renders a model's chats.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from exporter.core.errors import InputError

# The current release line, written for by default.
CURRENT_OLLAMA = "0.34.1"
GGUF_JINJA_FROM = (0, 30, 0)  # llama-server renders the GGUF's template
NO_ADAPTER_FROM = (0, 34, 1)  # Modelfiles with ADAPTER are refused


@dataclass(frozen=True)
class OllamaTarget:
    """An Ollama version (major, minor, patch) as --ollama-version names it."""

    text: str
    version: tuple[int, int, int]

    @property
    def renders_gguf_jinja(self) -> bool:
        return self.version >= GGUF_JINJA_FROM

    @property
    def accepts_adapter(self) -> bool:
        return self.version < NO_ADAPTER_FROM


def ollama_target(text: str = CURRENT_OLLAMA) -> OllamaTarget:
    """Parse --ollama-version ("0.34.1", "0.29", "v0.30.2")."""
    match = re.fullmatch(r"v?(\d+)\.(\d+)(?:\.(\d+))?(?:-[\w.]+)?", text.strip())
    if not match:
        raise InputError(
            f"--ollama-version {text!r} is not a version. Pass the Ollama release the Modelfiles are for, "
            f"like {CURRENT_OLLAMA} (the default) or 0.29.2."
        )
    major, minor, patch = (int(part) if part else 0 for part in match.groups())
    return OllamaTarget(text.strip().removeprefix("v"), (major, minor, patch))
