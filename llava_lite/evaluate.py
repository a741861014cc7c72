"""The exact-answer score: did stage 2 work?

Each ``exact`` sample of the ``test`` split holds questions with one checkable answer (count,
colour, shape, position, exist, size). Every question is asked on its own (image + question, one
turn), answered by batched greedy generation with a KV cache, and compared with the truth after
normalising (``'Three.'`` -> ``three``). Accuracy per question type sits beside

- the most-common-answer baseline (always say the test set's most frequent answer of the type),
- a *blind* model trained the same way without image tokens (what the text alone gives away),
- the tiny LM reading the symbolic context as text (the paper's text-only GPT-4 row).
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import io
from .conversation import IGNORE, IMAGE_TOKEN, Template
from .generate import evaluating, greedy_replies, model_replies, question_prompt, stop_id
from .model import token_loss
from .scene_text import reading_context, reading_layout
from .teachers.questions import QTYPES, is_correct, normalise_answer

log = logging.getLogger(__name__)


@dataclass
class Item:
    sample_id: str
    image: str | None
    qtype: str
    question: str
    answer: str


def exact_items(samples: Sequence[dict]) -> list[Item]:
    """One item per question of every ``exact`` sample (the question without ``<image>``)."""
    items = []
    for s in samples:
        if s.get("type") != "exact":
            continue
        turns = s["conversations"]
        for k, qtype in enumerate(s["qtypes"]):
            q = turns[2 * k]["value"].replace(IMAGE_TOKEN, "").strip()
            items.append(Item(f"{s['id']}/{k}", s.get("image"), qtype, q, turns[2 * k + 1]["value"]))
    return items


def blind_samples(samples: Sequence[dict]) -> list[dict]:
    """The same samples without their images: what a model learns from the text alone."""
    out = []
    for s in samples:
        conv = [dict(t, value=t["value"].replace(IMAGE_TOKEN, "").strip()) for t in s["conversations"]]
        out.append({k: v for k, v in s.items() if k != "image"} | {"conversations": conv})
    return out


def ask_llava(
    model,
    template: Template,
    tokenizer,
    items: Sequence[Item],
    features: Callable[[str], torch.Tensor] | None,
    batch_size: int = 64,
    blind: bool = False,
    progress: bool = False,
    max_new_tokens: int = 4,
) -> list[str]:
    """Replies of a LLaVA model (``blind``: of a model trained without images, asked without them),
    at most ``max_new_tokens`` each (a few for an exact answer, more for the judge's questions)."""
    prompts = [question_prompt(model, template, it.question, it.sample_id, image=not blind) for it in items]

    def extras(idx):
        if blind:
            return {}
        return {"image_features": torch.stack([features(items[i].image) for i in idx])}

    return model_replies(model, tokenizer, prompts, batch_size, max_new_tokens, extras, progress=progress)


def records(items: Sequence[Item], replies: Sequence[str]) -> list[dict]:
    return [
        asdict(it) | {"reply": r, "normalised": normalise_answer(r), "correct": is_correct(r, it.answer)}
        for it, r in zip(items, replies)
    ]


def top_answers(rows: Sequence[dict] | Sequence[Item]) -> dict[str, tuple[str, int]]:
    """Each question type's most frequent true answer and how often it is the answer."""
    answers: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        qtype, answer = (r["qtype"], r["answer"]) if isinstance(r, dict) else (r.qtype, r.answer)
        answers[qtype][answer] += 1
    return {t: c.most_common(1)[0] for t, c in answers.items()}


def score(recs: Sequence[dict]) -> dict:
    """Overall and per-type accuracy of per-question records, with each type's question count and,
    when the records carry the true ``answer``, its most-common-answer share (``baseline``). A type
    with no question is not scored but named in ``not_asked`` (on COCO: colour, shape, position and
    size, which a photo's names and boxes do not settle)."""
    per = defaultdict(list)
    for r in recs:
        per[r["qtype"]].append(r["correct"])
    out = {"overall": sum(r["correct"] for r in recs) / max(1, len(recs)), "questions": len(recs), "accuracy": {},
           "count": {}}  # fmt: skip
    top = top_answers(recs) if recs and all("answer" in r for r in recs) else None
    if top:
        out["baseline"] = {}
    for t in QTYPES:
        if per[t]:
            out["accuracy"][t] = sum(per[t]) / len(per[t])
            out["count"][t] = len(per[t])
            if top:
                out["baseline"][t] = top[t][1] / len(per[t])
    out["not_asked"] = [t for t in QTYPES if not per[t]]
    return out


def most_common_answer(items: Sequence[Item]) -> dict:
    """The baseline that always gives each type's most frequent answer (on these very items)."""
    top = {t: answer for t, (answer, _) in top_answers(items).items()}
    result = score([{"qtype": it.qtype, "correct": it.answer == top[it.qtype]} for it in items])
    result["answers"] = top
    return result


def question_prior(train: Sequence[Item], items: Sequence[Item]) -> dict:
    """The best a model that never sees the image can learn: for each question, the answer the
    *training* items give it most often (a question never seen in training falls back to its
    type's most frequent training answer). Counted, not trained, in a fraction of a second; the
    blind model, trained without image tokens, lands on it. ``unseen``: questions that fell back."""
    per_question: dict[str, Counter] = defaultdict(Counter)
    for it in train:
        per_question[it.question][it.answer] += 1
    per_type = {t: answer for t, (answer, _) in top_answers(train).items()}
    recs, unseen = [], 0
    for it in items:
        seen = per_question.get(it.question)
        unseen += seen is None
        guess = seen.most_common(1)[0][0] if seen else per_type.get(it.qtype)
        recs.append({"qtype": it.qtype, "correct": guess == it.answer})
    result = score(recs)
    result["unseen"] = unseen
    return result


def save(path: str | Path, recs: Sequence[dict], summary: dict) -> None:
    io.write_json(path, {"summary": summary, "records": list(recs)}, indent=1)


def table_rows(results: dict[str, dict]) -> list[dict]:
    """``{row name: score()}`` -> rows for :func:`llava_lite.viz.table` (one column per type)."""
    rows = []
    for name, res in results.items():
        row = {"model": name}
        for t in QTYPES:
            if t in res["accuracy"]:
                row[t] = round(res["accuracy"][t], 3)
        row["all"] = round(res["overall"], 3)
        rows.append(row)
    return rows


# ------------------------------------------------------------------ stage-1 evidence
@torch.no_grad()
def mean_loss(model, examples, collate, batch_size: int = 64) -> float:
    """Mean next-token loss over the learned tokens of ``examples`` (e.g. held-out captions)."""
    total, count = 0.0, 0
    with evaluating(model):
        for s in range(0, len(examples), batch_size):
            batch = collate(examples[s : s + batch_size])
            out = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                image_features=batch.get("image_features"),
            )
            total += token_loss(out.logits, batch["labels"], reduction="sum").item()
            count += int((batch["labels"][:, 1:] != IGNORE).sum())
    return total / max(1, count)


