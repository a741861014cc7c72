"""The hub loading paths of the real presets, through local folders in the layout the hub uses:
a language model and tokenizer saved with ``save_pretrained``, an open_clip tower as ``hf-hub:``
and ``local-dir:`` folders; ``HF_HUB_OFFLINE=1`` respected; a clear error when a model is
neither cached nor reachable."""

import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llava_lite import hub, stages
from llava_lite.config import LanguageConfig, get_preset
from llava_lite.paths import PRETRAINED_DIR
from llava_lite.vision import VisionTower

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _hub_folder(cache: Path, repo_id: str) -> Path:
    """The snapshot folder the hub's cache keeps for ``repo_id`` (refs/main names the commit)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    folder = repo / "snapshots" / COMMIT
    folder.mkdir(parents=True)
    return folder


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hub"


def test_a_hub_language_model_loads_offline_from_the_cache(offline_cache, tok):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    cfg.num_attention_heads = cfg.num_key_value_heads = 2
    lm = LlamaForCausalLM(cfg)
    folder = _hub_folder(offline_cache, "test-org/tiny-instruct")
    lm.save_pretrained(folder)
    tok.save_pretrained(folder)
    got, got_tok = stages.load_language(LanguageConfig(name="test-org/tiny-instruct"))
    assert got.config._attn_implementation == "sdpa"
    assert got_tok("a red circle")["input_ids"] == tok("a red circle")["input_ids"]
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(got(ids).logits, lm(ids).logits)


def test_an_open_clip_tower_loads_as_hf_hub_and_as_local_dir_with_the_same_features(offline_cache):
    folder = _hub_folder(offline_cache, "test-org/tiny-clip")
    for name in ("open_clip_config.json", "open_clip_model.safetensors"):
        shutil.copy(PRETRAINED_DIR / "tiny-clip" / name, folder / name)
    shipped, from_hub = VisionTower.load("tiny-clip"), VisionTower.load("hf-hub:test-org/tiny-clip")
    local = VisionTower.load(str(folder))
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        want = shipped(images)
        assert torch.equal(from_hub(images), want) and torch.equal(local(images), want)
    assert from_hub.cache_key == local.cache_key  # the same weights file: the same feature cache


def test_offline_a_model_that_is_not_cached_stops_with_what_to_do(offline_cache):
    with pytest.raises(hub.ModelUnavailable) as e:
        stages.load_language(get_preset("colab").language)
    msg = str(e.value)
    assert "HuggingFaceTB/SmolLM2-360M-Instruct" in msg and str(offline_cache) in msg and "HF_HUB_OFFLINE=1" in msg
    vision = get_preset("colab").vision
    with pytest.raises(hub.ModelUnavailable, match=r"ViT-B-16 \(openai: timm/vit_base_patch16_clip_224\.openai\)"):
        VisionTower.load(vision.encoder, vision.pretrained)
    with pytest.raises(hub.ModelUnavailable, match="test-org/absent-clip"):
        VisionTower.load("hf-hub:test-org/absent-clip")


def test_the_real_presets_name_hub_models_and_fit_their_machines():
    colab, full = get_preset("colab"), get_preset("full")
    assert (colab.vision.encoder, colab.vision.pretrained) == ("ViT-B-16", "openai")
    assert colab.language.name == "HuggingFaceTB/SmolLM2-360M-Instruct" and colab.language.dtype != "bf16"
    assert {colab.stage1.precision, colab.stage2.precision} == {"fp16"}  # a T4 has no bf16
    assert colab.language.attn == "sdpa"  # flash-attn needs Ampere or newer
    for p in (colab, full):  # a micro-batch of at most 8 per GPU: the memory estimate's budget
        assert all(s.batch_size // s.grad_accum <= 8 for s in (p.stage1, p.stage2))
    assert (full.vision.encoder, full.language.name) == ("ViT-L-14-336", "Qwen/Qwen2.5-1.5B-Instruct")
    assert colab.world.source == full.world.source == "coco"
