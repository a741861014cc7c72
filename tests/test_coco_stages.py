"""COCO fetched over HTTP from 127.0.0.1 taken through the stages after the teacher, as the ``colab``
preset's notebooks run them, with the shipped tiny backbones in place of its hub models: the
feature cache, stage 1 and stage 2, the exact-answer score and the offline judge."""

import math

import pytest
import torch
from test_coco_download import _cfg, release  # noqa: F401  (the local COCO server fixture)

from llava_lite import coco, evaluate, io, jsonl, judge, stages, world
from llava_lite.config import LanguageConfig, VisionConfig, get_preset
from llava_lite.conversation import get_template
from llava_lite.paths import Layout
from llava_lite.teachers import instruct
from llava_lite.train import latest_checkpoint, read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def test_coco_is_read_by_features_training_evaluation_and_the_judge_like_the_world(release, tmp_path, monkeypatch):  # noqa: F811
    torch.set_flush_denormal(True)
    monkeypatch.setenv("LLAVA_LITE_OUTPUTS", str(tmp_path / "out"))
    layout = Layout.for_preset("colab")
    preset = get_preset("colab").replace(vision=VisionConfig(), language=LanguageConfig())
    preset.world = _cfg(release, train=6, test=4)
    assert world.generate(preset.world, layout.world, progress=False) == {"train": 6, "test": 4}
    for split in ("train", "test"):
        instruct.build_split(layout, split)

    # features: every image of each split (JPEGs of unequal sizes, resized by the tower) is cached
    tower = stages.load_vision(preset.vision)
    assert tower.image_size == 64
    feats = {}
    for split in ("train", "test"):
        feats[split] = stages.split_features(layout, split, tower, progress=False)
        doc = io.read_json(layout.instances(split))
        images = doc["images"]
        assert len({(im["width"], im["height"]) for im in images}) == len(images) > 1
        assert all(im["width"] != 64 for im in images)
        assert {im["id"] for im in images} - {a["image_id"] for a in doc["annotations"]}, "no image without instances"
        assert sorted(feats[split].image_ids) == sorted(im["id"] for im in images)
        for im in images:
            assert feats[split](im["file_name"]).shape == (tower.num_patches, tower.width)

    # two steps of each stage on the teacher's samples, the colab preset's schedule made CPU-sized
    lm, tokenizer = stages.load_language(preset.language)
    model = stages.build_llava(preset, lm, tokenizer, tower)
    small = {"max_steps": 2, "batch_size": 2, "grad_accum": 1, "precision": "fp32", "log_every": 1}
    runs = {}
    for stage in (1, 2):
        samples = stages.stage_samples(layout, "train", stage)
        assert samples, f"no stage-{stage} samples on COCO"
        if stage == 2:
            stages.prepare_stage2(preset, model, latest_checkpoint(runs[1]))
        runs[stage] = stages.run_dir(layout, stage)
        summary = stages.run_stage(
            preset, model, tokenizer, feats["train"], stage, samples, runs[stage], progress=False, **small
        )
        losses = [m["loss"] for m in read_metrics(runs[stage])]
        assert summary["steps"] == 2 and len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert any("lora_" in n for n, _ in model.named_parameters())  # the colab preset's stage 2 trains LoRA

    # the exact-answer score: only the question types a COCO context settles, each with its count
    items = evaluate.exact_items(io.read_json(layout.instruct / "test.json"))
    asked = {it.qtype for it in items}
    assert asked == {"count", "exist"}
    template = get_template(preset.model.stage2_template, tokenizer)
    recs = evaluate.records(items, evaluate.ask_llava(model, template, tokenizer, items, feats["test"]))
    contexts = coco.load_contexts(layout.instances("test"), layout.captions("test"))
    reader = evaluate.ask_reader(lm, template, tokenizer, items, {c.file_name: c for c in contexts})
    train_items = evaluate.exact_items(io.read_json(layout.instruct / "train.json"))
    results = {
        "most common answer": evaluate.most_common_answer(items),
        "question prior": evaluate.question_prior(train_items, items),
        "LM reading the context": evaluate.score(evaluate.records(items, reader)),
        "LLaVA": evaluate.score(recs),
    }
    for got in results.values():
        assert got["count"] == {t: sum(it.qtype == t for it in items) for t in ("count", "exist")}
        assert set(got["accuracy"]) == asked and got["not_asked"] == ["colour", "shape", "position", "size"]
    assert [r["type"] for r in evaluate.error_analysis(recs, results["question prior"]["accuracy"])] == [
        "count",
        "exist",
    ]

    # the offline judge on COCO contexts says which kinds of fact it could not check
    bench = judge.build_questions(contexts, len(contexts))
    assert {q.image for q in bench} == {c.file_name for c in contexts}  # images without instances too
    answers = judge.answer_questions(model, template, tokenizer, bench, feats["test"], max_new_tokens=16)
    scores = judge.run_bench(bench, answers, layout.root / "bench", None, progress=False)
    assert scores["questions"] == len(bench) and scores["offline"]["rated"]["all"] > 0
    assert scores["offline"]["unchecked"] == ["colour", "shape", "position", "size"]
    rows = [r for _, r in jsonl.read_jsonl(layout.root / "bench" / "offline_judge.jsonl")]
    assert len(rows) == len(bench) and all(r["unchecked"] == ["colour", "shape", "position", "size"] for r in rows)
