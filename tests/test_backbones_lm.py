"""The tiny LM backbone: the shipped model still reads, the training code trains, and the chat
layout puts the loss on the answers only."""
from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import replace

import pytest
import torch

from llava_lite import backbones as bb
from llava_lite.coco import load_contexts
from llava_lite.config import get_preset
from llava_lite.io import write_json
from llava_lite.facts import COLOURS, SHAPES
from llava_lite.paths import PRETRAINED_DIR
from llava_lite.teachers.questions import QTYPES, count_word, exact_questions
from llava_lite.world import coco_files, sample_world

SHIPPED = PRETRAINED_DIR / "tiny-lm"
COLOUR_SHAPES = {f"{c} {s}" for c in COLOURS for s in SHAPES}


def _heldout_contexts(tmp_path, n: int, seed: int = 0):
    """``n`` scenes drawn beside the tiny preset's pretrain split (so none of them is one the LM
    was trained on), written as COCO files and read back like any split."""
    cfg = get_preset("tiny").world
    cfg.seed = seed
    cfg.splits = {"pretrain": cfg.splits["pretrain"], "heldout": n}
    scenes = sample_world(cfg)["heldout"]
    instances, captions = coco_files(scenes, cfg, "heldout")
    write_json(tmp_path / "instances.json", instances)
    write_json(tmp_path / "captions.json", captions)
    return load_contexts(tmp_path / "instances.json", tmp_path / "captions.json")


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    contexts = _heldout_contexts(tmp_path_factory.mktemp("tok"), 120, seed=7)
    return bb.train_tokenizer(bb.tokenizer_corpus(contexts), vocab_size=400), contexts


@pytest.fixture(scope="module")
def shipped_lm_measured(tmp_path_factory):
    """The shipped tiny LM read afresh: text-only accuracy on 250 held-out scenes it never saw."""
    torch.set_num_threads(2)
    model, tokenizer = bb.load_tiny_lm(SHIPPED)
    contexts = _heldout_contexts(tmp_path_factory.mktemp("heldout"), 250)
    return json.loads((SHIPPED / "metrics.json").read_text()), bb.text_only_accuracy(model, tokenizer, contexts, per_scene=4)


@pytest.mark.slow
def test_shipped_tiny_lm_answers_from_held_out_contexts_as_its_card_says(shipped_lm_measured):
    card, m = shipped_lm_measured
    assert m["questions"] > 800, m["questions"]
    # no worse than the numbers committed beside the weights (250 scenes: a few points of noise)
    assert m["overall"] >= card["text_only"]["overall"] - 0.06, (m["overall"], card["text_only"]["overall"])
    above = [t for t, acc in m["accuracy"].items() if acc > m["baseline"][t] + 0.03]
    assert {"count", "colour"} <= set(above), m


@pytest.mark.slow
def test_shipped_tiny_lm_meets_the_reading_target(shipped_lm_measured):
    _, m = shipped_lm_measured
    assert m["overall"] >= 0.9, f"text-only accuracy {m['overall']:.3f} < 0.9: {m['accuracy']}"
    for t, acc in m["accuracy"].items():
        base = m["baseline"][t]
        assert acc >= base + 0.25 or acc >= 0.95, f"{t}: accuracy {acc:.3f} not well above its baseline {base:.3f}"
    # a position question offers two words, so its chance level is 0.5, above its most common answer
    assert m["accuracy"]["position"] >= 0.5 + 0.15, f"position {m['accuracy']['position']:.3f}: near the 0.5 of a guess"


def test_shipped_tiny_lm_files_are_safetensors_and_small():
    files = {p.name: p.stat().st_size for p in SHIPPED.iterdir()}
    assert "model.safetensors" in files and "tokenizer.json" in files and "config.json" in files, sorted(files)
    assert sum(files.values()) < 12 * 2**20, files
    metrics = json.loads((SHIPPED / "metrics.json").read_text())
    assert set(metrics["text_only"]["accuracy"]) == {"count", "colour", "shape", "position", "exist", "size"}


def test_tokenizer_keeps_words_whole_and_digits_single(small_tokenizer):
    tok, _ = small_tokenizer
    for special in bb.SPECIAL_TOKENS:
        assert tok.convert_tokens_to_ids(special) != tok.unk_token_id and len(tok.tokenize(special)) == 1
    pieces = tok.tokenize("red circle: [0.125, 0.250, 0.406, 0.531]\nWhat colour is the red circle?")
    # a word reads the same at the start of a line and inside a sentence
    assert pieces.count("Ġred") == 2 and pieces.count("Ġcircle") == 2, pieces
    digits = [p for p in pieces if p.isdigit()]
    assert all(len(p) == 1 for p in digits) and len(digits) == 16, pieces


