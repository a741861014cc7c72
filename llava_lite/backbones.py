"""The tiny language model LLaVA's ``tiny`` preset starts from: a BPE tokenizer and a small Llama,
pretrained on the world's text until it *reads* (answers questions from a symbolic context).

The paper starts from an LLM that already reads and answers; ours must too before images are
added. Its pretraining text is chat documents in the layout stage 2 uses::

    <|user|>{scene as text}\\n{question}<|end|><|assistant|>{answer}<|end|><|user|>{question}<|end|>...

with the loss on the assistant turns (answer and ``<|end|>``). The scene is written as a
:func:`scene_table` (layout ``table``; the older ``boxes`` layout is :func:`object_lines`). In
stage 2 it is replaced by ``<image>`` tokens in exactly that place. The pretraining mix adds: a
share of documents asking for a caption ("Describe the image briefly."), which stage 1 needs;
optional drills (grounding questions for ``boxes``, :func:`lookup_drill` for ``table``); and
documents also read as plain text (every token predicted, the non-answer ones with a small
weight). ``data/pretrained/tiny-lm/README.md`` records what each lever measured.

``llava-lite backbones lm`` trains it; :func:`text_only_accuracy` scores it on held-out scenes
(the analogue of the paper's text-only GPT-4 row). The tiny CLIP lives in
:mod:`llava_lite.clip_pretrain` and adds ``llava-lite backbones clip`` through
:data:`SUBCOMMANDS`.
"""
from __future__ import annotations

import json
import logging
import math
import random
import re
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import io
from .coco import SymbolicContext, load_contexts
from .envcheck import training_device
from .facts import Obj
from .teachers.questions import QTYPES, ExactQA, exact_question, is_correct, unique_by

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<image>", "<|user|>", "<|assistant|>", "<|end|>")
USER, ASSISTANT, END = "<|user|>", "<|assistant|>", "<|end|>"
CAPTION_PROMPT = "Describe the image briefly."

# roles user/assistant (and an optional leading system message, written as plain text)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}<|end|>"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}<|end|>"
    "{% else %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# words (space-prefixed), single digits, punctuation runs (", " before a digit stays one piece),
# newlines, other whitespace
_PIECES = r" ?[A-Za-z]+|\d| ?[^\sA-Za-z\d]+(?: [^\sA-Za-z\d]+)*(?: (?=\d))?|\n|\s"


# ------------------------------------------------------------------------------ tokenizer
def train_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on ``texts``, as a ``PreTrainedTokenizerFast``.

    Every word is space-prefixed (a word at the start of a line or of a turn gets a space too,
    so ``red`` is one token wherever it stands) and every digit is its own token.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.Replace("\n", "\n "), normalizers.Prepend(" ")])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PIECES), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=["<image>", USER, ASSISTANT, END])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tokenizer_corpus(contexts: Sequence[SymbolicContext], seed: int = 0, questions_per_scene: int = 6,
                     layout: str = "table") -> Iterable[str]:
    """The text the tokenizer learns from: contexts (both layouts), questions, answers and captions."""
    rng = random.Random(seed)
    for ctx in contexts:
        yield object_lines(ctx)
        if layout != "boxes":
            yield reading_context(ctx, layout)
        yield from ctx.captions
        for qa in scene_questions(ctx, rng, questions_per_scene):
            yield qa.question
            yield qa.answer
    yield CAPTION_PROMPT



# ------------------------------------------------------------------------------ documents
LAYOUTS = ("table", "shuffled", "crossed", "ranked", "sized", "paired", "boxes")
# the table with lines in random order: (lines that name shape first, the lines written again sorted,
# how many pairs of objects each coordinate is written again for)
SHUFFLED = {"shuffled": ((), (), 0), "crossed": (("down",), (), 0), "ranked": (("down",), ("across", "down"), 0),
            "sized": (("down",), ("across", "down", "sizes"), 0), "paired": (("down",), ("across", "down", "sizes"), 3)}
# the heading of each line written again sorted
RANKED = {"across": "left to right", "down": "top to bottom", "sizes": "small to large"}


