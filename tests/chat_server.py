"""A canned OpenAI-compatible chat server on 127.0.0.1 for the chat client and feedback tests
(the `server` fixture in conftest.py starts one per test)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def completion(content: str) -> bytes:
    message = {"role": "assistant", "content": content}
    return json.dumps({"choices": [{"message": message}]}).encode()


class CannedServer(ThreadingHTTPServer):
    """Answers each POST with the next scripted (status, body, delay); then with `reply(body)`."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.script: list[tuple[int, bytes, float]] = []
        self.reply: Callable[[dict], str] = lambda body: "ok"
        self.requests: list[tuple[dict, dict]] = []  # (headers, body)
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()

    def handle_error(self, request, client_address) -> None:  # a client that timed out
        pass


class Handler(BaseHTTPRequestHandler):
    server: CannedServer

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.requests.append((dict(self.headers), body))
            status, payload, delay = (
                self.server.script.pop(0)
                if self.server.script
                else (200, completion(self.server.reply(body)), 0.0)
            )
            self.server.in_flight += 1
            self.server.max_in_flight = max(self.server.max_in_flight, self.server.in_flight)
        time.sleep(delay)
        with self.server.lock:
            self.server.in_flight -= 1
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass
