"""The chat teacher: the paper's way of writing instruction data, with any chat model.

For each symbolic context and response type it sends one request (system message, the
hand-written few-shot examples as user/assistant turns, then the context; see ``prompts.py``),
parses the reply (``replies.py``) and appends a LLaVA-format sample to a JSONL file. The
request goes to an OpenAI-compatible endpoint (``kind="chat"``, ``endpoint.py``) or to a
Hugging Face chat model on this machine (``kind="local"``, ``local.py``); everything else,
parsing, retries, failures and resume, is the same for both.

Resume policy, explicit:

* every (context, type) pair is a unit with a fixed sample id ``<image_id>-<type>`` and a
  fingerprint (``made_with``) of what its request holds: the context (the world), the prompt
  files, the model and the request settings;
* a unit whose id is in the output file with the same fingerprint is finished and never asked
  again; a record of another fingerprint is stale (a redrawn world, a changed prompt or model):
  it is removed from the file and the unit asked again;
* a unit whose replies stayed malformed after ``chat_format_retries`` extra requests, whose
  request the endpoint rejected (a 4xx such as 400), or whose every reply was a 200 without a
  completion, is written to the failures file with the raw replies and is *not* asked again on
  the next run, unless ``retry_failed=True``;
* trouble with the endpoint itself (wrong key, still failing after every retry) stops the run
  without recording anything for the units not done: run again to resume.

Samples and failures are flushed line by line, so a run stopped at any moment (a kill, a crash)
loses at most the requests in flight. Ctrl-C stops at once: the requests in flight are dropped
(their units stay to do), every reply already received is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .. import jsonl
from ..coco import SymbolicContext
from ..config import TeacherConfig
from ..paths import PROMPTS_DIR
from .endpoint import ChatEndpoint, NoCompletion, RejectedRequest
from .local import LocalChatModel
from .prompts import RESPONSE_TYPES, PromptSet, load_prompts
from .replies import IMAGE_TOKEN, MalformedReply, parse_reply

log = logging.getLogger(__name__)


@dataclass
class ChatStats:
    units: int = 0  # (context, type) pairs asked for
    already_done: int = 0  # found in the output file: skipped
    already_failed: int = 0  # found in the failures file: skipped (retry_failed=False)
    stale: int = 0  # records of another world, prompt or model: removed, their units asked again
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


def fingerprint(messages: list[dict], teacher: TeacherConfig, image: str) -> str:
    """What a unit's sample was made from: the request's messages (context and prompt files), the
    model and request settings, the image it names, the seed of the instruction draw, and the
    backend when it is not an endpoint (a local model of the same name is another teacher; an
    endpoint's fingerprints stay those of the files made before the local teacher existed)."""
    made = {"messages": messages, "model": teacher.model, "temperature": teacher.chat_temperature,
            "max_tokens": teacher.chat_max_tokens, "image": image, "seed": teacher.seed}  # fmt: skip
    if teacher.kind != "chat":
        made["backend"] = teacher.kind
    return hashlib.sha1(json.dumps(made, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


class _Job:
    """What every worker thread shares: the backend (endpoint or local model), the prompts and the settings."""

    def __init__(
        self,
        endpoint: ChatEndpoint | LocalChatModel,
        prompts: dict[str, PromptSet],
        teacher: TeacherConfig,
        image_prefix: str,
    ):
        self.endpoint, self.prompts, self.teacher, self.image_prefix = endpoint, prompts, teacher, image_prefix
        self.malformed = 0
        self._lock = threading.Lock()

    def image(self, ctx: SymbolicContext) -> str:
        return posixpath.join(self.image_prefix, ctx.file_name) if self.image_prefix else ctx.file_name

    def made_with(self, ctx: SymbolicContext, rtype: str) -> str:
        return fingerprint(self.prompts[rtype].messages(ctx.text()), self.teacher, self.image(ctx))

    def ask(self, ctx: SymbolicContext, rtype: str) -> tuple[str, dict]:
        """("sample", sample) or ("failure", record); endpoint trouble raises EndpointError."""
        kind, record = self._ask(ctx, rtype)
        record["made_with"] = self.made_with(ctx, rtype)
        return kind, record

    def _ask(self, ctx: SymbolicContext, rtype: str) -> tuple[str, dict]:
        prompts = self.prompts[rtype]
        messages = prompts.messages(ctx.text())
        sid = sample_id(ctx.image_id, rtype)
        attempts = []
        # a greedy local model gives a malformed reply again when asked again
        retries = 0 if self.endpoint.deterministic else self.teacher.chat_format_retries
        for _ in range(1 + retries):
            try:
                completion = self.endpoint.complete(messages)
            except NoCompletion as e:
                return "failure", self._failure(ctx, rtype, "no_completion", str(e), attempts)
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


def _current(path: Path, made_with: dict[str, str]) -> tuple[set[str], int]:
    """The ids of ``path`` whose record was made as this run would make it; records of another
    fingerprint (or of no unit of this run's, under an id it asks for) are removed from the file."""
    records = [rec for _, rec in jsonl.read_jsonl(path)]
    keep = [r for r in records if str(r.get("id")) not in made_with or r.get("made_with") == made_with[str(r["id"])]]
    if len(keep) < len(records):
        log.warning("%s: %d records were made from another world, prompt or model; removing them to ask again",
                    path, len(records) - len(keep))  # fmt: skip
        jsonl.write_jsonl(path, keep)
    return {str(r.get("id")) for r in keep}, len(records) - len(keep)


def _todo(units, job: _Job, out_path: Path, failures_path: Path, retry_failed: bool) -> tuple[list, ChatStats]:
    """The (context, type) units still to ask, and the run's statistics started with what is done."""
    made_with = {sample_id(ctx.image_id, t): job.made_with(ctx, t) for ctx, t in units}
    (done, stale), (failed, stale_failed) = _current(out_path, made_with), _current(failures_path, made_with)
    stats = ChatStats(units=len(units), stale=stale + stale_failed)
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


def _ask_all(job: _Job, todo: list, concurrency: int, stop: threading.Event):
    """Ask for every unit of ``todo`` from ``concurrency`` daemon threads; returns the queue their
    ``("ok", (kind, record))`` or ``("error", exception)`` results arrive on, and the threads.
    Daemon threads: a stopped run returns at once, not after its requests in flight (a worker
    never writes a file, so one left running can lose nothing)."""
    units: queue.SimpleQueue = queue.SimpleQueue()
    for unit in todo:
        units.put(unit)
    results: queue.SimpleQueue = queue.SimpleQueue()

    def work() -> None:
        while not stop.is_set():
            try:
                ctx, rtype = units.get_nowait()
            except queue.Empty:
                return
            try:
                results.put(("ok", job.ask(ctx, rtype)))
            except Exception as e:
                results.put(("error", e))

    workers = [threading.Thread(target=work, daemon=True, name=f"chat-teacher-{i}") for i in range(max(1, concurrency))]
    for w in workers[: max(1, min(len(todo), concurrency))]:
        w.start()
    return results, [w for w in workers if w.ident is not None]


def _next_result(results: queue.SimpleQueue, workers: list[threading.Thread]):
    """The next result, or None when every worker has left and none is waiting."""
    while True:
        try:
            return results.get(timeout=0.1)
        except queue.Empty:
            if not any(w.is_alive() for w in workers) and results.empty():
                return None


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


def backend_for(teacher: TeacherConfig, stop: threading.Event) -> ChatEndpoint | LocalChatModel:
    """Where a teacher config's requests go: a local chat model (``kind="local"``) or an endpoint."""
    if teacher.kind == "local":
        return LocalChatModel(
            teacher.model,
            batch_size=teacher.local_batch_size,
            temperature=teacher.chat_temperature,
            max_tokens=teacher.chat_max_tokens,
            device=teacher.local_device,
            stop=stop,
        )
    return endpoint_for(teacher, stop)


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
    """Ask the teacher's model for every (context, type) not yet finished; append samples to ``out_path``
    (JSONL) and failures to ``failures_path`` (default ``<out>.failures.jsonl``)."""
    start = time.monotonic()
    out_path = Path(out_path)
    failures_path = Path(failures_path) if failures_path else failures_path_for(out_path)
    prompts = {t: load_prompts(t, prompts_dir) for t in types}
    seen = Counter(ctx.image_id for ctx in contexts)
    dupes = [k for k, n in seen.items() if n > 1]
    if dupes:
        raise ValueError(f"chat teacher: image ids occur more than once among the contexts: {dupes[:5]}")

    stop = threading.Event()
    endpoint = backend_for(teacher, stop)
    job = _Job(endpoint, prompts, teacher, image_prefix)
    todo, stats = _todo([(ctx, t) for ctx in contexts for t in types], job, out_path, failures_path, retry_failed)
    fatal: BaseException | None = None
    interrupted = False
    with endpoint, jsonl.open_for_append(out_path) as fout, jsonl.open_for_append(failures_path) as ffail:

        def take(kind: str, value) -> None:
            nonlocal fatal
            if kind == "error":  # endpoint trouble (or a bug): stop asking, keep what is done
                if fatal is None and not interrupted:
                    fatal = value
                    stop.set()
                return
            kind, record = value
            if kind == "sample":
                jsonl.append(fout, record)
                stats.samples += 1
            else:
                jsonl.append(ffail, record)
                stats.failures += 1
                log.warning("%s: recorded as a failure (%s: %s)", record["id"], record["reason"], record["error"])

        results, workers = _ask_all(job, todo, endpoint.concurrency, stop)
        bar = tqdm(total=len(todo), disable=not progress, desc="chat teacher", unit="reply")
        try:
            for _ in range(len(todo)):
                got = _next_result(results, workers)
                if got is None:  # stopped early: every worker has left
                    break
                take(*got)
                bar.update()
        except KeyboardInterrupt:
            interrupted = True
            stop.set()  # no new requests; those in flight are left to end on their own
        finally:
            stop.set()
            bar.close()
            while not results.empty():  # replies that came in while the loop was stopping are kept
                take(*results.get_nowait())
    # counted after the workers have left (but at Ctrl-C), so requests in flight at a stop are included
    stats.count_requests(endpoint.counts, job.malformed)
    stats.seconds = time.monotonic() - start
    log.info("chat teacher: %s", stats.summary())
    if interrupted:
        raise KeyboardInterrupt(
            f"chat teacher stopped by Ctrl-C: {stats.samples} samples and {stats.failures} failures of this run "
            f"are in {out_path}; run again to resume"
        )
    if fatal is not None:
        raise RuntimeError(
            f"chat teacher stopped early: {fatal}. {stats.samples} samples were written "
            f"to {out_path}; run again to resume"
        ) from fatal
    return stats
