"""Real `offload-moe serve` processes on free localhost ports, for the server's tests.

`start_server(checkpoint, *flags)` runs the CLI in a subprocess with `--port 0`, reads the
address it prints, waits for /health to answer 200 and returns a Server; `served` is a
module-wide one on a tiny random Mixtral. Every request goes to 127.0.0.1 only.
"""

from __future__ import annotations

import json
import threading
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from offload_moe.testing import make_tiny_checkpoint

START_TIMEOUT_S = 120


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    checkpoint: Path

    def get(self, path: str, headers: dict | None = None) -> tuple[int, bytes]:
        request = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def post(self, path: str, body: bytes | dict, headers: dict | None = None) -> tuple[int, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method="POST",
                                         headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _wait_for_address(process: subprocess.Popen, deadline: float) -> str:
    lines = []
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            raise RuntimeError(f"serve exited ({process.poll()}): {''.join(lines)}")
        lines.append(line)
        found = re.search(r"on (http://\S+) ", line)
        if found:
            return found.group(1)
    raise RuntimeError(f"serve printed no address in {START_TIMEOUT_S} s: {''.join(lines)}")


def _drain(process: subprocess.Popen) -> None:
    """Keep reading the server's stderr so that a full pipe never blocks it."""
    threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()


def start_server(checkpoint: Path, *flags: str) -> Server:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "offload_moe.cli", "serve", str(checkpoint), "--port", "0", "--device", "cpu",
         *flags], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        url = _wait_for_address(process, deadline)
        _drain(process)
        server = Server(url, process, checkpoint)
        while time.monotonic() < deadline:
            status, _ = server.get("/health")
            if status == 200:
                return server
            time.sleep(0.2)
        raise RuntimeError("the model did not load in time")
    except BaseException:
        process.kill()
        process.wait()
        raise


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    server = start_server(make_tiny_checkpoint(tmp_path_factory.mktemp("serve") / "tiny-mixtral"))
    try:
        yield server
    finally:
        server.stop()