def test_chat_template_renders_user_assistant_turns(small_tokenizer):
    tok, _ = small_tokenizer
    msgs = [{"role": "user", "content": "ctx\nWhat colour is the circle?"}, {"role": "assistant", "content": "red"},
            {"role": "user", "content": "How many squares are there?"}, {"role": "assistant", "content": "two"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == ("<|user|>ctx\nWhat colour is the circle?<|end|><|assistant|>red<|end|>"
                    "<|user|>How many squares are there?<|end|><|assistant|>two<|end|>")
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|end|><|assistant|>")


def test_reading_document_loss_mask_covers_exactly_the_answers(small_tokenizer):
    tok, contexts = small_tokenizer
    docs = bb.reading_documents(contexts[:20], random.Random(0), qa_per_doc=5, caption_share=0.0, box_share=0.5)
    enc = bb.ChatEncoder(tok)
    end = tok.convert_tokens_to_ids("<|end|>")
    for doc in docs:
        ids, labels = enc.encode(doc)
        rendered = tok.apply_chat_template(doc, tokenize=True)
        rendered = rendered["input_ids"] if hasattr(rendered, "keys") else rendered
        assert list(rendered) == ids, "ChatEncoder and apply_chat_template disagree"
        # the supervised tokens, split at <|end|>, are exactly the answers in order
        supervised = [i for i, l in zip(ids, labels) if l != -100]
        assert all(l in (-100, i) for i, l in zip(ids, labels))
        answers, cur = [], []
        for i in supervised:
            if i == end:
                answers.append(tok.decode(cur).strip())
                cur = []
            else:
                cur.append(i)
        assert not cur
        assert answers == [m["content"] for m in doc if m["role"] == "assistant"]
        assert doc[0]["content"].startswith(bb.scene_table(next(c for c in contexts if bb.scene_table(c) in doc[0]["content"])))


def _read_table(table: str, qa) -> str:
    """Answer an exact question from a ``scene_table`` by lookups and one comparison only: what
    the tiny LM must learn to do."""
    rows = {k: v.split(", ") for k, v in (line.split(": ", 1) for line in table.split("\n"))}
    names = rows["objects"]  # always colour first
    words = re.findall(r"[a-z]+", qa.question.lower())
    named = [f"{a} {b}" for a, b in zip(words, words[1:]) if f"{a} {b}" in COLOUR_SHAPES]
    value = lambda key, name: next(e.rsplit(" ", 1)[1] for e in rows[key]  # noqa: E731
                                   if sorted(e.rsplit(" ", 1)[0].split()) == sorted(name.split()))  # either word order
    if qa.qtype == "colour":
        shape = next(w for w in words if w in SHAPES)
        return next(e.split()[1] for e in rows["colours"] if e.split()[0] == shape)
    if qa.qtype == "shape":
        colour = next(w for w in words if w in COLOURS)
        return next(e.split()[0] for e in rows["colours"] if e.split()[1] == colour)
    if qa.qtype == "size":
        return value("sizes", named[0])
    if qa.qtype == "exist":
        return "yes" if named[0] in names else "no"
    if qa.qtype == "position":
        a, b = named
        key, first, second = ("across", "left", "right") if "left" in words else ("down", "above", "below")
        va, vb = int(value(key, a)), int(value(key, b))
        assert va != vb, (table, qa)  # a position question is never a tie in tenths
        return first if va < vb else second
    plural = next(w for w in words if w in ("circles", "squares", "triangles", "shapes", "objects"))
    before = words[words.index(plural) - 1]
    colour, kind = (before if before in COLOURS else None), (plural[:-1] if plural[:-1] in SHAPES else None)
    n = sum(1 for x in names if colour in (None, x.split()[0]) and kind in (None, x.split()[1]))
    return count_word(n)


@pytest.mark.parametrize("layout", ["table", "shuffled", "crossed", "ranked", "sized", "paired"])
def test_scene_table_answers_every_exact_question_by_lookup(tmp_path, layout):
    contexts = _heldout_contexts(tmp_path, 300, seed=3)
    rng, checked = random.Random(0), Counter()
    for ctx in contexts:
        table = bb.reading_context(ctx, layout)
        for qa in exact_questions(ctx.objects, rng, 8):
            assert _read_table(table, qa) == qa.answer, (table, qa)
            checked[qa.qtype] += 1
    assert set(checked) == set(QTYPES) and min(checked.values()) > 100, checked


def test_shuffled_layouts_hold_the_table_lines_in_their_own_orders(small_tokenizer):
    _, contexts = small_tokenizer
    entries = lambda text: {k: sorted(v.split(", ")) for k, v in (l.split(": ", 1) for l in text.split("\n"))}  # noqa: E731
    reordered = Counter()
    for ctx in contexts:
        table = bb.reading_context(ctx, "table")
        for layout in ("shuffled", "crossed"):
            text = bb.reading_context(ctx, layout)
            assert text == bb.reading_context(ctx, layout)  # read again: the same text (seeded by the scene)
            lines, ref = entries(text), entries(table)
            assert list(lines) == list(ref)
            for key in ref:
                if layout == "crossed" and key == "down":  # names shape first: "circle red 6"
                    flip = lambda e: " ".join(e.split()[:2][::-1] + e.split()[2:])  # noqa: E731
                    assert sorted(flip(e) for e in lines[key]) == ref[key], (text, table)
                else:
                    assert lines[key] == ref[key], (text, table)
            reordered[layout] += text.split("\n")[1:] != table.split("\n")[1:]
        # pretraining draws a new order each time it reads a scene
        orders = {bb.reading_context(ctx, "shuffled", random.Random(i)) for i in range(20)}
        assert len(orders) > 1 or len(ctx.objects) == 1 or len({o.name for o in ctx.objects}) == 1
    assert min(reordered.values()) > len(contexts) // 3, reordered


def test_ranked_layout_repeats_each_coordinate_in_sorted_order(tmp_path):
    contexts = _heldout_contexts(tmp_path, 200, seed=5)
    rng, by_order = random.Random(0), Counter()
    for i, ctx in enumerate(contexts):
        text = bb.reading_context(ctx, "ranked", random.Random(i))
        lines = text.split("\n")
        # the crossed table, drawn from the same generator, then the two ranked lines
        assert "\n".join(lines[:-2]) == bb.reading_context(ctx, "crossed", random.Random(i))
        rows = {k: v.split(", ") for k, v in (line.split(": ", 1) for line in lines)}
        assert list(rows)[-2:] == ["left to right", "top to bottom"]
        for key, axis in (("left to right", "across"), ("top to bottom", "down")):
            assert sorted(rows[key]) == sorted(rows[axis]), text
            digits = [int(e.rsplit(" ", 1)[1]) for e in rows[key]]
            assert digits == sorted(digits), text
        # a position question is answered by which of its two names the ranked line lists first
        for qa in exact_questions(ctx.objects, rng, 8):
            if qa.qtype != "position":
                continue
            words = re.findall(r"[a-z]+", qa.question.lower())
            a, b = [f"{x} {y}" for x, y in zip(words, words[1:]) if f"{x} {y}" in COLOUR_SHAPES]
            key, first, second = ("left to right", "left", "right") if "left" in words else ("top to bottom", "above", "below")
            names = [" ".join(sorted(e.rsplit(" ", 1)[0].split())) for e in rows[key]]
            ia, ib = names.index(" ".join(sorted(a.split()))), names.index(" ".join(sorted(b.split())))
            assert (first if ia < ib else second) == qa.answer, (text, qa)
            by_order[qa.answer] += 1
    assert set(by_order) == {"left", "right", "above", "below"} and min(by_order.values()) > 20, by_order


def test_sized_layout_repeats_each_size_small_ones_first(tmp_path):
    contexts = _heldout_contexts(tmp_path, 200, seed=6)
    rng, asked, mixed = random.Random(0), Counter(), 0
    for i, ctx in enumerate(contexts):
        text = bb.reading_context(ctx, "sized", random.Random(i))
        lines = text.split("\n")
        # the ranked table, drawn from the same generator, then the sizes once more
        assert "\n".join(lines[:-1]) == bb.reading_context(ctx, "ranked", random.Random(i))
        rows = {k: v.split(", ") for k, v in (line.split(": ", 1) for line in lines)}
        assert list(rows)[-1] == "small to large"
        assert sorted(rows["small to large"]) == sorted(rows["sizes"]), text
        sizes = [e.rsplit(" ", 1)[1] for e in rows["small to large"]]
        assert sizes == sorted(sizes, key=lambda w: w == "large"), text
        mixed += len(set(sizes)) == 2
        # a size question is answered by the word after its name in the new line
        for qa in exact_questions(ctx.objects, rng, 8):
            if qa.qtype == "size":
                name = re.search(r"Is the (\w+ \w+) ", qa.question).group(1)
                assert [e.rsplit(" ", 1)[1] for e in rows["small to large"] if e.rsplit(" ", 1)[0] == name] == [qa.answer]
                asked[qa.answer] += 1
    assert mixed > 50 and min(asked[a] for a in ("small", "large")) > 20, (mixed, asked)


def test_paired_layout_repeats_the_coordinates_of_named_pairs(tmp_path):
    contexts = _heldout_contexts(tmp_path, 200, seed=7)
    entries = Counter()
    for i, ctx in enumerate(contexts):
        text = bb.reading_context(ctx, "paired", random.Random(i))
        lines = text.split("\n")
        assert text == bb.reading_context(ctx, "paired", random.Random(i))  # the same generator, the same text
        sized = bb.reading_context(ctx, "sized", random.Random(i))
        n = len(sized.split("\n"))
        # the sized table, drawn from the same generator, then a line of pairs per coordinate
        assert "\n".join(lines[:n]) == sized
        rows = {k: v.split(", ") for k, v in (line.split(": ", 1) for line in lines)}
        unique = [o.name for o in ctx.objects if sum(p.name == o.name for p in ctx.objects) == 1]
        assert list(rows)[n:] == (["across pairs", "down pairs"] if len(unique) > 1 else []), text
        for axis in ("across", "down"):
            digit = {e.rsplit(" ", 1)[0].split()[-1] + " " + e.rsplit(" ", 1)[0].split()[0] if axis == "down"
                     else e.rsplit(" ", 1)[0]: e.rsplit(" ", 1)[1] for e in rows[axis]}
            for e in rows.get(f"{axis} pairs", []):
                m = re.fullmatch(r"(\w+ \w+) and (\w+ \w+) (\d) (\d)", e)
                assert m and m[1] != m[2] and {m[1], m[2]} <= set(unique), (e, text)
                assert (digit[m[1]], digit[m[2]]) == (m[3], m[4]), (e, text)
                entries[axis] += 1
            assert len(rows.get(f"{axis} pairs", [])) == min(3, len(unique) * (len(unique) - 1))
    assert min(entries.values()) > 300, entries


def test_reading_layouts_and_the_layout_saved_with_the_tokenizer(small_tokenizer, tmp_path):
    tok, contexts = small_tokenizer
    ctx = contexts[0]
    assert bb.reading_context(ctx, "boxes") == bb.object_lines(ctx)
    assert bb.reading_context(ctx, "table").split("\n")[0] == "objects: " + ", ".join(o.name for o in ctx.objects)
    with pytest.raises(ValueError, match="unknown reading layout 'grid'"):
        bb.reading_context(ctx, "grid")
    tok.init_kwargs["reading_layout"] = "table"
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer
    assert bb.reading_layout(AutoTokenizer.from_pretrained(tmp_path)) == "table"


def test_pretrain_lm_smoke_loss_falls_and_saves_loadable_model(small_tokenizer, tmp_path):
    tok, contexts = small_tokenizer
    cfg = bb.LMConfig(lm_hidden=32, lm_layers=2, lm_heads=2, lm_intermediate=64, steps=30, batch_size=6, lr=3e-3,
                      warmup=5, eval_every=30, eval_scenes=5, checkpoint_every=15, qa_per_doc=3, threads=1)
    model, _, metrics = bb.pretrain_lm(contexts[:100], contexts[100:], tmp_path, cfg, tokenizer=tok, progress=False)
    train, evals = bb.read_log(tmp_path / "log.jsonl")
    assert len(train) == 30 and len(evals) == 1
    first, last = sum(r["loss"] for r in train[:5]) / 5, sum(r["loss"] for r in train[-5:]) / 5
    assert last < 0.85 * first, (first, last)
    loaded, loaded_tok = bb.load_tiny_lm(tmp_path)
    ids = torch.tensor([loaded_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True,
                                                       add_generation_prompt=True, return_dict=False)])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)
    assert not (tmp_path / "checkpoint.pt").exists()


