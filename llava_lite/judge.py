"""The judge score, LLaVA-Bench style: how good are a model's answers next to the teacher's?

The paper picks 30 COCO images and asks three questions of each, one per response type
(conversation, detailed description, complex reasoning). A text-only teacher answers from the
symbolic context (the reference); the model answers from the image. A judge reads the context,
the question and both answers, rates each from 1 to 10, and the score of a type is

    relative score = mean(model's ratings) / mean(reference's ratings) x 100

Here the same happens on held-out ``test`` scenes with two judges:

* :func:`endpoint_judge`: any OpenAI-compatible chat model, with our prompt and rules
  (``data/prompts/judge/``); each question is judged in both answer orders, the position bias is
  reported, a reply whose two scores cannot be read is counted and never averaged in, and the
  records are appended to a JSONL file so a rerun asks nothing twice.
* :func:`offline_judge`: no network. It checks every fact an answer states (objects, counts,
  colours, shapes, positions, sizes, existence) against the context with the vocabulary of
  :mod:`llava_lite.facts`, counts the objects it names that are not there (CHAIR-style), and turns
  precision and coverage into a 1-10 rating (:data:`SCORE_FORMULA`). On real COCO contexts it
  checks what boxes and names can tell (objects present or absent, counts) and says so.

The question, answer and context files can be read and written in LLaVA-Bench's own layout
(:func:`write_bench`, :func:`read_bench`, :func:`read_answers`), so the real files score too.
"""

from __future__ import annotations

import logging
import random
import re
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import facts, io, jsonl, stages
from .coco import SymbolicContext, load_contexts
from .config import TeacherConfig, get_preset
from .conversation import IMAGE_TOKEN, Template, get_template
from .evaluate import Item, ask_llava
from .facts import COLOURS, NUMBER_WORDS, SHAPES, Obj
from .paths import PROMPTS_DIR, Layout
from .teachers import symbolic
from .teachers.chat import endpoint_for
from .teachers.endpoint import RejectedRequest
from .train import latest_checkpoint

log = logging.getLogger(__name__)

TYPES = ("conversation", "detail", "complex")
# LLaVA-Bench's category names for the three types, and back
OFFICIAL_CATEGORY = {"conversation": "conv", "detail": "detail", "complex": "complex"}
CATEGORY_TYPE = {"conv": "conversation", "conversation": "conversation", "detail": "detail", "complex": "complex"}
# the paper's LLaVA-Bench (COCO) relative scores, LLaVA trained on the full data
PAPER = {"conversation": 83.1, "detail": 75.3, "complex": 96.5, "all": 85.1}
PAPER_IMAGES = 30  # 30 COCO images x 3 types = 90 questions
JUDGE_PROMPTS = PROMPTS_DIR / "judge"
ORDERS = ("reference_first", "model_first")
SCORE_RANGE = (1.0, 10.0)

# the 80 COCO object categories: what an answer about a real photo may name (and invent)
COCO_CATEGORIES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)  # fmt: skip


# ================================================================== the question set
@dataclass
class BenchQuestion:
    """One question of the bench: what is asked about which image, and the teacher's answer."""

    question_id: int | str
    image: str
    category: str  # conversation | detail | complex
    text: str
    reference: str  # the text-only teacher's answer, written from the context
    context: SymbolicContext


def _first_turn(sample: dict) -> tuple[str, str]:
    turns = sample["conversations"]
    return turns[0]["value"].replace(IMAGE_TOKEN, "").strip(), turns[1]["value"]


def build_questions(
    contexts: Sequence[SymbolicContext], images: int = PAPER_IMAGES, seed: int = 0
) -> list[BenchQuestion]:
    """The bench: the first ``images`` contexts (the paper: 30) x the three types, ids 0, 1, 2, ...
    in image order. The symbolic teacher, seeing only the context, writes each question and its
    reference answer (a conversation's first turn stands for the conversation)."""
    if len(contexts) < images:
        raise ValueError(f"the bench wants {images} images, only {len(contexts)} contexts were given")
    out: list[BenchQuestion] = []
    for ctx in contexts[:images]:
        for rtype in TYPES:
            sample = symbolic.sample(ctx, rtype, random.Random(f"{seed}:{ctx.image_id}:{rtype}:0"))
            if sample is None:
                log.info("image %s: no %s question can be asked (no objects)", ctx.image_id, rtype)
                continue
            question, reference = _first_turn(sample)
            out.append(BenchQuestion(len(out), ctx.file_name, rtype, question, reference, ctx))
    return out


# ================================================================== LLaVA-Bench files
BENCH_FILES = {"questions": "questions.jsonl", "context": "context.jsonl", "reference": "reference_answers.jsonl"}


def context_record(ctx: SymbolicContext) -> dict:
    """A context as one line of LLaVA-Bench's context file (captions + instances, normalised boxes)."""
    instances = [{"category": o.name, "bbox": [round(v, 3) for v in o.box]} for o in ctx.objects]
    return {"id": ctx.image_id, "image": ctx.file_name, "captions": list(ctx.captions), "instances": instances}


