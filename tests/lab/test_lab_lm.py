"""The tiny LM: the shipped model still reads, the loop trains, resumes exactly and refuses a
checkpoint of other settings, and the card's command still makes the shipped run's first steps."""

from __future__ import annotations

import json
import random
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from llava_lite import jsonl
from llava_lite.lab.config import LMArchitecture, LMDocuments, LMRuntime, LMTraining
from llava_lite.lab.lm import heldout_perplexity, load_tiny_lm, lr_at, pretrain_lm, text_only_accuracy
from llava_lite.paths import PRETRAINED_DIR
from llava_lite.scene_text import reading_context, reading_layout

sys.path.insert(0, str(Path(__file__).parents[1]))  # the kill helpers of tests/
import kill_jobs  # noqa: E402
import kill_worker  # noqa: E402

SHIPPED = PRETRAINED_DIR / "tiny-lm"
SHIPPED_SMALL = PRETRAINED_DIR / "tiny-lm-small"  # the ablation's smaller LM: the same recipe, 2 layers
SMALL = LMArchitecture(lm_hidden=32, lm_layers=2, lm_heads=2, lm_intermediate=64)


def _log(path) -> tuple[list[dict], list[dict]]:
    """The training lines and the eval lines of a ``log.jsonl``."""
    rows = [rec for _, rec in jsonl.read_jsonl(path)]
    return [r for r in rows if "loss" in r], [r for r in rows if "eval_overall" in r]


@pytest.fixture(scope="module")
def lm_measured(heldout_contexts):
    """``lm_measured(folder)``: ``(its card, its text-only accuracy read afresh on 250 held-out scenes
    it never saw)``, each folder read once."""
    done = {}

    def measure(folder):
        if folder not in done:
            torch.set_num_threads(2)
            model, tokenizer = load_tiny_lm(folder)
            card = json.loads((folder / "metrics.json").read_text())
            done[folder] = card, text_only_accuracy(model, tokenizer, heldout_contexts(250), per_scene=4)
        return done[folder]

    return measure


@pytest.mark.slow
@pytest.mark.parametrize("folder", [SHIPPED, SHIPPED_SMALL], ids=lambda p: p.name)
def test_shipped_tiny_lm_answers_from_held_out_contexts_as_its_card_says(lm_measured, folder):
    card, m = lm_measured(folder)
    assert m["questions"] > 800, m["questions"]
    # no worse than the numbers committed beside the weights (250 scenes: a few points of noise)
    assert m["overall"] >= card["text_only"]["overall"] - 0.06, (m["overall"], card["text_only"]["overall"])
    above = [t for t, acc in m["accuracy"].items() if acc > m["baseline"][t] + 0.03]
    assert {"count", "colour"} <= set(above), m


@pytest.mark.slow
def test_shipped_tiny_lm_meets_the_reading_target(lm_measured):
    _, m = lm_measured(SHIPPED)
    assert m["overall"] >= 0.9, f"text-only accuracy {m['overall']:.3f} < 0.9: {m['accuracy']}"
    for t, acc in m["accuracy"].items():
        base = m["baseline"][t]
        assert acc >= base + 0.25 or acc >= 0.95, f"{t}: accuracy {acc:.3f} not well above its baseline {base:.3f}"
    # a position question offers two words, so its chance level is 0.5, above its most common answer
    assert m["accuracy"]["position"] >= 0.5 + 0.15, f"position {m['accuracy']['position']:.3f}: near the 0.5 of a guess"


@pytest.mark.parametrize("folder", [SHIPPED, SHIPPED_SMALL], ids=lambda p: p.name)
def test_shipped_tiny_lm_files_are_safetensors_and_small(folder):
    files = {p.name: p.stat().st_size for p in folder.iterdir()}
    assert "model.safetensors" in files and "tokenizer.json" in files and "config.json" in files, sorted(files)
    assert sum(files.values()) < 12 * 2**20, files
    metrics = json.loads((folder / "metrics.json").read_text())
    assert set(metrics["text_only"]["accuracy"]) == {"count", "colour", "shape", "position", "exist", "size"}


def test_the_smaller_lm_is_the_shipped_recipe_at_half_the_depth_with_the_same_tokenizer():
    big, small = (json.loads((f / "metrics.json").read_text())["config"] for f in (SHIPPED, SHIPPED_SMALL))
    assert (big["lm_layers"], small["lm_layers"]) == (4, 2)
    differs = {k for k in big.keys() & small.keys() if big[k] != small[k]}  # settings both record
    assert differs <= {"lm_layers", "device", "threads", "workers", "eval_every", "checkpoint_every"}, differs
    # the same tokens, so the instruction data and the image-token id of stage 2 are the same for both
    assert (SHIPPED / "tokenizer.json").read_bytes() == (SHIPPED_SMALL / "tokenizer.json").read_bytes()
    n = {f.name: json.loads((f / "config.json").read_text())["num_hidden_layers"] for f in (SHIPPED, SHIPPED_SMALL)}
    assert n == {"tiny-lm": 4, "tiny-lm-small": 2}


