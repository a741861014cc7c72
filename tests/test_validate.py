"""`llava-lite validate`: every rule, on the project's JSONL and on official-style LLaVA JSON."""

import json
import logging

import pytest

from llava_lite.cli import main
from llava_lite.validate import check_sample, validate_file


def good(sid="000000033471", image="000000033471.jpg", **extra):
    sample = {
        "id": sid,
        "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the bus?"},
            {"from": "gpt", "value": "The bus is white and red."},
            {"from": "human", "value": "Is anyone getting on it?"},
            {"from": "gpt", "value": "Yes, a few people are stepping in."},
        ],
        **extra,
    }
    if image is not None:
        sample["image"] = image
    return sample


def rules(sample, images=None):
    return [(turn, rule) for turn, rule, _ in check_sample(sample, images)]


def test_official_llava_json_list_and_project_jsonl_with_extra_keys_pass(tmp_path):
    official = tmp_path / "llava_instruct.json"
    official.write_text(json.dumps([good(), good("000000052846", "000000052846.jpg")], indent=1))
    report = validate_file(official)
    assert report.ok and report.samples == 2
    ours = tmp_path / "chat.jsonl"
    ours.write_text(
        "".join(json.dumps(good(f"{i}-conversation", f"train/{i}.png", type="conversation")) + "\n" for i in range(3))
    )
    assert validate_file(ours).ok and validate_file(ours).samples == 3


def test_image_token_may_be_the_last_line_of_the_first_turn_and_text_only_samples_have_none():
    sample = good()
    sample["conversations"][0]["value"] = "What colour is the bus?\n<image>"
    assert rules(sample) == []
    text_only = good(image=None)
    text_only["conversations"][0]["value"] = "What colour are buses in London?"
    assert rules(text_only) == []


def test_roles_must_alternate_from_human_and_each_bad_turn_is_named():
    sample = good()
    sample["conversations"][2]["from"] = "gpt"
    assert rules(sample) == [(2, "order")]
    first_gpt = good()
    first_gpt["conversations"] = first_gpt["conversations"][1:2] + first_gpt["conversations"][:1]
    assert (0, "order") in rules(first_gpt)
    unknown = good()
    unknown["conversations"][1]["from"] = "assistant"
    assert rules(unknown) == [(1, "role")]


def test_a_conversation_ending_with_an_unanswered_human_turn_is_reported():
    sample = good()
    sample["conversations"].append({"from": "human", "value": "And then?"})
    assert rules(sample) == [(4, "order")]


@pytest.mark.parametrize("value", ["", "   \n", None, 42])
def test_empty_or_non_string_values_are_reported_with_their_turn(value):
    sample = good()
    sample["conversations"][3]["value"] = value
    assert rules(sample) == [(3, "value")]


@pytest.mark.parametrize("conversations", [None, [], "human: hi", {"from": "human"}])
def test_missing_or_empty_conversations_are_reported(conversations):
    sample = good()
    sample["conversations"] = conversations
    assert rules(sample) == [(None, "conversations")]


@pytest.mark.parametrize(
    "turn0, turn2, expected",
    [
        ("What colour is the bus?", "Is anyone getting on it?", [(0, "image-token")]),  # none at all
        ("<image>\n<image>\nWhat colour?", "Is anyone getting on it?", [(0, "image-token")]),  # two
        ("<image>\nWhat colour?", "<image>\nIs anyone getting on it?", [(2, "image-token")]),  # outside turn 0
        ("What <image> colour is the bus?", "Is anyone getting on it?", [(0, "image-token")]),  # mid-line
        ("What colour\n<image>\nis the bus?", "Is anyone getting on it?", [(0, "image-token")]),  # middle line
    ],
)
def test_exactly_one_image_token_on_the_first_or_last_line_of_the_first_human_turn(turn0, turn2, expected):
    sample = good()
    sample["conversations"][0]["value"] = turn0
    sample["conversations"][2]["value"] = turn2
    assert rules(sample) == expected


