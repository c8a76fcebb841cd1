"""Local vLLM servers and ``ucm-pd proxy`` processes on loopback, for the PD tests and benchmark.

Each process writes its output to a log file in a work directory; ``Processes.stop()`` ends them all.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

#: The servers' environment on these CPU machines: small KV cache, no thread pinning, no hub.
SERVER_ENV = {
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TORCHDYNAMO_DISABLE": "1",
}
#: A chat template for models built without one (benchmarks/models.py).
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
START_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ucm_kv_config(role: str, store: dict) -> dict:
    """``--kv-transfer-config`` of a server with UCM's connector in ``role``; a chunk that fails to
    load (the shared store restarting between lookup and load) is recomputed, not an error."""
    return {
        "kv_connector": "UcmConnector",
        "kv_role": role,
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": store,
    }


class Processes:
    """Child processes of one test session or benchmark run."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.running: list[subprocess.Popen] = []

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as handle:
            process = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        self.running.append(process)
        return process, log

    def vllm(
        self,
        name: str,
        model: str,
        block: int,
        kv: dict | None = None,
        kv_cache_gib: int = 1,
        batched_tokens: int = 512,
        max_model_len: int = 4096,
    ) -> tuple[str, subprocess.Popen, Path]:
        """Starts ``vllm serve``-like server (OpenAI API) named ``tiny``; returns its URL (not yet healthy)."""
        template = self.workdir / "chat.jinja"
        template.write_text(CHAT_TEMPLATE)
        port = free_port()
        args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
        args += ["--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port)]
        args += ["--block-size", str(block), "--max-model-len", str(max_model_len), "--enforce-eager"]
        args += ["--enable-prompt-tokens-details", "--chat-template", str(template)]
        args += ["--max-num-batched-tokens", str(batched_tokens), "--disable-log-stats"]
        if kv is not None:
            args += ["--kv-transfer-config", json.dumps(kv)]
        env = {**SERVER_ENV, "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib)}
        process, log = self.start(name, args, env)
        return f"http://127.0.0.1:{port}", process, log

    def proxy(self, name: str, prefill: list[str], decode: list[str]) -> str:
        """Starts ``ucm-pd proxy`` and waits until it answers; returns its URL."""
        port = free_port()
        args = [sys.executable, "-m", "ucm.pd.cli", "proxy", "--prefill", *prefill, "--decode", *decode]
        args += ["--port", str(port), "--health-interval", "1"]
        process, log = self.start(name, args)
        url = f"http://127.0.0.1:{port}"
        wait_answering(url + "/stats", process, log, 60)
        return url

    def stop(self) -> None:
        for process in self.running:
            process.terminate()
        for process in self.running:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


def wait_answering(url: str, process: subprocess.Popen, log: Path, timeout: float = START_TIMEOUT_S) -> None:
    """Waits until ``url`` answers 200; raises with the log's tail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"{url}: process exited with {process.returncode}; log {log}:\n{log.read_text()[-4000:]}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout} s; log {log}:\n{log.read_text()[-4000:]}")
