"""The exact-answer score: items, scores, baselines, the blind samples and the mean loss
(batched generation itself is tested in test_generate.py)."""

import pytest

from llava_lite import conversation as conv
from llava_lite import evaluate as ev
from llava_lite.data import Collator, encode_samples

from llava_fixtures import fake_features


def test_every_question_of_an_exact_sample_becomes_one_item(exact_setup):
    _, _, samples = exact_setup
    items = ev.exact_items(samples)
    assert len(items) == sum(len(s["qtypes"]) for s in samples)
    assert all("<image>" not in it.question and it.answer for it in items)
    assert len({it.sample_id for it in items}) == len(items)


def test_scores_and_the_most_common_answer_baseline():
    items = [
        ev.Item(str(i), None, t, "q", a)
        for i, (t, a) in enumerate(
            [("colour", "red"), ("colour", "red"), ("colour", "blue"), ("exist", "yes"), ("exist", "no")]
        )
    ]
    base = ev.most_common_answer(items)
    assert base["accuracy"]["colour"] == pytest.approx(2 / 3) and base["answers"]["colour"] == "red"
    recs = ev.records(items, ["Red.", "blue", "Blue", "yes", "No, there is none"])
    s = ev.score(recs)
    assert s["accuracy"] == {"colour": pytest.approx(2 / 3), "exist": 1.0} and s["overall"] == pytest.approx(0.8)


def test_the_question_prior_answers_each_question_as_training_most_often_did():
    train = [
        ev.Item("t0", None, "colour", "What colour is the circle?", "red"),
        ev.Item("t1", None, "colour", "What colour is the circle?", "red"),
        ev.Item("t2", None, "colour", "What colour is the circle?", "blue"),
        ev.Item("t3", None, "colour", "What colour is the square?", "green"),
        ev.Item("t4", None, "colour", "What colour is the triangle?", "blue"),
        ev.Item("t5", None, "colour", "What colour is the cross?", "blue"),
        ev.Item("t6", None, "exist", "Is there a square?", "no"),
    ]
    test = [
        ev.Item("q0", None, "colour", "What colour is the circle?", "red"),  # prior: red (2 of 3)
        ev.Item("q1", None, "colour", "What colour is the square?", "blue"),  # prior: green, wrong
        ev.Item("q2", None, "colour", "What colour is the star?", "blue"),  # unseen: the type's blue
        ev.Item("q3", None, "exist", "Is there a square?", "yes"),  # prior: no, wrong
    ]
    prior = ev.question_prior(train, test)
    assert prior["accuracy"] == {"colour": pytest.approx(2 / 3), "exist": 0.0}
    assert prior["overall"] == pytest.approx(0.5) and prior["unseen"] == 1


def test_score_gives_each_types_most_common_answer_share_when_records_carry_the_answer():
    items = [
        ev.Item(str(i), None, t, "q", a)
        for i, (t, a) in enumerate(
            [
                ("colour", "red"),
                ("colour", "red"),
                ("colour", "blue"),
                ("count", "two"),
                ("count", "three"),
                ("count", "two"),
                ("count", "two"),
                ("exist", "yes"),
            ]
        )
    ]
    recs = ev.records(items, ["red", "blue", "blue", "two", "two", "one", "two", "no"])
    s = ev.score(recs)
    assert s["baseline"] == {"colour": pytest.approx(2 / 3), "count": 0.75, "exist": 1.0}
    assert s["count"] == {"colour": 3, "count": 4, "exist": 1} and s["questions"] == 8
    assert s["accuracy"]["count"] == 0.5 and s["accuracy"]["exist"] == 0.0
    without = ev.score([{k: v for k, v in r.items() if k != "answer"} for r in recs])
    assert "baseline" not in without and without["accuracy"] == s["accuracy"]


def test_blind_samples_have_no_image_anywhere(exact_setup):
    _, _, samples = exact_setup
    for s in ev.blind_samples(samples):
        assert "image" not in s and all("<image>" not in t["value"] for t in s["conversations"])


def test_mean_loss_matches_the_language_model_loss_and_describe_answers_each_image(exact_setup):
    tok, model, samples = exact_setup
    template = conv.get_template("chat", tok)
    examples, _ = encode_samples(samples[:1], template, 4, 256)
    collate = Collator(tok.pad_token_id, features=fake_features)
    batch = collate(examples)
    ref = model(input_ids=batch["input_ids"], labels=batch["labels"], image_features=batch["image_features"]).loss
    assert ev.mean_loss(model, examples, collate) == pytest.approx(ref.item(), rel=1e-4)
    names = [s["image"] for s in samples[:5]]
    said = ev.describe(model, template, tok, names, fake_features, max_new_tokens=5)
    assert len(said) == 5 and all(isinstance(t, str) for t in said)
    words = ev.nearest_words(model, tok, fake_features(names[0]), k=2)
    assert len(words) == 4 and all(len(w) == 2 for w in words)


# ------------------------------------------------------------------ error analysis
def test_the_wilson_interval_matches_its_formula():
    lo, hi = ev.wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert ev.wilson_interval(0, 0) == (0.0, 1.0)
    assert ev.wilson_interval(10, 10)[1] == 1.0


def _rec(qtype, question, answer, reply):
    return {"qtype": qtype, "question": question, "answer": answer, "normalised": reply, "correct": reply == answer}


def test_guessing_counts_the_options_a_question_names_else_the_types_answers():
    recs = [
        _rec("position", "Is the circle to the left or to the right of the square?", "left", "left"),
        _rec("position", "Is the circle above or below the square?", "below", "above"),
        _rec("colour", "What colour is the circle?", "red", "red"),
        _rec("colour", "What colour is the square?", "blue", "red"),
        _rec("colour", "What colour is the triangle?", "green", "red"),
    ]
    assert ev.guess_chance(recs) == {"position": 0.5, "colour": pytest.approx(1 / 3)}


def test_the_error_analysis_reads_chance_and_the_prior_from_the_numbers():
    left = "Is the circle to the left or to the right of the square?"
    position = [_rec("position", left, "left" if i % 2 else "right", "left") for i in range(20)]  # 10 of 20
    colour = [_rec("colour", f"What colour is shape {i}?", ("red", "blue", "green")[i % 3], "red") for i in range(3)]
    colour += [_rec("colour", "What colour is it?", "red", "red") for _ in range(27)]  # 28 of 30 right
    rows = ev.error_analysis(position + colour, prior={"position": 0.5, "colour": 0.95})
    by = {r["type"]: r for r in rows}
    assert [r["type"] for r in rows] == ["colour", "position"]  # in QTYPES order
    assert by["position"]["accuracy"] == 0.5 and by["position"]["reading"] == "at chance"
    assert by["position"]["most frequent mistake"] == "'left' for 'right' (10x)"
    assert by["colour"]["reading"] == "above chance, at the question prior"
    assert by["colour"]["over chance"] == round(28 / 30 - 1 / 3, 3)
    assert ev.error_analysis(colour)[0]["reading"] == "above chance"


def test_a_type_with_no_question_is_named_not_asked_and_never_scored():
    recs = ev.records([ev.Item("0", None, "count", "q", "two"), ev.Item("1", None, "exist", "q", "no")], ["2", "yes"])
    s = ev.score(recs)
    assert s["accuracy"] == {"count": 1.0, "exist": 0.0} and s["count"] == {"count": 1, "exist": 1}
    assert s["not_asked"] == ["colour", "shape", "position", "size"]
    assert [r["model"] for r in ev.table_rows({"m": s})] == ["m"] and "colour" not in ev.table_rows({"m": s})[0]
