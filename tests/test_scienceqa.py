"""ScienceQA-style multiple choice: the official files read, the world's set written and read back
(choices, balanced letters, true answers), the paper's prompt and two answer formats, replies
parsed by the reference's rules, accuracy per category, and stage 2 trained and scored on it."""

import json
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch

from llava_lite import cli, scienceqa, stages, validate
from llava_lite.config import ScienceQAConfig, get_preset
from llava_lite.conversation import get_template
from llava_lite.paths import Layout
from llava_lite.scienceqa import Problem, ScienceQAFormatError, parse_answer
from llava_lite.teachers.questions import count_word
from llava_lite.train import read_metrics

from llava_fixtures import fake_features, tiny_llava

OFFICIAL = Path(__file__).parent / "scienceqa_official"


@pytest.fixture(scope="module")
def world_set(small_world, tmp_path_factory):
    """The small world's multiple-choice set, written under a layout whose world is ``small_world``."""
    root = tmp_path_factory.mktemp("sqa")
    (root / "world").symlink_to(small_world, target_is_directory=True)
    layout = Layout(root)
    counts = scienceqa.write_world_set(layout)
    return layout, counts


# ------------------------------------------------------------------ the official format
def test_the_official_files_are_read_with_every_field_and_the_splits_in_their_order():
    problems, splits = scienceqa.read_problems(OFFICIAL)
    assert sorted(problems) == ["11", "12", "13"] and splits["test"] == ["13", "12"] and splits["val"] == []
    p = problems["12"]
    assert (p.question, p.choices, p.answer, p.letter) == (
        "Which direction does the arrow point?",
        ["north", "south", "east", "west"],
        2,
        "C",
    )
    assert (p.image, p.image_key, p.split, p.subject, p.grade) == (
        "image.png",
        "test/12/image.png",
        "test",
        "social science",
        "grade3",
    )
    assert problems["11"].image is None and problems["11"].image_key is None and problems["11"].extra == {}
    assert [q.pid for q in scienceqa.read_split(OFFICIAL, "test")] == ["13", "12"]
    with pytest.raises(ValueError, match="no split 'dev'"):
        scienceqa.read_split(OFFICIAL, "dev")


def test_written_problems_read_back_to_the_same_files(tmp_path):
    problems, _ = scienceqa.read_problems(OFFICIAL)
    ordered = [problems[p] for p in ("11", "13", "12")]
    scienceqa.write_problems(tmp_path, ordered)
    assert json.loads((tmp_path / "problems.json").read_text()) == json.loads((OFFICIAL / "problems.json").read_text())
    again, splits = scienceqa.read_problems(tmp_path)
    assert again == problems and splits == {"train": ["11"], "test": ["13", "12"]}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.pop("choices"), "pid 12: missing field 'choices'"),
        (lambda d: d.update(answer=4), "pid 12: field 'answer' should be an index into the 4 choices, found 4"),
        (lambda d: d.update(answer="2"), "pid 12: field 'answer' should be an index"),
        (lambda d: d.update(choices=["a", "b", "c", "d", "e", "f"]), "pid 12: field 'choices' has 6 choices"),
        (lambda d: d.update(choices=["a", 2]), "pid 12: field 'choices' should be a list of strings"),
        (lambda d: d.update(hint=None), "pid 12: field 'hint' should be a string, found None"),
        (lambda d: d.update(image=""), "pid 12: field 'image' should be a file name or null"),
    ],
)
def test_a_bad_problem_is_refused_naming_its_pid_and_field(tmp_path, change, message):
    doc = json.loads((OFFICIAL / "problems.json").read_text())
    change(doc["12"])
    (tmp_path / "problems.json").write_text(json.dumps(doc))
    shutil.copy(OFFICIAL / "pid_splits.json", tmp_path)
    with pytest.raises(ScienceQAFormatError, match=message.replace("(", r"\(").replace(")", r"\)")):
        scienceqa.read_problems(tmp_path)


def test_a_split_naming_an_unknown_pid_is_refused(tmp_path):
    shutil.copy(OFFICIAL / "problems.json", tmp_path)
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["12", "99"]}))
    with pytest.raises(ScienceQAFormatError, match="split 'test' lists pid 99"):
        scienceqa.read_problems(tmp_path)


