"""The judge score: reading a judge's two scores, the relative score, LLaVA-Bench's files, the
endpoint judge (our HTTP server, then ``transformers serve``) and the offline fact-checking judge."""

import json
import random
import re
from pathlib import Path

import pytest
import torch

from llava_lite import cli, jsonl, judge, stages, world
from llava_lite.coco import SymbolicContext
from llava_lite.config import TeacherConfig, TrainConfig, WorldConfig, get_preset
from llava_lite.facts import Obj
from llava_lite.paths import Layout
from llava_lite.teachers.testing_server import FaultyChatServer
from llava_lite.train import save_checkpoint

from serve_fixtures import transformers_serve
from test_chat_serve import save_tiny_chat_model
from test_chat_teacher import KEY, KEY_ENV, assert_key_nowhere


def contexts(n: int, seed: int = 1) -> list[SymbolicContext]:
    scenes = world.sample_world(WorldConfig(splits={"test": n}, seed=seed))["test"]
    return [
        SymbolicContext(
            s.image_id, s.file_name, s.size, s.size, world.captions(s, random.Random(s.image_id)), s.objects()
        )
        for s in scenes
    ]


@pytest.fixture(scope="module")
def bench():
    return judge.build_questions(contexts(30))


# ---------------------------------------------------------------- reading the two scores
PARSED = [
    ("8 9", (8, 9)),
    ("8, 9", (8, 9)),
    ("8,9", (8, 9)),
    ("8/9", (8, 9)),
    ("8 and 9", (8, 9)),
    ("7.5 9", (7.5, 9)),
    ("**8 9**", (8, 9)),
    ("Scores: 6, 10", (6, 10)),
    ("8/10, 9/10", (8, 9)),
    ("\n\n  8 9\nAssistant 2 names every object.", (8, 9)),
    ("8 9.", (8, 9)),
    ("Assistant 1: 8 ... Assistant 2: 9", (8, 9)),
    ("Assistant 1: 8\nAssistant 2: 9\nBoth are fine.", (8, 9)),
    ("Assistant 2: 3, Assistant 1: 7", (7, 3)),
    ("Assistant 1 score: 4/10; Assistant 2 score: 6/10", (4, 6)),
]
UNREADABLE = [
    "",
    "   \n  ",
    "8",
    "9/10",  # one score out of ten, not two
    "8 9 10",
    "11 9",
    "0 5",
    "-1 -1",  # what the reference scorer writes for a failure: never a score here
    "Both answers are good.",
    "Assistant 1 is better. 8 9",
    "The scores are 8 and 9.",
    "Assistant 1: 8",
    "Explanation first.\n8 9",
]


@pytest.mark.parametrize("reply, scores", PARSED)
def test_scores_are_read_from_the_forms_judges_write(reply, scores):
    assert judge.parse_scores(reply) == scores


@pytest.mark.parametrize("reply", UNREADABLE)
def test_a_reply_without_two_clear_scores_on_its_first_line_is_refused(reply):
    assert judge.parse_scores(reply) is None


# ---------------------------------------------------------------- the score
RECORDS = [
    {"question_id": 0, "category": "conversation", "reference": 8, "model": 6},
    {"question_id": 1, "category": "conv", "reference": 6, "model": 6},  # LLaVA-Bench's name for the type
    {"question_id": 2, "category": "detail", "reference": 10, "model": 5},
    {"question_id": 3, "category": "complex", "reference": 4, "model": 6},
    {"question_id": 4, "category": "complex", "reference": None, "model": None},  # unreadable: left out
]