def scene_table(ctx: SymbolicContext, rng: random.Random | None = None, shape_first: Sequence[str] = (),
                ranked: Sequence[str] = (), pairs: int = 0) -> str:
    """The context as the tiny LM reads it: one line per view of the scene, each listing every
    object with the key a question names first and the value it asks after::

        objects: red circle, blue square
        colours: circle red, square blue
        sizes: red circle large, blue square small
        across: red circle 2, blue square 7
        down: red circle 6, blue square 1

    ``across``/``down`` are box centres in tenths of the image (0 = left/top edge, 9 = right/
    bottom). Every lookup a question needs is then "find the key, read what follows"; two
    objects that a position question compares always differ by at least one tenth
    (``facts.RELATION_MARGIN`` is 0.12). Categories without a colour (COCO) have no colour line.

    Layout ``table``: every line in the scene's object order. With ``rng`` (layouts ``shuffled``
    and ``crossed``) each line lists the objects in its own random order, so a line cannot be
    predicted by copying the one above it in order: reading it as text then trains the very
    lookups the questions need ("the line said ``red circle``; here is ``red``, so ``circle``
    follows"). The lines named in ``shape_first`` write each name shape first (``circle red 6``),
    which makes the colour after a shape word as predictable as the shape after a colour word.

    ``ranked`` names the lines written once more, sorted. Layout ``ranked`` adds both coordinates::

        left to right: blue square 1, red circle 2
        top to bottom: square blue 1, circle red 6

    Nothing else in the context makes a reader fetch a coordinate: each digit is new where the
    ``across``/``down`` line writes it, so predicting the text never asks for the lookup a position
    question needs. A ranked line asks for it densely: its next name is the one with the smallest
    digit not yet listed (a comparison), and the digit after a name is that name's value above (a
    lookup, exactly as ``colours`` repeats the colour after a shape).

    Layout ``sized`` adds the sizes as well, small ones first (in random order among themselves)::

        small to large: blue square small, red circle large

    for the same reason: the ``sizes`` line is the only place a size is written, so without this
    line no size is ever looked up while reading, only when a size question asks.

    ``pairs`` (layout ``paired``: 3) writes both coordinates once more for that many random pairs
    of differently named objects, the two names first and their two digits after them::

        across pairs: red circle and blue square 2 1
        down pairs: blue square and red circle 1 6

    A ranked line asks for a digit right after its name; a position question names two objects
    and asks, several words later, how their coordinates compare. A pair entry asks for exactly
    those two lookups, from names read a few words before. It adds no fact the ``across`` and
    ``down`` lines do not hold, and no relation word.
    """
    objs = ctx.objects

    def listed():
        return rng.sample(objs, len(objs)) if rng is not None else objs

    def name(o: Obj, line: str) -> str:
        return f"{o.kind} {o.colour}" if line in shape_first and o.colour else o.name

    lines = ["objects: " + ", ".join(o.name for o in listed())]
    if any(o.colour for o in objs):
        lines.append("colours: " + ", ".join(f"{o.kind} {o.colour}" for o in listed() if o.colour))
    coord = {"across": lambda o: o.cx, "down": lambda o: o.cy}
    value = {"sizes": lambda o: o.size, "across": lambda o: _tenth(o.cx), "down": lambda o: _tenth(o.cy)}
    at = lambda o, line: f"{name(o, line)} {value[line](o)}"  # noqa: E731
    for line in ("sizes", "across", "down"):
        lines.append(f"{line}: " + ", ".join(at(o, line) for o in listed()))
    for line in ranked:
        if line == "sizes":  # two values: ties keep a random order
            entries = (at(o, line) for o in sorted(listed(), key=lambda o: o.size == "large"))
        else:
            entries = (at(o, line) for o in sorted(objs, key=coord[line]))
        lines.append(f"{RANKED[line]}: " + ", ".join(entries))
    if pairs:
        named = unique_by(objs, lambda o: o.name)  # the objects a position question can name
        for line in ("across", "down"):
            drawn = rng.sample([(a, b) for a in named for b in named if a is not b], min(pairs, len(named) * (len(named) - 1)))
            if drawn:
                lines.append(f"{line} pairs: " + ", ".join(
                    f"{a.name} and {b.name} {value[line](a)} {value[line](b)}" for a, b in drawn))
    return "\n".join(lines)


def _tenth(v: float) -> str:
    """A normalised coordinate as the table writes it: its tenth, ``0``..``9``."""
    return str(min(9, max(0, int(v * 10))))


def reading_layout(tokenizer) -> str:
    """The layout a tokenizer's LM was pretrained to read (saved with the tokenizer; models from
    before layouts existed read ``boxes``)."""
    return tokenizer.init_kwargs.get("reading_layout", "boxes")


def reading_context(ctx: SymbolicContext, layout: str = "table", rng: random.Random | None = None) -> str:
    """The scene as text for the reading LM: :func:`scene_table` or :func:`object_lines`.

    ``shuffled``, ``crossed``, ``ranked``, ``sized`` and ``paired`` order each line at random: by ``rng`` while pretraining (a new
    order every time a scene is read), else by the scene's id (the same text every time)."""
    if layout == "table":
        return scene_table(ctx)
    if layout in SHUFFLED:
        rng = rng if rng is not None else random.Random(f"{ctx.image_id}:{layout}")
        shape_first, ranked, pairs = SHUFFLED[layout]
        return scene_table(ctx, rng, shape_first, ranked, pairs)
    if layout == "boxes":
        return object_lines(ctx)
    raise ValueError(f"unknown reading layout {layout!r}; expected one of {LAYOUTS}")


