"""The symbolic teacher: writes LLaVA's instruction data from a symbolic context, offline.

It stands where the paper's text-only GPT stands: it reads the captions and boxes (never the
pixels) and writes the three response types of the paper, ``conversation``, ``detail`` and
``complex``, plus stage-1 ``caption`` samples and ``exact`` (one short checkable answer per
question) samples. Every fact it states is one of a few sentence forms
(:mod:`llava_lite.teachers.sentences`, built from :mod:`llava_lite.facts`), so a test can parse
the text back and check it against the boxes:

    there are three circles                             (counts)
    the circle is red                                   (colours)
    the red circle is in the top left corner            (regions)
    the red circle is to the left of the blue square    (relations)
    the red circle is large                             (sizes)
    there is no green square                            (absence)

The wording around those facts, and every question, varies. Works on the shapes world and on
real COCO contexts (objects without colours, people, crowded scenes) alike.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import Counter
from collections.abc import Iterable

from .. import facts
from ..coco import SymbolicContext
from ..facts import COLOURS, article, plural, unique_by
from . import questions
from .reasoning import complex_reasoning
from .sentences import cap, counted, is_at, is_rel, listing, the, there_are

log = logging.getLogger(__name__)

TYPES = ("caption", "conversation", "detail", "complex", "exact")
# questions per ``exact`` sample, drawn in this range (inclusive)
EXACT_TURNS = (2, 4)

# our own paraphrases of "describe the image briefly", for stage-1 caption samples
BRIEF_INSTRUCTIONS = (
    "Describe the image briefly.",
    "Give a short description of this picture.",
    "What does this image show, in a few words?",
    "Summarise the picture in one sentence.",
    "Write a brief caption for the image.",
    "Tell me in short what is in the image.",
    "Provide a one-line description of the picture.",
    "Caption this image.",
    "Sum up what you see here.",
    "In one sentence, what is in this photo?",
    "Describe the scene concisely.",
    "Give this image a short caption.",
)


# ----------------------------------------------------------------- conversation
def _qa_objects(objs, rng):
    q = rng.choice(
        [
            "What objects are in the image?",
            "What can you see in this picture?",
            "What is shown in the image?",
            "Which things appear in this image?",
        ]
    )
    lead = rng.choice(["I can see ", "The image shows ", "In the picture there is ", "This picture contains "])
    return q, f"{lead}{listing(objs)}."


def _qa_count(objs, rng):
    kinds = counted(objs)
    kind = rng.choice(sorted(kinds))
    n = kinds[kind]
    q = rng.choice(
        [
            f"How many {plural(kind)} are there?",
            f"How many {plural(kind)} can you see?",
            f"Can you count the {plural(kind)} in the image?",
        ]
    )
    return q, cap(there_are(n, kind)) + rng.choice([" in the image.", ".", " in total."])


def _qa_total(objs, rng):
    noun = "shape" if objs[0].colour else "object"
    q = rng.choice(
        [f"How many {plural(noun)} are in the picture altogether?", f"How many {plural(noun)} does the image contain?"]
    )
    return q, cap(there_are(len(objs), noun)) + " altogether."


def _qa_colour(objs, rng):
    kinds = counted(objs)
    cands = [o for o in objs if o.colour and kinds[o.kind] == 1]
    if not cands:
        return None
    o = rng.choice(cands)
    q = rng.choice(
        [
            f"What colour is the {o.kind}?",
            f"Which colour does the {o.kind} have?",
            f"Tell me the colour of the {o.kind}.",
        ]
    )
    return q, f"The {o.kind} is {o.colour}."


def _qa_where(objs, rng):
    cands = unique_by(objs)
    if not cands:
        return None
    o = rng.choice(cands)
    q = rng.choice(
        [f"Where is {the(o)}?", f"Where in the image is {the(o)} located?", f"Can you tell me where {the(o)} is?"]
    )
    return q, cap(is_at(o)) + "."


def _qa_relation(objs, rng):
    pairs = [(a, b, facts.relation(a, b)) for a in unique_by(objs) for b in unique_by(objs) if a is not b]
    pairs = [p for p in pairs if p[2]]
    if not pairs:
        return None
    a, b, rel = rng.choice(pairs)
    if rng.random() < 0.5:
        q = rng.choice(
            [
                f"What is the position of {the(a)} relative to {the(b)}?",
                f"How is {the(a)} placed compared with {the(b)}?",
            ]
        )
        return q, cap(is_rel(a, rel, b)) + "."
    wrong = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[rel]
    asked = rel if rng.random() < 0.5 else wrong
    q = f"Is {the(a)} {facts.RELATION_PHRASES[asked]} {the(b)}?"
    if asked == rel:
        return q, f"Yes, {is_rel(a, rel, b)}."
    return q, f"No, {is_rel(a, rel, b)}."


def _qa_size(objs, rng):
    if len(objs) < 2:
        return None
    big = max(objs, key=lambda o: o.area)
    if sum(o.area >= 0.8 * big.area for o in objs) > 1 or big.name not in {o.name for o in unique_by(objs)}:
        return None
    q = rng.choice(
        [
            "Which object is the biggest?",
            "What is the largest thing in the image?",
            "Which shape takes up the most space?",
        ]
    )
    return q, f"The biggest one is {the(big)}; {the(big)} is {big.size}."


def _qa_exists(objs, rng):
    present = sorted({o.name for o in objs})
    if rng.random() < 0.5:
        name = rng.choice(present)
        o = next(o for o in objs if o.name == name)
        n = sum(p.name == name for p in objs)
        ans = f"Yes, {there_are(n, name)}" + (f"; {is_at(o)}." if n == 1 else ".")
    else:
        if objs[0].colour:
            absent = [f"{c} {o.kind}" for o in objs for c in COLOURS if f"{c} {o.kind}" not in present]
        else:
            absent = [n for n in ("dog", "bicycle", "umbrella", "horse", "laptop", "clock") if n not in present]
        if not absent:
            return None
        name = rng.choice(sorted(set(absent)))
        ans = f"No, there is no {name} in the image."
    q = rng.choice(
        [
            f"Is there {article(name)} in the image?",
            f"Do you see {article(name)}?",
            f"Does the picture contain {article(name)}?",
        ]
    )
    return q, ans


CONVERSATION_QA = (_qa_objects, _qa_count, _qa_total, _qa_colour, _qa_where, _qa_relation, _qa_size, _qa_exists)


def conversation(ctx: SymbolicContext, rng: random.Random) -> list[tuple[str, str]]:
    """3-5 question/answer turns, each about something else."""
    objs = ctx.objects
    turns, seen = [], set()
    makers = list(CONVERSATION_QA)
    rng.shuffle(makers)
    target = rng.randint(3, 5)
    for make in makers:
        qa = make(objs, rng) if objs else None
        if qa and qa[0] not in seen:
            seen.add(qa[0])
            turns.append(qa)
        if len(turns) == target:
            break
    if not objs:  # a COCO image without annotated objects: talk about its captions only
        turns = [("What is happening in this image?", ctx.captions[0])]
    return turns


# ----------------------------------------------------------------- detail
def detail(ctx: SymbolicContext, rng: random.Random) -> str:
    """A paragraph that covers every object and where it is, left to right."""
    objs = sorted(ctx.objects, key=lambda o: (o.cx, o.cy))
    if not objs:
        return " ".join(ctx.captions[:2])
    noun = "shape" if objs[0].colour else "object"
    open_ = rng.choice(["The image shows {}.", "In this picture {}.", "This is a scene in which {}."])
    parts = [cap(open_.format(there_are(len(objs), noun)))]
    names = Counter(o.name for o in objs)
    for o in objs:
        if names[o.name] == 1:
            parts.append(cap(is_at(o)) + (f" and {o.size}" if o.colour else "") + ".")
        else:
            parts.append(cap(f"{article(o.name)} is {facts.region_phrase(o)}."))
    u = unique_by(objs)
    rels = [(a, b, facts.relation(a, b)) for a in u for b in u if a is not b]
    rels = [r for r in rels if r[2]]
    if rels:
        a, b, rel = rng.choice(rels)
        parts.append(
            rng.choice(["Looking at how they are arranged, ", "As for their layout, ", "Overall, "])
            + is_rel(a, rel, b)
            + "."
        )
    return " ".join(parts)


def _conversations(turns: list[tuple[str, str]], rng: random.Random) -> list[dict]:
    """LLaVA's turn list, with ``<image>`` on the first or last line of the first human turn."""
    out = []
    for i, (q, a) in enumerate(turns):
        if i == 0:
            q = f"<image>\n{q}" if rng.random() < 0.5 else f"{q}\n<image>"
        out += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return out


