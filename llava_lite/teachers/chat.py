"""The chat teacher: the paper's way of writing instruction data, with any chat endpoint.

For each symbolic context and response type it sends one request (system message, the
hand-written few-shot examples as user/assistant turns, then the context; see ``prompts.py``),
parses the reply (``replies.py``) and appends a LLaVA-format sample to a JSONL file.

Resume policy, explicit:

* every (context, type) pair is a unit with a fixed sample id ``<image_id>-<type>``;
* a unit whose id is in the output file is finished and never asked again;
* a unit whose replies stayed malformed after ``chat_format_retries`` extra requests, or whose
  request the endpoint rejected (a 4xx such as 400), is written to the failures file with the
  raw replies and is *not* asked again on the next run, unless ``retry_failed=True``;
* trouble with the endpoint itself (wrong key, still failing after every retry) stops the run
  without recording anything for the units not done: run again to resume.

Samples and failures are flushed line by line, so a run stopped at any moment (Ctrl-C, a kill,
a crash) loses at most the requests in flight.
"""

from __future__ import annotations

import logging
import posixpath
import random
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .. import jsonl
from ..coco import SymbolicContext
from ..config import TeacherConfig
from ..paths import PROMPTS_DIR
from .endpoint import ChatEndpoint, RejectedRequest
from .prompts import RESPONSE_TYPES, PromptSet, load_prompts
from .replies import IMAGE_TOKEN, MalformedReply, parse_reply

log = logging.getLogger(__name__)


@dataclass
class ChatStats:
    units: int = 0  # (context, type) pairs asked for
    already_done: int = 0  # found in the output file: skipped
    already_failed: int = 0  # found in the failures file: skipped (retry_failed=False)
    samples: int = 0  # written by this run
    failures: int = 0  # written to the failures file by this run
    malformed_replies: int = 0  # replies that did not parse (each retried or recorded)
    requests: int = 0  # HTTP requests sent, every retry included
    completions: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    without_usage: int = 0  # completions whose reply carried no usage numbers
    retried: dict = field(default_factory=dict)  # reason (429, 500, timeout, connection, ...) -> retries
    seconds: float = 0.0

    def summary(self) -> str:
        retried = ", ".join(f"{k}: {v}" for k, v in sorted(self.retried.items())) or "none"
        return (
            f"{self.units} units ({self.already_done} done before, {self.already_failed} failed before); "
            f"this run: {self.samples} samples, {self.failures} failures, "
            f"{self.malformed_replies} malformed replies; {self.requests} requests "
            f"(retries {retried}); tokens: {self.prompt_tokens} prompt + {self.completion_tokens} "
            f"completion"
            + (f" ({self.without_usage} replies without usage)" if self.without_usage else "")
            + f"; {self.seconds:.1f}s"
        )

    def count_requests(self, counts, malformed: int) -> None:
        """Take in an endpoint's request counts and the teacher's malformed replies."""
        self.malformed_replies = malformed
        self.requests, self.completions = counts.requests, counts.completions
        self.prompt_tokens, self.completion_tokens = counts.prompt_tokens, counts.completion_tokens
        self.without_usage, self.retried = counts.without_usage, dict(counts.retried)


def sample_id(image_id: int | str, rtype: str) -> str:
    return f"{image_id}-{rtype}"


def failures_path_for(out_path: str | Path) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(out_path.stem + ".failures.jsonl")


def to_sample(
    ctx: SymbolicContext, rtype: str, parsed: list[tuple[str, str]] | str, prompts: PromptSet, image: str, seed: int
) -> dict:
    """A LLaVA-format sample; ``<image>`` opens the first human turn."""
    sid = sample_id(ctx.image_id, rtype)
    if rtype == "detail":
        instruction = random.Random(f"{seed}:{sid}").choice(prompts.instructions)
        pairs = [(instruction, parsed)]
    else:
        pairs = parsed
    turns = []
    for i, (question, answer) in enumerate(pairs):
        turns.append({"from": "human", "value": f"{IMAGE_TOKEN}\n{question}" if i == 0 else question})
        turns.append({"from": "gpt", "value": answer})
    return {"id": sid, "image": image, "type": rtype, "conversations": turns}


class _Job:
    """What every worker thread shares: the endpoint, the prompts and the settings."""

    def __init__(
        self, endpoint: ChatEndpoint, prompts: dict[str, PromptSet], teacher: TeacherConfig, image_prefix: str
    ):
        self.endpoint, self.prompts, self.teacher, self.image_prefix = endpoint, prompts, teacher, image_prefix
        self.malformed = 0
        self._lock = threading.Lock()

    def image(self, ctx: SymbolicContext) -> str:
        return posixpath.join(self.image_prefix, ctx.file_name) if self.image_prefix else ctx.file_name

    def ask(self, ctx: SymbolicContext, rtype: str) -> tuple[str, dict]:
        """("sample", sample) or ("failure", record); endpoint trouble raises EndpointError."""
        prompts = self.prompts[rtype]
        messages = prompts.messages(ctx.text())
        sid = sample_id(ctx.image_id, rtype)
        attempts = []
        for _ in range(1 + self.teacher.chat_format_retries):
            try:
                completion = self.endpoint.complete(messages)
            except RejectedRequest as e:
                return "failure", self._failure(ctx, rtype, "rejected", str(e), attempts)
            reply = completion.content
            try:
                if completion.finish_reason == "length":
                    raise MalformedReply(
                        "the reply was cut off at max_tokens (finish_reason 'length'); "
                        "raise chat_max_tokens if this happens often"
                    )
                parsed = parse_reply(rtype, reply)
            except MalformedReply as e:
                with self._lock:
                    self.malformed += 1
                log.debug("%s: malformed reply (%s)", sid, e)
                attempts.append({"raw": reply, "error": str(e)})
                continue
            return "sample", to_sample(ctx, rtype, parsed, prompts, self.image(ctx), self.teacher.seed)
        return "failure", self._failure(ctx, rtype, "malformed", attempts[-1]["error"], attempts)

    def _failure(self, ctx: SymbolicContext, rtype: str, reason: str, error: str, attempts: list) -> dict:
        return {
            "id": sample_id(ctx.image_id, rtype),
            "image_id": ctx.image_id,
            "image": self.image(ctx),
            "type": rtype,
            "reason": reason,
            "error": error,
            "attempts": attempts,
            "context": ctx.text(),
        }