def test_text_only_accuracy_asks_in_the_layout_the_tokenizer_records(heldout_contexts):
    model, tokenizer = load_tiny_lm(SHIPPED)
    contexts = heldout_contexts(12, seed=2)
    m = text_only_accuracy(model, tokenizer, contexts, per_scene=3)
    assert set(m) == {"overall", "questions", "scenes", "accuracy", "baseline", "count", "examples", "not_asked"}
    assert not set(m["not_asked"]) & set(m["accuracy"])  # a type is scored or named as never asked
    assert m["scenes"] == 12 and m["questions"] == sum(m["count"].values()) == 36
    assert set(m["accuracy"]) == set(m["baseline"]) == set(m["count"])
    assert reading_layout(tokenizer) == "sized"
    first = m["examples"][0]
    assert first["context"] == reading_context(contexts[0], "sized") and first["reply"].strip()
    assert m["overall"] >= 0.6, m  # the shipped reader, on a dozen scenes


def test_heldout_perplexity_of_the_shipped_lm_is_near_one(heldout_contexts):
    model, tokenizer = load_tiny_lm(SHIPPED)
    assert 1.0 < heldout_perplexity(model, tokenizer, heldout_contexts(40, seed=3)) < 1.5


def test_pretrain_lm_smoke_loss_falls_and_saves_loadable_model(small_tokenizer, tmp_path):
    tok, contexts = small_tokenizer
    training = LMTraining(steps=30, batch_size=6, lr=3e-3, warmup=5)
    runtime = LMRuntime(eval_every=30, eval_scenes=5, checkpoint_every=15, threads=1)
    model, _, metrics = pretrain_lm(
        contexts[:100],
        contexts[100:],
        tmp_path,
        SMALL,
        LMDocuments(qa_per_doc=3),
        training,
        runtime,
        tokenizer=tok,
        progress=False,
    )
    train, evals = _log(tmp_path / "log.jsonl")
    assert len(train) == 30 and len(evals) == 1
    first, last = sum(r["loss"] for r in train[:5]) / 5, sum(r["loss"] for r in train[-5:]) / 5
    assert last < 0.85 * first, (first, last)
    loaded, loaded_tok = load_tiny_lm(tmp_path)
    ids = torch.tensor(
        [
            loaded_tok.apply_chat_template(
                [{"role": "user", "content": "hi"}], tokenize=True, add_generation_prompt=True, return_dict=False
            )
        ]
    )
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)
    assert not (tmp_path / "checkpoint.pt").exists()
    assert metrics["config"]["lm_hidden"] == 32 and metrics["config"]["eval_every"] == 30


class _Crash(Exception):
    pass


def test_pretrain_lm_resumes_after_a_crash_with_the_same_losses(small_tokenizer, tmp_path):
    tok, contexts = small_tokenizer
    arch, docs = replace(SMALL, lm_layers=1), LMDocuments(qa_per_doc=3)
    training = LMTraining(steps=12, batch_size=4, warmup=2, bf16=False)
    runtime = LMRuntime(eval_every=6, eval_scenes=3, checkpoint_every=6, threads=1)
    train, val = contexts[:60], contexts[60:63]
    pretrain_lm(train, val, tmp_path / "straight", arch, docs, training, runtime, tokenizer=tok, progress=False)

    def crash(step, metrics):
        if step == 12:
            raise _Crash(step)

    with pytest.raises(_Crash):  # dies at the last step's eval; its checkpoint of step 6 stays
        pretrain_lm(
            train,
            val,
            tmp_path / "resumed",
            arch,
            docs,
            training,
            runtime,
            tokenizer=tok,
            progress=False,
            on_eval=crash,
        )
    assert (tmp_path / "resumed" / "checkpoint.pt").exists()
    with pytest.raises(ValueError, match=r"other settings \(lr: 0.002 there, 0.001 now\)"):
        pretrain_lm(
            train,
            val,
            tmp_path / "resumed",
            arch,
            docs,
            replace(training, lr=1e-3),
            runtime,
            tokenizer=tok,
            progress=False,
        )
    # where it runs (threads, workers, how often it reports) is not what it learns: the run resumes under
    # other values, here with its documents built in a background process from step 6, inside a length group
    pretrain_lm(
        train,
        val,
        tmp_path / "resumed",
        arch,
        docs,
        training,
        replace(runtime, threads=2, workers=1),
        tokenizer=tok,
        progress=False,
    )
    straight, _ = _log(tmp_path / "straight" / "log.jsonl")
    resumed, _ = _log(tmp_path / "resumed" / "log.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 13))
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in straight], abs=1e-4)


