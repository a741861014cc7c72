"""A notebook rerun after a disconnect: ``run_stage`` goes on from the run folder's last checkpoint
when the folder holds this same run, and starts afresh (clearing the other run's checkpoints) when
anything that makes the run differs."""

import pytest
import torch

from llava_lite import stages
from llava_lite.config import get_preset
from llava_lite.paths import Layout
from llava_lite.train import latest_checkpoint, read_metrics

from llava_fixtures import fake_features, tiny_llava, world_samples

ARGS = {"progress": False, "max_steps": 6, "batch_size": 4, "save_every": 2}


class Disconnect(Exception):
    """Stands for the runtime going away mid-training."""


def _features_that_fail_after(calls: int):
    seen = [0]

    def features(name):
        seen[0] += 1
        if seen[0] > calls:
            raise Disconnect(f"feature read {seen[0]}")
        return fake_features(name)

    return features


def _samples():
    return [s for s in world_samples(24)[1] if s["type"] == "caption"]


def test_a_rerun_after_a_disconnect_resumes_from_the_last_checkpoint_in_the_home_folder(tok, tmp_path, monkeypatch):
    monkeypatch.delenv("LLAVA_LITE_OUTPUTS", raising=False)
    monkeypatch.setenv("LLAVA_LITE_HOME", str(tmp_path / "drive"))
    run = stages.run_dir(Layout.for_preset("tiny"), 1)
    assert run == tmp_path / "drive" / "outputs" / "tiny" / "checkpoints" / "stage1"
    preset = get_preset("tiny")
    with pytest.raises(Disconnect):  # 4 samples a step: the 13th read is in step 4, after checkpoint-2
        stages.run_stage(preset, tiny_llava(tok), tok, _features_that_fail_after(12), 1, _samples(), run, **ARGS)
    assert latest_checkpoint(run).name == "checkpoint-2"
    # the notebook is run again from the top: a fresh model from the same seed, the same data and settings
    summary = stages.run_stage(preset, tiny_llava(tok), tok, fake_features, 1, _samples(), run, **ARGS)
    assert (summary["started_at"], summary["steps"]) == (2, 6)
    assert latest_checkpoint(run).name == "checkpoint-6"


@pytest.mark.slow
def test_a_run_with_other_settings_or_data_starts_afresh_and_never_resumes_the_old_checkpoints(tok, tmp_path):
    preset, run = get_preset("tiny"), tmp_path / "stage1"
    with pytest.raises(Disconnect):
        stages.run_stage(preset, tiny_llava(tok), tok, _features_that_fail_after(12), 1, _samples(), run, **ARGS)
    other = {**ARGS, "lr": 5e-4}
    with pytest.raises(Disconnect):  # killed before its first checkpoint: the old run's is gone already
        stages.run_stage(preset, tiny_llava(tok), tok, _features_that_fail_after(4), 1, _samples(), run, **other)
    assert latest_checkpoint(run) is None and not list(run.glob("checkpoint-*"))
    summary = stages.run_stage(preset, tiny_llava(tok), tok, fake_features, 1, _samples(), run, **other)
    assert summary["started_at"] == 0
    fewer = stages.run_stage(preset, tiny_llava(tok), tok, fake_features, 1, _samples()[:20], run, **other)
    assert fewer["started_at"] == 0  # other samples: another run
    forced = stages.run_stage(preset, tiny_llava(tok), tok, fake_features, 1, _samples(), run, resume=False, **other)
    assert forced["started_at"] == 0


def test_a_run_paused_with_stop_at_goes_on_when_started_again_and_ends_as_an_unbroken_run(tok, tmp_path):
    preset = get_preset("tiny")
    whole = tiny_llava(tok)
    stages.run_stage(preset, whole, tok, fake_features, 1, _samples(), tmp_path / "whole", **ARGS)
    paused = tiny_llava(tok)
    first = stages.run_stage(preset, paused, tok, fake_features, 1, _samples(), tmp_path / "paused", stop_at=3, **ARGS)
    assert first["stopped_at"] == 3 and latest_checkpoint(tmp_path / "paused").name == "checkpoint-3"
    rerun = stages.run_stage(
        preset, tiny_llava(tok), tok, fake_features, 1, _samples(), tmp_path / "paused", stop_at=3, **ARGS
    )
    assert (rerun["started_at"], rerun["stopped_at"]) == (3, 3)  # already there: no step more
    assert [m["step"] for m in read_metrics(tmp_path / "paused")][-1] == 3
    again = tiny_llava(tok)  # a fresh model, as a notebook run again from the top builds it
    rest = stages.run_stage(preset, again, tok, fake_features, 1, _samples(), tmp_path / "paused", **ARGS)
    assert (rest["started_at"], rest["stopped_at"], rest["steps"]) == (3, None, 6)
    for (name, p), (_, q) in zip(whole.projector.named_parameters(), again.projector.named_parameters()):
        assert torch.equal(p, q), name