def object_lines(ctx: SymbolicContext) -> str:
    """The ``name: [x1, y1, x2, y2]`` lines of ``ctx.text()`` (no captions), in the file's order."""
    text = ctx.text()
    lines = text.split("\n\n", 1)[1] if "\n\n" in text else ""
    if len(lines.split("\n")) != len(ctx.objects):
        raise ValueError(f"image {ctx.image_id}: expected {len(ctx.objects)} object lines, found {lines!r}")
    return lines


def _content_key(qa: ExactQA) -> tuple:
    """What a question asks, without its wording (two phrasings of one question share it)."""
    return (qa.qtype, qa.answer, tuple(w for w in re.findall(r"[a-z]+", qa.question.lower()) if w in _CONTENT))


_CONTENT = {"red", "orange", "yellow", "green", "blue", "purple", "circle", "square", "triangle", "circles",
            "squares", "triangles", "shape", "shapes", "object", "objects"}


def scene_questions(ctx: SymbolicContext, rng: random.Random, n: int,
                    type_weights: dict[str, float] | None = None) -> list[ExactQA]:
    """Up to ``n`` questions about one scene, no question asked twice in other words (a repeated
    question could be answered by copying the earlier answer). Types are drawn evenly, or in
    proportion to ``type_weights`` (a type that does not apply to the scene falls back to
    another)."""
    out, seen = [], set()
    types, weights = (list(type_weights), list(type_weights.values())) if type_weights else (None, None)
    for _ in range(n * 4):
        qtype = rng.choices(types, weights)[0] if types else None
        qa = exact_question(ctx.objects, rng, qtype) or (exact_question(ctx.objects, rng) if qtype else None)
        if qa and _content_key(qa) not in seen:
            seen.add(_content_key(qa))
            out.append(qa)
            if len(out) == n:
                break
    return out


def box_question(ctx: SymbolicContext, rng: random.Random) -> ExactQA | None:
    """``Where is the red circle?`` -> its box as the context writes it (a grounding question,
    only for a name the scene holds once). It makes the model find a line by its name and read
    its digits, which position and size questions need."""
    names = Counter(o.name for o in ctx.objects)
    cands = [o for o in ctx.objects if names[o.name] == 1]
    if not cands:
        return None
    o = rng.choice(cands)
    return ExactQA("box", f"Where is the {o.name}?", "[" + ", ".join(f"{v:.3f}" for v in o.box) + "]")


DRILLS = {"size": "What size is the {}?", "across": "How far across is the {}?", "down": "How far down is the {}?"}


def lookup_drill(ctx: SymbolicContext, rng: random.Random, no_size_of: frozenset[str] = frozenset()) -> ExactQA | None:
    """A question of the ``table`` layout answered by one lookup, with no options offered:
    ``What size is the red circle?`` -> ``large``, ``How far across is the red circle?`` -> ``2``.
    The exact size and position questions offer both answers in the question (``small or
    large?``), and a small LM first learns to pick one of those words; the drills make it find
    the value beside a name, which those questions need (only for a name the scene holds once).
    ``None`` also when the drawn drill asks the size of a name in ``no_size_of`` (a document
    that asks that object's size question would let the answer be copied)."""
    names = Counter(o.name for o in ctx.objects)
    cands = [o for o in ctx.objects if names[o.name] == 1]
    if not cands:
        return None
    o, kind = rng.choice(cands), rng.choice(list(DRILLS))
    if kind == "size" and o.name in no_size_of:
        return None
    answer = {"size": o.size, "across": _tenth(o.cx), "down": _tenth(o.cy)}[kind]
    return ExactQA("drill", DRILLS[kind].format(o.name), answer)


def reading_documents(contexts: Sequence[SymbolicContext], rng: random.Random, qa_per_doc: int = 8,
                      caption_share: float = 0.05, box_share: float = 0.0,
                      type_weights: dict[str, float] | None = None, layout: str = "table",
                      drill_share: float = 0.0) -> list[list[dict]]:
    """One chat document per context: the reading context, then ``qa_per_doc`` questions and
    their answers (the first question shares the first user turn with the context). A
    ``caption_share`` of documents instead asks for a caption and gets one of the scene's; in a
    ``box_share`` of documents one question is replaced by a grounding question
    (:func:`box_question`, ``boxes`` layout); a ``drill_share`` of the questions are lookup
    drills (:func:`lookup_drill`, ``table`` layout)."""
    docs = []
    for ctx in contexts:
        lines = reading_context(ctx, layout, rng)
        if ctx.captions and rng.random() < caption_share:
            docs.append([{"role": "user", "content": f"{lines}\n{CAPTION_PROMPT}"},
                         {"role": "assistant", "content": rng.choice(ctx.captions)}])
            continue
        qas = scene_questions(ctx, rng, qa_per_doc, type_weights)
        if box_share and rng.random() < box_share:
            box = box_question(ctx, rng)
            if box:
                qas = qas[: qa_per_doc - 1]
                qas.insert(rng.randrange(len(qas) + 1), box)
        if drill_share:
            sized = frozenset(o.name for o in ctx.objects
                              if any(q.qtype == "size" and f"the {o.name} " in q.question for q in qas))
            for i in range(len(qas)):
                if rng.random() < drill_share:
                    qas[i] = lookup_drill(ctx, rng, sized) or qas[i]
            qas = list({qa.question: qa for qa in qas}.values())  # a drill drawn twice is asked once
        if not qas:
            continue
        doc = []
        for i, qa in enumerate(qas):
            doc.append({"role": "user", "content": f"{lines}\n{qa.question}" if i == 0 else qa.question})
            doc.append({"role": "assistant", "content": qa.answer})
        docs.append(doc)
    return docs


