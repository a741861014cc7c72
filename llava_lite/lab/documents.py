"""The tiny LM's pretraining text: reading documents, and the batches a training step gets.

The paper starts from an LLM that already reads and answers; ours must too before images are
added. A reading document is one scene in the layout stage 2 uses, the chat of the ``roles``
template (:mod:`llava_lite.conversation`)::

    <|user|>{scene as text}\\n{question}<|end|><|assistant|>{answer}<|end|><|user|>{question}<|end|>...

with the loss on the assistant turns (answer and ``<|end|>``). The scene is written by
:func:`llava_lite.scene_text.reading_context`; in stage 2 the ``<image>`` tokens stand in exactly
that place. A share of documents asks for a caption instead (``Describe the image briefly.``,
stage 1's task), and a share is also read as plain text: every token predicted, the non-answer
ones with a small weight.

:class:`DocStream` gives step ``s`` the same batch however the run got there (resumed, or built
ahead in background processes by :func:`stream_batches`), so a stopped run continues exactly.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Sequence

import torch

from ..coco import SymbolicContext
from ..conversation import IGNORE, Template
from ..scene_text import reading_context
from ..teachers.questions import ExactQA, exact_question
from .config import LMDocuments

CAPTION_PROMPT = "Describe the image briefly."

# the words that say what a question asks (two phrasings of one question share them)
_CONTENT = set("red orange yellow green blue purple circle square triangle circles squares triangles".split())
_CONTENT |= {"shape", "shapes", "object", "objects"}


def content_key(qa: ExactQA) -> tuple:
    """What a question asks, without its wording (two phrasings of one question share it)."""
    return (qa.qtype, qa.answer, tuple(w for w in re.findall(r"[a-z]+", qa.question.lower()) if w in _CONTENT))


def scene_questions(ctx: SymbolicContext, rng: random.Random, n: int) -> list[ExactQA]:
    """Up to ``n`` exact questions about one scene, types drawn evenly, no question asked twice in
    other words (a repeated question could be answered by copying the earlier answer)."""
    out, seen = [], set()
    for _ in range(n * 4):
        qa = exact_question(ctx.objects, rng)
        if qa and content_key(qa) not in seen:
            seen.add(content_key(qa))
            out.append(qa)
            if len(out) == n:
                break
    return out


def reading_documents(
    contexts: Sequence[SymbolicContext],
    rng: random.Random,
    qa_per_doc: int = 8,
    caption_share: float = 0.05,
    layout: str = "sized",
) -> list[list[dict]]:
    """One document of LLaVA turns per context: the scene as text, then ``qa_per_doc`` questions
    and their answers (the first question shares the first human turn with the scene). A
    ``caption_share`` of documents instead asks for a caption and gets one of the scene's."""
    docs = []
    for ctx in contexts:
        scene = reading_context(ctx, layout, rng)
        if ctx.captions and rng.random() < caption_share:
            docs.append(
                [
                    {"from": "human", "value": f"{scene}\n{CAPTION_PROMPT}"},
                    {"from": "gpt", "value": rng.choice(ctx.captions)},
                ]
            )
            continue
        qas = scene_questions(ctx, rng, qa_per_doc)
        if not qas:
            continue
        doc = []
        for i, qa in enumerate(qas):
            doc.append({"from": "human", "value": f"{scene}\n{qa.question}" if i == 0 else qa.question})
            doc.append({"from": "gpt", "value": qa.answer})
        docs.append(doc)
    return docs