def test_relative_score_is_a_ratio_of_means_per_type_and_pooled_and_leaves_unrated_records_out():
    got = judge.relative_score(RECORDS)
    # conversation 100 * (6+6)/2 / ((8+6)/2) = 600/7; detail 50; complex 150; all 100 * 23/4 / (28/4) = 575/7
    assert got == pytest.approx({"conversation": 600 / 7, "detail": 50.0, "complex": 150.0, "all": 575 / 7})
    s = judge.summarise(RECORDS)
    assert s["rated"] == {"conversation": 2, "detail": 1, "complex": 1, "all": 4}
    assert s["unrated"] == {"conversation": 0, "detail": 0, "complex": 1, "all": 1}
    assert s["reference_mean_x10"]["all"] == pytest.approx(70.0) and s["model_mean_x10"]["all"] == pytest.approx(57.5)
    assert s["paper"] == {"conversation": 83.1, "detail": 75.3, "complex": 96.5, "all": 85.1}
    assert judge.table_rows(s)[0] == {
        "model": "ours",
        "conversation": 85.7,
        "detail": 50.0,
        "complex": 150.0,
        "all": 82.1,
    }


def test_the_offline_summary_names_the_kinds_of_fact_the_judge_could_not_check():
    photo = SymbolicContext(9, "9.jpg", 640, 480, ["A dog."], [Obj("dog", (0.1, 0.1, 0.4, 0.5))])
    q = judge.BenchQuestion(0, "9.jpg", "detail", "Describe it.", "There is one dog.", photo)
    recs = judge.judge_offline([q], {0: "There is one dog on the left. It is large."})
    assert recs[0]["facts_checked"] == 1 and recs[0]["model"] == 10.0  # "one dog"; its place and size unread
    assert judge.summarise(recs)["unchecked"] == ["colour", "shape", "position", "size"]
    world_q = judge.build_questions(contexts(1), 1)
    world_recs = judge.judge_offline(world_q, {x.question_id: x.reference for x in world_q})
    assert judge.summarise(world_recs)["unchecked"] == []
    assert "unchecked" not in judge.summarise(RECORDS)  # an endpoint judge's records say nothing of it


def test_position_bias_is_what_an_answer_gains_by_being_shown_first():
    recs = [
        {"question_id": 0, "order": "reference_first", "reference": 9, "model": 5},
        {"question_id": 0, "order": "model_first", "reference": 7, "model": 8},  # the winner flips
        {"question_id": 1, "order": "reference_first", "reference": 6, "model": 6},
        {"question_id": 1, "order": "model_first", "reference": 6, "model": 7},
        {"question_id": 2, "order": "reference_first", "reference": 6, "model": 6},
        {"question_id": 2, "order": "model_first", "reference": None, "model": None},  # not paired
    ]
    # question 0: ((9-7) + (8-5)) / 2 = 2.5; question 1: ((6-6) + (7-6)) / 2 = 0.5
    assert judge.position_bias(recs) == {"questions": 2, "bias": pytest.approx(1.5), "flips": 2}


# ---------------------------------------------------------------- the question set and the files
def test_the_bench_asks_each_type_once_per_image_with_the_teachers_answer(bench):
    assert len(bench) == 90 and [q.question_id for q in bench] == list(range(90))
    assert [q.category for q in bench[:6]] == ["conversation", "detail", "complex"] * 2
    assert len({q.image for q in bench}) == 30
    assert all(q.text and "<image>" not in q.text and q.reference for q in bench)
    with pytest.raises(ValueError, match="wants 30 images, only 2"):
        judge.build_questions(contexts(2))


