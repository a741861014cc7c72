"""The two training stages put together for a preset: the same start for the same seed, stage 2
prepared from stage 1, QLoRA's refusal without a GPU, and two processes that train as one."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import ClusterConfig
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from llava_lite import memory, stages
from llava_lite.config import LanguageConfig, get_preset
from llava_lite.paths import PACKAGE_DIR, Layout
from llava_lite.train import latest_checkpoint, read_metrics, set_trainable

from llava_fixtures import fake_features, tiny_llava, world_samples

HERE = Path(__file__).parent


class Tower:
    cache_key, width, num_patches = "t", 12, 4


def test_the_same_preset_always_starts_from_the_same_projector(tok):
    def lm():
        return LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tok),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=4,
                num_key_value_heads=4,
            )
        )

    cfg = get_preset("tiny")
    a = stages.build_llava(cfg, lm(), tok, Tower())
    torch.rand(100)  # whatever ran before does not matter
    b = stages.build_llava(cfg, lm(), tok, Tower())
    assert torch.equal(a.projector.linear_1.weight, b.projector.linear_1.weight)
    c = stages.build_llava(cfg, lm(), tok, Tower(), seed=1)
    assert not torch.equal(a.projector.linear_1.weight, c.projector.linear_1.weight)
    assert a.config.num_image_tokens == 4 and a.config.vision_dim == 12 and a.config.vision_key == "t"


def test_a_seed_draws_the_lora_adapters_and_leaves_the_global_generator_alone(tok):
    preset = get_preset("tiny")

    def adapters(model, seed):
        model = stages.prepare_stage2(preset, model, None, lora=True, seed=seed)
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


def _stage_samples(stage):
    kinds = stages.STAGE_TYPES[stage]
    return [s for s in world_samples(24)[1] if s["type"] in kinds]


def test_run_stage_trains_through_the_presets_template_and_reports_its_examples(tok, tmp_path):
    preset = get_preset("tiny")
    model = tiny_llava(tok)
    summary = stages.run_stage(
        preset,
        model,
        tok,
        fake_features,
        1,
        _stage_samples(1),
        tmp_path / "stage1",
        progress=False,
        max_steps=2,
        batch_size=4,
    )
    assert summary["steps"] == 2 and summary["examples"]["kept"] == 24
    assert [m["step"] for m in read_metrics(tmp_path / "stage1")][-1] == 2
    assert latest_checkpoint(tmp_path / "stage1").name == "checkpoint-2"


def test_stage2_starts_from_the_stage1_projector(tok, tmp_path):
    preset = get_preset("tiny")
    first = tiny_llava(tok)
    stages.run_stage(
        preset,
        first,
        tok,
        fake_features,
        1,
        _stage_samples(1),
        tmp_path / "stage1",
        progress=False,
        max_steps=2,
        batch_size=4,
        lr=1e-2,
    )
    second = stages.prepare_stage2(preset, tiny_llava(tok), latest_checkpoint(tmp_path / "stage1"), lora=False)
    for (n, p), (_, q) in zip(first.projector.named_parameters(), second.projector.named_parameters()):
        assert torch.equal(p, q), n
    assert not torch.equal(second.projector.linear_1.weight, tiny_llava(tok).projector.linear_1.weight)


def test_a_stage1_checkpoint_of_another_projector_is_refused_naming_both(tok, tmp_path):
    preset = get_preset("tiny")
    stages.run_stage(
        preset,
        tiny_llava(tok, projector_type="linear"),
        tok,
        fake_features,
        1,
        _stage_samples(1),
        tmp_path / "stage1",
        progress=False,
        max_steps=1,
        batch_size=4,
    )
    with pytest.raises(
        ValueError,
        match="stage-1 checkpoint .* was made for projector_type='linear', "
        "but this model has projector_type='mlp2x_gelu'",
    ):
        stages.prepare_stage2(preset, tiny_llava(tok), latest_checkpoint(tmp_path / "stage1"))


def test_a_stage1_checkpoint_over_another_lm_of_the_same_width_is_refused(tok, tmp_path):
    def lm(seed):
        torch.manual_seed(seed)
        arch = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
        return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), **arch))

    preset = get_preset("tiny")
    made_over = stages.build_llava(preset, lm(0), tok, Tower())
    made_over.config.save(tmp_path)
    same = stages.build_llava(preset, lm(0), tok, Tower())
    assert same.config == made_over.config  # the same base LM: the same digest
    other = stages.build_llava(preset, lm(1), tok, Tower())
    assert other.config.lm_dim == made_over.config.lm_dim and other.config.lm_name == made_over.config.lm_name
    with pytest.raises(ValueError, match=r"was made for lm_fingerprint='[0-9a-f]{16}', but this model has"):
        stages.prepare_stage2(preset, other, tmp_path, lora=False)


def test_qlora_without_a_cuda_gpu_says_what_to_use_instead(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert stages.qlora_available() == "no CUDA GPU on this machine"
    with pytest.raises(RuntimeError, match=r"load_in_4bit \(QLoRA\) for tiny-lm: no CUDA GPU.*model.lora=True"):
        stages.load_language(LanguageConfig(name="tiny-lm", load_in_4bit=True))


@pytest.mark.slow
def test_two_cpu_processes_stay_identical_and_match_one_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    two = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", str(HERE / "ddp_worker.py"), str(tmp_path / "two")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, str(HERE / "ddp_worker.py"), str(tmp_path / "one")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
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
    folder = PACKAGE_DIR / "launch"
    zero2 = ClusterConfig.from_yaml_file(folder / "deepspeed_zero2.yaml")
    assert str(zero2.distributed_type).endswith("DEEPSPEED") and zero2.deepspeed_config["zero_stage"] == 2
    ddp = ClusterConfig.from_yaml_file(folder / "ddp_multi_gpu.yaml")
    assert str(ddp.distributed_type).endswith("MULTI_GPU") and not ddp.use_cpu


def test_run_dir_names_the_settings_a_run_depends_on_and_keeps_the_presets_own_folders(tmp_path):
    layout = Layout(tmp_path)
    tiny = get_preset("tiny")
    assert stages.run_dir(layout, 1) == stages.run_dir(layout, 1, preset=tiny) == tmp_path / "checkpoints" / "stage1"
    assert stages.run_dir(layout, 2, "lora", preset=tiny).name == "stage2-lora"
    assert stages.run_dir(layout, 1, preset=get_preset("colab")).name == "stage1"  # against its own defaults
    changed = get_preset("tiny")
    changed.vision.layer, changed.model.projector_type = -1, "linear"
    assert stages.run_key(changed, 1) == "layer-1-linear"
    assert stages.run_dir(layout, 1, preset=changed).name == "stage1-layer-1-linear"
    assert stages.run_dir(layout, 2, "blind", preset=changed).name == "stage2-layer-1-linear-blind"
    other = get_preset("tiny")
    other.vision.keep_cls, other.language.name, other.model.stage1_template = True, "/models/my-lm", "plain"
    digest = hashlib.sha1(b"/models/my-lm").hexdigest()[:6]
    assert stages.run_key(other, 1) == f"cls-lm-my-lm-{digest}-plain"
    assert stages.run_key(other, 2) == f"cls-lm-my-lm-{digest}-s1plain"  # stage 2 starts from that stage 1
    clip = get_preset("tiny")
    clip.vision.encoder, clip.vision.pretrained = "ViT-B-16", "openai"
    assert stages.run_key(clip, 1) == "ViT-B-16-openai"


def test_a_presets_memory_is_estimated_from_its_shapes_as_the_loaded_model_is():
    tiny = get_preset("tiny")
    lm, tokenizer = stages.load_language(tiny.language)
    model = stages.build_llava(tiny, lm, tokenizer, stages.load_vision(tiny.vision))
    set_trainable(model, 2)
    loaded = memory.estimate(model, tiny.stage2.batch_size // tiny.stage2.grad_accum, tiny.model.max_len)
    shapes = stages.memory_estimate(tiny, 2, lora=False)
    assert (shapes.total, shapes.trainable, shapes.free) == (loaded.total, model.trainable_parameters(), None)
    colab = stages.memory_estimate(get_preset("colab"), 1)  # SmolLM2-360M and ViT-B/16, nothing downloaded
    projector = 768 * 960 + 960 + 960 * 960 + 960
    layer = 2 * 960 * 960 + 2 * 960 * 320 + 3 * 960 * 2560 + 2 * 960  # attention (5 of 15 heads for k, v), MLP, norms
    lm_params = 49152 * 960 + 32 * layer + 960  # tied embeddings, 32 layers, the last norm
    assert (colab.trainable, colab.weights) == (projector, 4 * (lm_params + projector))
    lora = 64 * (2 * (960 + 960) + 2 * (960 + 320) + 3 * (960 + 2560))  # r 64 beside each linear of a layer
    assert stages.memory_estimate(get_preset("colab"), 2).trainable == 32 * lora + projector
