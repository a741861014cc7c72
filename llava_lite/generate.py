"""Batched greedy replies with a KV cache: how every evaluation asks a model something.

Prompts of different lengths are sorted by length, left-padded into batches and continued by the
model's own ``generate`` until the token that ends an assistant turn; a reply is the decoded new
tokens before it. The same function serves LLaVA (with image features for each batch), the blind
model and the language model reading the scene as text.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

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


def question_prompt(model, template: Template, question: str, sample_id: str = "", image: bool = True) -> list[int]:
    """Token ids asking ``question`` in one human turn (after ``<image>``, grown to one slot per
    patch token, when ``image``), ready for the model to answer."""
    ids = template.prompt([{"from": "human", "value": f"{IMAGE_TOKEN}\n{question}" if image else question}], sample_id)
    if not image:
        return ids
    pos = [i for i, t in enumerate(ids) if t == model.image_token_id]
    return expand_image(Encoded(ids, ids, sample_id, pos), model.config.num_image_tokens).input_ids
