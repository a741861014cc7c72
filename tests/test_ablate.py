"""The ablation runner: rows change what they say, a finished (row, seed) is never trained twice,
and the table's means, spreads and differences are the hand-computed ones."""

import json

import pytest
import torch

from llava_lite import ablate, jsonl, stages
from llava_lite.cli import main
from llava_lite.config import get_preset
from llava_lite.paths import Layout
from llava_lite.teachers import instruct

REDUCED = {"batch_size": 4, "eval_limit": 4, "stage1_steps": 2, "stage2_steps": 2}


@pytest.fixture(scope="module")
def tiny_outputs(small_world, tmp_path_factory):
    """An outputs folder whose ``tiny`` layout holds the small world and its instruction data."""
    root = tmp_path_factory.mktemp("outputs")
    layout = Layout(root / "tiny")
    layout.root.mkdir()
    (layout.root / "world").symlink_to(small_world, target_is_directory=True)
    for split in ("train", "test"):
        instruct.build_split(layout, split)
    return root


def test_a_row_changes_only_what_it_names():
    tiny = get_preset("tiny")
    last = ablate.row_preset(tiny, ablate.row_named("last layer"))
    linear = ablate.row_preset(tiny, ablate.row_named("linear projector"))
    assert last.vision.layer == -1 and last.model == tiny.model and tiny.vision.layer == -2
    assert linear.model.projector_type == "linear" and linear.vision == tiny.vision
    smaller = ablate.row_preset(tiny, ablate.row_named("smaller LM"))
    assert smaller.language.name == "tiny-lm-small" and smaller.language != tiny.language
    assert (smaller.vision, smaller.model) == (tiny.vision, tiny.model)
    assert stages.run_key(smaller, 2).startswith("lm-tiny-lm-small-")  # its stage runs never reuse the baseline's
    assert tiny.model.projector_type == "mlp2x_gelu" and tiny.language.name == "tiny-lm"  # the preset is untouched
    with pytest.raises(ValueError, match="no ablation row 'bigger'"):
        ablate.row_named("bigger")


@pytest.mark.slow
def test_reduced_units_train_score_and_resume_without_retraining(tiny_outputs, monkeypatch, capsys):
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)  # batches of 4 are faster on one thread, and the suite shares the CPU
    monkeypatch.setenv("LLAVA_LITE_OUTPUTS", str(tiny_outputs))
    out = tiny_outputs / "ablate"
    argv = ["ablate", "--rows", "last layer", "no stage 1", "--seeds", "0", "--out", str(out)]
    argv += ["--stage1-steps", "2", "--stage2-steps", "2", "--eval-limit", "4", "--batch-size", "4"]
    assert main([*argv, "--jobs", "2"]) == 0  # the two units side by side, each in its own process
    results = sorted((r for _, r in jsonl.read_jsonl(out / "results.jsonl")), key=lambda r: r["row"])
    assert [(r["row"], r["seed"]) for r in results] == [("last layer", 0), ("no stage 1", 0)]
    last, cold = results
    assert json.loads(last["reduced"]) == REDUCED and last["row_settings"]["layer"] == -1
    assert last["stage1_steps"] == 2 and (out / "last-layer-s0" / "stage1").is_dir()
    assert cold["stage1_steps"] == 0 and not (out / "no-stage-1-s0" / "stage1").exists()
    for r in results:
        assert r["stage2_steps"] == 2 and 0.0 <= r["exact"] <= 1.0 and 0.0 <= r["mc"] <= 1.0
        assert r["mc_questions"] == 4 and 0 <= r["mc_unparseable"] <= 4 and 0.0 <= r["mc_named"] <= 1.0
        assert r["stage2_examples"]["kept"] > 0
    report = (out / "report.md").read_text()
    assert "llava-lite ablate --rows" in report and "| last layer |" in report and "| no stage 1 |" in report
    assert "| last layer |" in capsys.readouterr().out

    def must_not_train(*a, **k):
        raise AssertionError("a finished unit was trained again")

    monkeypatch.setattr(ablate, "run_unit", must_not_train)
    assert main(argv) == 0  # everything is in results.jsonl already
    assert len(list(jsonl.read_jsonl(out / "results.jsonl"))) == 2


