"""The one training loop: what each stage trains, checkpoints that resume exactly and keep what
trained, a diverging loss that names its samples, and the learning-rate schedule."""

import math
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import llava_lite.train as T
from llava_lite import conversation as conv
from llava_lite.config import PRESETS, get_preset
from llava_lite.data import Collator, encode_samples
from llava_lite.model import apply_lora
from llava_lite.train import TrainConfig, TrainingDiverged, latest_checkpoint, lr_factor, train

import kill_jobs
import kill_worker
from llava_fixtures import NUM_IMAGE_TOKENS, fake_features, tiny_llava


def _setup(tok, samples, stage=1):
    model = tiny_llava(tok)
    template = conv.get_template("plain" if stage == 1 else "chat", tok)
    data = [s for s in samples if (s["type"] == "caption") == (stage == 1)]
    examples, _ = encode_samples(data, template, NUM_IMAGE_TOKENS, 256)
    return model, examples, Collator(tok.pad_token_id, features=fake_features)


def test_stage1_trains_the_projector_and_leaves_everything_else_untouched(tok, samples, tmp_path):
    model, examples, collate = _setup(tok, samples)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, examples, collate, TrainConfig(stage=1, batch_size=8, max_steps=2, lr=1e-2), tmp_path, progress=False)
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == n.startswith("projector."), n


class Stop(Exception):
    pass


def test_resume_continues_exactly(tok, samples, tmp_path, monkeypatch):
    cfg = TrainConfig(stage=2, batch_size=4, max_steps=6, lr=3e-3, grad_accum=2, save_every=3, log_every=1)
    a, examples, collate = _setup(tok, samples, stage=2)
    train(a, examples, collate, cfg, tmp_path / "straight", progress=False)
    b, _, _ = _setup(tok, samples, stage=2)
    # stop after 3 steps (as if killed after the checkpoint), then resume for the rest
    orig = T.save_checkpoint

    def stop_after_first(*args, **kw):
        orig(*args, **kw)
        raise Stop

    with monkeypatch.context() as m:
        m.setattr(T, "save_checkpoint", stop_after_first)
        with pytest.raises(Stop):
            train(b, examples, collate, cfg, tmp_path / "resumed", progress=False)
    assert latest_checkpoint(tmp_path / "resumed").name == "checkpoint-3"
    c, _, _ = _setup(tok, samples, stage=2)  # a fresh process: new model, state from disk
    summary = train(c, examples, collate, cfg, tmp_path / "resumed", resume=True, progress=False)
    assert summary["started_at"] == 3
    for (n, p), (_, q) in zip(a.named_parameters(), c.named_parameters()):
        assert torch.equal(p, q), n
    steps = [m["step"] for m in T.read_metrics(tmp_path / "resumed")]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_nan_loss_stops_with_step_and_sample_ids(tok, samples, tmp_path):
    model, examples, collate = _setup(tok, samples)
    with torch.no_grad():
        model.projector.linear_1.weight[0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"step 0: loss is nan on samples \['\d+-caption'"):
        train(model, examples, collate, TrainConfig(stage=1, batch_size=4, max_steps=2), tmp_path, progress=False)


def test_lora_trains_adapters_and_projector_and_the_checkpoint_keeps_both(tok, samples, tmp_path):
    _, examples, collate = _setup(tok, samples, stage=2)
    model = apply_lora(tiny_llava(tok), r=4, alpha=8)
    groups = dict(T.set_trainable(model, 2))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or n.startswith("projector.") for n in names)
    assert any(n.startswith("projector.") for n in names) and len(groups["lm"]) > 0
    train(model, examples, collate, TrainConfig(stage=2, batch_size=8, max_steps=3, lr=1e-2), tmp_path, progress=False)
    saved = load_file(str(latest_checkpoint(tmp_path) / "trainable.safetensors"))
    assert set(saved) == set(names)
    fresh = apply_lora(tiny_llava(tok), r=4, alpha=8)
    trained = dict(model.named_parameters())
    assert any(not torch.equal(p, trained[n]) for n, p in fresh.named_parameters() if n in saved)
    T.load_trained(fresh, latest_checkpoint(tmp_path))
    for n, p in fresh.named_parameters():  # everything: what trained from the checkpoint, the rest as built
        assert torch.equal(p, trained[n]), n