class ChatEncoder:
    """Token ids and loss labels of chat documents, equal to ``apply_chat_template``'s rendering.

    Pieces (a question, an answer, a context) are tokenized once and cached; the special tokens
    split the text, so a document's tokens are the concatenation of its pieces' tokens.
    """

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.user, self.assistant, self.end = (tokenizer.convert_tokens_to_ids(t) for t in (USER, ASSISTANT, END))
        self._piece = lru_cache(maxsize=200_000)(lambda s: tuple(tokenizer.encode(s, add_special_tokens=False)))

    def encode(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """``(ids, labels)``: labels are the ids on assistant content and its ``<|end|>``, else -100."""
        ids, labels = [], []
        for m in messages:
            role = m["role"]
            if role == "system":
                part = list(self._piece(m["content"] + "\n"))
                ids += part
                labels += [-100] * len(part)
                continue
            head = {"user": self.user, "assistant": self.assistant}.get(role)
            if head is None:
                raise ValueError(f"unknown chat role {role!r} (expected system, user or assistant)")
            body = list(self._piece(m["content"])) + [self.end]
            ids += [head] + body
            labels += [-100] + (body if role == "assistant" else [-100] * len(body))
        return ids, labels

    def prompt(self, messages: list[dict]) -> list[int]:
        """Ids of ``messages`` followed by the generation prompt ``<|assistant|>``."""
        return self.encode(messages)[0] + [self.assistant]


def collate(pairs: list[tuple[list[int], list[int]]], pad_id: int, multiple: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``[B, T]`` ids and labels (padding is -100 in labels), ``T`` a multiple of
    ``multiple`` (few distinct shapes keep the CPU kernels' caches small). Causal attention never
    looks right, so right padding needs no attention mask."""
    T = -(-max(len(i) for i, _ in pairs) // multiple) * multiple
    ids = torch.full((len(pairs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), T), -100, dtype=torch.long)
    for b, (i, l) in enumerate(pairs):
        ids[b, : len(i)] = torch.tensor(i)
        labels[b, : len(l)] = torch.tensor(l)
    return ids, labels


def as_text_document(pair: tuple[list[int], list[int]], weight: float) -> tuple[list[int], list[float]]:
    """A reading document read as plain text: every token is predicted, the answers with weight
    1 and the rest (context lines, questions, role tokens) with ``weight``."""
    ids, labels = pair
    return ids, [1.0 if l != -100 else weight for l in labels]


# ------------------------------------------------------------------------------ model
@dataclass
class LMConfig:
    """The tiny Llama and how it is pretrained."""

    lm_hidden: int = 192
    lm_layers: int = 4
    lm_heads: int = 6
    lm_intermediate: int = 512
    lm_max_positions: int = 1024
    lm_rope_theta: float = 10000.0
    vocab_size: int = 512  # BPE target size
    steps: int = 2000
    batch_size: int = 32
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    qa_per_doc: int = 8
    layout: str = "table"  # how a context is written: "table", "shuffled", "crossed", "ranked", "sized", "paired" (scene_table) or "boxes" (object_lines)
    drill_share: float = 0.0  # questions replaced by lookup drills (table layout; see lookup_drill)
    lr_schedule: str = "cosine"  # after warmup: "cosine" to min_lr, "constant", or "wsd" (constant, then cosine
    decay_share: float = 0.3     # to min_lr over this last share of the steps)
    caption_share: float = 0.05
    box_share: float = 0.0  # documents with one grounding question ("Where is the red circle?")
    type_weights: dict[str, float] | None = None  # question types drawn in these proportions (None: evenly)
    text_share: float = 0.0  # documents read as plain text (context and questions predicted too)
    text_weight: float = 0.2  # weight of a plain-text document's non-answer tokens
    curriculum_steps: int = 0  # for this many steps only scenes of <= curriculum_objects objects
    curriculum_objects: int = 2
    bf16: bool = True
    seed: int = 0
    threads: int = 2
    device: str = "cpu"  # "cuda" trains on a GPU (bf16 autocast there too); the shipped LM's card says which
    workers: int = 0  # processes building the documents beside the loop (0: none); a GPU step outruns the building
    eval_every: int = 250
    eval_scenes: int = 150
    checkpoint_every: int = 250
    length_group: int = 4  # batches drawn together and sorted by length (less padding)


# where and how fast a run goes, not what it learns: a checkpoint resumes under other values of these
RUNTIME_FIELDS = ("device", "threads", "workers")


def build_model(cfg: LMConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.lm_hidden, intermediate_size=cfg.lm_intermediate,
        num_hidden_layers=cfg.lm_layers, num_attention_heads=cfg.lm_heads, num_key_value_heads=cfg.lm_heads,
        max_position_embeddings=cfg.lm_max_positions, rope_theta=cfg.lm_rope_theta, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(END),
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


def load_tiny_lm(path: str | Path):
    """``(model, tokenizer)`` from a directory written by :func:`pretrain_lm` (or any
    ``save_pretrained`` causal LM with a chat tokenizer), in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: no config.json; expected a save_pretrained model directory")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    return model, tokenizer


# ------------------------------------------------------------------------------ evaluation
def eval_questions(contexts: Sequence[SymbolicContext], per_scene: int = 6, seed: int = 1234):
    """A fixed list of ``(context, ExactQA)``: ``per_scene`` questions per scene."""
    out = []
    for ctx in contexts:
        rng = random.Random(f"{seed}:{ctx.image_id}")
        out += [(ctx, qa) for qa in scene_questions(ctx, rng, per_scene)]
    return out


@torch.no_grad()
def text_only_accuracy(model, tokenizer, contexts: Sequence[SymbolicContext], per_scene: int = 6,
                       batch_size: int = 64, max_new_tokens: int = 4, seed: int = 1234,
                       progress: bool = False, layout: str | None = None) -> dict:
    """Exact-answer accuracy from the symbolic context alone (the reading context + question in the
    first user turn), greedy, batched with a KV cache. Returns overall and per-type accuracy,
    question counts and each type's most-common-answer baseline."""
    enc = ChatEncoder(tokenizer)
    layout = layout or reading_layout(tokenizer)
    items = eval_questions(contexts, per_scene, seed)
    prompts = [enc.prompt([{"role": "user", "content": f"{reading_context(c, layout)}\n{qa.question}"}])
               for c, qa in items]
    from .evaluate import greedy_replies

    was_training = model.training
    model.eval()
    try:
        replies = greedy_replies(model.generate, prompts, tokenizer.pad_token_id, enc.end,
                                 lambda t: tokenizer.decode(t, skip_special_tokens=True), batch_size,
                                 max_new_tokens=max_new_tokens, returns_prompt=True, progress=progress,
                                 device=model.device)
    finally:
        model.train(was_training)

    per_type, answers = defaultdict(list), defaultdict(Counter)
    for (ctx, qa), reply in zip(items, replies):
        per_type[qa.qtype].append(is_correct(reply, qa.answer))
        answers[qa.qtype][qa.answer] += 1
    result = {"overall": sum(sum(v) for v in per_type.values()) / max(1, len(items)), "questions": len(items),
              "scenes": len(contexts), "accuracy": {}, "baseline": {}, "count": {}}
    for t in QTYPES:
        if per_type[t]:
            result["accuracy"][t] = sum(per_type[t]) / len(per_type[t])
            result["baseline"][t] = answers[t].most_common(1)[0][1] / len(per_type[t])
            result["count"][t] = len(per_type[t])
    result["examples"] = [{"context": reading_context(c, layout), "question": qa.question, "answer": qa.answer, "reply": r}
                          for (c, qa), r in list(zip(items, replies))[:5]]
    return result


# ------------------------------------------------------------------------------ training
def _lr_at(step: int, cfg: LMConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "wsd":  # warmup, stable, decay
        start = int(cfg.steps * (1 - cfg.decay_share))
        if step < start:
            return cfg.lr
        return _cosine(cfg, (step - start) / max(1, cfg.steps - start))
    if cfg.lr_schedule != "cosine":
        raise ValueError(f"lr_schedule {cfg.lr_schedule!r}: expected cosine, constant or wsd")
    return _cosine(cfg, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))


def _cosine(cfg: LMConfig, t: float) -> float:
    """From ``cfg.lr`` at ``t`` = 0 down to ``cfg.min_lr`` at ``t`` >= 1."""
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


class DocStream:
    """Deterministic batches: step ``s`` always gets the same documents (so a resumed run sees
    the same data). ``length_group`` batches are drawn together and sorted by length."""

    def __init__(self, contexts, encoder: ChatEncoder, cfg: LMConfig, pad_id: int):
        self.contexts, self.enc, self.cfg, self.pad_id = contexts, encoder, cfg, pad_id
        self._group, self._cached = None, None
        self.small = [c for c in contexts if len(c.objects) <= cfg.curriculum_objects] or list(contexts)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g, k = divmod(step, self.cfg.length_group)
        if self._group != g:
            rng = random.Random(f"{self.cfg.seed}:docs:{g}")
            n = self.cfg.batch_size * self.cfg.length_group
            pool = self.small if step < self.cfg.curriculum_steps else self.contexts
            scenes = [pool[rng.randrange(len(pool))] for _ in range(n)]
            args = (self.cfg.qa_per_doc, self.cfg.caption_share, self.cfg.box_share, self.cfg.type_weights,
                    self.cfg.layout, self.cfg.drill_share)
            docs = reading_documents(scenes, rng, *args)
            while len(docs) < n:  # a scene without questions is rare; top up
                docs += reading_documents([pool[rng.randrange(len(pool))]], rng, *args)
            pairs = [self.enc.encode(d) for d in docs[:n]]
            # token weights: reading documents weigh their answers only; a text_share of them is
            # read as plain text (every token predicted, non-answers with text_weight)
            weighted = [as_text_document(p, self.cfg.text_weight if rng.random() < self.cfg.text_share else 0.0)
                        for p in pairs]
            self._group, self._cached = g, sorted(weighted, key=lambda p: len(p[0]))
        B = self.cfg.batch_size
        chunk = self._cached[k * B: (k + 1) * B]
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
        n = self.stream.cfg.length_group
        return [self.stream.batch((self.first + i) * n + k) for k in range(n)]


def stream_batches(stream: DocStream, start: int, steps: int, workers: int = 0):
    """``stream.batch(s)`` for ``s`` in ``start .. steps - 1``, built in order in the loop or, with
    ``workers`` > 0, a group of batches at a time in that many background processes (the same
    batches: each step's documents depend on its step alone)."""
    if workers <= 0:
        for s in range(start, steps):
            yield stream.batch(s)
        return
    n = stream.cfg.length_group
    first, last = start // n, -(-steps // n)
    loader = torch.utils.data.DataLoader(_Groups(stream, first, last), batch_size=None, num_workers=workers,
                                         prefetch_factor=4)
    s = first * n
    for group in loader:
        for b in group:
            if start <= s < steps:
                yield b
            s += 1


def lm_loss(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over the tokens whose label is not -100."""
    logits = model(input_ids=ids).logits  # [B, T, V]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def weighted_lm_loss(model, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Next-token loss, each target token weighted (``weights`` [B, T], 0 = not predicted)."""
    logits = model(input_ids=ids).logits  # [B, T, V]
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")  # [B*(T-1)]
    w = weights[:, 1:].flatten()
    return (nll * w).sum() / w.sum().clamp_min(1e-8)


def pretrain_lm(pretrain: Sequence[SymbolicContext], val: Sequence[SymbolicContext], out: str | Path,
                cfg: LMConfig, tokenizer=None, progress: bool = True,
                on_eval: Callable[[int, dict], None] | None = None):
    """Pretrain the tiny LM on reading documents from ``pretrain`` scenes; score it on ``val``.

    Writes to ``out``: ``log.jsonl`` (one line per step: loss, lr, seconds; eval lines with
    per-type accuracy), ``checkpoint.pt`` every ``checkpoint_every`` steps (a stopped run
    resumes from it), and at the end the model and tokenizer (``save_pretrained``) plus
    ``metrics.json``. Returns ``(model, tokenizer, metrics)``.
    """
    dev = training_device(cfg.device)  # before any work: a missing GPU fails at once
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(True)
    if tokenizer is None:  # trained once, saved beside the model (a resumed run reloads it)
        if (out / "tokenizer.json").exists() and (out / "checkpoint.pt").exists():
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(out)
        else:
            tokenizer = train_tokenizer(tokenizer_corpus(pretrain[:5000], cfg.seed, layout=cfg.layout), cfg.vocab_size)
            tokenizer.init_kwargs["reading_layout"] = cfg.layout
            tokenizer.save_pretrained(out)
    model = build_model(cfg, tokenizer).to(dev)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    start, elapsed = 0, 0.0
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False, map_location=dev)
        saved, now = state["config"], asdict(cfg)
        differ = sorted(k for k in set(saved) | set(now) if k not in RUNTIME_FIELDS and saved.get(k) != now.get(k))
        if differ:
            changes = ", ".join(f"{k}: {saved.get(k)!r} there, {now.get(k)!r} now" for k in differ)
            raise ValueError(f"{ckpt}: written with other settings ({changes}); delete it or resume with the same settings")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, elapsed = state["step"], state["elapsed"]
        log.info("resuming from %s at step %d", ckpt, start)
    stream = DocStream(pretrain, ChatEncoder(tokenizer), cfg, tokenizer.pad_token_id)
    log_path = out / "log.jsonl"
    if log_path.exists():  # keep what the checkpoint covers (nothing on a fresh start)
        kept = [line for line in log_path.read_text().splitlines() if line and json.loads(line)["step"] <= start]
        io.write_text(log_path, "".join(line + "\n" for line in kept))
    n_params = sum(p.numel() for p in model.parameters())
    log.info("tiny LM: %.2fM parameters, %d steps of %d documents", n_params / 1e6, cfg.steps, cfg.batch_size)
    model.train()
    bar = tqdm(range(start, cfg.steps), desc="pretrain LM", disable=not progress, initial=start, total=cfg.steps)
    t0 = time.perf_counter() - elapsed
    with open(log_path, "a") as logf:
        for step, (ids, weights) in zip(bar, stream_batches(stream, start, cfg.steps, cfg.workers)):  # [B, T]
            ids, weights = ids.to(dev, non_blocking=True), weights.to(dev, non_blocking=True)
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, cfg)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                loss = weighted_lm_loss(model, ids, weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            rec = {"step": step + 1, "loss": round(loss.item(), 5), "lr": round(opt.param_groups[0]["lr"], 7),
                   "tokens": ids.numel(), "seconds": round(time.perf_counter() - t0, 2)}
            logf.write(json.dumps(rec) + "\n")
            if (step + 1) % 10 == 0:
                logf.flush()
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
            done = step + 1
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                logf.flush()
                with io.atomic_path(ckpt) as tmp:
                    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": done,
                                "elapsed": time.perf_counter() - t0, "config": asdict(cfg)}, tmp)
            if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps) and val:
                m = text_only_accuracy(model, tokenizer, val[: cfg.eval_scenes])
                model.train()
                ev = {"step": done, "seconds": round(time.perf_counter() - t0, 2), "eval_overall": round(m["overall"], 4),
                      **{f"eval_{k}": round(v, 4) for k, v in m["accuracy"].items()}}
                logf.write(json.dumps(ev) + "\n")
                logf.flush()
                log.info("step %d: %s", done, ev)
                if on_eval:
                    on_eval(done, m)
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    metrics = {"parameters": n_params, "steps": cfg.steps, "train_seconds": round(time.perf_counter() - t0, 1),
               "config": asdict(cfg)}
    io.write_json(out / "metrics.json", metrics, indent=2)
    if ckpt.exists():
        ckpt.unlink()
    return model, tokenizer, metrics