# ------------------------------------------------------------------ the world's set
def test_the_world_set_has_2_to_5_choices_balanced_letters_and_true_answers(world_set):
    layout, counts = world_set
    problems, splits = scienceqa.read_problems(layout.scienceqa)
    assert counts == {s: len(splits[s]) for s in ("train", "val", "test")} and counts["train"] == 120
    contexts = scienceqa.world_contexts(layout, ("train", "val", "test"))
    letters: dict[tuple, Counter] = defaultdict(Counter)
    for p in problems.values():
        assert 2 <= len(p.choices) <= 5 and len(set(p.choices)) == len(p.choices), p
        assert p.category in scienceqa.choices.CATEGORIES and p.lecture and p.solution
        letters[(p.split, len(p.choices))][p.letter] += 1
        objs = contexts[p.extra["world_image"]].objects
        if p.image:
            assert p.hint == "" and (layout.world / p.image_key).is_file()
        else:
            assert p.hint == scienceqa.choices.scene_hint(objs)
        if p.category == "count" and p.question == "How many shapes are there?":
            assert p.choices[p.answer] == count_word(len(objs))
        if p.category == "colour":
            kind = p.question.removeprefix("Which colour is the ").removesuffix("?")
            assert [o.colour for o in objs if o.kind == kind] == [p.choices[p.answer]]
    for (split, n), seen in letters.items():  # every letter of n choices answers as often as the others (within one)
        assert set(seen) <= set("ABCDE"[:n]), (split, n, seen)
        if sum(seen.values()) >= n:
            assert len(seen) == n and max(seen.values()) - min(seen.values()) <= 1, (split, n, seen)
    cats = Counter(p.category for p in problems.values())
    assert set(cats) == set(scienceqa.choices.CATEGORIES)
    assert 0 < sum(p.image is None for p in problems.values()) < len(problems) / 2


def test_the_world_set_is_the_same_for_the_same_seed_and_another_for_another(world_set, tmp_path):
    layout, _ = world_set
    scienceqa.write_world_set(layout, tmp_path / "again")
    scienceqa.write_world_set(layout, tmp_path / "other", ScienceQAConfig(seed=1))
    same = (layout.scienceqa / "problems.json").read_bytes()
    assert (tmp_path / "again" / "problems.json").read_bytes() == same
    assert (tmp_path / "other" / "problems.json").read_bytes() != same