@torch.no_grad()
def nearest_words(
    model, tokenizer, image_features: torch.Tensor, k: int = 3, skip_special: bool = True
) -> list[list[str]]:
    """For each projected image token of one image, the ``k`` vocabulary words whose input
    embeddings are closest (cosine): what the language model "reads" in each patch."""
    emb = model.lm.get_input_embeddings().weight.float()  # [V, D]
    proj = model.projector(image_features.float().unsqueeze(0))[0]  # [P, Dv] -> [P, D]
    sims = torch.nn.functional.normalize(proj, dim=-1) @ torch.nn.functional.normalize(emb, dim=-1).T  # [P, V]
    if skip_special:
        sims[:, tokenizer.all_special_ids] = -2
    top = sims.topk(k, dim=-1).indices  # [P, k]
    return [[tokenizer.convert_ids_to_tokens(int(i)).replace("Ġ", "").strip() for i in row] for row in top]


def describe(
    model,
    template,
    tokenizer,
    images: Sequence[str],
    features: Callable[[str], torch.Tensor],
    instruction: str = "Describe the image briefly.",
    max_new_tokens: int = 24,
    batch_size: int = 32,
) -> list[str]:
    """What the model says about each image when asked ``instruction`` (greedy)."""
    prompts = [question_prompt(model, template, instruction, name) for name in images]
    stop = stop_id(tokenizer) if template.name == "chat" else tokenizer.eos_token_id
    with evaluating(model):
        return greedy_replies(
            model.generate,
            prompts,
            tokenizer.pad_token_id,
            stop,
            lambda t: tokenizer.decode(t, skip_special_tokens=True).strip(),
            batch_size,
            max_new_tokens=max_new_tokens,
            extras=lambda idx: {"image_features": torch.stack([features(images[i]) for i in idx])},
            device=next(model.parameters()).device,
        )