@torch.no_grad()
def heldout_perplexity(model, tokenizer, contexts: Sequence[SymbolicContext], qa_per_doc: int = 8,
                       caption_share: float = 0.05, batch_size: int = 32, seed: int = 1234) -> float:
    """``exp`` of the mean loss per supervised token (answers, captions and their ``<|end|>``) on
    reading documents of held-out scenes."""
    enc = ChatEncoder(tokenizer)
    docs = reading_documents(contexts, random.Random(seed), qa_per_doc, caption_share)
    pairs = sorted((enc.encode(d) for d in docs), key=lambda p: len(p[0]))
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for s in range(0, len(pairs), batch_size):
        ids, labels = collate(pairs[s: s + batch_size], tokenizer.pad_token_id)  # [B, T]
        ids, labels = ids.to(model.device), labels.to(model.device)
        n = int((labels[:, 1:] != -100).sum())
        total += lm_loss(model, ids, labels).item() * n
        count += n
    model.train(was_training)
    return math.exp(total / max(1, count))


def export_checkpoint(out: str | Path) -> tuple:
    """Save the model of ``out/checkpoint.pt`` (a run stopped early) with ``save_pretrained``
    beside its tokenizer, keeping the checkpoint so the run can still be resumed.
    Returns ``(model, tokenizer, step)``."""
    from transformers import AutoTokenizer

    out = Path(out)
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = build_model(LMConfig(**state["config"]), tokenizer)
    model.load_state_dict(state["model"])
    model.eval()
    model.save_pretrained(out)
    return model, tokenizer, state["step"]