def write_official(folder: Path) -> dict[str, Path]:
    """Three files shaped as LLaVA-Bench ships them (extra keys and all), one COCO photo."""
    q = [
        {"question_id": 0, "image": "000000441147.jpg", "text": "How many suitcases are there?", "category": "conv"},
        {"question_id": 1, "image": "000000441147.jpg", "text": "Describe the image.", "category": "detail"},
        {"question_id": 2, "image": "000000441147.jpg", "text": "Why are they here?", "category": "complex"},
    ]
    ctx = {
        "id": "000000441147",
        "image": "000000441147.jpg",
        "captions": ["Two old suitcases stacked.", "A pair of suitcases on a table."],
        "instances": [
            {"id": 1, "category": "suitcase", "bbox": [0.1, 0.2, 0.5, 0.9]},
            {"id": 2, "category": "suitcase", "bbox": [0.5, 0.2, 0.9, 0.9]},
            {"id": 3, "category": "dining table", "bbox": [0.0, 0.6, 1.0, 1.0]},
        ],
    }
    ref = [
        {"question_id": i, "text": t, "category": c, "answer_id": f"ref{i}"}
        for i, t, c in [
            (0, "There are two suitcases.", "conv"),
            (1, "Two suitcases stand on a dining table.", "detail"),
            (2, "The two suitcases wait on the table for a trip.", "complex"),
        ]
    ]
    ans = [
        {
            "question_id": 0,
            "prompt": "x",
            "text": "There are three suitcases.",
            "answer_id": "a0",
            "model_id": "m",
            "metadata": {},
        },
        {
            "question_id": 1,
            "prompt": "x",
            "text": "Two suitcases and a dog on a dining table.",
            "answer_id": "a1",
            "model_id": "m",
            "metadata": {},
        },
        {
            "question_id": 2,
            "prompt": "x",
            "text": "The suitcases are packed for a trip.",
            "answer_id": "a2",
            "model_id": "m",
            "metadata": {},
        },
    ]
    paths = {
        "questions": folder / "qa90_questions.jsonl",
        "context": folder / "caps_boxes_coco2014_val_80.jsonl",
        "reference": folder / "qa90_gpt4_answer.jsonl",
        "answers": folder / "answers.jsonl",
    }
    for key, recs in (("questions", q), ("context", [ctx]), ("reference", ref), ("answers", ans)):
        paths[key].write_text("".join(json.dumps(r) + "\n" for r in recs))
    return paths


def test_llava_bench_files_in_their_official_layout_are_read_and_scored(tmp_path):
    paths = write_official(tmp_path)
    questions = judge.read_bench(paths["questions"], paths["context"], paths["reference"])
    assert [(q.question_id, q.category) for q in questions] == [(0, "conversation"), (1, "detail"), (2, "complex")]
    ctx = questions[0].context
    assert [o.name for o in ctx.objects] == ["suitcase", "suitcase", "dining table"] and len(ctx.captions) == 2
    assert ctx.text().endswith("dining table: [0.000, 0.600, 1.000, 1.000]")
    answers = judge.read_answers(paths["answers"])
    recs = {r["question_id"]: r for r in judge.judge_offline(questions, answers)}
    assert recs[0]["contradicted"] == ["three suitcases"] and recs[0]["model"] == 1.0
    assert recs[1]["invented"] == ["dog"] and recs[1]["unchecked"] == ["colour", "shape", "position", "size"]


def test_our_bench_written_in_the_official_layout_reads_back_the_same(bench, tmp_path):
    paths = judge.write_bench(bench, tmp_path)
    first = json.loads(paths["questions"].read_text().splitlines()[1])
    assert set(first) == {"question_id", "image", "text", "category"} and first["category"] == "detail"
    back = judge.read_bench(paths["questions"], paths["context"], paths["reference"])
    assert [(q.question_id, q.image, q.category, q.text, q.reference) for q in back] == [
        (q.question_id, q.image, q.category, q.text, q.reference) for q in bench
    ]
    assert [o.name for o in back[0].context.objects] == [o.name for o in bench[0].context.objects]