def test_a_redrawn_world_makes_the_set_refuse_to_be_used(world_set, tmp_path):
    layout, _ = world_set
    scienceqa.check_world(layout.scienceqa, layout)  # the world it was made from: fine
    info = json.loads((layout.scienceqa / "info.json").read_text())
    info["world_sha1"]["test"] = "0" * 40
    (tmp_path / "info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="changed since this set was written"):
        scienceqa.check_world(tmp_path, layout)


# ------------------------------------------------------------------ prompts and targets
PROBLEM = Problem(
    pid="7",
    question="Which colour is the circle?",
    choices=["red", "blue", "green"],
    answer=1,
    image="image.png",
    category="colour",
    lecture="A lecture.",
    solution="The circle is blue.",
    split="test",
    extra={"world_image": "test/000000000007.png"},
)


def test_the_question_is_asked_as_the_reference_asked_it():
    assert scienceqa.prompt_text(PROBLEM) == (
        "Context: N/A\nQuestion: Which colour is the circle?\nOptions: (A) red (B) blue (C) green"
    )
    hinted = Problem("8", "How many?", ["one", "two"], 0, hint="A picture shows a red circle.")
    assert scienceqa.prompt_text(hinted).startswith("Context: A picture shows a red circle.\nQuestion: How many?")


def test_the_two_answer_formats_put_the_reasoning_before_or_after_the_answer():
    assert scienceqa.target_text(PROBLEM, "reasoning-first") == "A lecture. The circle is blue. The answer is B."
    assert scienceqa.target_text(PROBLEM, "answer-first") == "The answer is B. BECAUSE: A lecture. The circle is blue."
    assert (
        scienceqa.target_text(PROBLEM, "answer-first", lecture=False) == "The answer is B. BECAUSE: The circle is blue."
    )
    with pytest.raises(ValueError, match="unknown answer format 'cot'"):
        scienceqa.target_text(PROBLEM, "cot")


def test_samples_are_valid_llava_samples_with_the_picture_the_world_cached(world_set):
    layout, _ = world_set
    problems = scienceqa.read_split(layout.scienceqa, "test")
    samples = scienceqa.to_samples(problems, "reasoning-first")
    assert all(validate.check_sample(s) == [] for s in samples)
    with_image = [s for s, p in zip(samples, problems) if p.image]
    assert with_image and all(s["conversations"][0]["value"].startswith("<image>\nContext: ") for s in with_image)
    assert {s["image"] for s in with_image} <= {
        f"test/{c.file_name}" for c in scienceqa.world_contexts(layout, ["test"]).values()
    }
    assert all("image" not in s for s, p in zip(samples, problems) if not p.image)


# ------------------------------------------------------------------ reading a reply
@pytest.mark.parametrize(
    "reply, n, letter",
    [
        ("The answer is B.", 3, "B"),
        ("The answer is B. BECAUSE: the circle is blue.", 3, "B"),
        ("The circle is blue and the square is red. The answer is C.", 3, "C"),
        ("the answer is B.", 3, "B"),  # the phrase in any case
        ("The answer is (B).", 3, "B"),
        ("The answer is B. So the answer is B.", 3, "B"),  # the same letter twice
        ("B", 3, "B"),
        (" B.\n", 3, "B"),
        ("(B)", 3, "B"),
        ("B. blue", 3, "B"),
        ("(B) blue", 3, "B"),
        ("b", 3, None),  # lower case: not an option letter ("a" is a word)
        ("The answer is b.", 3, None),
        ("The answer is a circle.", 3, None),
        ("The answer is A. The answer is B.", 3, None),  # two letters
        ("A or B", 3, None),
        ("AB", 3, None),
        ("", 3, None),  # none
        ("The circle is blue.", 3, None),
        ("A circle is round.", 3, None),
        ("D", 3, None),  # beyond the choices
        ("The answer is E.", 4, None),
        ("E", 5, "E"),
        ("F", 5, None),
    ],
)
def test_a_reply_is_read_by_the_references_rules(reply, n, letter):
    assert parse_answer(reply, n) == letter


# ------------------------------------------------------------------ scoring
def test_accuracy_per_category_and_with_and_without_a_picture_equals_the_hand_count():
    def p(pid, category, image, answer):
        return Problem(pid, "q?", ["x", "y", "z"], answer, image="image.png" if image else None, category=category,
                       subject={"count": "number"}.get(category, "appearance"))  # fmt: skip

    problems = [
        p("1", "count", True, 0),
        p("2", "count", True, 1),
        p("3", "count", False, 1),
        p("4", "colour", True, 2),
        p("5", "colour", False, 0),
        p("6", "shape", True, 0),
    ]
    replies = ["The answer is A.", "I think so", "B", "The answer is B.", "A. x", "The answer is D."]
    recs = scienceqa.mc_records(problems, replies)
    assert [r["parsed"] for r in recs] == ["A", None, "B", "B", "A", None]
    s = scienceqa.score_mc(recs)
    assert s["overall"] == 3 / 6 and s["questions"] == 6 and s["unparseable"] == 2 and s["chance"] == 1 / 3
    assert s["accuracy"] == {"colour": 1 / 2, "count": 2 / 3, "shape": 0.0}
    assert s["count"] == {"colour": 2, "count": 3, "shape": 1}
    assert s["subject"] == {"appearance": 1 / 3, "number": 2 / 3}
    assert s["image"] == {"image": 1 / 4, "no image": 2 / 2} and s["image_count"] == {"image": 4, "no image": 2}


# ------------------------------------------------------------------ training and evaluation
@pytest.mark.slow
def test_stage2_trains_on_the_set_in_both_formats_and_is_scored(world_set, tok, tmp_path):
    torch.set_flush_denormal(True)
    layout, _ = world_set
    preset = get_preset("tiny")
    train, test = (scienceqa.read_split(layout.scienceqa, s) for s in ("train", "test"))
    for fmt in scienceqa.FORMATS:
        model = tiny_llava(tok)
        samples = scienceqa.to_samples(train, fmt)
        summary = stages.run_stage(
            preset, model, tok, fake_features, 2, samples, tmp_path / fmt, progress=False, max_steps=2, batch_size=4
        )
        assert summary["steps"] == 2 and summary["examples"]["kept"] == len(samples) == 120
        assert all(torch.isfinite(torch.tensor(m["loss"])) for m in read_metrics(tmp_path / fmt) if "loss" in m)
    template = get_template(preset.model.stage2_template, tok)
    result, recs = scienceqa.evaluate_mc(model, tok, template, test, fake_features, max_new_tokens=6)
    assert result["questions"] == len(test) == len(recs) == sum(result["count"].values())
    assert result["unparseable"] == sum(r["parsed"] is None for r in recs)
    assert result["overall"] == sum(r["correct"] for r in recs) / len(recs)
    assert sum(result["image_count"].values()) == len(test) and set(result["image_count"]) == {"image", "no image"}
    contexts = scienceqa.world_contexts(layout, ["test"])
    read, _ = scienceqa.evaluate_mc_reader(model.lm, tok, template, test, contexts, max_new_tokens=6)
    assert read["questions"] == len(test) and 0.0 <= read["overall"] <= 1.0


def test_official_pictures_are_encoded_by_the_tower_and_a_missing_one_named(tmp_path):
    from PIL import Image  # only this test draws a picture

    tower = stages.load_vision(get_preset("tiny").vision)
    problems = scienceqa.read_split(OFFICIAL, "test")
    with pytest.raises(FileNotFoundError, match="pid 12: its image .*test/12/image.png does not exist"):
        scienceqa.image_features(tower, problems, tmp_path)
    (tmp_path / "test" / "12").mkdir(parents=True)
    Image.new("RGB", (80, 60), (30, 90, 200)).save(tmp_path / "test" / "12" / "image.png")
    feats = scienceqa.image_features(tower, problems, tmp_path)
    assert list(feats) == ["test/12/image.png"]
    assert feats["test/12/image.png"].shape == (tower.num_patches, tower.width)
    expected = tower.encode([tmp_path / "test" / "12" / "image.png"])[0]
    assert torch.equal(feats["test/12/image.png"], expected)


# ------------------------------------------------------------------ the command
def test_the_command_writes_the_set_and_says_what_train_and_evaluate_lack(world_set, tmp_path, monkeypatch, caplog):
    layout, counts = world_set
    monkeypatch.setenv("LLAVA_LITE_OUTPUTS", str(tmp_path))
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "world").symlink_to(layout.world.resolve(), target_is_directory=True)
    assert cli.main(["scienceqa", "write", "--questions-per-scene", "1"]) == 0
    _, splits = scienceqa.read_problems(tmp_path / "tiny" / "scienceqa")
    assert {s: len(p) for s, p in splits.items()} == {"train": 60, "val": 20, "test": 20}
    assert cli.main(["scienceqa", "train", "--format", "answer-first"]) == 1
    assert "no stage-1 checkpoint" in caplog.text
    assert cli.main(["scienceqa", "evaluate"]) == 1
    assert "needs --checkpoint (or --reader)" in caplog.text
    with pytest.raises(SystemExit):
        cli.main(["scienceqa", "train", "--format", "cot"])