# ------------------------------------------------------------------------------ report
def read_log(path: str | Path) -> tuple[list[dict], list[dict]]:
    """The training lines and the eval lines of a ``log.jsonl``."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r], [r for r in rows if "eval_overall" in r]


def plot_training(log_path: str | Path, png: str | Path, smooth: int = 25) -> None:
    """Answer loss (smoothed) and held-out accuracy per question type against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = read_log(log_path)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in train]
    loss = [r["loss"] for r in train]
    sm = [sum(loss[max(0, i - smooth + 1): i + 1]) / len(loss[max(0, i - smooth + 1): i + 1]) for i in range(len(loss))]
    a.plot(steps, loss, alpha=0.25, color="C0")
    a.plot(steps, sm, color="C0")
    a.set(xlabel="step", ylabel="training loss (answers + weighted text)", yscale="log", title="pretraining loss")
    for t in ("overall",) + QTYPES:
        key = f"eval_{t}"
        pts = [(r["step"], r[key]) for r in evals if key in r]
        if pts:
            b.plot(*zip(*pts), marker=".", label=t, lw=2.5 if t == "overall" else 1.2)
    b.set(xlabel="step", ylabel="text-only accuracy", ylim=(0, 1.02), title="held-out accuracy (val scenes)")
    b.legend(fontsize=8)
    fig.tight_layout()
    with io.atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------ command line