def write_bench(questions: Sequence[BenchQuestion], folder: str | Path) -> dict[str, Path]:
    """The bench in LLaVA-Bench's layout: questions, contexts and the reference answers (JSONL)."""
    folder = Path(folder)
    paths = {k: folder / name for k, name in BENCH_FILES.items()}
    jsonl.write_jsonl(
        paths["questions"],
        [
            {"question_id": q.question_id, "image": q.image, "text": q.text, "category": OFFICIAL_CATEGORY[q.category]}
            for q in questions
        ],
    )
    contexts = {q.image: q.context for q in questions}
    jsonl.write_jsonl(paths["context"], [context_record(c) for c in contexts.values()])
    jsonl.write_jsonl(
        paths["reference"],
        answer_records(questions, {q.question_id: q.reference for q in questions}, "symbolic-teacher"),
    )
    return paths


def answer_records(questions: Sequence[BenchQuestion], answers: Mapping, model_id: str) -> list[dict]:
    """Answers as LLaVA-Bench writes them: one ``{question_id, text, category, model_id}`` a line."""
    return [
        {
            "question_id": q.question_id,
            "text": answers[q.question_id],
            "category": OFFICIAL_CATEGORY[q.category],
            "model_id": model_id,
        }
        for q in questions
    ]


def _need(rec, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, found {type(rec).__name__}")
    missing = [k for k in keys if k not in rec]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(map(repr, missing))} (has {sorted(rec)})")


def read_contexts(path: str | Path) -> dict[str, SymbolicContext]:
    """LLaVA-Bench's context file: ``{image, captions (or caption), instances: [{category, bbox}]}`` a
    line, boxes ``[x1, y1, x2, y2]`` normalised to 0..1; keyed by image file name."""
    out: dict[str, SymbolicContext] = {}
    for line, rec in jsonl.read_jsonl(path, skip_torn_tail=False):
        where = f"{path}: line {line}"
        _need(rec, ("image",), where)
        captions = rec.get("captions", rec.get("caption"))
        captions = [captions] if isinstance(captions, str) else captions
        if not (isinstance(captions, list) and captions and all(isinstance(c, str) for c in captions)):
            raise ValueError(f"{where}: expected 'captions' (a list of strings), found {captions!r:.80}")
        objects = []
        for k, inst in enumerate(rec.get("instances", [])):
            _need(inst, ("category", "bbox"), f"{where}, instance {k}")
            box = inst["bbox"]
            if not (
                isinstance(box, list)
                and len(box) == 4
                and all(isinstance(v, (int, float)) and -1e-3 <= v <= 1 + 1e-3 for v in box)
                and box[0] <= box[2]
                and box[1] <= box[3]
            ):
                raise ValueError(
                    f"{where}, instance {k}: expected a normalised box [x1, y1, x2, y2] in 0..1, found {box}"
                )
            objects.append(Obj(str(inst["category"]), tuple(float(v) for v in box)))
        if rec["image"] in out:
            raise ValueError(f"{where}: image {rec['image']!r} appears twice")
        out[rec["image"]] = SymbolicContext(
            rec.get("id", line), rec["image"], 0, 0, [" ".join(c.split()) for c in captions], objects
        )
    return out


def read_answers(path: str | Path) -> dict:
    """An answers file (``question_id`` and ``text`` a line, any other keys ignored): id -> text."""
    out: dict = {}
    for line, rec in jsonl.read_jsonl(path, skip_torn_tail=False):
        where = f"{path}: line {line}"
        _need(rec, ("question_id", "text"), where)
        if rec["question_id"] in out:
            raise ValueError(f"{where}: question_id {rec['question_id']!r} answered twice")
        if not isinstance(rec["text"], str):
            raise ValueError(f"{where}: 'text' should be a string, found {type(rec['text']).__name__}")
        out[rec["question_id"]] = rec["text"]
    return out


def read_bench(questions: str | Path, context: str | Path, reference: str | Path) -> list[BenchQuestion]:
    """The bench back from LLaVA-Bench's files (the official ``qa90_questions.jsonl``,
    ``caps_boxes_coco2014_val_80.jsonl``, ``qa90_gpt4_answer.jsonl``, or ours)."""
    contexts, refs = read_contexts(context), read_answers(reference)
    out = []
    for line, rec in jsonl.read_jsonl(questions, skip_torn_tail=False):
        where = f"{questions}: line {line}"
        _need(rec, ("question_id", "image", "text", "category"), where)
        if rec["category"] not in CATEGORY_TYPE:
            raise ValueError(f"{where}: unknown category {rec['category']!r}; expected one of {sorted(CATEGORY_TYPE)}")
        if rec["image"] not in contexts:
            raise ValueError(f"{where}: image {rec['image']!r} is not in the context file {context}")
        if rec["question_id"] not in refs:
            raise ValueError(f"{where}: question {rec['question_id']!r} has no reference answer in {reference}")
        out.append(
            BenchQuestion(
                rec["question_id"],
                rec["image"],
                CATEGORY_TYPE[rec["category"]],
                rec["text"],
                refs[rec["question_id"]],
                contexts[rec["image"]],
            )
        )
    return out


def check_answers(questions: Sequence[BenchQuestion], answers: Mapping, what: str) -> None:
    """Every question has an answer; otherwise an error naming the missing ids."""
    missing = [q.question_id for q in questions if q.question_id not in answers]
    if missing:
        raise ValueError(f"{what}: no answer to {len(missing)} question(s): ids {missing[:10]}")


