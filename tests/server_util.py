"""Start edgert's server on a free loopback port, in this process (uvicorn in a thread)."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import json
import urllib.error
import urllib.request


@contextmanager
def running_server(model, model_id: str = "test-model", **engine_kw):
    """Yield (base_url, engine) of a live server on 127.0.0.1; shut down afterwards."""
    import uvicorn

    from edgert.engine import Engine
    from edgert.server import create_app

    default_max_tokens = engine_kw.pop("default_max_tokens", 64)
    max_body_bytes = engine_kw.pop("max_body_bytes", 8 << 20)
    engine = Engine(model, **engine_kw)
    app = create_app(engine, model_id, default_max_tokens, max_body_bytes)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < end and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield url, engine
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.close()
        sock.close()


def wait_idle(url: str, timeout: float = 60) -> dict:
    """/health once no request is active or waiting."""
    end = time.monotonic() + timeout
    while True:
        h = get_json(f"{url}/health")
        if h["active"] == 0 and h["waiting"] == 0:
            return h
        assert time.monotonic() < end, h
        time.sleep(0.1)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def post_raw(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    """POST bytes as they are; (status, JSON body) whatever the status."""
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