def _wider(tok):
    """The tiny LLaVA over 16-wide features instead of 12."""
    model = tiny_llava(tok)
    model.projector.linear_1 = torch.nn.Linear(16, 32)
    return model


def test_loading_a_checkpoint_into_the_wrong_model_names_the_weights(tok, samples, tmp_path):
    model, examples, collate = _setup(tok, samples)
    train(model, examples, collate, TrainConfig(stage=1, batch_size=8, max_steps=1), tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"projector.linear_1.weight has shape \(32, 12\)"):
        T.load_trained(_wider(tok), latest_checkpoint(tmp_path))
    with pytest.raises(ValueError, match="do not exist in this model"):
        T.load_trained(tiny_llava(tok, projector_type="linear"), latest_checkpoint(tmp_path))


def test_set_trainable_refuses_an_unknown_stage(tok):
    with pytest.raises(ValueError, match="stage must be 1 or 2"):
        T.set_trainable(tiny_llava(tok), 3)


# ------------------------------------------------------------------ the schedule
def _cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """A linear warmup, then a cosine from the peak to zero, written out on its own (the stage
    settings of docs/results.md were measured on this curve)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def test_warmup_rises_linearly_from_one_over_warmup_to_one():
    assert [lr_factor(s, 100, 10) for s in range(10)] == [(s + 1) / 10 for s in range(10)]
    assert lr_factor(0, 100, 10) == 1 / 10 and lr_factor(9, 100, 10) == 1.0
    assert lr_factor(10, 100, 10) == 1.0  # the cosine starts at the peak


@pytest.mark.parametrize("floor", [0.0, 0.1])
def test_cosine_falls_steadily_to_the_floor_at_the_last_step(floor):
    values = [lr_factor(s, 100, 10, floor=floor) for s in range(10, 101)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(floor, abs=1e-12) and min(values) >= floor - 1e-12
    assert lr_factor(55, 100, 10, floor=floor) == pytest.approx(floor + (1 - floor) * 0.5)  # half way: half down
    assert lr_factor(150, 100, 10, floor=floor) == pytest.approx(floor, abs=1e-12)  # past the end: stays there


def test_decay_from_holds_the_peak_until_then_and_decays_over_the_rest():
    assert [lr_factor(s, 100, 10, decay_from=60) for s in range(10)] == [(s + 1) / 10 for s in range(10)]
    assert all(lr_factor(s, 100, 10, decay_from=60) == 1.0 for s in range(10, 61))
    tail = [lr_factor(s, 100, 10, floor=0.2, decay_from=60) for s in range(60, 101)]
    assert all(a > b for a, b in zip(tail, tail[1:]))
    assert lr_factor(80, 100, 10, floor=0.2, decay_from=60) == pytest.approx(0.6)  # half way between 1 and 0.2
    assert tail[-1] == pytest.approx(0.2, abs=1e-12)


def test_with_no_floor_the_schedule_is_bitwise_a_plain_cosine_with_warmup():
    for total, warmup in ((6, 1), (100, 3), (2000, 60), (7, 7), (1, 1)):
        for step in range(total + 3):
            assert lr_factor(step, total, warmup) == _cosine_with_warmup(step, total, warmup), (step, total)
            assert lr_factor(step, total, warmup, floor=0) == _cosine_with_warmup(step, total, warmup)


# ------------------------------------------------------------------ runs that survive reruns, kills and changes
def _train(tok, samples, out, cfg, resume=False, stop_at=None, monkeypatch=None, collate=None, **kw):
    """A fresh model trained into ``out``; ``stop_at``: raise Stop before that (0-based) step."""
    model, examples, default_collate = _setup(tok, samples, stage=cfg.stage)
    if stop_at is not None:
        orig = T._accumulate

        def accumulate(*args):
            if args[6] == stop_at:
                raise Stop
            return orig(*args)

        with monkeypatch.context() as m:
            m.setattr(T, "_accumulate", accumulate)
            with pytest.raises(Stop):
                train(model, examples, collate or default_collate, cfg, out, resume=resume, progress=False, **kw)
        return model, None
    return model, train(model, examples, collate or default_collate, cfg, out, resume=resume, progress=False, **kw)


def _same_weights(a, b):
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def _cfg(**changes):
    return TrainConfig(**{**dict(stage=1, batch_size=4, max_steps=6, lr=1e-2, save_every=2, log_every=1), **changes})


def test_a_new_run_in_a_folder_with_an_older_runs_later_checkpoints_keeps_its_own(tok, samples, tmp_path):
    _train(tok, samples, tmp_path, _cfg())  # the older run: checkpoint-4, checkpoint-6
    _train(tok, samples, tmp_path, _cfg(max_steps=3, save_every=1, lr=5e-3))  # a new run: 1, 2, 3
    assert latest_checkpoint(tmp_path).name == "checkpoint-3" and latest_checkpoint(tmp_path).is_dir()
    names = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert names == [
        "checkpoint-2",
        "checkpoint-3",
        "checkpoint-4",
        "checkpoint-6",
    ]  # its newest two, and the older run's


@pytest.mark.slow
def test_resume_after_a_new_run_stopped_before_its_first_checkpoint_never_loads_the_older_run(
    tok, samples, tmp_path, monkeypatch
):
    _train(tok, samples, tmp_path / "run", _cfg())  # the older run finished at step 6
    straight, _ = _train(tok, samples, tmp_path / "straight", _cfg(lr=5e-3))
    _train(tok, samples, tmp_path / "run", _cfg(lr=5e-3), stop_at=1, monkeypatch=monkeypatch)
    resumed, summary = _train(tok, samples, tmp_path / "run", _cfg(lr=5e-3), resume=True)
    assert summary["started_at"] == 0
    _same_weights(straight, resumed)


def test_a_run_killed_between_checkpoints_resumes_exactly_and_logs_each_step_once(tok, samples, tmp_path, monkeypatch):
    straight, _ = _train(tok, samples, tmp_path / "straight", _cfg())
    _train(tok, samples, tmp_path / "run", _cfg(), stop_at=3, monkeypatch=monkeypatch)  # steps 1-3 done, saved at 2
    assert [m["step"] for m in T.read_metrics(tmp_path / "run")] == [1, 2, 3]
    resumed, summary = _train(tok, samples, tmp_path / "run", _cfg(), resume=True)
    assert summary["started_at"] == 2
    _same_weights(straight, resumed)
    assert [m["step"] for m in T.read_metrics(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in T.read_metrics(tmp_path / "run")] == [
        m["loss"] for m in T.read_metrics(tmp_path / "straight")
    ]


def test_a_resume_under_changed_settings_is_refused_naming_each(tok, samples, tmp_path, monkeypatch):
    _train(tok, samples, tmp_path, _cfg(), stop_at=3, monkeypatch=monkeypatch)
    with pytest.raises(ValueError, match=r"checkpoint-2: made with other settings \(lr: 0.01 there, 0.02 now; "
                       r"max_steps: 6 there, 8 now\)") as e:  # fmt: skip
        _train(tok, samples, tmp_path, _cfg(lr=2e-2, max_steps=8, log_every=5), resume=True)
    assert "log_every" not in str(e.value)  # how a run reports is not a setting of its numbers
    with pytest.raises(ValueError, match=r"examples: 40 there, 39 now"):
        model, examples, collate = _setup(tok, samples)
        train(model, examples[:-1], collate, _cfg(), tmp_path, resume=True, progress=False)


def _as_if_saved_on_a_gpu(path):
    """Rewrite a CPU checkpoint's tensors as CUDA ones (the storage location in its pickle)."""
    import zipfile  # noqa: PLC0415  (only this test rewrites a checkpoint)

    with zipfile.ZipFile(path) as zin:
        entries = [(info, zin.read(info)) for info in zin.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zout:
        for info, data in entries:
            if info.filename.endswith("data.pkl"):
                assert b"X\x03\x00\x00\x00cpu" in data
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            zout.writestr(info, data)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only machine is what this test is about")
def test_a_checkpoint_written_on_a_gpu_resumes_on_a_cpu(tok, samples, tmp_path, monkeypatch):
    straight, _ = _train(tok, samples, tmp_path / "straight", _cfg())
    _train(tok, samples, tmp_path / "run", _cfg(), stop_at=2, monkeypatch=monkeypatch)
    state_file = latest_checkpoint(tmp_path / "run") / "train_state.pt"
    _as_if_saved_on_a_gpu(state_file)
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(state_file, weights_only=False)
    resumed, _ = _train(tok, samples, tmp_path / "run", _cfg(), resume=True)
    _same_weights(straight, resumed)


def _scaled_accelerator():
    """A CPU accelerator whose loss is scaled like fp16's (a real GradScaler, doubling every step)."""
    acc = T.make_accelerator("fp32")
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    return acc


def test_the_loss_scale_is_saved_and_resumed(tok, samples, tmp_path, monkeypatch):
    a = _scaled_accelerator()
    _train(tok, samples, tmp_path / "straight", _cfg(), accelerator=a)
    b = _scaled_accelerator()
    _train(tok, samples, tmp_path / "run", _cfg(), stop_at=3, monkeypatch=monkeypatch, accelerator=b)
    state = torch.load(latest_checkpoint(tmp_path / "run") / "train_state.pt", weights_only=False)
    assert state["scaler"]["scale"] == 2.0**12  # two steps, doubled each
    c = _scaled_accelerator()
    _train(tok, samples, tmp_path / "run", _cfg(), resume=True, accelerator=c)
    assert c.scaler.get_scale() == a.scaler.get_scale() == 2.0**16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_cuda_random_state_is_saved(tok, samples, tmp_path):
    _train(tok, samples, tmp_path, _cfg(max_steps=2))
    state = torch.load(latest_checkpoint(tmp_path) / "train_state.pt", weights_only=False, map_location="cpu")
    assert len(state["rng"]["cuda"]) == torch.cuda.device_count()


def test_ctrl_c_saves_a_checkpoint_at_the_step_it_finishes_and_the_resume_is_exact(
    tok, samples, tmp_path, monkeypatch, ctrl_c
):
    straight, _ = _train(tok, samples, tmp_path / "straight", _cfg(save_every=0))
    model, examples, collate = _setup(tok, samples)
    orig = T._accumulate

    def press_ctrl_c_in_step_3(*args):
        if args[6] == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return orig(*args)

    with monkeypatch.context() as m:
        m.setattr(T, "_accumulate", press_ctrl_c_in_step_3)
        with pytest.raises(T.TrainingInterrupted, match=r"after step 3 of 6; checkpoint .*checkpoint-3"):
            train(model, examples, collate, _cfg(save_every=0), tmp_path / "run", progress=False)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    resumed, summary = _train(tok, samples, tmp_path / "run", _cfg(save_every=0), resume=True)
    assert summary["started_at"] == 3
    _same_weights(straight, resumed)


def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(tok, samples, tmp_path, monkeypatch, ctrl_c):
    model, examples, collate = _setup(tok, samples)
    orig = T._accumulate

    def press_twice(*args):
        if args[6] == 1:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return orig(*args)

    with monkeypatch.context() as m:
        m.setattr(T, "_accumulate", press_twice)
        with pytest.raises(KeyboardInterrupt) as e:
            train(model, examples, collate, _cfg(save_every=0), tmp_path, progress=False)
    assert not isinstance(e.value, T.TrainingInterrupted)
    assert latest_checkpoint(tmp_path) is None and not list(tmp_path.glob("checkpoint-*"))


def test_an_empty_example_list_says_so(tok, tmp_path):
    with pytest.raises(ValueError, match="0 examples are fewer than one batch of 4"):
        train(tiny_llava(tok), [], Collator(tok.pad_token_id, features=fake_features), _cfg(), tmp_path)


class _Reader:
    """Features that say which tower made them, like a FeatureReader."""

    cache_key, folder = "another-tower", "features/another-tower/train"

    def __call__(self, name):
        return fake_features(name)


def test_features_of_another_tower_than_the_models_are_refused(tok, samples, tmp_path):
    with pytest.raises(ValueError, match=r"another-tower/train: features of vision tower 'another-tower', "
                       r"but the model was built for 'test-features'"):  # fmt: skip
        _train(tok, samples, tmp_path, _cfg(), collate=Collator(tok.pad_token_id, features=_Reader()))


def _pid(alive: bool):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)" if alive else "pass"])
    if not alive:
        proc.wait()
    return proc