# ================================================================== the model answers
def answer_questions(
    model,
    template: Template,
    tokenizer,
    questions: Sequence[BenchQuestion],
    features: Callable[[str], torch.Tensor],
    max_new_tokens: int = 96,
    batch_size: int = 32,
    progress: bool = False,
) -> dict:
    """The model's answers from the image (greedy, one turn each): question id -> text."""
    items = [Item(str(q.question_id), q.image, q.category, q.text, q.reference) for q in questions]
    replies = ask_llava(
        model, template, tokenizer, items, features, batch_size, progress=progress, max_new_tokens=max_new_tokens
    )
    return {q.question_id: r.strip() for q, r in zip(questions, replies)}


def checkpoint_answers(
    preset_name: str,
    checkpoint: Path | None = None,
    split: str = "test",
    images: int = PAPER_IMAGES,
    max_new_tokens: int = 96,
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[BenchQuestion], dict]:
    """The bench of a preset's ``split`` and a trained model's answers to it (default: the latest
    stage-2 checkpoint), features from the split's cache (extracted when missing)."""
    preset, layout = get_preset(preset_name), Layout.for_preset(preset_name)
    run = stages.run_dir(layout, 2, preset=preset)
    ckpt = checkpoint or latest_checkpoint(run)
    if ckpt is None:
        raise FileNotFoundError(f"no stage-2 checkpoint under {run}; pass --checkpoint")
    if not layout.instances(split).exists():
        raise FileNotFoundError(
            f"{layout.instances(split)}: no {split} split (run `llava-lite world --preset {preset_name}`)"
        )
    questions = build_questions(load_contexts(layout.instances(split), layout.captions(split)), images, seed)
    tower = stages.load_vision(preset.vision)
    model, tokenizer = stages.load_stage(preset, ckpt, tower)
    feats = stages.split_features(layout, split, tower, progress=progress)
    template = get_template(preset.model.stage2_template, tokenizer)
    answers = answer_questions(model, template, tokenizer, questions, feats, max_new_tokens, progress=progress)
    return questions, answers


# ================================================================== reading a judge's two scores
_NUM = r"(\d+(?:\.\d+)?)"
_LABELLED = [re.compile(rf"assistant\s*{k}\b[^0-9\n]{{0,24}}?{_NUM}", re.IGNORECASE) for k in (1, 2)]
_OUT_OF_TEN = re.compile(rf"{_NUM}\s*(?:/|out of)\s*10\b", re.IGNORECASE)
_LABEL = re.compile(r"^(?:(?:final\s+)?scores?|ratings?)\s*[:=\-]?\s*", re.IGNORECASE)
_PAIR = re.compile(rf"^{_NUM}\s*(?:,|/|;|\s|\band\b|\bvs\.?)\s*{_NUM}\.?$", re.IGNORECASE)


def _in_range(pair: tuple[float, float]) -> tuple[float, float] | None:
    lo, hi = SCORE_RANGE
    return pair if all(lo <= v <= hi for v in pair) else None


def parse_scores(text: str) -> tuple[float, float] | None:
    """The two 1-10 scores a judge put on its first line, or ``None`` when they cannot be read.

    Accepted: ``8 9``, ``8, 9``, ``8/9``, ``8 and 9``, ``Scores: 8 9``, ``**8 9**``, ``8/10 9/10``, and
    labelled scores ``Assistant 1: 8 ... Assistant 2: 9`` on the first line or the first two
    lines (either label first). Refused: one number, three or more, a number outside 1-10, words
    around bare numbers, a lone ``9/10`` (one score out of ten), an empty reply. A refused reply
    is counted by the caller, never scored.
    """
    if not isinstance(text, str):
        return None
    lines = [ln.strip() for ln in text.replace("\r\n", "\n").split("\n") if ln.strip()]
    if not lines:
        return None
    head = " ".join(lines[:2])
    labelled = [rx.search(head) for rx in _LABELLED]
    if all(labelled):
        return _in_range((float(labelled[0].group(1)), float(labelled[1].group(1))))
    first = re.sub(r"[*_`#]", "", lines[0]).strip()
    first = _LABEL.sub("", first)
    first = _OUT_OF_TEN.sub(r"\1", first).strip()
    m = _PAIR.match(first)
    return _in_range((float(m.group(1)), float(m.group(2)))) if m else None


# ================================================================== the score
def relative_score(records: Iterable[Mapping]) -> dict[str, float]:
    """``{type: 100 * mean(model) / mean(reference), ..., "all": ...}`` over the records that carry
    both ratings (``reference`` and ``model`` numbers, ``category`` a type); a record whose
    ratings are ``None`` (unreadable, not judged) is left out, never counted as a number. "all"
    pools every rated record, as LLaVA-Bench does. A type with no rated record is absent."""
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for r in records:
        if r.get("reference") is None or r.get("model") is None:
            continue
        for key in (CATEGORY_TYPE.get(r["category"], r["category"]), "all"):
            sums[key][0] += r["reference"]
            sums[key][1] += r["model"]
    return {k: 100 * sums[k][1] / sums[k][0] for k in (*TYPES, "all") if k in sums and sums[k][0] > 0}