def test_image_token_in_a_sample_without_an_image_is_reported():
    assert rules(good(image=None)) == [(0, "image-token")]


def test_image_must_be_a_file_name_and_exist_when_an_image_folder_is_given(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "1.png").write_bytes(b"")
    assert rules(good(image="train/1.png"), tmp_path) == []
    assert rules(good(image="train/2.png"), tmp_path) == [(None, "image-file")]
    assert rules(good(image="train/2.png")) == []  # no folder given: not checked
    assert (None, "image") in rules(good(image=["a.png", "b.png"]))


def test_ids_must_be_present_and_unique_and_duplicates_name_the_first_use(tmp_path):
    assert rules(good(sid=None)) == [(None, "id")]
    path = tmp_path / "data.json"
    path.write_text(json.dumps([good("a"), good("b"), good("a", image="other.jpg"), good("b")]))
    report = validate_file(path)
    # the same id for the same image is how LLaVA's instruction files key an image's samples
    assert [(p.where, p.rule) for p in report.problems] == [("sample 2", "duplicate-id")]
    assert "sample 0" in report.problems[0].message


def test_bad_jsonl_lines_are_reported_by_line_and_a_bad_json_file_names_line_and_column(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(good("a")) + "\n{not json\n" + json.dumps(good("b")) + "\n")
    report = validate_file(path)
    assert report.samples == 2 and [(p.where, p.rule) for p in report.problems] == [("line 2", "json")]
    broken = tmp_path / "data.json"
    broken.write_text('[{"id": "a",\n "conversations": [}]')
    with pytest.raises(ValueError, match=r"data.json: not valid JSON at line 2, column"):
        validate_file(broken)


def test_cli_reports_each_problem_with_sample_id_and_turn_then_a_summary_and_exits_non_zero(tmp_path, caplog):
    bad = good("x1")
    bad["conversations"][1]["value"] = ""
    path = tmp_path / "data.json"
    path.write_text(json.dumps([good("x0"), bad, "not a sample"]))
    caplog.set_level(logging.INFO)
    assert main(["validate", str(path)]) == 1
    lines = [r.getMessage() for r in caplog.records]
    assert f"{path}: sample 1 (id 'x1'), turn 1: empty 'value'" in lines
    assert f"{path}: sample 2: expected an object, found str" in lines
    assert lines[-1] == f"{path}: 3 samples, 2 problems in 2 samples (value: 1, sample: 1)"
    caplog.clear()
    path.write_text(json.dumps([good("x0")]))
    assert main(["validate", str(path), "--images", str(tmp_path)]) == 1  # the image is not there
    (tmp_path / "000000033471.jpg").write_bytes(b"")
    assert main(["validate", str(path), "--images", str(tmp_path)]) == 0


def test_max_problems_shows_the_first_problems_then_how_many_more_and_the_summary(tmp_path, caplog):
    bad = [good(f"x{i}") for i in range(3)]
    for sample in bad:
        sample["conversations"][1]["value"] = ""
    path = tmp_path / "data.json"
    path.write_text(json.dumps(bad))
    caplog.set_level(logging.INFO)
    assert main(["validate", str(path), "--max-problems", "1"]) == 1
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        f"{path}: sample 0 (id 'x0'), turn 1: empty 'value'",
        "... 2 more problems not shown",
        f"{path}: 3 samples, 3 problems in 3 samples (value: 3)",
    ]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_file_with_a_byte_order_mark_passes_and_one_not_in_utf8_names_the_file_and_line(tmp_path, suffix):
    text = json.dumps([good()]) if suffix == ".json" else json.dumps(good()) + "\n"
    (tmp_path / f"bom{suffix}").write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert validate_file(tmp_path / f"bom{suffix}").ok
    latin = text.replace("colour", "colour\u00e9").encode("latin-1")
    (tmp_path / f"latin{suffix}").write_bytes(latin)
    with pytest.raises(ValueError, match=rf"latin{suffix}: not UTF-8 text \(byte 0xe9 at offset \d+, line 1\)"):
        validate_file(tmp_path / f"latin{suffix}")
