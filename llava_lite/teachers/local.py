"""A local teacher: the chat teacher's requests answered by a Hugging Face chat model on this machine.

For a Colab user without an API key: the same messages the endpoint would receive go through
the model's chat template and ``generate``, and the replies come back to the chat teacher's
parser and its resumable JSONL (``chat.py``); only where a reply comes from differs.

The teacher's worker threads each ask for one reply, as they would of an endpoint; one
generation thread gathers what they ask into batches (left-padded prompts, greedy when the
temperature is 0 or ``None``, else sampled at it) so the GPU answers many prompts at once.
The model comes from a folder or the hub through ``hub.py`` (``HF_HUB_OFFLINE`` respected);
it runs in fp16 on a GPU, fp32 on the CPU.
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .. import hub
from .endpoint import Completion, EndpointError, RequestCounts

log = logging.getLogger(__name__)

# how long the generation thread waits for more requests to join a batch it has begun to gather
GATHER_S = 0.05


def pick_device(device: str = "") -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def model_folder(name: str) -> Path:
    """A local folder as it is; a hub id -> its snapshot in the cache (downloaded when missing and reachable)."""
    if Path(name).is_dir():
        return Path(name)
    return hub.snapshot(name, hub.LM_FILES, what="teacher model")


class LocalChatModel:
    """A chat model answering ``complete(messages)`` like :class:`~.endpoint.ChatEndpoint`, in batches."""

    def __init__(
        self,
        model: str,
        *,
        batch_size: int = 8,
        temperature: float | None = 0.2,
        max_tokens: int = 1024,
        device: str = "",
        stop: threading.Event | None = None,
    ):
        if not model:
            raise ValueError("local teacher: no model (a folder or a hub id) in the teacher config")
        if batch_size < 1:
            raise ValueError(f"local teacher: local_batch_size must be at least 1, found {batch_size}")
        if max_tokens < 1:
            raise ValueError(f"local teacher: chat_max_tokens must be at least 1 for a local model, found {max_tokens}")
        folder = model_folder(model)
        self.device = pick_device(device)
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        if not self.tokenizer.chat_template:
            raise ValueError(f"local teacher: {folder} has no chat template; a chat (instruct) model is needed")
        self.tokenizer.padding_side = "left"  # every prompt ends where its reply begins
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        with hub.quiet_loading():
            self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(self.device).eval()
        self.name, self.batch_size, self.concurrency = model, batch_size, batch_size
        self.temperature, self.max_tokens = temperature, max_tokens
        self.deterministic = not temperature  # greedy: asking again gives the same reply
        self.counts = RequestCounts()
        self.stop = stop or threading.Event()
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._starting = threading.Lock()
        log.info("local teacher: %s on %s (%s), batches of %d", model, self.device, dtype, batch_size)

    def __enter__(self) -> LocalChatModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.stop.set()

    def __repr__(self) -> str:
        return f"LocalChatModel({self.name!r}, device={str(self.device)!r})"

    def complete(self, messages: list[dict]) -> Completion:
        """One reply; waits while the generation thread answers it in a batch with others."""
        if self.stop.is_set():
            raise EndpointError("stopped")
        if self._thread is None:
            self._start()
        done, slot = threading.Event(), {}
        self._requests.put((messages, done, slot))
        while not done.wait(0.1):
            if self.stop.is_set():
                raise EndpointError("stopped")
        if "error" in slot:
            raise slot["error"]
        return slot["completion"]

    def _start(self) -> None:
        with self._starting:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, daemon=True, name="local-teacher")
                self._thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                batch = [self._requests.get(timeout=0.1)]
            except queue.Empty:
                continue
            while len(batch) < self.batch_size:  # the others asking now join this batch
                try:
                    batch.append(self._requests.get(timeout=GATHER_S))
                except queue.Empty:
                    break
            try:
                log.debug("local teacher: a batch of %d", len(batch))
                completions = self.generate([messages for messages, _, _ in batch])
                for (_, done, slot), completion in zip(batch, completions):
                    slot["completion"] = completion
                    done.set()
            except Exception as e:  # a failed batch (out of memory, a bad template) stops the run
                error = EndpointError(f"local teacher {self.name}: generation failed: {type(e).__name__}: {e}")
                for _, done, slot in batch:
                    slot["error"] = error
                    done.set()

    @torch.no_grad()
    def generate(self, conversations: list[list[dict]]) -> list[Completion]:
        """Replies to several conversations at once, each as a :class:`Completion` with token counts."""
        template = self.tokenizer.apply_chat_template
        texts = [template(m, add_generation_prompt=True, tokenize=False) for m in conversations]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        sampling = {"do_sample": True, "temperature": self.temperature} if self.temperature else {"do_sample": False}
        out = self.model.generate(
            **enc,
            max_new_tokens=self.max_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            top_p=None,
            top_k=None,
            **sampling,
        )
        new = out[:, enc["input_ids"].shape[1] :]  # (B, new tokens), padded after an early end
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos if eos is not None else self.tokenizer.eos_token_id])
        completions = []
        for row, mask in zip(new.tolist(), enc["attention_mask"]):
            end = next((i for i, t in enumerate(row) if t in eos), None)
            reply = row if end is None else row[:end]
            prompt_tokens, completion_tokens = int(mask.sum()), len(reply) + (end is not None)
            self.counts.add(requests=1, completions=1, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
            finish = "stop" if end is not None else "length"
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
            completions.append(Completion(self.tokenizer.decode(reply, skip_special_tokens=True), usage, finish))
        return completions