@pytest.mark.parametrize(
    "change, error",
    [
        (
            lambda d: d["context"].update(bbox=[10, 20, 300, 400]),
            r"caps.*: line 1, instance 0: expected a normalised box",
        ),
        (lambda d: d["question"].update(category="poem"), r"qa90_questions.jsonl: line 1: unknown category 'poem'"),
        (lambda d: d["question"].pop("text"), r"qa90_questions.jsonl: line 1: missing 'text'"),
        (lambda d: d["question"].update(image="x.jpg"), r"line 1: image 'x.jpg' is not in the context file"),
    ],
)
def test_a_malformed_bench_file_is_refused_naming_the_file_and_line(tmp_path, change, error):
    paths = write_official(tmp_path)
    q = json.loads(paths["questions"].read_text().splitlines()[0])
    c = json.loads(paths["context"].read_text())
    change({"question": q, "context": c["instances"][0]})
    paths["questions"].write_text(json.dumps(q) + "\n")
    paths["context"].write_text(json.dumps(c) + "\n")
    with pytest.raises(ValueError, match=error):
        judge.read_bench(paths["questions"], paths["context"], paths["reference"])


# ---------------------------------------------------------------- the offline judge
TWO = SymbolicContext(
    1,
    "1.png",
    64,
    64,
    ["A red circle and a blue square."],
    [Obj("red circle", (0.05, 0.05, 0.35, 0.35)), Obj("blue square", (0.75, 0.75, 0.9, 0.9))],
)
CORRECT = (
    "There are two shapes. The red circle is in the top left corner and large. The blue square is in the "
    "bottom right corner and small. The red circle is above the blue square."
)


def test_the_offline_judge_scores_a_contradicted_fact_and_an_invented_object_by_its_formula():
    right = judge.offline_judge(TWO, "Describe the image.", CORRECT, CORRECT)
    # 8 facts: a count, two objects there, two regions, two sizes, one relation; all right, all covered
    assert right.checked == 8 and right.precision == 1 and right.coverage == 1 and right.score == 10
    wrong = judge.offline_judge(TWO, "Describe the image.", CORRECT.replace("top left", "bottom left"), CORRECT)
    assert [f.text for f in wrong.contradicted] == ["the red circle is in the bottom left corner"]
    # P = C = 7/8 -> F = 7/8 -> 1 + 9 * 7/8 = 8.875, 1.125 below the correct answer
    assert wrong.score == pytest.approx(8.875) and right.score - wrong.score == pytest.approx(1.125)
    invented = judge.offline_judge(TWO, "Describe the image.", CORRECT + " A green triangle is in the centre.", CORRECT)
    # one more fact, wrong (the triangle is not there; its position is not checked again): P = 8/9, C = 1
    # F = 2 * 8/9 / (8/9 + 1) = 16/17 -> 1 + 9 * 16/17 = 9.4706, 9/17 below the correct answer
    assert invented.invented == ["green triangle"] and invented.hallucination_rate == pytest.approx(1 / 3)
    assert invented.score == pytest.approx(1 + 9 * 16 / 17) and right.score - invented.score == pytest.approx(9 / 17)
    assert judge.offline_judge(TWO, "Describe the image.", "I cannot tell.", CORRECT).score == 1.0
    assert "rating = 1 + 9 * F" in judge.SCORE_FORMULA and "rating = 1 + 9 * F" in judge.offline_judge.__doc__


def test_the_offline_judge_checks_colours_shapes_counts_and_absence_in_the_shapes_world():
    got = judge.offline_judge(
        TWO, "q", "The circle is red. The blue object is a square. There is no green square. There are three circles."
    )
    marks = {f.key: f.correct for f in got.facts}
    assert marks[("colour", "circle", "red")] and marks[("shape", "blue", "square")]
    assert marks[("exist", "green square", False)] and not marks[("count", None, None, "circle", 3)]
    assert got.unchecked == ()