def test_the_table_holds_means_spreads_and_differences_from_the_baseline():
    def r(row, seed, exact, mc):
        return {"row": row, "seed": seed, "exact": exact, "mc": mc}

    results = [r("baseline", 0, 0.80, 0.60), r("baseline", 1, 0.90, 0.70), r("no stage 1", 0, 0.50, 0.40)]
    results += [r("no stage 1", 1, 0.70, 0.50)]
    base, cold = ablate.table(results)
    assert base == {
        "row": "baseline", "seeds": 2, "exact": 0.85, "exact spread": 0.1, "mc": 0.65, "mc spread": 0.1,
        "exact vs baseline": 0.0, "mc vs baseline": 0.0, "paper": 90.92, "paper vs baseline": 0.0,
    }  # fmt: skip
    assert cold["exact"] == 0.6 and cold["exact spread"] == 0.2 and cold["exact vs baseline"] == -0.25
    assert cold["mc"] == 0.45 and cold["mc vs baseline"] == -0.2 and cold["paper vs baseline"] == -5.11


def _result(row, seed, exact, mc, preset="tiny", reduced=None):
    return {"row": row, "seed": seed, "preset": preset, "exact": exact, "mc": mc, "reduced": reduced}


def test_saved_results_prefer_the_command_output_then_the_committed_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVA_LITE_OUTPUTS", str(tmp_path / "outputs"))
    docs = tmp_path / "ablations.jsonl"
    assert ablate.saved_results("tiny", docs) == ([], None)
    jsonl.write_jsonl(docs, [_result("baseline", 0, 0.8, 0.7), _result("baseline", 0, 0.5, 0.5, preset="colab")])
    assert ablate.saved_results("tiny", docs) == ([_result("baseline", 0, 0.8, 0.7)], docs)
    mine = Layout.for_preset("tiny").root / "ablate" / "results.jsonl"
    jsonl.write_jsonl(mine, [_result("baseline", 1, 0.6, 0.6, reduced='{"stage2_steps": 2}')])
    assert ablate.saved_results("tiny", docs)[1] == docs  # a reduced run is not the full ablation
    jsonl.write_jsonl(mine, [_result("baseline", 1, 0.6, 0.6)])
    assert ablate.saved_results("tiny", docs) == ([_result("baseline", 1, 0.6, 0.6)], mine)


def test_rows_are_compared_with_their_spread_over_seeds():
    results = [_result("answer first", 0, 0.5, 0.4), _result("baseline", 0, 0.6, 0.5), _result("baseline", 1, 0.8, 0.7)]
    assert ablate.by_row(results, "mc") == {"baseline": [0.5, 0.7], "answer first": [0.4]}
    assert ablate.compare(results, "baseline", "answer first", "mc") == (
        "baseline 0.600 (seeds 0.500-0.700) vs answer first 0.400 (seeds 0.400-0.400): baseline higher by 0.200; "
        "the seeds' ranges do not overlap"
    )
    results.append(_result("answer first", 1, 0.7, 0.6))
    assert ablate.compare(results, "baseline", "answer first", "mc").endswith("within what a reseed moves")
    assert ablate.compare(results, "baseline", "no stage 1") == "no results for ['no stage 1']"


@pytest.mark.slow
def test_a_train_limit_trains_on_that_many_samples_and_is_recorded(tiny_outputs, monkeypatch):
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)
    monkeypatch.setenv("LLAVA_LITE_OUTPUTS", str(tiny_outputs))
    reduced = {"stage1_steps": 1, "stage2_steps": 1, "eval_limit": 2, "batch_size": 4, "train_limit": 8}
    out = tiny_outputs / "ablate-limited"
    (result,) = ablate.run("tiny", out, [ablate.row_named("answer first")], (0,), progress=False, **reduced)
    assert json.loads(result["reduced"]) == reduced
    assert 0 < result["stage2_examples"]["kept"] <= 8 and result["stage2_steps"] == 1
