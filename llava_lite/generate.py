"""Batched greedy replies with a KV cache: how every evaluation asks a model something; and one
reply streamed token by token, greedy or sampled: how a chat asks it.

Prompts of different lengths are sorted by length, left-padded into batches and continued by the
model's own ``generate`` until the token that ends an assistant turn; a reply is the decoded new
tokens before it. The same function serves LLaVA (with image features for each batch), the blind
model and the language model reading the scene as text. :func:`stream_reply` runs the same
``generate`` on one prompt and hands each piece of text to a callback as its token arrives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm
from transformers.generation.streamers import BaseStreamer

from .conversation import IMAGE_TOKEN, Encoded, Template, expand_image

END_OF_TURN = ("<|end|>", "<|im_end|>", "<|eot_id|>")


def stop_id(tokenizer) -> int:
    """The token that ends an assistant turn: ``<|end|>`` / ``<|im_end|>`` / ``<|eot_id|>`` when
    the vocabulary has one, else EOS."""
    vocab = tokenizer.get_vocab()
    for t in END_OF_TURN:
        if t in vocab:
            return vocab[t]
    return tokenizer.eos_token_id


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode for the block, then back in the mode it was in."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def greedy_replies(
    generate: Callable[..., torch.Tensor],
    prompts: Sequence[list[int]],
    pad_id: int,
    stop_id: int,
    decode: Callable[[list[int]], str],
    batch_size: int = 64,
    max_new_tokens: int = 4,
    extras: Callable[[list[int]], dict] | None = None,
    returns_prompt: bool = False,
    progress: bool = False,
    device: torch.device | str | None = None,
) -> list[str]:
    """Replies to ``prompts`` (token id lists), batched by length and left-padded.

    ``generate(input_ids=, attention_mask=, max_new_tokens=, **extras(batch_indices))`` is a
    model's ``generate``; ``returns_prompt`` says whether its output starts with the prompt;
    ``device``: where the prompts and the ``extras`` tensors go (the model's), if not the CPU.
    """
    replies: dict[int, str] = {}
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for s in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress):
        idx = order[s : s + batch_size]
        T = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), T), pad_id, dtype=torch.long)  # [B, T], left padded
        mask = torch.zeros((len(idx), T), dtype=torch.long)
        for b, i in enumerate(idx):
            ids[b, T - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[b, T - len(prompts[i]) :] = 1
        more = extras(idx) if extras else {}
        if device is not None:
            ids, mask = ids.to(device), mask.to(device)
            more = {k: v.to(device) if torch.is_tensor(v) else v for k, v in more.items()}
        out = generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop_id,
            pad_token_id=pad_id,
            **more,
        )
        out = out[:, T:] if returns_prompt else out  # [B, new]
        for b, i in enumerate(idx):
            new = out[b].tolist()
            replies[i] = decode(new[: new.index(stop_id)] if stop_id in new else new)
    return [replies[i] for i in range(len(prompts))]


def model_replies(
    model,
    tokenizer,
    prompts: Sequence[list[int]],
    batch_size: int = 64,
    max_new_tokens: int = 4,
    extras: Callable[[list[int]], dict] | None = None,
    returns_prompt: bool = False,
    progress: bool = False,
) -> list[str]:
    """:func:`greedy_replies` of ``model`` (in eval mode, on its device) with ``tokenizer``'s padding,
    stop token and decoding: what every scorer asks through. ``returns_prompt``: a plain language
    model's ``generate`` (its output starts with the prompt), not LLaVA's."""
    with evaluating(model):
        return greedy_replies(
            model.generate,
            prompts,
            tokenizer.pad_token_id,
            stop_id(tokenizer),
            lambda t: tokenizer.decode(t, skip_special_tokens=True),
            batch_size,
            max_new_tokens=max_new_tokens,
            extras=extras,
            returns_prompt=returns_prompt,
            progress=progress,
            device=next(model.parameters()).device,
        )


def conversation_prompt(model, template: Template, conversations: list[dict], sample_id: str = "") -> list[int]:
    """Token ids of LLaVA turns so far plus the assistant's opening, each ``<image>`` grown to one
    slot per patch token: what the model reads before it answers the last human turn."""
    ids = template.prompt(conversations, sample_id)
    pos = [i for i, t in enumerate(ids) if t == model.image_token_id]
    if not pos:
        return ids
    return expand_image(Encoded(ids, ids, sample_id, pos), model.config.num_image_tokens).input_ids


def question_prompt(model, template: Template, question: str, sample_id: str = "", image: bool = True) -> list[int]:
    """Token ids asking ``question`` in one human turn (after ``<image>``, grown to one slot per
    patch token, when ``image``), ready for the model to answer."""
    value = f"{IMAGE_TOKEN}\n{question}" if image else question
    return conversation_prompt(model, template, [{"from": "human", "value": value}], sample_id)


class _TextStream(BaseStreamer):
    """Takes each new token from ``generate`` and hands ``on_text`` the text it adds to the reply.
    Text is held back while it ends in half a character (a multi-byte letter split over tokens)."""

    def __init__(self, decode: Callable[[list[int]], str], stop_id: int, on_text: Callable[[str], None]):
        self.decode, self.stop_id, self.on_text = decode, stop_id, on_text
        self.tokens: list[int] = []
        self.sent = ""
        self.prompt_seen = self.stopped = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate hands over the prompt first
            self.prompt_seen = True
            return
        for t in value.reshape(-1).tolist():
            self.stopped = self.stopped or t == self.stop_id
            if not self.stopped:
                self.tokens.append(t)
        self._emit(final=False)

    def end(self) -> None:
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        text = self.decode(self.tokens)
        if (final or not text.endswith("\ufffd")) and text.startswith(self.sent) and len(text) > len(self.sent):
            self.on_text(text[len(self.sent) :])
            self.sent = text


def stream_reply(
    generate: Callable[..., torch.Tensor],
    prompt: list[int],
    stop_id: int,
    decode: Callable[[list[int]], str],
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    seed: int | None = None,
    on_text: Callable[[str], None] | None = None,
    pad_id: int | None = None,
    device: torch.device | str | None = None,
    **extras,
) -> str:
    """One reply to ``prompt`` (token ids), its text handed to ``on_text`` piece by piece as tokens
    arrive. ``temperature`` 0 is greedy (the same call :func:`greedy_replies` makes, so the same
    reply); above 0 it samples from the softmax at that temperature, kept to the smallest set of
    tokens whose probability reaches ``top_p`` (nucleus sampling). ``seed`` makes a sample
    repeatable without touching the global random state. ``extras`` go to ``generate`` (image
    features), moved to ``device`` like the prompt."""
    if temperature < 0:
        raise ValueError(f"temperature must be 0 (greedy) or more, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    ids = torch.tensor([prompt], dtype=torch.long, device=device)  # [1, T]
    extras = {k: v.to(device) if torch.is_tensor(v) and device is not None else v for k, v in extras.items()}
    sampling = {"do_sample": False}
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p), "top_k": 0}
    streamer = _TextStream(decode, stop_id, on_text) if on_text else None
    on_gpu = ids.device.type == "cuda"
    with torch.random.fork_rng(devices=[ids.device] if on_gpu else [], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        out = generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            eos_token_id=stop_id,
            pad_token_id=stop_id if pad_id is None else pad_id,
            streamer=streamer,
            **sampling,
            **extras,
        )
    new = out[0].tolist()  # [T_new]: the new tokens (LLaVA's generate returns no prompt)
    return decode(new[: new.index(stop_id)] if stop_id in new else new)