def _world_contexts(world: Path, split: str) -> list[SymbolicContext]:
    inst, caps = world / "annotations" / f"instances_{split}.json", world / "annotations" / f"captions_{split}.json"
    if not inst.exists():
        raise FileNotFoundError(f"{inst}: no {split} split; run `llava-lite world` first or drop --world")
    return load_contexts(inst, caps)


def train_and_report(out: str | Path, cfg: LMConfig, world: str | Path | None = None, preset: str = "tiny",
                     eval_split: str = "test", progress: bool = True) -> dict:
    """The whole recipe behind the shipped LM: the world's ``pretrain`` split (generated if
    missing), tokenizer, pretraining, then text-only accuracy and perplexity on ``eval_split``,
    written to ``out/metrics.json`` with a training plot."""
    from .config import get_preset
    from .paths import Layout
    from .world import generate

    out = Path(out)
    world = Path(world) if world else Layout.for_preset(preset).world
    if not (world / "annotations" / "instances_pretrain.json").exists():
        log.info("no world in %s: generating the %s preset's world", world, preset)
        generate(get_preset(preset).world, world, progress=progress)
    pretrain, val = _world_contexts(world, "pretrain"), _world_contexts(world, "val")
    heldout = _world_contexts(world, eval_split)
    model, tokenizer, metrics = pretrain_lm(pretrain, val, out, cfg, progress=progress)
    acc = text_only_accuracy(model, tokenizer, heldout, progress=progress)
    metrics.update({"eval_split": eval_split, "text_only": acc,
                    "perplexity": heldout_perplexity(model, tokenizer, heldout)})
    io.write_json(out / "metrics.json", metrics, indent=2)
    plot_training(out / "log.jsonl", out / "training.png")
    log.info("text-only accuracy on %d %s scenes: %.3f overall; %s; perplexity %.3f", len(heldout), eval_split,
             acc["overall"], ", ".join(f"{k} {v:.3f}" for k, v in acc["accuracy"].items()), metrics["perplexity"])
    return metrics