def position_bias(records: Iterable[Mapping]) -> dict:
    """How much an answer gains from being shown first, over the questions judged readably in
    both orders: ``bias`` = mean of (reference's rating when first - when second + model's rating
    when first - when second) / 2; ``flips``: questions whose winner changes with the order."""
    by_q: dict = defaultdict(dict)
    for r in records:
        if r.get("reference") is not None and r.get("model") is not None:
            by_q[r["question_id"]][r["order"]] = r
    pairs = [(d["reference_first"], d["model_first"]) for d in by_q.values() if len(d) == 2]
    if not pairs:
        return {"questions": 0, "bias": None, "flips": 0}
    gains = [((a["reference"] - b["reference"]) + (b["model"] - a["model"])) / 2 for a, b in pairs]

    def winner(r):
        return (r["model"] > r["reference"]) - (r["model"] < r["reference"])

    return {
        "questions": len(pairs),
        "bias": sum(gains) / len(gains),
        "flips": sum(winner(a) != winner(b) for a, b in pairs),
    }


def summarise(records: Sequence[Mapping]) -> dict:
    """The table a notebook shows: relative score per type beside the paper's, both mean ratings
    x 10 (as LLaVA-Bench prints them), how many were rated and how many could not be; for the
    offline judge's records, ``unchecked``: the kinds of fact it could not check on some context
    (on COCO: colour, shape, position, size), so a score never reads as covering them."""
    rated = [r for r in records if r.get("reference") is not None and r.get("model") is not None]
    out: dict = {
        "relative": relative_score(records),
        "paper": dict(PAPER),
        "rated": {},
        "unrated": {},
        "reference_mean_x10": {},
        "model_mean_x10": {},
    }
    for t in (*TYPES, "all"):
        mine = [r for r in rated if t == "all" or CATEGORY_TYPE.get(r["category"], r["category"]) == t]
        out["rated"][t] = len(mine)
        out["unrated"][t] = sum(
            1
            for r in records
            if (t == "all" or CATEGORY_TYPE.get(r["category"], r["category"]) == t) and r not in rated
        )
        if mine:
            out["reference_mean_x10"][t] = 10 * sum(r["reference"] for r in mine) / len(mine)
            out["model_mean_x10"][t] = 10 * sum(r["model"] for r in mine) / len(mine)
    if any("unchecked" in r for r in records):
        out["unchecked"] = [k for k in facts.FACT_KINDS if any(k in r.get("unchecked", ()) for r in records)]
    if any("order" in r for r in records):
        out["position_bias"] = position_bias(records)
        out["relative_by_order"] = {o: relative_score(r for r in records if r.get("order") == o) for o in ORDERS}
    return out


def table_rows(summary: Mapping, name: str = "ours") -> list[dict]:
    """Ours beside the paper's, one row each, for :func:`llava_lite.viz.table`."""
    rows = []
    for label, scores in ((name, summary["relative"]), ("paper (LLaVA, full data)", summary["paper"])):
        rows.append({"model": label, **{k: round(scores[k], 1) if k in scores else None for k in (*TYPES, "all")}})
    return rows


# ================================================================== the endpoint judge
@dataclass(frozen=True)
class JudgePrompts:
    system: str
    rules: dict[str, str]  # response type -> the rule closing the user message


def load_judge_prompts(folder: str | Path = JUDGE_PROMPTS) -> JudgePrompts:
    """``system.txt`` and ``rules.json`` (one rule per type; ``{context_note}`` / ``{format_note}`` filled in)."""
    folder = Path(folder)
    system_path, rules_path = folder / "system.txt", folder / "rules.json"
    if not system_path.is_file():
        raise FileNotFoundError(f"{system_path}: the judge's system message is missing")
    system = system_path.read_text(encoding="utf-8").strip()
    raw = io.read_json(rules_path)
    missing = [k for k in (*TYPES, "context_note", "format_note") if not isinstance(raw.get(k), str)]
    if missing:
        raise ValueError(f"{rules_path}: missing text for {missing}")
    notes = {"context_note": raw["context_note"], "format_note": raw["format_note"]}
    return JudgePrompts(system, {t: raw[t].format(**notes) for t in TYPES})


def judge_messages(prompts: JudgePrompts, question: BenchQuestion, first: str, second: str) -> list[dict]:
    """The request: the context, the question, assistant 1's and assistant 2's answers each between
    its own markers, then the rule for the question's type."""
    user = (
        f"[Context]\n{question.context.text()}\n\n[Question]\n{question.text}\n\n"
        f"[Assistant 1]\n{first}\n[End of Assistant 1]\n\n[Assistant 2]\n{second}\n[End of Assistant 2]\n\n"
        f"[Instructions]\n{prompts.rules[question.category]}"
    )
    return [{"role": "system", "content": prompts.system}, {"role": "user", "content": user}]


def unit_id(question_id, order: str) -> str:
    return f"{question_id}:{order}"


@dataclass
class JudgeRun:
    """What one :func:`endpoint_judge` run did, and every record in the file after it."""

    asked: int = 0  # requests this run sent for new units (retries not counted)
    already_done: int = 0  # units found in the file: not asked again
    unparseable: int = 0  # replies of this run whose scores could not be read
    rejected: int = 0  # requests the endpoint refused (recorded, not retried)
    records: list[dict] = field(default_factory=list)


def _judge_record(q: BenchQuestion, order: str, reply: str | None, error: str | None = None) -> dict:
    scores = parse_scores(reply) if reply is not None else None
    ref, mod = (None, None) if scores is None else (scores if order == "reference_first" else scores[::-1])
    return {
        "id": unit_id(q.question_id, order),
        "question_id": q.question_id,
        "category": q.category,
        "order": order,
        "reference": ref,
        "model": mod,
        "parsed": scores is not None,
        "raw": reply,
        "error": error,
    }