def sample(ctx: SymbolicContext, kind: str, rng: random.Random) -> dict | None:
    """One LLaVA-format sample of ``kind`` for ``ctx``, or ``None`` when the context cannot give one."""
    extra: dict = {}
    if kind == "caption":
        turns = [(rng.choice(BRIEF_INSTRUCTIONS), rng.choice(ctx.captions))]
    elif kind == "conversation":
        turns = conversation(ctx, rng)
    elif kind == "detail":
        q = rng.choice(
            [
                "Describe the image in detail.",
                "Give a detailed description of this picture.",
                "What is in this image? Describe every object and where it is.",
                "Explain the contents of the picture thoroughly.",
            ]
        )
        turns = [(q, detail(ctx, rng))]
    elif kind == "complex":
        qa = complex_reasoning(ctx, rng)
        if not qa:
            return None
        turns = [qa]
    elif kind == "exact":
        qas = questions.exact_questions(ctx.objects, rng, rng.randint(*EXACT_TURNS))
        if not qas:
            return None
        turns = [(qa.question, qa.answer) for qa in qas]
        extra["qtypes"] = [qa.qtype for qa in qas]
    else:
        raise ValueError(f"unknown sample type {kind!r}; expected one of {TYPES}")
    return {
        "id": f"{ctx.image_id}-{kind}",
        "image": ctx.file_name,
        "type": kind,
        "conversations": _conversations(turns, rng),
        **extra,
    }


def _key(s: dict) -> str:
    return hashlib.sha1(json.dumps(s["conversations"], sort_keys=True).encode()).hexdigest()


def generate(
    contexts: Iterable[SymbolicContext], kinds: Iterable[str] = TYPES, seed: int = 0, attempts: int = 8
) -> tuple[list[dict], dict]:
    """Samples of every kind for every context. No two samples are identical: a repeat is redrawn
    (``attempts`` times) and otherwise left out and counted. Returns ``(samples, stats)``."""
    kinds = list(kinds)
    out: list[dict] = []
    seen: set[str] = set()
    stats: Counter = Counter()
    for ctx in contexts:
        for kind in kinds:
            for attempt in range(attempts):
                s = sample(ctx, kind, random.Random(f"{seed}:{ctx.image_id}:{kind}:{attempt}"))
                if s is None:
                    stats[f"{kind}: not applicable"] += 1
                    break
                if _key(s) not in seen:
                    seen.add(_key(s))
                    out.append(s)
                    stats[kind] += 1
                    break
            else:
                stats[f"{kind}: left out as a repeat"] += 1
    if any("repeat" in k for k in stats):
        log.info("samples left out as repeats: %s", {k: v for k, v in stats.items() if "repeat" in k})
    return out, dict(stats)
