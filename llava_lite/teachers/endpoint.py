"""One OpenAI-compatible chat-completions endpoint, spoken to in plain HTTP (httpx).

The protocol, all of it that the chat teacher needs::

    POST {base_url}/chat/completions
    Authorization: Bearer <key>            (only when the key's environment variable is set)
    {"model": ..., "messages": [{"role": ..., "content": ...}, ...], "temperature": ..., "max_tokens": ...}

    200 {"choices": [{"message": {"content": "..."}}], "usage": {"prompt_tokens": n, "completion_tokens": m}}

``base_url`` is what the OpenAI client calls it: ``https://api.openai.com/v1``,
``http://localhost:11434/v1`` (Ollama), ``http://localhost:8000/v1`` (vLLM, ``transformers serve``).

Transient trouble (429, 5xx, a timeout, a dropped connection, a 200 whose body is not a
completion) is retried with exponential back-off and jitter, waiting at least as long as a
``Retry-After`` header asks. 401/403/404 mean the configuration is wrong and stop at once;
other 4xx reject this one request (:class:`RejectedRequest`), and so does a 200 that still
holds no completion after every retry (:class:`NoCompletion`): the endpoint answers, this
request's reply is what is wrong.

The API key is read from the environment variable the configuration names and lives only in
the request headers: no message, log line or file ever contains it.
"""

from __future__ import annotations

import email.utils
import logging
import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

log = logging.getLogger(__name__)
# httpx logs every request at INFO; one line per request drowns the progress bar
if logging.getLogger("httpx").level == logging.NOTSET:
    logging.getLogger("httpx").setLevel(logging.WARNING)

# a Retry-After longer than this is cut to it (a misconfigured server should not park us for hours)
MAX_RETRY_AFTER_S = 600.0
_FATAL_STATUS = {401: "the API key was refused", 403: "access is forbidden", 404: "no such endpoint or model"}


class EndpointError(RuntimeError):
    """The endpoint cannot be used: wrong configuration, or still failing after every retry."""


class RejectedRequest(EndpointError):
    """The endpoint refused this one request (a 4xx other than 401/403/404/429)."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class NoCompletion(RejectedRequest):
    """Every attempt of this one request came back 200 without a completion in its body."""

    def __init__(self, attempts: int, detail: str):
        EndpointError.__init__(self, f"{attempts} replies of HTTP 200 without a completion; last: {detail}")
        self.status, self.detail = 200, detail


@dataclass
class Completion:
    content: str
    usage: dict | None  # the server's ``usage`` object, when it sends one
    finish_reason: str | None = None  # "stop", or "length" when max_tokens cut the reply off


@dataclass
class RequestCounts:
    """What was sent and what came back; updated from every worker thread under one lock."""

    requests: int = 0  # HTTP requests sent (every attempt counts)
    completions: int = 0  # 200 replies holding a completion
    prompt_tokens: int = 0
    completion_tokens: int = 0
    without_usage: int = 0  # completions whose reply had no usage numbers
    retried: Counter = field(default_factory=Counter)  # reason -> retries
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **changes: int) -> None:
        with self._lock:
            for k, v in changes.items():
                setattr(self, k, getattr(self, k) + v)

    def retry(self, reason: str) -> None:
        with self._lock:
            self.retried[reason] += 1


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (a number or an HTTP date), or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class ChatEndpoint:
    deterministic = False  # a server may answer the same request differently (batching, sampling)

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str,
        *,
        timeout_s: float = 120.0,
        max_retries: int = 6,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        temperature: float | None = 0.2,
        max_tokens: int = 1024,
        concurrency: int = 4,
        stop: threading.Event | None = None,
    ):
        if not base_url:
            raise ValueError("chat teacher: no base_url (e.g. http://localhost:8000/v1) in the teacher config")
        if not model:
            raise ValueError("chat teacher: no model name in the teacher config")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.max_retries, self.backoff_s, self.max_backoff_s = max_retries, backoff_s, max_backoff_s
        self.concurrency = concurrency
        self.temperature, self.max_tokens = temperature, max_tokens
        self.counts = RequestCounts()
        self.stop = stop or threading.Event()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(api_key_env, "") if api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        else:
            log.info("no API key in $%s: sending requests without one", api_key_env)
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self._client = httpx.Client(headers=headers, timeout=timeout_s, limits=limits)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ChatEndpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:  # never the headers: they hold the key
        return f"ChatEndpoint({self.url!r}, model={self.model!r})"

    def body(self, messages: list[dict]) -> dict:
        body: dict = {"model": self.model, "messages": messages, "stream": False}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.max_tokens:
            body["max_tokens"] = self.max_tokens
        return body

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        delay = min(self.max_backoff_s, self.backoff_s * 2**attempt) * random.uniform(0.5, 1.0)
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_RETRY_AFTER_S))
        return delay

    def complete(self, messages: list[dict]) -> Completion:
        """One completion, retrying transient failures; raises :class:`EndpointError` when it gives up."""
        body = self.body(messages)
        last = ""
        for attempt in range(self.max_retries + 1):
            if self.stop.is_set():
                raise EndpointError("stopped")
            retry_after = None
            self.counts.add(requests=1)
            try:
                response = self._client.post(self.url, json=body)
            except httpx.TimeoutException:
                reason, last = "timeout", f"no reply within {self._client.timeout.read}s"
            except httpx.TransportError as e:
                reason, last = "connection", f"connection failed: {type(e).__name__}: {e}"
            else:
                status = response.status_code
                if status == 200:
                    completion = self._completion(response)
                    if completion is not None:
                        return completion
                    reason, last = "bad_body", f"HTTP 200 without a completion: {response.text[:200]!r}"
                elif status in _FATAL_STATUS:
                    raise EndpointError(f"{self.url}: HTTP {status}, {_FATAL_STATUS[status]}: {response.text[:300]}")
                elif status == 429 or status >= 500:
                    reason, last = str(status), f"HTTP {status}: {response.text[:200]}"
                    retry_after = retry_after_seconds(response.headers.get("retry-after"))
                else:
                    raise RejectedRequest(status, response.text[:500])
            if attempt == self.max_retries:
                break
            delay = self._delay(attempt, retry_after)
            self.counts.retry(reason)
            log.info("%s: %s; retry %d/%d in %.1fs", self.url, last, attempt + 1, self.max_retries, delay)
            if self.stop.wait(delay):
                raise EndpointError("stopped")
        if reason == "bad_body":
            raise NoCompletion(self.max_retries + 1, last)
        raise EndpointError(f"{self.url}: gave up after {self.max_retries + 1} attempts; last: {last}")

    def _completion(self, response: httpx.Response) -> Completion | None:
        try:
            doc = response.json()
            choice = doc["choices"][0]
            content = choice["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return None
        if not isinstance(content, str):
            content = "" if content is None else str(content)
        usage = doc.get("usage") if isinstance(doc.get("usage"), dict) else None
        prompt = usage.get("prompt_tokens") if usage else None
        completion = usage.get("completion_tokens") if usage else None
        if isinstance(prompt, int) and isinstance(completion, int):
            self.counts.add(completions=1, prompt_tokens=prompt, completion_tokens=completion)
        else:
            self.counts.add(completions=1, without_usage=1)
        return Completion(content, usage, choice.get("finish_reason"))