def endpoint_judge(
    questions: Sequence[BenchQuestion],
    answers: Mapping,
    out_path: str | Path,
    teacher: TeacherConfig,
    *,
    orders: Sequence[str] = ORDERS,
    prompts: JudgePrompts | None = None,
    progress: bool = True,
) -> JudgeRun:
    """Judge every question in each of ``orders`` with the chat endpoint ``teacher`` names, appending
    one record per (question, order) to ``out_path``; units already there are not asked again.
    An unreadable reply is recorded with its raw text and ``None`` ratings; endpoint trouble stops
    the run (what is done stays written: run again to resume). The key stays in the headers."""
    check_answers(questions, answers, "model answers")
    unknown = [o for o in orders if o not in ORDERS]
    if unknown:
        raise ValueError(f"unknown answer orders {unknown}; expected some of {ORDERS}")
    prompts = prompts or load_judge_prompts()
    out_path = Path(out_path)
    run = JudgeRun()
    done = {str(r.get("id")) for _, r in jsonl.read_jsonl(out_path)}
    todo = []
    for q in questions:
        for order in orders:
            if unit_id(q.question_id, order) in done:
                run.already_done += 1
            else:
                todo.append((q, order))
    log.info(
        "judge: %d units, %d already in %s; asking %d",
        len(todo) + run.already_done,
        run.already_done,
        out_path.name,
        len(todo),
    )
    stop = threading.Event()
    endpoint = endpoint_for(teacher, stop)

    def ask(q: BenchQuestion, order: str) -> dict:
        a, b = (
            (q.reference, answers[q.question_id])
            if order == "reference_first"
            else (answers[q.question_id], q.reference)
        )
        try:
            reply = endpoint.complete(judge_messages(prompts, q, a, b)).content
        except RejectedRequest as e:
            return _judge_record(q, order, None, str(e))
        return _judge_record(q, order, reply)

    fatal: BaseException | None = None
    with (
        endpoint,
        jsonl.open_for_append(out_path) as fout,
        ThreadPoolExecutor(max(1, teacher.chat_concurrency)) as pool,
    ):
        futures = [pool.submit(ask, q, o) for q, o in todo]
        for fut in tqdm(as_completed(futures), total=len(futures), disable=not progress, desc="judge", unit="reply"):
            if fut.cancelled():
                continue
            try:
                rec = fut.result()
            except Exception as e:  # endpoint trouble: stop asking, keep what is done
                if fatal is None:
                    fatal = e
                    stop.set()
                    for f in futures:
                        f.cancel()
                continue
            jsonl.append(fout, rec)
            run.asked += 1
            run.rejected += rec["error"] is not None
            run.unparseable += rec["error"] is None and not rec["parsed"]
    run.records = [r for _, r in jsonl.read_jsonl(out_path)]
    if fatal is not None:
        raise RuntimeError(
            f"judge stopped early: {fatal}. {run.asked} judgements were written to {out_path}; run again to resume"
        ) from fatal
    if run.unparseable:
        log.warning("judge: %d of %d replies had no readable scores (counted, not scored)", run.unparseable, run.asked)
    return run


# ================================================================== the offline judge
SCORE_FORMULA = """\
rating = 1 + 9 * F,   F = 2 * P * C / (P + C)   (F = 0 when P or C is 0)
P, precision: facts the answer states correctly / facts of the answer that were checked
C, coverage:  facts of the reference (stated correctly) that the answer states correctly too
              / facts of the reference; with no reference: objects of the context the answer
              names / objects of the context
no checkable fact in the reference: rating = 1 + 9 * P;  none in either: no rating (left out)
an object named that is not in the context counts once, as a wrong existence fact; other claims
about it are not checked again. hallucination rate (CHAIR) = invented objects / objects named"""

SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large"}
GENERIC = ("shape", "object")
HYPOTHETICAL = re.compile(r"\b(?:if|would|leaves?|left over|remain\w*|remov\w+|taking away|half)\b")
_COUNT_WORDS = {w: i for i, w in enumerate(NUMBER_WORDS) if i} | {"zero": 0}
_IRREGULAR = {
    "person": ("people", "persons"),
    "knife": ("knives",),
    "mouse": ("mice",),
    "sheep": ("sheep",),
    "skis": ("skis",),
    "scissors": ("scissors",),
}
_REGIONS = {
    "in the centre": "centre",
    "in the center": "centre",
    "in the middle": "centre",
    **{f"in the {v} {h} corner": f"{v} {h}" for v in ("top", "bottom") for h in ("left", "right")},
    **{f"in the {v} {h}": f"{v} {h}" for v in ("top", "bottom") for h in ("left", "right")},
    "on the left": "left",
    "on the right": "right",
    "at the top": "top",
    "at the bottom": "bottom",
}
_RELATIONS = {v: k for k, v in facts.RELATION_PHRASES.items()}
_INVERSE = {"right of": "left of", "below": "above"}


@dataclass(frozen=True)
class Fact:
    kind: str  # exist | count | colour | shape | position | size
    key: tuple  # what was claimed, in a form two answers can share
    text: str  # the words it was read from
    correct: bool