def collate(
    pairs: list[tuple[list[int], list[int]]], pad_id: int, multiple: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``[B, T]`` ids and labels (padding is -100 in labels), ``T`` a multiple of
    ``multiple`` (few distinct shapes keep the CPU kernels' caches small). Causal attention never
    looks right, so right padding needs no attention mask."""
    T = -(-max(len(i) for i, _ in pairs) // multiple) * multiple
    ids = torch.full((len(pairs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), T), IGNORE, dtype=torch.long)
    for b, (tokens, targets) in enumerate(pairs):
        ids[b, : len(tokens)] = torch.tensor(tokens)
        labels[b, : len(targets)] = torch.tensor(targets)
    return ids, labels


def as_text_document(pair: tuple[list[int], list[int]], weight: float) -> tuple[list[int], list[float]]:
    """A reading document read as plain text: every token is predicted, the answers with weight
    1 and the rest (scene lines, questions, role tokens) with ``weight``."""
    ids, labels = pair
    return ids, [1.0 if label != IGNORE else weight for label in labels]


class DocStream:
    """Deterministic batches: step ``s`` always gets the same documents (so a resumed run sees
    the same data). ``docs.length_group`` batches are drawn together and sorted by length."""

    def __init__(
        self,
        contexts: Sequence[SymbolicContext],
        template: Template,
        docs: LMDocuments,
        batch_size: int,
        seed: int,
        pad_id: int,
    ):
        self.contexts, self.template, self.docs = contexts, template, docs
        self.batch_size, self.seed, self.pad_id = batch_size, seed, pad_id
        self._group, self._cached = None, None

    def _draw_group(self, g: int) -> list[tuple[list[int], list[float]]]:
        """The documents of length group ``g``, token weights beside their ids, shortest first."""
        rng = random.Random(f"{self.seed}:docs:{g}")
        n, d, pool = self.batch_size * self.docs.length_group, self.docs, self.contexts
        scenes = [pool[rng.randrange(len(pool))] for _ in range(n)]
        docs = reading_documents(scenes, rng, d.qa_per_doc, d.caption_share, d.layout)
        while len(docs) < n:  # a scene without questions is rare; top up
            docs += reading_documents([pool[rng.randrange(len(pool))]], rng, d.qa_per_doc, d.caption_share, d.layout)
        encoded = [self.template.encode(doc) for doc in docs[:n]]
        # token weights: a reading document weighs its answers only; a text_share of them is read
        # as plain text (every token predicted, non-answers with text_weight)
        weighted = [
            as_text_document((e.input_ids, e.labels), d.text_weight if rng.random() < d.text_share else 0.0)
            for e in encoded
        ]
        return sorted(weighted, key=lambda p: len(p[0]))

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, weights)`` of step ``step``, both ``[B, T]`` (weight 0: not predicted)."""
        g, k = divmod(step, self.docs.length_group)
        if self._group != g:
            self._group, self._cached = g, self._draw_group(g)
        chunk = self._cached[k * self.batch_size : (k + 1) * self.batch_size]
        ids, _ = collate([(i, [0] * len(i)) for i, _ in chunk], self.pad_id)  # [B, T]
        weights = torch.zeros(ids.shape)
        for b, (_, w) in enumerate(chunk):
            weights[b, : len(w)] = torch.tensor(w)
        return ids, weights


class _Groups(torch.utils.data.Dataset):
    """Item ``i``: the batches of length group ``first + i`` of a :class:`DocStream`."""

    def __init__(self, stream: DocStream, first: int, last: int):
        self.stream, self.first, self.last = stream, first, last

    def __len__(self) -> int:
        return self.last - self.first

    def __getitem__(self, i: int) -> list:
        n = self.stream.docs.length_group
        return [self.stream.batch((self.first + i) * n + k) for k in range(n)]


def stream_batches(
    stream: DocStream, start: int, steps: int, workers: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``stream.batch(s)`` for ``s`` in ``start .. steps - 1``, built in order in the loop or, with
    ``workers`` > 0, a group of batches at a time in that many background processes (the same
    batches: each step's documents depend on its step alone)."""
    if workers <= 0:
        for s in range(start, steps):
            yield stream.batch(s)
        return
    n = stream.docs.length_group
    first, last = start // n, -(-steps // n)
    loader = torch.utils.data.DataLoader(
        _Groups(stream, first, last), batch_size=None, num_workers=workers, prefetch_factor=4
    )
    s = first * n
    for group in loader:
        for b in group:
            if start <= s < steps:
                yield b
            s += 1