def test_a_killed_runs_temp_folder_is_removed_and_another_live_runs_is_kept(tok, samples, tmp_path):
    live = _pid(alive=True)
    try:
        tmp_path.mkdir(exist_ok=True)
        theirs = tmp_path / f".checkpoint-2.{live.pid}.1a2b3c4d.tmp"
        killed = tmp_path / f".checkpoint-2.{_pid(alive=False).pid}.5e6f7a8b.tmp"
        for d in (theirs, killed):
            d.mkdir()
            (d / "train_state.pt").write_bytes(b"half")
        _train(tok, samples, tmp_path, _cfg(max_steps=2))
        assert theirs.is_dir() and not killed.exists()
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [theirs.name]
    finally:
        live.kill()
        live.wait()


def test_latest_json_never_names_a_missing_folder_while_a_checkpoint_is_replaced(tok, samples, tmp_path, monkeypatch):
    _train(tok, samples, tmp_path, _cfg(max_steps=2))
    seen = []

    def check(what):
        def wrapped(*args, **kw):
            ckpt = latest_checkpoint(tmp_path)
            seen.append(ckpt is None or ckpt.is_dir())
            return what(*args, **kw)

        return wrapped

    monkeypatch.setattr(T.shutil, "rmtree", check(shutil.rmtree))
    monkeypatch.setattr(Path, "rename", check(Path.rename))
    _train(tok, samples, tmp_path, _cfg(max_steps=2, lr=5e-3))  # a new run replaces checkpoint-2
    assert seen and all(seen)
    assert latest_checkpoint(tmp_path).name == "checkpoint-2"