@dataclass
class JudgeResult:
    """What the offline judge found in one answer, and the 1-10 rating it gives (``None``: nothing
    to judge). ``unchecked`` names the kinds of fact this context cannot check."""

    facts: list[Fact]
    mentioned: list[str]  # objects (names or kinds) the answer says are there
    invented: list[str]  # ... of which the context has none
    precision: float | None
    coverage: float | None
    score: float | None
    unchecked: tuple[str, ...] = ()

    @property
    def checked(self) -> int:
        return len(self.facts)

    @property
    def contradicted(self) -> list[Fact]:
        return [f for f in self.facts if not f.correct]

    @property
    def hallucination_rate(self) -> float:
        return len(self.invented) / len(self.mentioned) if self.mentioned else 0.0


class _Vocabulary:
    """The object words a context's answers may use: every colour x shape in the shapes world,
    the 80 COCO categories for a photo, and the context's own names; singular and plural."""

    def __init__(self, ctx: SymbolicContext):
        coloured = any(o.colour for o in ctx.objects)
        names = {o.name for o in ctx.objects}
        if coloured:
            names |= {f"{c} {s}" for c in COLOURS for s in SHAPES} | set(SHAPES)
        if not coloured or any(o.colour is None for o in ctx.objects):
            names |= set(COCO_CATEGORIES)
        names |= {o.kind for o in ctx.objects}
        self.coloured = coloured
        self.surface: dict[str, str] = {}
        for n in names:
            head, _, last = n.rpartition(" ")
            forms = {last, facts.plural(last), *_IRREGULAR.get(last, ())}
            for f in forms:
                self.surface[f"{head} {f}".strip()] = n
        alts = "|".join(re.escape(s) for s in sorted(self.surface, key=len, reverse=True))
        self.name = rf"(?:{alts})"
        kinds = {n.split()[-1] if n.split()[0] in COLOURS else n for n in names} | set(GENERIC)
        kind_forms = {}
        for k in kinds:
            head, _, last = k.rpartition(" ")
            for f in {last, facts.plural(last), *_IRREGULAR.get(last, ())}:
                kind_forms[f"{head} {f}".strip()] = k
        self.kind_surface = kind_forms
        self.kind = rf"(?:{'|'.join(re.escape(s) for s in sorted(kind_forms, key=len, reverse=True))})"

    def canon(self, surface: str) -> str:
        return self.surface.get(surface) or self.kind_surface[surface]


def _matches(o: Obj, name: str) -> bool:
    return o.name == name or o.kind == name or name in GENERIC


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?;])\s+|\n+", text.lower()) if s.strip()]


def read_facts(ctx: SymbolicContext, text: str) -> tuple[list[Fact], list[str], tuple[str, ...]]:
    """Every fact ``text`` states that ``ctx`` can check, each marked right or wrong; the objects it
    names; and the kinds of fact this context cannot check (colours, shapes, positions and sizes
    on a real photo, whose names carry no colour and whose boxes are not the world's)."""
    v = _Vocabulary(ctx)
    objs = ctx.objects
    checks = facts.checkable_kinds(objs)
    unchecked = tuple(c for c in facts.FACT_KINDS if c not in checks)
    size, colour, num = "|".join(SIZE_WORDS), "|".join(COLOURS), "|".join([*_COUNT_WORDS, r"\d+"])
    region = "|".join(re.escape(r) for r in sorted(_REGIONS, key=len, reverse=True))
    rel = "|".join(re.escape(r) for r in _RELATIONS)
    art = r"(?:the|an?)\s+"
    adj = rf"(?:(?:{size})\s+)?"
    found: dict[tuple, Fact] = {}
    mentioned: list[str] = []

    def present(name: str) -> bool:
        return any(_matches(o, name) for o in objs)

    def add(kind: str, key: tuple, words: str, correct: bool) -> None:
        if kind in checks and key not in found:
            found[key] = Fact(kind, key, words, correct)

    def mention(name: str, words: str) -> None:
        if name in GENERIC:
            return
        if name not in mentioned:
            mentioned.append(name)
        add("exist", ("exist", name, True), words, present(name))

    for s in _sentences(text):
        taken: list[tuple[int, int]] = []
        for m in re.finditer(rf"\b(?:no|zero|not any|n't any|without any)\s+{adj}({v.name})\b", s):
            name = v.canon(m.group(1))
            add("exist", ("exist", name, False), m.group(0), not present(name))
            taken.append(m.span())
        for m in re.finditer(rf"\b({num})\s+(?:({size})\s+)?(?:({colour})\s+)?({v.kind})\b", s):
            n = _COUNT_WORDS.get(m.group(1), None)
            n = int(m.group(1)) if n is None else n
            sz, col, noun = SIZE_WORDS.get(m.group(2) or ""), m.group(3), v.kind_surface[m.group(4)]
            named = f"{col} {noun}" if col and noun not in GENERIC else noun
            if n and named not in GENERIC:
                if not present(named):
                    mention(named, m.group(0))  # an invented object, counted once
                    taken.append(m.span())
                    continue
                if named not in mentioned:
                    mentioned.append(named)
            if HYPOTHETICAL.search(s):
                continue  # a count after removing or selecting objects is not the scene's
            true = sum(
                _matches(o, noun) and (col is None or o.colour == col) and (sz is None or o.size == sz) for o in objs
            )
            add("count", ("count", col, sz, noun, n), m.group(0), true == n)
            taken.append(m.span())
        for m in re.finditer(rf"\b{art}{adj}({v.name})\s+(?:is|sits|lies|appears)?\s*({region})", s):
            name, where = v.canon(m.group(1)), _REGIONS[m.group(2)]
            if present(name):
                ok = any(_matches(o, name) and facts.region(o) == where for o in objs)
                add("position", ("position", name, where), m.group(0), ok)
        for m in re.finditer(rf"\b{art}{adj}({v.name})\s+(?:is|sits|lies)?\s*({rel})\s+{art}{adj}({v.name})\b", s):
            a, r, b = v.canon(m.group(1)), _RELATIONS[m.group(2)], v.canon(m.group(3))
            if present(a) and present(b):
                ok = any(
                    facts.holds(x, r, y) for x in objs if _matches(x, a) for y in objs if _matches(y, b) and y is not x
                )
                key = ("position", b, _INVERSE[r], a) if r in _INVERSE else ("position", a, r, b)
                add("position", key, m.group(0), ok)
        sized = list(re.finditer(rf"\b{art}({v.name})\s+is\s+(?:(?:{region})\s+and\s+)?({size})\b", s))
        sized += [
            m for m in re.finditer(rf"\b({size})\s+({v.name})\b", s) if not any(a <= m.start() < b for a, b in taken)
        ]
        for m in sized:
            w1, w2 = m.group(1), m.group(2)
            name, sz = (v.canon(w1), SIZE_WORDS[w2]) if w2 in SIZE_WORDS else (v.canon(w2), SIZE_WORDS[w1])
            if present(name):
                add("size", ("size", name, sz), m.group(0), any(_matches(o, name) and o.size == sz for o in objs))
        for m in re.finditer(rf"\bthe (?:biggest|largest) (?:one|object|shape|thing) is {art}({v.name})\b", s):
            name = v.canon(m.group(1))
            if present(name) and objs:
                add("size", ("biggest", name), m.group(0), _matches(max(objs, key=lambda o: o.area), name))
        for m in re.finditer(rf"\bthe ({v.kind}) is ({colour})\b", s):
            kind = v.kind_surface[m.group(1)]
            if kind not in GENERIC and present(kind):
                add(
                    "colour",
                    ("colour", kind, m.group(2)),
                    m.group(0),
                    any(o.kind == kind and o.colour == m.group(2) for o in objs),
                )
        for m in re.finditer(rf"\bthe ({colour}) (?:object|shape|one) is an? ({v.kind})\b", s):
            col, kind = m.group(1), v.kind_surface[m.group(2)]
            add("shape", ("shape", col, kind), m.group(0), any(o.colour == col and o.kind == kind for o in objs))
        for m in re.finditer(rf"\b({v.name})\b", s):
            if not any(a <= m.start() < b for a, b in taken):
                mention(v.canon(m.group(1)), m.group(0))
    # "I count the triangles: there are no triangles" names triangles without saying they are there
    absent = {k[1] for k in found if k[0] == "exist" and not k[2]}
    absent |= {k[3] if k[1] is None else f"{k[1]} {k[3]}" for k in found if k[0] == "count" and k[4] == 0}
    kept = [f for k, f in found.items() if not (k[0] == "exist" and k[2] and k[1] in absent)]
    return kept, [n for n in mentioned if n not in absent], unchecked