class _Crash(Exception):
    pass


def test_pretrain_lm_resumes_after_a_crash_with_the_same_losses(small_tokenizer, tmp_path):
    tok, contexts = small_tokenizer
    cfg = bb.LMConfig(lm_hidden=32, lm_layers=1, lm_heads=2, lm_intermediate=64, steps=12, batch_size=4,
                      warmup=2, eval_every=6, eval_scenes=3, checkpoint_every=6, qa_per_doc=3, bf16=False, threads=1)
    train, val = contexts[:60], contexts[60:63]
    bb.pretrain_lm(train, val, tmp_path / "straight", cfg, tokenizer=tok, progress=False)

    def crash(step, metrics):
        raise _Crash(step)

    with pytest.raises(_Crash):  # dies at step 6, just after writing its checkpoint
        bb.pretrain_lm(train, val, tmp_path / "resumed", cfg, tokenizer=tok, progress=False, on_eval=crash)
    assert (tmp_path / "resumed" / "checkpoint.pt").exists()
    with pytest.raises(ValueError, match=r"other settings \(lr: 0.002 there, 0.001 now\)"):
        bb.pretrain_lm(train, val, tmp_path / "resumed", replace(cfg, lr=1e-3), tokenizer=tok, progress=False)
    # where it runs (device, threads, workers) is not what it learns: the run resumes under other
    # values, here with its documents built in a background process from step 6, inside a length group
    bb.pretrain_lm(train, val, tmp_path / "resumed", replace(cfg, threads=2, workers=1), tokenizer=tok, progress=False)
    straight, _ = bb.read_log(tmp_path / "straight" / "log.jsonl")
    resumed, _ = bb.read_log(tmp_path / "resumed" / "log.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 13))
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in straight], abs=1e-4)