def test_on_a_coco_photo_it_checks_presence_and_counts_and_says_what_it_cannot_check():
    photo = SymbolicContext(
        9,
        "9.jpg",
        640,
        480,
        ["Two dogs on a couch."],
        [Obj("dog", (0.1, 0.1, 0.4, 0.5)), Obj("dog", (0.5, 0.1, 0.9, 0.5)), Obj("couch", (0.0, 0.3, 1.0, 1.0))],
    )
    got = judge.offline_judge(
        photo,
        "q",
        "There are two dogs and a cat on the couch. The dog is brown and large in the centre. There is no person.",
    )
    assert {f.key: f.correct for f in got.facts} == {
        ("count", None, None, "dog", 2): True,
        ("exist", "cat", True): False,
        ("exist", "couch", True): True,
        ("exist", "dog", True): True,
        ("exist", "person", False): True,
    }
    assert got.invented == ["cat"] and got.unchecked == ("colour", "shape", "position", "size")
    # no reference: coverage is the share of the photo's objects named (dog, couch: 1); P = 4/5
    assert got.coverage == 1 and got.score == pytest.approx(1 + 9 * 2 * 0.8 / 1.8)


def test_the_teachers_own_answers_are_never_contradicted_and_rate_ten(bench):
    more = judge.build_questions(contexts(60, seed=7), 60)
    checked = 0
    for q in [*bench, *more]:
        got = judge.offline_judge(q.context, q.text, q.reference, q.reference)
        assert not got.contradicted and not got.invented, (q.reference, [f.text for f in got.contradicted])
        assert got.score in (10.0, None)  # None: a reply stating nothing checkable
        checked += got.checked
    assert checked > 1000


# ---------------------------------------------------------------- the endpoint judge
def scripted_judge(messages: list[dict]) -> str:
    """Rate the reference 8 and the model 6, each plus one when shown first; "ramble" for question 2."""
    user = messages[-1]["content"]
    first = re.search(r"\[Assistant 1\]\n(.*?)\n\[End of Assistant 1\]", user, re.S).group(1)
    if "[Question]\nQ2?" in user:
        return "I like both answers."
    return "9 6\nThe first is better." if first.startswith("REF") else "Assistant 1: 7\nAssistant 2: 8"


def tiny_bench(n: int = 4) -> tuple[list[judge.BenchQuestion], dict]:
    ctx = TWO
    qs = [judge.BenchQuestion(i, ctx.file_name, judge.TYPES[i % 3], f"Q{i}?", f"REF {i}", ctx) for i in range(n)]
    return qs, {i: f"MODEL {i}" for i in range(n)}


def judge_teacher(base_url: str, **changes) -> TeacherConfig:
    settings = dict(
        kind="chat",
        model="judge-model",
        base_url=base_url,
        api_key_env=KEY_ENV,
        chat_concurrency=3,
        chat_timeout_s=5,
        chat_backoff_s=0.01,
        chat_max_backoff_s=0.05,
    )
    return TeacherConfig(**(settings | changes))


def test_endpoint_judge_asks_both_orders_counts_unreadable_replies_and_a_rerun_asks_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    questions, answers = tiny_bench()
    out = tmp_path / "judge.jsonl"
    with FaultyChatServer(api_key=KEY, reply=scripted_judge) as server:
        run = judge.endpoint_judge(questions, answers, out, judge_teacher(server.base_url), progress=False)
        assert run.asked == 8 and run.unparseable == 2 and run.already_done == 0 and len(server.log) == 8
        again = judge.endpoint_judge(questions, answers, out, judge_teacher(server.base_url), progress=False)
        assert again.asked == 0 and again.already_done == 8 and len(server.log) == 8
    recs = {r["id"]: r for r in again.records}
    assert len(recs) == 8
    assert (recs["0:reference_first"]["reference"], recs["0:reference_first"]["model"]) == (9, 6)
    assert (recs["0:model_first"]["reference"], recs["0:model_first"]["model"]) == (8, 7)
    assert recs["2:model_first"]["reference"] is None and recs["2:model_first"]["raw"] == "I like both answers."
    s = judge.summarise(again.records)
    # 6 rated judgements: reference 9, 8 three times each; model 6, 7 -> all = 100 * 6.5 / 8.5
    assert s["relative"]["all"] == pytest.approx(100 * 6.5 / 8.5) and s["unrated"]["all"] == 2
    assert s["position_bias"] == {"questions": 3, "bias": pytest.approx(1.0), "flips": 0}
    assert s["relative_by_order"]["reference_first"]["all"] == pytest.approx(100 * 6 / 9)
    assert_key_nowhere(tmp_path)