def test_every_preset_saves_checkpoints_along_the_way():
    for name in PRESETS:
        preset = get_preset(name)
        for cfg in (preset.stage1, preset.stage2):
            assert cfg.save_every > 0, (name, cfg.stage)


# ------------------------------------------------------------------ kill tests: real processes, SIGKILL
@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_a_run_killed_mid_step_then_mid_checkpoint_ends_with_the_weights_of_an_unbroken_run(stage, tmp_path):
    """Two children, each SIGKILLed: the first in the middle of a seeded step, the second (going
    on from its checkpoint) in the middle of writing a checkpoint file; a third run finishes."""
    rng = random.Random(stage)
    straight = kill_jobs.train_job(stage, tmp_path / "straight")
    write = "llava_lite.train:torch.save" if stage == 1 else "llava_lite.train:save_file"
    kills = [{"call": "llava_lite.train:_accumulate", "n": rng.randint(3, 6)}, {"call": write, "n": 1, "half": True}]
    out = tmp_path / "run"
    assert kill_worker.kill_and_resume("train", {"stage": stage, "out": str(out), "resume": True}, kills, tmp_path) == [
        -9,
        -9,
    ]
    assert kill_worker.temp_files(out)  # the second child did die inside a checkpoint's temporary folder
    resumed = kill_jobs.train_job(stage, out, resume=True)
    _same_weights(straight, resumed)
    logged = T.read_metrics(out)
    assert [m["step"] for m in logged] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in logged] == [m["loss"] for m in T.read_metrics(tmp_path / "straight")]
    assert kill_worker.temp_files(out) == []
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert latest_checkpoint(out).name == "checkpoint-6"


def test_a_checkpoint_without_its_settings_is_not_resumed_but_says_so(tok, samples, tmp_path):
    _train(tok, samples, tmp_path, _cfg(max_steps=2))
    state_file = latest_checkpoint(tmp_path) / "train_state.pt"
    state = torch.load(state_file, weights_only=False)
    del state["settings"]  # as an older version wrote it
    torch.save(state, state_file)
    with pytest.raises(ValueError, match=r"checkpoint-2: written without its run's settings \(an older version\)"):
        _train(tok, samples, tmp_path, _cfg(max_steps=2), resume=True)