def _ids(path: Path) -> set[str]:
    return {str(rec.get("id")) for _, rec in jsonl.read_jsonl(path)}


def _todo(contexts, types, out_path: Path, failures_path: Path, retry_failed: bool) -> tuple[list, ChatStats]:
    """The (context, type) units still to ask, and the run's statistics started with what is done."""
    done, failed = _ids(out_path), _ids(failures_path)
    units = [(ctx, t) for ctx in contexts for t in types]
    stats = ChatStats(units=len(units))
    todo = []
    for ctx, t in units:
        sid = sample_id(ctx.image_id, t)
        if sid in done:
            stats.already_done += 1
        elif sid in failed and not retry_failed:
            stats.already_failed += 1
        else:
            todo.append((ctx, t))
    skipped = " (skipped; retry_failed=True asks again)" if stats.already_failed else ""
    log.info("chat teacher: %d units; %d already in %s, %d failed before%s; asking for %d",
             len(units), stats.already_done, out_path.name, stats.already_failed, skipped, len(todo))  # fmt: skip
    return todo, stats


def endpoint_for(teacher: TeacherConfig, stop: threading.Event) -> ChatEndpoint:
    """The endpoint a teacher config names, with its retry, timeout and concurrency settings."""
    return ChatEndpoint(
        teacher.base_url,
        teacher.model,
        teacher.api_key_env,
        timeout_s=teacher.chat_timeout_s,
        max_retries=teacher.chat_max_retries,
        backoff_s=teacher.chat_backoff_s,
        max_backoff_s=teacher.chat_max_backoff_s,
        temperature=teacher.chat_temperature,
        max_tokens=teacher.chat_max_tokens,
        concurrency=teacher.chat_concurrency,
        stop=stop,
    )


def generate(
    contexts: Sequence[SymbolicContext],
    out_path: str | Path,
    teacher: TeacherConfig,
    *,
    types: Sequence[str] = RESPONSE_TYPES,
    image_prefix: str = "",
    failures_path: str | Path | None = None,
    retry_failed: bool = False,
    prompts_dir: str | Path = PROMPTS_DIR,
    progress: bool = True,
) -> ChatStats:
    """Ask the endpoint for every (context, type) not yet finished; append samples to ``out_path``
    (JSONL) and failures to ``failures_path`` (default ``<out>.failures.jsonl``)."""
    start = time.monotonic()
    out_path = Path(out_path)
    failures_path = Path(failures_path) if failures_path else failures_path_for(out_path)
    prompts = {t: load_prompts(t, prompts_dir) for t in types}
    seen = Counter(ctx.image_id for ctx in contexts)
    dupes = [k for k, n in seen.items() if n > 1]
    if dupes:
        raise ValueError(f"chat teacher: image ids occur more than once among the contexts: {dupes[:5]}")

    todo, stats = _todo(contexts, types, out_path, failures_path, retry_failed)
    stop = threading.Event()
    endpoint = endpoint_for(teacher, stop)
    job = _Job(endpoint, prompts, teacher, image_prefix)
    fatal: BaseException | None = None
    with (
        endpoint,
        jsonl.open_for_append(out_path) as fout,
        jsonl.open_for_append(failures_path) as ffail,
        ThreadPoolExecutor(max_workers=max(1, teacher.chat_concurrency)) as pool,
    ):
        futures = [pool.submit(job.ask, ctx, t) for ctx, t in todo]
        try:
            for fut in tqdm(
                as_completed(futures), total=len(futures), disable=not progress, desc="chat teacher", unit="reply"
            ):
                if fut.cancelled():
                    continue
                try:
                    kind, record = fut.result()
                except Exception as e:  # endpoint trouble (or a bug): stop asking, keep what is done
                    if fatal is None:
                        fatal = e
                        stop.set()
                        for f in futures:
                            f.cancel()
                    continue
                if kind == "sample":
                    jsonl.append(fout, record)
                    stats.samples += 1
                else:
                    jsonl.append(ffail, record)
                    stats.failures += 1
                    log.warning("%s: recorded as a failure (%s: %s)", record["id"], record["reason"], record["error"])
        except BaseException:
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    # counted after the pool has finished, so requests still in flight at a stop are included
    stats.count_requests(endpoint.counts, job.malformed)
    stats.seconds = time.monotonic() - start
    log.info("chat teacher: %s", stats.summary())
    if fatal is not None:
        raise RuntimeError(
            f"chat teacher stopped early: {fatal}. {stats.samples} samples were written "
            f"to {out_path}; run again to resume"
        ) from fatal
    return stats