def offline_judge(context: SymbolicContext, question: str, answer: str, reference: str | None = None) -> JudgeResult:
    """Rate ``answer`` to ``question`` about ``context`` from 1 to 10 without any model:

    rating = 1 + 9 * F,  F = 2 * P * C / (P + C)  (see :data:`SCORE_FORMULA` for P and C).

    Each fact the answer states is checked against the context (:func:`read_facts`); P is the share
    it gets right, C the share of the reference's right facts (or, with no reference, of the
    context's objects) it states right too. ``question`` is kept for the record (the facts of an
    answer are checked whatever was asked)."""
    found, mentioned, unchecked = read_facts(context, answer)
    invented = [n for n in mentioned if not any(_matches(o, n) for o in context.objects)]
    right = {f.key for f in found if f.correct}
    precision = len(right) / len(found) if found else None
    if reference is not None:
        ref_right = {f.key for f in read_facts(context, reference)[0] if f.correct}
        coverage = len(right & ref_right) / len(ref_right) if ref_right else None
    else:
        names = {o.name for o in context.objects}
        coverage = len(names & {k[1] for k in right if k[0] == "exist" and k[2]}) / len(names) if names else None
    if precision is None:
        score = 1.0 if coverage is not None else None
    elif coverage is None:
        score = 1 + 9 * precision
    else:
        f1 = 2 * precision * coverage / (precision + coverage) if precision + coverage else 0.0
        score = 1 + 9 * f1
    return JudgeResult(found, mentioned, invented, precision, coverage, score, unchecked)


def judge_offline(questions: Sequence[BenchQuestion], answers: Mapping) -> list[dict]:
    """One record per question: both answers rated by :func:`offline_judge` against the reference's
    facts (the reference is rated against itself, as the paper's judge sees it beside the model's)."""
    check_answers(questions, answers, "model answers")
    out = []
    for q in questions:
        ref = offline_judge(q.context, q.text, q.reference, q.reference)
        mod = offline_judge(q.context, q.text, answers[q.question_id], q.reference)
        out.append(
            {
                "question_id": q.question_id,
                "category": q.category,
                "reference": ref.score,
                "model": mod.score,
                "facts_checked": mod.checked,
                "contradicted": [f.text for f in mod.contradicted],
                "invented": mod.invented,
                "hallucination_rate": mod.hallucination_rate,
                "precision": mod.precision,
                "coverage": mod.coverage,
                "unchecked": list(mod.unchecked),
            }
        )
    return out


