"""Stage 2: LoRA, memory advice, and two processes that train as one."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llava_lite import conversation as conv
from llava_lite import memory
from llava_lite.data import Collator, encode_samples
from llava_lite.model import apply_lora, merge_lora
from llava_lite.train import TrainConfig, latest_checkpoint, load_trained, set_trainable, train

from llava_fixtures import fake_features, tiny_llava, tiny_tokenizer, world_samples

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def examples(tok):
    samples = [s for s in world_samples(40)[1] if s["type"] != "caption"]
    return encode_samples(samples, conv.get_template("chat", tok), 4, 256)[0]


def test_lora_trains_adapters_and_projector_and_the_checkpoint_keeps_both(tok, examples, tmp_path):
    model = apply_lora(tiny_llava(tok), r=4, alpha=8)
    groups = dict(set_trainable(model, 2))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or n.startswith("projector.") for n in names)
    assert any(n.startswith("projector.") for n in names) and len(groups["lm"]) > 0
    train(model, examples, Collator(tok.pad_token_id, features=fake_features),
          TrainConfig(stage=2, batch_size=8, max_steps=3, lr=1e-2), tmp_path, progress=False)
    saved = load_file(str(latest_checkpoint(tmp_path) / "trainable.safetensors"))
    assert set(saved) == set(names)
    fresh = apply_lora(tiny_llava(tok), r=4, alpha=8)
    load_trained(fresh, latest_checkpoint(tmp_path))
    batch = Collator(tok.pad_token_id, features=fake_features)(examples[:4])
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], image_features=batch["image_features"])
    with torch.no_grad():
        before = fresh(**kw).logits
        merged = merge_lora(fresh)
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        assert torch.allclose(merged(**kw).logits, before, atol=1e-4)


def test_a_seed_draws_the_lora_adapters_and_leaves_the_global_generator_alone(tok):
    from llava_lite.config import get_preset
    from llava_lite.pipeline import prepare_stage2

    preset = get_preset("tiny")

    def adapters(model, seed):
        model = prepare_stage2(preset, model, None, lora=True, seed=seed)
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}

    models = [tiny_llava(tok) for _ in range(3)]
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    one, again, two = adapters(models[0], 1), adapters(models[1], 1), adapters(models[2], 2)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's random stream is untouched
    assert one and set(one) == set(two)
    assert all(torch.equal(one[n], again[n]) for n in one)
    assert not any(torch.equal(one[n], two[n]) for n in one)


def test_train_command_takes_a_seed():
    import argparse

    from llava_lite.pipeline import register_cli

    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    assert parser.parse_args(["train", "--stage", "2", "--seed", "3"]).seed == 3
    assert parser.parse_args(["train", "--stage", "1"]).seed is None  # the preset's


def test_memory_estimate_names_the_setting_to_change_instead_of_running_out(tok, monkeypatch):
    model = tiny_llava(tok)
    set_trainable(model, 2)
    est = memory.estimate(model, batch_size=8, seq_len=128)
    assert est.weights > 0 and est.gradients > 0 and est.optimizer == pytest.approx(2 * est.gradients)
    assert memory.estimate(model, 8, 128, gradient_checkpointing=True).activations < est.activations
    monkeypatch.setattr(memory, "free_memory", lambda device: 1e6)
    with pytest.raises(MemoryError, match="gradient checkpointing.*halve the per-device batch.*LoRA"):
        memory.check(model, 8, 128, "fp32", False, torch.device("cpu"))


@pytest.mark.slow
def test_two_cpu_processes_stay_identical_and_match_one_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    two = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(HERE / "ddp_worker.py"), str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, str(HERE / "ddp_worker.py"), str(tmp_path / "one")], capture_output=True,
                         text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    r0, r1 = (load_file(str(tmp_path / "two" / f"rank{r}.safetensors")) for r in (0, 1))
    single = load_file(str(tmp_path / "one" / "rank0.safetensors"))
    for name in single:
        assert torch.equal(r0[name], r1[name]), f"replicas differ on {name}"
        assert torch.allclose(r0[name], single[name], atol=1e-5, rtol=1e-4), f"2 processes != 1 process on {name}"
    initial = load_file(str(tmp_path / "one" / "initial0.safetensors"))
    moved = [n for n in single if not torch.equal(single[n], initial[n])]
    assert any(n.startswith("projector.") for n in moved) and any(n.startswith("lm.") for n in moved)


def test_launch_configs_parse_as_accelerate_configs():
    """The shipped accelerate configs load as accelerate's own config class (what `accelerate
    launch --config_file` reads): DeepSpeed ZeRO-2 and multi-GPU DDP."""
    from accelerate.commands.config.config_args import ClusterConfig

    import llava_lite

    folder = Path(llava_lite.__file__).parent / "launch"
    zero2 = ClusterConfig.from_yaml_file(folder / "deepspeed_zero2.yaml")
    assert str(zero2.distributed_type).endswith("DEEPSPEED") and zero2.deepspeed_config["zero_stage"] == 2
    ddp = ClusterConfig.from_yaml_file(folder / "ddp_multi_gpu.yaml")
    assert str(ddp.distributed_type).endswith("MULTI_GPU") and not ddp.use_cpu


def test_qlora_without_a_cuda_gpu_says_what_to_use_instead(monkeypatch):
    from llava_lite import pipeline
    from llava_lite.config import LanguageConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pipeline.qlora_available() == "no CUDA GPU on this machine"
    with pytest.raises(RuntimeError, match=r"load_in_4bit \(QLoRA\) for tiny-lm: no CUDA GPU.*model.lora=True"):
        pipeline.load_language(LanguageConfig(name="tiny-lm", load_in_4bit=True))
