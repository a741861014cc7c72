"""A chat-completions server that misbehaves on purpose (tests and the notebook use it).

It speaks just enough of the OpenAI protocol for the chat teacher and, for each request,
asks a *plan* what to do: ``plan(key, n) -> fault``, where ``key`` names the unit of work
(the response type and the context) and ``n`` counts the earlier requests for that key.
Faults:

    ok         a well-formed reply made from the context (its captions and object names)
    malformed  a chatty reply without the requested format
    500        an internal server error
    429        rate limited, with ``Retry-After``
    slow       a correct reply, but only after ``slow_s`` seconds (past the client's timeout)
    drop       the connection is closed without any reply
    cut        a correct reply cut in half, with ``finish_reason: "length"`` (max_tokens ran out)
    400        the request is refused as bad (as a server refuses a context that is too long)
    empty      a 200 whose body holds no completion (no choices), as some proxies send

The response type is read off the few-shot examples, the way a real model would follow them:
assistant examples with several questions mean a conversation, one question complex
reasoning, none a detailed description. Every request is logged (key, n, fault, usage) so a
test can check what was asked, how often, and what the client should have counted.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger(__name__)

FAULTS = ("ok", "malformed", "500", "429", "slow", "drop", "cut", "400", "empty")
# what "malformed" sends: chatter where blocks were asked for, blocks where plain text was
MALFORMED_REPLY = "Sure! It is a lovely picture and I am happy to talk about it."
MALFORMED_DETAIL = "Question:\nWhat is this?\n===\nAnswer:\nA picture.\n==="

Plan = Callable[[str, int], str]


def request_type(messages: list[dict]) -> str:
    examples = [m["content"] for m in messages if m.get("role") == "assistant"]
    questions = max((e.count("Question:") for e in examples), default=0)
    return "conversation" if questions > 1 else "complex" if questions == 1 else "detail"


def _read_context(context: str) -> tuple[list[str], list[str]]:
    captions, names = [], []
    head, _, tail = context.partition("\n\n")
    captions = [line for line in head.splitlines() if line.strip()]
    for line in tail.splitlines():
        name, sep, _ = line.partition(": [")
        if sep:
            names.append(name)
    return captions, names


def reply_for(rtype: str, context: str) -> str:
    """A correct reply in the requested format, made from the context alone."""
    captions, names = _read_context(context)
    things = ", ".join(names) if names else "nothing in particular"
    if rtype == "detail":
        return f"{captions[0] if captions else 'A picture.'} In the picture I can see: {things}."
    if rtype == "complex":
        n = len(names)
        pairs = [
            (
                "If one object were taken out of the picture, how many would be left?",
                f"First I count the objects: {things}, which makes {n}. Taking one away leaves {max(n - 1, 0)}.",
            )
        ]
    else:
        pairs = [("What can you see in this image?", f"I can see: {things}.")]
        pairs.append(("How many objects are there?", f"There are {len(names)} objects."))
        pairs.append(("Can you sum the picture up in one sentence?", captions[0] if captions else "No."))
    return "\n".join(f"Question:\n{q}\n===\nAnswer:\n{a}\n===" for q, a in pairs)


def rotating_faults(faults: Sequence[str]) -> Plan:
    """A plan that answers each context's requests with ``faults`` in turn, each context starting
    at its own place in the list (so a run meets every fault, and every context is answered once
    its turn reaches ``"ok"``)."""
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        raise ValueError(f"unknown faults {unknown}; expected some of {FAULTS}")
    return lambda key, n: faults[(n + sum(map(ord, key))) % len(faults)]


class FaultyChatServer:
    """``with FaultyChatServer(plan) as server: ... server.base_url ...`` (127.0.0.1, a free port)."""

    def __init__(
        self,
        plan: Plan | None = None,
        api_key: str | None = None,
        slow_s: float = 1.0,
        retry_after_s: int = 1,
        latency_s: float = 0.0,
        port: int = 0,
        reply: Callable[[list[dict]], str] | None = None,
    ):
        self.plan: Plan = plan or (lambda key, n: "ok")
        self.reply = reply  # what "ok" sends for a request's messages (default: a teacher's reply)
        self.api_key, self.slow_s, self.retry_after_s = api_key, slow_s, retry_after_s
        self.latency_s = latency_s  # added to every reply, to make a run last long enough to stop
        self.log: list[dict] = []  # one entry a request: key, n, fault, usage
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def start(self) -> FaultyChatServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="faulty-chat-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> FaultyChatServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def keys_asked(self) -> list[str]:
        with self._lock:
            return [entry["key"] for entry in self.log]

    def _next(self, key: str) -> tuple[int, str]:
        with self._lock:
            n = self._seen.get(key, 0)
            self._seen[key] = n + 1
            fault = self.plan(key, n)
            if fault not in FAULTS:
                raise ValueError(f"plan gave unknown fault {fault!r}; expected one of {FAULTS}")
            self.log.append({"key": key, "n": n, "fault": fault, "usage": None})
            return len(self.log) - 1, fault

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format, *args):  # noqa: A002 (the base class's name)
                log.debug("%s %s", self.address_string(), format % args)

            def _send(self, status: int, doc: dict, headers: dict | None = None) -> None:
                data = json.dumps(doc).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    log.debug("client left before the reply")

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    return self._send(401, {"error": {"message": "missing or wrong API key"}})
                try:
                    req = json.loads(body)
                    messages = req["messages"]
                    context = messages[-1]["content"]
                except (ValueError, KeyError, IndexError, TypeError):
                    return self._send(400, {"error": {"message": "expected {'messages': [...]}"}})
                rtype = request_type(messages)
                index, fault = server._next(f"{rtype}\n{context}")
                if fault == "drop":
                    self.close_connection = True
                    return
                if server.latency_s:
                    time.sleep(server.latency_s)
                if fault == "400":
                    return self._send(400, {"error": {"message": "injected: this request is too long"}})
                if fault == "500":
                    return self._send(500, {"error": {"message": "injected internal error"}})
                if fault == "429":
                    return self._send(
                        429, {"error": {"message": "injected rate limit"}}, {"Retry-After": str(server.retry_after_s)}
                    )
                if fault == "empty":
                    return self._send(200, {"id": f"chatcmpl-{index}", "object": "chat.completion", "choices": []})
                if fault == "slow":
                    time.sleep(server.slow_s)
                if fault == "malformed":
                    content = MALFORMED_DETAIL if rtype == "detail" else MALFORMED_REPLY
                else:
                    content = server.reply(messages) if server.reply else reply_for(rtype, context)
                if fault == "cut":
                    content = content[: len(content) // 2]
                usage = {
                    "prompt_tokens": sum(len(str(m.get("content", "")).split()) for m in messages),
                    "completion_tokens": len(content.split()),
                }
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                with server._lock:
                    server.log[index]["usage"] = usage
                self._send(
                    200,
                    {
                        "id": f"chatcmpl-{index}",
                        "object": "chat.completion",
                        "model": req.get("model"),
                        "choices": [
                            {
                                "index": 0,
                                "finish_reason": "length" if fault == "cut" else "stop",
                                "message": {"role": "assistant", "content": content},
                            }
                        ],
                        "usage": usage,
                    },
                )

        return Handler