def test_guessing_is_scored_per_category_too():
    rec = {"subject": "s", "image": True}
    recs = [
        {**rec, "category": "count", "choices": 2, "parsed": "A", "correct": True, "named": True},
        {**rec, "category": "count", "choices": 4, "parsed": "B", "correct": False, "named": True},
        {**rec, "category": "size", "image": False, "choices": 5, "parsed": None, "correct": False, "named": False},
    ]
    s = scienceqa.score_mc(recs)
    assert s["chance_by"] == {"count": (1 / 2 + 1 / 4) / 2, "size": 1 / 5}
    assert s["named"] == 2 / 3


def test_a_reasoning_names_the_right_option_only_when_no_other_is_named_too():
    choices = ["green triangle", "purple circle", "circle", "left of"]
    assert scienceqa.named_options("The Purple circle is large. The answer is B.", choices) == {1}
    assert scienceqa.named_options("A circle, and a green triangle.", choices) == {0, 2}
    assert scienceqa.named_options("It lies to the left of it; it is left-of-centre.", choices) == {3}
    assert scienceqa.named_options("The answer is C.", choices) == set()
    p = Problem("9", "Which shape is the largest?", choices, 1, category="size", subject="comparison")
    recs = scienceqa.mc_records([p] * 3, ["The purple circle is largest. The answer is A.",
                                          "The purple circle and the circle. The answer is B.", "B"])  # fmt: skip
    assert [(r["named"], r["correct"]) for r in recs] == [(True, False), (False, True), (False, True)]