# ================================================================== the whole measurement
def run_bench(
    questions: Sequence[BenchQuestion],
    answers: Mapping,
    out: str | Path,
    teacher: TeacherConfig | None = None,
    progress: bool = True,
) -> dict:
    """Score ``answers`` on ``questions`` with the offline judge and, when ``teacher`` names an
    endpoint, the endpoint judge too; writes the records and ``scores.json`` under ``out``."""
    out = Path(out)
    offline = judge_offline(questions, answers)
    jsonl.write_jsonl(out / "offline_judge.jsonl", offline)
    scores = {"questions": len(questions), "offline": summarise(offline)}
    if teacher is not None:
        run = endpoint_judge(questions, answers, out / "endpoint_judge.jsonl", teacher, progress=progress)
        asked = {unit_id(q.question_id, o) for q in questions for o in ORDERS}
        mine = [r for r in run.records if r["id"] in asked]
        scores["endpoint"] = summarise(mine) | {
            "model": teacher.model,
            "unparseable": sum(not r["parsed"] and r["error"] is None for r in mine),
            "rejected": sum(r["error"] is not None for r in mine),
        }
    io.write_json(out / "scores.json", scores, indent=2)
    return scores


# ================================================================== why a judge: string matches beside it
def word_f1(answer: str, reference: str) -> float:
    """Word overlap of an answer with the reference (F1 over lower-cased words, counted with
    repetition): the loose string match that open-ended answers are often scored by."""
    a, r = re.findall(r"[a-z0-9]+", answer.lower()), re.findall(r"[a-z0-9]+", reference.lower())
    common = sum(min(a.count(w), r.count(w)) for w in set(a))
    if not common:
        return 0.0
    precision, recall = common / len(a), common / len(r)
    return 2 * precision * recall / (precision + recall)


def digits_for_words(text: str) -> str:
    """The same text with its number words written as digits ("three shapes" -> "3 shapes")."""
    words = {w: str(i) for i, w in enumerate(NUMBER_WORDS) if i}
    return re.sub(rf"\b({'|'.join(words)})\b", lambda m: words[m.group(1)], text)


def one_colour_swapped(text: str) -> str:
    """The same text with its first colour word changed to the next colour of the world."""
    m = re.search(rf"\b({'|'.join(COLOURS)})\b", text)
    if m is None:
        return text
    other = COLOURS[(COLOURS.index(m.group(1)) + 1) % len(COLOURS)]
    return text[: m.start()] + other + text[m.end() :]


def string_match_examples(questions: Sequence[BenchQuestion], min_overlap: float = 0.8) -> list[dict]:
    """Two answers to the first question where they exist: the reference with digits for its
    number words (same facts, so the offline judge rates it as the reference, though an exact
    string match calls it wrong) and the reference with one colour swapped (a word overlap of at
    least ``min_overlap`` calls it nearly right; the judge rates it lower). Each row carries both
    string scores and both ratings; ``[]`` when no question allows both."""
    for q in questions:
        ref = offline_judge(q.context, q.text, q.reference, q.reference).score
        rows = []
        for kind, answer in (("same facts, other words", digits_for_words(q.reference)),
                             ("one fact wrong, same words", one_colour_swapped(q.reference))):  # fmt: skip
            found = offline_judge(q.context, q.text, answer, q.reference)
            rating = found.score
            rows.append(
                {
                    "question_id": q.question_id,
                    "category": q.category,
                    "kind": kind,
                    "answer": answer,
                    "exact match": answer.strip().lower() == q.reference.strip().lower(),
                    "word overlap": round(word_f1(answer, q.reference), 3),
                    "judge": rating,
                    "judge (reference)": ref,
                    "judge found wrong": "; ".join(f.text for f in found.contradicted) or "-",
                }
            )
        same, wrong = rows
        if (
            ref is not None
            and not same["exact match"]
            and same["judge"] == ref
            and wrong["word overlap"] >= min_overlap
            and wrong["judge"] is not None
            and wrong["judge"] < ref
        ):
            return rows
    return []


def best_and_worst(questions: Sequence[BenchQuestion], answers: Mapping, records: Sequence[Mapping]) -> list[dict]:
    """For each type, the model's best- and worst-rated answer (ties: the first), with the
    reference, both ratings, how many of its facts the judge could check, how much of the
    reference's facts it covers and what the judge found wrong: examples to read beside the score."""
    by_id = {q.question_id: q for q in questions}
    out = []
    for t in TYPES:
        rated = [r for r in records if r["category"] == t and r["model"] is not None and r["reference"] is not None]
        if not rated:
            continue
        best = max(rated, key=lambda r: r["model"])
        worst = min(rated, key=lambda r: r["model"])
        for label, r in (("best", best), ("worst", worst)):
            q = by_id[r["question_id"]]
            out.append(
                {
                    "type": t,
                    "which": label,
                    "question": q.text,
                    "reference": q.reference,
                    "model": answers[q.question_id],
                    "rating": round(r["model"], 2),
                    "reference rating": round(r["reference"], 2),
                    "facts checked": r["facts_checked"],
                    "coverage": None if r["coverage"] is None else round(r["coverage"], 2),
                    "wrong": "; ".join(r["contradicted"] + [f"invented: {n}" for n in r["invented"]]) or "-",
                }
            )
    return out