def test_run_bench_writes_both_judges_scores_and_never_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    questions, answers = tiny_bench(3)
    answers = {i: CORRECT for i in answers}
    questions = [judge.BenchQuestion(q.question_id, q.image, q.category, q.text, CORRECT, q.context) for q in questions]
    with FaultyChatServer(api_key=KEY, reply=lambda m: "8 8") as server:
        scores = judge.run_bench(questions, answers, tmp_path, judge_teacher(server.base_url), progress=False)
    assert scores["offline"]["relative"]["all"] == 100.0 and scores["endpoint"]["relative"]["all"] == 100.0
    assert scores["endpoint"]["unparseable"] == 0 and scores["endpoint"]["position_bias"]["bias"] == 0
    assert json.loads((tmp_path / "scores.json").read_text()) == scores
    assert_key_nowhere(tmp_path)


@pytest.mark.slow
def test_endpoint_judge_against_transformers_serve_both_orders_and_resume(tmp_path, monkeypatch):
    """A random model cannot write two scores: every reply is counted as unreadable, none is scored."""
    model_dir = tmp_path / "tiny-judge-model"
    save_tiny_chat_model(model_dir)
    server_log = tmp_path / "serve.log"
    monkeypatch.setenv(KEY_ENV, KEY)
    with transformers_serve(model_dir, server_log) as base:
        questions, answers = tiny_bench(3)
        cfg = judge_teacher(f"{base}/v1", model=str(model_dir), chat_max_tokens=8, chat_timeout_s=30)
        out = tmp_path / "judge.jsonl"
        run = judge.endpoint_judge(questions, answers, out, cfg, progress=False)
        again = judge.endpoint_judge(questions, answers, out, cfg, progress=False)
    posts = server_log.read_text().count('"POST /v1/chat/completions HTTP/1.1" 200')
    assert run.asked == 6 and posts == 6  # both orders of 3 questions, and the rerun sent nothing
    assert again.asked == 0 and again.already_done == 6
    assert {(r["question_id"], r["order"]) for r in again.records} == {(i, o) for i in range(3) for o in judge.ORDERS}
    unreadable = [r for r in again.records if not r["parsed"]]
    assert len(unreadable) == run.unparseable and all(isinstance(r["raw"], str) for r in again.records)
    assert judge.relative_score(unreadable) == {}
    assert_key_nowhere(tmp_path)


# ---------------------------------------------------------------- the command
def test_judge_command_scores_given_files_in_the_official_layout(tmp_path):
    paths = write_official(tmp_path)
    argv = [
        "judge",
        "--questions",
        str(paths["questions"]),
        "--context",
        str(paths["context"]),
        "--reference",
        str(paths["reference"]),
        "--answers",
        str(paths["answers"]),
        "--out",
        str(tmp_path / "out"),
    ]
    assert cli.main(argv) == 0
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert scores["questions"] == 3 and set(scores["offline"]["relative"]) <= {*judge.TYPES, "all"}
    assert len(list(jsonl.read_jsonl(tmp_path / "out" / "offline_judge.jsonl"))) == 3
    assert cli.main(["judge", "--questions", str(paths["questions"]), "--out", str(tmp_path / "x")]) == 1


