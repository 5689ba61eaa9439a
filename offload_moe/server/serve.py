"""`offload-moe serve`: listen, load the model in the background, serve until interrupted."""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable
from typing import Any, TextIO

import uvicorn

from offload_moe.errors import ConfigError
from offload_moe.server.app import ServerState, create_app


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), or one ConfigError naming both."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from None
    sock.set_inheritable(True)
    return sock


def serve(load: Callable[[], Any], model_id: str, host: str, port: int, api_key: str | None = None,
          max_batch: int = 8, max_queue: int = 32, out: TextIO | None = None) -> int:
    """Serve until interrupted; a model that fails to load re-raises its error (the CLI prints
    its one line)."""
    out = sys.stderr if out is None else out
    sock = listen(host, port)
    server: uvicorn.Server | None = None

    def failed(exc: BaseException) -> None:
        if server is not None:
            server.should_exit = True

    state = ServerState(load, model_id, api_key=api_key, max_batch=max_batch, max_queue=max_queue,
                        on_failure=failed)
    config = uvicorn.Config(create_app(state), log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(f"serving {model_id} on http://{shown}:{bound_port} (OpenAI API at /v1, chat page at /)", file=out,
          flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if state.error is not None:
        raise state.error
    return 0