def test_background_workers_build_the_same_batches_from_any_step(small_tokenizer):
    tok, contexts = small_tokenizer
    cfg = bb.LMConfig(batch_size=3, qa_per_doc=2, length_group=4, text_share=0.5)
    stream = bb.DocStream(contexts[:50], bb.ChatEncoder(tok), cfg, tok.pad_token_id)
    for start, steps in ((0, 8), (5, 11), (7, 8)):
        inline = [stream.batch(s) for s in range(start, steps)]
        built = list(bb.stream_batches(stream, start, steps, workers=2))
        assert len(built) == steps - start
        for (ids, w), (ids2, w2) in zip(inline, built):
            assert torch.equal(ids, ids2) and torch.equal(w, w2)


def test_lookup_drills_answer_from_the_table_and_never_leak_a_size_answer(small_tokenizer):
    _, contexts = small_tokenizer
    rng, kinds = random.Random(0), Counter()
    for ctx in contexts:
        drill = bb.lookup_drill(ctx, rng)
        if drill is None:
            continue
        table = dict(line.split(": ", 1) for line in bb.scene_table(ctx).split("\n"))
        name = re.search(r"is the (\w+ \w+)\?", drill.question).group(1)
        key = "sizes" if drill.question.startswith("What size") else drill.question.split()[2]
        assert f"{name} {drill.answer}" in table[key].split(", "), (drill, table[key])
        kinds[key] += 1
    assert set(kinds) == {"sizes", "across", "down"}, kinds
    for doc in bb.reading_documents(contexts, random.Random(1), qa_per_doc=10, caption_share=0.0, drill_share=0.5):
        asked = [m["content"].split("\n")[-1] for m in doc if m["role"] == "user"]
        sized = {q[len("What size is the "):-1] for q in asked if q.startswith("What size is the ")}
        assert not [q for q in asked if q.startswith("Is the ") and q.split(" or ")[-1].rstrip("?") in ("small", "large")
                    and any(f"the {n} " in q for n in sized)], asked


def test_wsd_schedule_holds_then_decays_to_min_lr():
    cfg = bb.LMConfig(steps=100, warmup=10, lr=1e-3, min_lr=1e-4, lr_schedule="wsd", decay_share=0.3)
    lrs = [bb._lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(lr == pytest.approx(1e-3) for lr in lrs[10:70])
    assert all(a >= b for a, b in zip(lrs[70:], lrs[71:])) and lrs[-1] == pytest.approx(1e-4, rel=0.05)
    with pytest.raises(ValueError, match="lr_schedule 'linear'"):
        bb._lr_at(500, bb.LMConfig(lr_schedule="linear"))


def test_training_device_names_what_is_missing(monkeypatch):
    """``--device`` of the backbone trainers: a GPU that is not here, or a name torch does not know,
    fails at once with the flag in the message (before any data is loaded)."""
    from llava_lite.envcheck import training_device

    assert training_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="not a device name"):
        training_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA GPU.*--device cpu"):
        training_device("cuda")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        bb.pretrain_lm([], [], "/nonexistent/never-written", bb.LMConfig(device="cuda"))