def ask_reader(
    lm,
    template: Template,
    tokenizer,
    items: Sequence[Item],
    contexts: dict,
    batch_size: int = 64,
    max_new_tokens: int = 4,
    progress: bool = False,
) -> list[str]:
    """The language model alone, reading each item's symbolic context as text (in the layout it
    was pretrained on, :func:`~llava_lite.scene_text.reading_context`) in the place where LLaVA
    puts the image: the paper's text-only row. ``contexts`` maps an image file name to its
    :class:`~llava_lite.coco.SymbolicContext`."""
    layout = reading_layout(tokenizer)
    prompts = [
        template.prompt(
            [{"from": "human", "value": f"{reading_context(contexts[it.image], layout)}\n{it.question}"}], it.sample_id
        )
        for it in items
    ]
    return model_replies(lm, tokenizer, prompts, batch_size, max_new_tokens, returns_prompt=True, progress=progress)


# ------------------------------------------------------------------ error analysis
def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% (Wilson) interval of an accuracy of ``successes`` out of ``n``: how far a
    measured share could be from the true one by the luck of which questions were drawn."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def guess_chance(recs: Sequence[dict]) -> dict[str, float]:
    """Per type, what guessing scores: 1 / the number of answers a question offers, where it names
    two or more of its type's answers ("left or right"), else 1 / its type's distinct answers."""
    answers: dict[str, set] = defaultdict(set)
    for r in recs:
        answers[r["qtype"]].add(r["answer"])
    per: dict[str, list[float]] = defaultdict(list)
    for r in recs:
        named = [a for a in answers[r["qtype"]] if re.search(rf"\b{re.escape(a)}\b", r["question"].lower())]
        per[r["qtype"]].append(1 / (len(named) if len(named) >= 2 else len(answers[r["qtype"]])))
    return {t: sum(v) / len(v) for t, v in per.items()}


def error_analysis(recs: Sequence[dict], prior: dict[str, float] | None = None) -> list[dict]:
    """One row per question type: accuracy with its 95% interval, what guessing scores, the question
    prior (``prior``: :func:`question_prior`'s accuracy per type), a reading of where the accuracy
    stands, written from these numbers ("at chance": guessing lies inside the interval), and the
    most frequent mistake."""
    chance = guess_chance(recs)
    rows = []
    for t in QTYPES:
        mine = [r for r in recs if r["qtype"] == t]
        if not mine:
            continue
        right = sum(r["correct"] for r in mine)
        lo, hi = wilson_interval(right, len(mine))
        p = prior.get(t) if prior else None
        if hi < chance[t]:
            reading = "below chance"
        elif lo <= chance[t]:
            reading = "at chance"
        elif p is not None and hi < p:
            reading = "above chance, below the question prior"
        elif p is not None and lo <= p:
            reading = "above chance, at the question prior"
        else:
            reading = "above chance" + (" and the question prior" if p is not None else "")
        wrong = Counter((r["answer"], r["normalised"] or "(nothing)") for r in mine if not r["correct"])
        (truth, said), n = wrong.most_common(1)[0] if wrong else ((None, None), 0)
        rows.append(
            {
                "type": t,
                "questions": len(mine),
                "accuracy": round(right / len(mine), 3),
                "95% interval": f"{lo:.2f}-{hi:.2f}",
                "chance": round(chance[t], 3),
                "over chance": round(right / len(mine) - chance[t], 3),
                **({"question prior": round(p, 3)} if p is not None else {}),
                "reading": reading,
                "most frequent mistake": f"'{said}' for '{truth}' ({n}x)" if n else "-",
            }
        )
    return rows
