"""An OpenAI chat-completions server on 127.0.0.1 for the tests: scripted statuses, bodies and delays."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from sae.llm import cache_key

DESCRIPTION = "a person reflecting on a decision"


class FakeOpenAI:
    """An OpenAI chat-completions server on 127.0.0.1 with scripted failures and a log of requests."""

    def __init__(self, failures=(), delay=0.0, bodies=()):
        """failures: statuses of the first requests (then 200); bodies: raw 200 bodies sent instead of the
        answer for the first requests (None: the answer)."""
        self.failures, self.delay, self.log, self.lock = list(failures), delay, [], threading.Lock()
        self.bodies = list(bodies)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    status = fake.failures.pop(0) if fake.failures else 200
                    raw = fake.bodies.pop(0) if fake.bodies and status == 200 else None
                time.sleep(fake.delay)
                user = body["messages"][-1]["content"]
                answer = DESCRIPTION if "what property" in user else ("yes" if "«" not in user and
                                                                      "I " in user else "no")
                with fake.lock:
                    fake.log.append((status, body))
                if status != 200:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(json.dumps({"error": {"message": "scripted", "type": "x"}}).encode())
                    return
                payload = {"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": answer}}],
                           "usage": {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}}
                data = json.dumps(payload).encode() if raw is None else raw
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def statuses(self):
        return [s for s, _ in self.log]

    def keys(self, start=0):
        """The cache keys (as the client computes them) of the requests from `start` on."""
        return [cache_key(b["model"], b["messages"], {k: b[k] for k in ("temperature", "max_tokens")})
                for _, b in self.log[start:]]

    def close(self):
        self.server.shutdown()
        self.server.server_close()