def _register_lm(sub) -> None:
    p = sub.add_parser("lm", help="train the BPE tokenizer and pretrain the tiny Llama to read contexts")
    p.add_argument("--out", required=True, help="folder for the model, tokenizer, log and metrics")
    p.add_argument("--world", help="world folder with a pretrain split (default: outputs/<preset>/world)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--eval-split", default="test")
    defaults = LMConfig()
    for f in asdict(defaults):
        v = getattr(defaults, f)
        flag = "--" + f.replace("_", "-")
        if isinstance(v, bool):
            p.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=v, metavar="BOOL")
        elif v is None or isinstance(v, dict):
            p.add_argument(flag, type=json.loads, default=v, metavar="JSON")
        else:
            p.add_argument(flag, type=type(v), default=v)

    def run(args):
        cfg = LMConfig(**{f: getattr(args, f) for f in asdict(defaults)})
        train_and_report(args.out, cfg, args.world, args.preset, args.eval_split)

    p.set_defaults(func=run)


# sub-commands of `llava-lite backbones`; llava_lite.clip_pretrain adds `clip` through
# register_cli_clip (found below) or by appending its registrar here
SUBCOMMANDS: list[Callable] = [_register_lm]


def register_cli(sub) -> None:
    import importlib

    p = sub.add_parser("backbones", help="pretrain the tiny backbones (lm: tokenizer + Llama; clip: tiny CLIP)")
    inner = p.add_subparsers(dest="backbone", required=True, metavar="BACKBONE")
    registrars = list(SUBCOMMANDS)
    try:
        clip = importlib.import_module("llava_lite.clip_pretrain")
    except ModuleNotFoundError as e:
        if e.name != "llava_lite.clip_pretrain":
            raise
    else:
        extra = getattr(clip, "register_cli_clip", None)
        if extra is not None and extra not in registrars:
            registrars.append(extra)
    for register in registrars:
        register(inner)
