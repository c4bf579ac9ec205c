"""Run llama.cpp's llama-server on 127.0.0.1, bounded in time, and talk to it.

Used to check a deployment for real: the server is started from a config's command (with a free
port on 127.0.0.1 and --no-repack where the CPU has AMX, as converters.llama_runtime does for the
runtime), must be healthy within a deadline, and is always stopped when the `with` block ends.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converters.errors import StageError
from converters.llama_tools import LlamaTools

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def cpu_has_amx() -> bool:
    try:
        return " amx" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@dataclass(frozen=True)
class LlamaServer:
    """A running llama-server."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def post(self, path: str, body: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
        request = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - 127.0.0.1 only
                data: dict[str, Any] = json.loads(response.read())
                return data
        except urllib.error.HTTPError as exc:
            raise StageError(
                f"llama-server answered {path} with {exc.code}: {exc.read().decode()[:800]}"
            ) from exc

    def get(self, path: str, timeout: float = 30) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:  # noqa: S310 - 127.0.0.1 only
            return json.loads(response.read())


def _log_tail(log: Path) -> str:
    return "".join(log.read_text(errors="replace").splitlines(keepends=True)[-20:]) if log.is_file() else ""


@contextmanager
def running_llama_server(
    tools: LlamaTools, arguments: list[str], cwd: Path, log: Path, startup_s: float = 120
) -> Iterator[LlamaServer]:
    """Start llama-server with `arguments` (its own: -m, --lora, …; host and port are chosen here) in
    `cwd`; yield it once /health answers; stop it at the end, whatever happens."""
    port = free_port()
    command = [str(tools.server), *arguments, "--host", HOST, "--port", str(port), "--threads", "2"]
    if cpu_has_amx():
        command.append("--no-repack")
    with log.open("wb") as handle:
        process = subprocess.Popen(command, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT, env=tools.env())
    server = LlamaServer(f"http://{HOST}:{port}", process, log)
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if process.poll() is not None:
                raise StageError(
                    f"llama-server exited with {process.returncode} at startup:\n{_log_tail(log)}"
                )
            try:
                if server.get("/health", timeout=2).get("status") == "ok":
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                pass
            if time.monotonic() > deadline:
                raise StageError(f"llama-server was not healthy within {startup_s:.0f} s:\n{_log_tail(log)}")
            time.sleep(0.25)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)