@pytest.mark.slow
def test_judge_command_answers_from_a_checkpoint_and_writes_the_bench(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVA_LITE_OUTPUTS", str(tmp_path / "outputs"))
    torch.set_flush_denormal(True)
    layout = Layout.for_preset("tiny")
    cfg = get_preset("tiny").world
    cfg.splits = {"test": 10}
    world.generate(cfg, layout.world, progress=False)
    preset = get_preset("tiny")
    tower = stages.load_vision(preset.vision)
    lm, tok = stages.load_language(preset.language)
    model = stages.build_llava(preset, lm, tok, tower)
    ckpt = save_checkpoint(
        tmp_path / "run", 0, model, torch.optim.SGD(model.projector.parameters(), lr=0), TrainConfig(), 1
    )
    out = tmp_path / "bench"
    argv = ["judge", "--checkpoint", str(ckpt), "--images", "10", "--max-new-tokens", "12", "--out", str(out)]
    assert cli.main(argv) == 0
    answers = judge.read_answers(out / "answers.jsonl")
    back = judge.read_bench(out / "questions.jsonl", out / "context.jsonl", out / "reference_answers.jsonl")
    assert len(back) == 30 and set(answers) == {q.question_id for q in back}
    scores = json.loads((out / "scores.json").read_text())
    assert scores["questions"] == 30 and scores["offline"]["rated"]["all"] + scores["offline"]["unrated"]["all"] == 30


# ---------------------------------------------------------------- string matches beside the judge
def test_word_overlap_is_the_f1_of_shared_words():
    assert judge.word_f1("The red circle.", "the red circle") == 1.0
    # 2 shared words; precision 2/3, recall 2/4 -> F1 = 2 * (2/3) * (1/2) / (2/3 + 1/2) = 4/7
    assert judge.word_f1("a red circle", "the red circle here") == pytest.approx(4 / 7)
    assert judge.word_f1("blue", "red") == 0.0 and judge.word_f1("", "red") == 0.0


def test_the_two_rewordings_change_digits_or_exactly_one_colour():
    assert judge.digits_for_words("There are two shapes, one red.") == "There are 2 shapes, 1 red."
    assert judge.digits_for_words("no shapes, someone") == "no shapes, someone"  # whole words only
    assert judge.one_colour_swapped("A red circle and a red square.") == "A orange circle and a red square."
    assert judge.one_colour_swapped("A purple circle.") == "A red circle."  # the colours wrap around
    assert judge.one_colour_swapped("Two shapes.") == "Two shapes."


def test_string_matches_miss_what_the_judge_sees():
    """The digits version keeps the reference's rating though it is no exact match; the swapped colour
    keeps nearly every word yet is rated lower, for the fact it gets wrong."""
    q = judge.BenchQuestion(0, TWO.file_name, "detail", "Describe the image.", CORRECT, TWO)
    same, wrong = judge.string_match_examples([q])
    assert same["answer"].startswith("There are 2 shapes.") and not same["exact match"]
    assert same["judge"] == same["judge (reference)"] == 10.0
    assert "The orange circle is" in wrong["answer"] and wrong["word overlap"] >= 0.9
    assert wrong["judge"] < wrong["judge (reference)"] and wrong["judge found wrong"] == "orange circle"
    no_number = judge.BenchQuestion(1, TWO.file_name, "conversation", "What colour?", "The circle is red.", TWO)
    assert judge.string_match_examples([no_number]) == []


def test_best_and_worst_pick_the_extreme_ratings_of_each_type():
    q = [judge.BenchQuestion(i, TWO.file_name, "detail", "Describe the image.", CORRECT, TWO) for i in range(2)]
    answers = {0: CORRECT, 1: "There are three shapes."}
    rows = judge.best_and_worst(q, answers, judge.judge_offline(q, answers))
    assert [(r["type"], r["which"], r["model"]) for r in rows] == [
        ("detail", "best", CORRECT),
        ("detail", "worst", "There are three shapes."),
    ]
    assert rows[0]["rating"] == 10.0 and rows[0]["wrong"] == "-" and rows[1]["wrong"] == "three shapes"
    assert rows[0]["coverage"] == 1.0 and rows[1]["facts checked"] == 1 and rows[1]["coverage"] == 0.0
