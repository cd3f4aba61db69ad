"""A tiny OpenAI-compatible server that records what a client sends (to record an agent CLI's
first request: ``tests/data/first-requests/``).

    python bench/capture_server.py --port 18080 --out /tmp/captured

Every ``POST`` body is saved as ``<out>/<n>-<path>.json`` (``{"path", "headers", "body"}``);
``/v1/chat/completions`` answers one short text message (streamed when asked, with usage), so
the client ends its turn; ``GET /v1/models`` lists the model ``glm-test``.  Loopback only.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MODEL = "glm-test"
ANSWER = "Done."
_KEEP_HEADERS = ("user-agent", "content-type", "accept", "x-stainless-package-version", "x-stainless-lang",
                 "http-referer", "x-title")


class Capture(BaseHTTPRequestHandler):
    out: Path
    lock = threading.Lock()
    count = 0

    def log_message(self, fmt: str, *args: object) -> None:  # quiet
        pass

    def _json(self, status: int, obj: object) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        if self.path.rstrip("/").endswith("/models"):
            self._json(200, {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0,
                                                         "owned_by": "capture", "max_model_len": 131072}]})
        else:
            self._json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        with self.lock:
            Capture.count += 1
            n = Capture.count
        name = self.path.split("?")[0].strip("/").replace("/", "_")
        headers = {k: v for k, v in self.headers.items() if k.lower() in _KEEP_HEADERS}
        (self.out / f"{n:03d}-{name}.json").write_text(
            json.dumps({"path": self.path, "headers": headers, "body": body}, ensure_ascii=False, indent=1))
        if not self.path.split("?")[0].endswith("/chat/completions"):
            self._json(404, {"error": {"message": "only chat completions here", "type": "invalid_request_error"}})
            return
        head = {"id": f"chatcmpl-{n}", "object": "chat.completion.chunk", "created": int(time.time()), "model": MODEL}
        usage = {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}
        if not body.get("stream"):
            self._json(200, {**head, "object": "chat.completion", "usage": usage, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}]})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        chunks = [
            {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
            {**head, "choices": [{"index": 0, "delta": {"content": ANSWER}, "finish_reason": None}]},
            {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        ]
        if (body.get("stream_options") or {}).get("include_usage"):
            chunks.append({**head, "choices": [], "usage": usage})
        for c in chunks:
            self.wfile.write(f"data: {json.dumps(c)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=18080)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    Capture.out = args.out
    ThreadingHTTPServer(("127.0.0.1", args.port), Capture).serve_forever()


if __name__ == "__main__":
    main()