def test_a_resumed_run_reloads_the_tokenizer_it_saved(small_tokenizer, tmp_path):
    _, contexts = small_tokenizer
    args = dict(
        arch=SMALL,
        docs=LMDocuments(qa_per_doc=2),
        training=LMTraining(steps=4, batch_size=2, warmup=1, bf16=False),
        progress=False,
    )

    def crash(step, metrics):
        if step == 4:
            raise _Crash(step)

    with pytest.raises(_Crash):  # trains its tokenizer, then stops at step 4 with a checkpoint of step 2
        pretrain_lm(
            contexts[:40],
            contexts[40:42],
            tmp_path,
            runtime=LMRuntime(eval_every=2, eval_scenes=1, checkpoint_every=2, threads=1),
            on_eval=crash,
            **args,
        )
    saved = AutoTokenizer.from_pretrained(tmp_path)
    assert reading_layout(saved) == "sized"
    # other scenes would train another tokenizer: the resumed run reads the saved one instead
    _, again, _ = pretrain_lm(
        contexts[60:100],
        contexts[40:42],
        tmp_path,
        runtime=LMRuntime(eval_every=0, checkpoint_every=2, threads=1),
        **args,
    )
    assert again.get_vocab() == saved.get_vocab() and reading_layout(again) == "sized"


def test_wsd_schedule_holds_then_decays_to_min_lr():
    t = LMTraining(steps=100, warmup=10, lr=1e-3, min_lr=1e-4, lr_schedule="wsd", decay_share=0.3)
    lrs = [lr_at(s, t) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(lr == pytest.approx(1e-3) for lr in lrs[10:70])
    assert all(a >= b for a, b in zip(lrs[70:], lrs[71:])) and lrs[-1] == pytest.approx(1e-4, rel=0.05)
    cosine = [lr_at(s, replace(t, lr_schedule="cosine")) for s in range(100)]
    assert cosine[:10] == pytest.approx(lrs[:10]) and all(a > b for a, b in zip(cosine[10:], cosine[11:]))
    assert cosine[-1] == pytest.approx(1e-4, rel=0.05)
    with pytest.raises(ValueError, match="lr_schedule 'linear'"):
        LMTraining(lr_schedule="linear")


def test_pretraining_on_a_missing_gpu_fails_before_any_data_is_read(monkeypatch):
    """``--device cuda`` on a machine without a GPU stops at once, naming what is missing."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        pretrain_lm(
            [],
            [],
            "/nonexistent/never-written",
            LMArchitecture(),
            LMDocuments(),
            LMTraining(),
            LMRuntime(device="cuda"),
        )


class _Stop(Exception):
    pass


@pytest.mark.slow
def test_the_cards_command_makes_the_shipped_runs_first_steps(tiny_pretrain, tmp_path):
    """The tiny-lm card's command (``--steps 4000 --batch-size 64 --layout sized --lr-schedule wsd
    --lm-hidden 128 --lm-heads 4 --lm-intermediate 384 --qa-per-doc 12 --text-share 1.0``), run on
    the CPU for its first 3 steps: the same documents (token counts), the same learning rates, and
    the losses of the shipped ``log.jsonl`` (written on a GPU in bf16: agreement to rounding)."""
    _, pretrain, _, val = tiny_pretrain

    def stop(step, metrics):
        raise _Stop(step)

    with pytest.raises(_Stop):
        pretrain_lm(
            pretrain,
            val,
            tmp_path,
            LMArchitecture(lm_hidden=128, lm_heads=4, lm_intermediate=384),
            LMDocuments(layout="sized", qa_per_doc=12, text_share=1.0),
            LMTraining(steps=4000, batch_size=64, lr_schedule="wsd"),
            LMRuntime(device="cpu", threads=2, eval_every=3, eval_scenes=1),
            progress=False,
            on_eval=stop,
        )
    ours, _ = _log(tmp_path / "log.jsonl")
    shipped, _ = _log(SHIPPED / "log.jsonl")
    assert [r["tokens"] for r in ours] == [r["tokens"] for r in shipped[:3]]
    assert [r["lr"] for r in ours] == [r["lr"] for r in shipped[:3]]
    assert [r["loss"] for r in ours] == pytest.approx([r["loss"] for r in shipped[:3]], rel=0.005)


@pytest.mark.slow
def test_pretraining_killed_mid_step_and_mid_checkpoint_ends_with_an_unbroken_runs_model(tmp_path):
    rng = random.Random(5)
    kill_jobs.lm_job(tmp_path / "straight")
    kills = [
        {"call": "llava_lite.lab.lm:_train_step", "n": rng.randint(3, 6)},  # inside a step (a checkpoint at 2)
        {"call": "llava_lite.io:fsync_path", "n": 3, "half": True},  # inside the next checkpoint's write
    ]
    out = tmp_path / "run"
    assert kill_worker.kill_and_resume("lm", {"out": str(out)}, kills, tmp_path) == [-9, -9]
    assert kill_worker.temp_files(out)
    kill_jobs.lm_job(out)
    assert kill_worker.temp_files(out) == [] and not (out / "checkpoint.pt").exists()
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "straight" / "model.safetensors").read_bytes()
    rows = lambda path: [{k: v for k, v in r.items() if k != "seconds"} for _, r in jsonl.read_jsonl(path)]  # noqa: E731
    assert rows(out / "log.jsonl") == rows(tmp_path / "straight" / "log.jsonl")  # each step and each eval once
