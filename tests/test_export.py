"""The Hugging Face Llava export: four variants (the paper's linear projector, LLaVA-1.5's MLP,
LoRA, the CLS token kept with the last layer), each trained one real stage-2 step, written out
and loaded back with transformers' own classes, give our logits and our greedy reply; so do
``pipeline("image-text-to-text")`` and ``transformers serve`` answering an ``image_url`` request.

Every model is the shipped tiny backbones joined by a projector and trained by our own loop.
"""

import base64
import io as pyio
import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoProcessor, CLIPVisionModel, LlavaForConditionalGeneration, pipeline

from llava_lite import export, io, stages, world
from llava_lite.cli import main
from llava_lite.config import WorldConfig, get_preset
from llava_lite.conversation import get_template
from llava_lite.evaluate import save, score
from llava_lite.train import latest_checkpoint
from llava_lite.vision import VisionTower

from llava_fixtures import world_samples

QUESTION = "How many shapes are there?"
VARIANTS = {
    "linear": dict(projector_type="linear"),
    "mlp2x_gelu": dict(projector_type="mlp2x_gelu"),
    "lora": dict(projector_type="mlp2x_gelu", lora=True),
    "cls_last_layer": dict(projector_type="mlp2x_gelu", keep_cls=True, layer=-1),
}
SMALL_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 3, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 20, "width": 16, "heads": 2, "layers": 1},
}


def variant_preset(name: str):
    preset = get_preset("tiny")
    v = VARIANTS[name]
    preset.model.projector_type = v["projector_type"]
    preset.model.lora = v.get("lora", False)
    preset.vision.keep_cls = v.get("keep_cls", False)
    preset.vision.layer = v.get("layer", -2)
    return preset


def scene_image(seed: int = 1):
    return world.render(world.sample_world(WorldConfig(splits={"test": 1}, seed=seed))["test"][0])


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


@pytest.fixture(scope="module")
def stage2_samples():
    return [s for s in world_samples(8)[1] if s["type"] in stages.STAGE_TYPES[2]]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, stage2_samples):
    """``{variant: (preset, checkpoint, export folder)}``, each trained for one stage-2 step and exported."""
    torch.set_flush_denormal(True)
    root = tmp_path_factory.mktemp("export")
    out = {}
    for name in VARIANTS:
        preset = variant_preset(name)
        tower = stages.load_vision(preset.vision)
        lm, tok = stages.load_language(preset.language)
        model = stages.build_llava(preset, lm, tok, tower)
        stages.prepare_stage2(preset, model, None, seed=0)

        def features(image_name, tower=tower):  # stand-in cached features of the tower's shape
            g = torch.Generator().manual_seed(sum(map(ord, image_name)))
            return torch.randn(tower.num_patches, tower.width, generator=g)

        run = root / name / "run"
        stages.run_stage(
            preset, model, tok, features, 2, stage2_samples, run, progress=False, max_steps=1, batch_size=4,
            lr=1e-2, lm_lr=1e-2,
        )  # fmt: skip
        ckpt = latest_checkpoint(run)
        out[name] = (preset, ckpt, export.export(ckpt, root / name / "hf", preset))
    return out


@pytest.fixture(scope="module")
def compared(trained):
    """``compare`` of each variant on one scene, run once: ``{variant: result}``."""
    cache = {}

    def get(name):
        if name not in cache:
            preset, ckpt, folder = trained[name]
            cache[name] = export.compare(folder, scene_image(), QUESTION, checkpoint=ckpt, preset=preset)
        return cache[name]

    return get


# ------------------------------------------------------------------ the parts
@pytest.mark.parametrize("keep_cls, quick_gelu", [(False, False), (True, False), (False, True)])
def test_clip_vision_model_gives_our_tower_features_at_every_layer(keep_cls, quick_gelu):
    tower = VisionTower.from_config(SMALL_CLIP | {"quick_gelu": quick_gelu}, seed=0, keep_cls=keep_cls)
    config = export.clip_vision_config(tower)
    assert config.hidden_act == ("quick_gelu" if quick_gelu else "gelu")  # OpenAI's CLIPs use QuickGELU
    clip = CLIPVisionModel(config).eval()
    clip.load_state_dict(export.clip_vision_state(tower))
    pixels = tower.pixels([scene_image().resize((32, 32))])
    with torch.no_grad():
        hidden = clip(pixel_values=pixels, output_hidden_states=True).hidden_states
    for layer in range(-tower.num_blocks, tower.num_blocks):
        t = VisionTower(tower.visual, name="t", weights_id="w", layer=layer, keep_cls=keep_cls,
                        mean=tower.mean.flatten().tolist(), std=tower.std.flatten().tolist())  # fmt: skip
        hf_layer, strategy = export.feature_choice(t)
        with torch.no_grad():
            ours = t(pixels)
        theirs = hidden[hf_layer] if strategy == "full" else hidden[hf_layer][:, 1:]
        assert theirs.shape == ours.shape == (1, 16 + keep_cls, 32)
        assert (theirs - ours).abs().max() < 1e-5, layer


def test_our_layer_counts_become_hf_hidden_state_indices():
    tower = VisionTower.from_config(SMALL_CLIP, seed=0)  # 3 blocks: hidden_states has 4 entries
    pairs = []
    for layer in (-3, -2, -1, 0, 1, 2):
        t = VisionTower(tower.visual, name="t", weights_id="w", layer=layer, keep_cls=layer == 2, mean=[0] * 3,
                        std=[1] * 3)  # fmt: skip
        pairs.append(export.feature_choice(t))
    assert pairs == [(-3, "default"), (-2, "default"), (-1, "default"), (-3, "default"), (-2, "default"),
                     (-1, "full")]  # fmt: skip


def test_a_tower_that_is_not_a_plain_vit_is_refused_naming_what_is_different():
    cfg = json.loads(json.dumps(SMALL_CLIP))
    cfg["vision_cfg"]["ls_init_value"] = 0.1  # layer scale has no place in CLIPVisionModel
    tower = VisionTower.from_config(cfg, seed=0, name="scaled")
    with pytest.raises(ValueError, match=r"scaled: cannot be written as a CLIPVisionModel: layer scale in block 0"):
        export.clip_vision_config(tower)


def test_the_processor_gives_our_pixels_for_square_scene_images_and_nearly_for_a_larger_one(trained):
    preset, _, folder = trained["mlp2x_gelu"]
    tower = stages.load_vision(preset.vision)
    processor = AutoProcessor.from_pretrained(folder)
    for seed in (1, 2, 3):
        image = scene_image(seed)
        assert image.size == (tower.image_size, tower.image_size)
        theirs = processor.image_processor(image, return_tensors="pt")["pixel_values"]
        assert (theirs - tower.pixels([image])).abs().max() < 1e-6
    big = scene_image(4).resize((128, 128))  # resized on both sides: PIL's bicubic against torchvision's
    levels = (processor.image_processor(big, return_tensors="pt")["pixel_values"] - tower.pixels([big])).abs()
    assert float((levels * tower.std * 255).max()) <= 1.0 + 1e-3


# ------------------------------------------------------------------ the text side
def test_the_export_template_gives_our_token_ids_for_questions_and_conversations(trained, stage2_samples):
    preset, ckpt, folder = trained["mlp2x_gelu"]
    processor = AutoProcessor.from_pretrained(folder)
    ours = get_template(preset.model.stage2_template, processor.tokenizer)
    for s in stage2_samples[:6]:
        msgs = []
        for turn in s["conversations"]:
            role = "user" if turn["from"] == "human" else "assistant"
            v = turn["value"]  # "<image>\nQ" or "Q\n<image>": the image part goes where it stands
            parts = [{"type": "image"} if p == "<image>" else {"type": "text", "text": p} for p in v.split("\n")]
            msgs.append({"role": role, "content": parts})
        ids = processor.tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=False)
        assert ids == ours.encode(s["conversations"]).input_ids, s["id"]
        # string contents (what a text-only caller sends) render the same way
        plain = [{"role": m["role"], "content": t["value"]} for m, t in zip(msgs, s["conversations"])]
        assert processor.tokenizer.apply_chat_template(plain, tokenize=True, return_dict=False) == ids


def test_the_roles_template_as_jinja_equals_ours_and_plain_is_refused(tok):
    tok.chat_template = export.chat_template(tok, "roles")
    roles = get_template("roles", tok)
    conv = [{"from": "human", "value": "<image>\nWhat is red?"}, {"from": "gpt", "value": "A circle."},
            {"from": "human", "value": "And blue?"}]  # fmt: skip
    msgs = [{"role": "system", "content": "Be brief."}] + [
        {"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in conv
    ]
    rendered = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
    expected = roles.prompt([{"from": "system", "value": "Be brief."}] + conv)
    assert rendered == expected
    with pytest.raises(ValueError, match="cannot export a model asked with the 'plain' template"):
        export.chat_template(tok, "plain")


# ------------------------------------------------------------------ the four variants
@pytest.mark.parametrize("name", list(VARIANTS))
def test_the_export_gives_our_logits_and_greedy_reply(trained, compared, name):
    preset, ckpt, folder = trained[name]
    result = compared(name)
    assert result["prompt_ids_equal"] and result["max_abs_pixel_diff"] < 1e-6
    assert result["max_abs_logit_diff"] < 1e-4, result
    assert result["ours_tokens"] == result["export_tokens"] and len(result["ours_tokens"]) > 0
    assert result["ours_text"] == result["export_text"]

    config = json.loads((folder / "config.json").read_text())
    tower = stages.load_vision(preset.vision)
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["image_seq_length"] == tower.num_patches == 64 + preset.vision.keep_cls
    assert config["vision_feature_select_strategy"] == ("full" if preset.vision.keep_cls else "default")
    assert config["vision_feature_layer"] == preset.vision.layer
    assert config["text_config"]["vocab_size"] == len(AutoProcessor.from_pretrained(folder).tokenizer)
    assert config["projector_hidden_act"] == ("linear" if name == "linear" else "gelu")
    # the processor expands <image> to exactly the model's number of image tokens
    processor = AutoProcessor.from_pretrained(folder)
    inputs = processor.apply_chat_template(
        export.messages_for(scene_image(), QUESTION), add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert inputs["input_ids"][0].count(config["image_token_index"]) == tower.num_patches


def test_the_linear_projector_is_exported_with_an_identity_second_layer(trained):
    _, ckpt, folder = trained["linear"]
    hf = LlavaForConditionalGeneration.from_pretrained(folder)
    proj = hf.model.multi_modal_projector
    assert torch.equal(proj.linear_2.weight, torch.eye(proj.linear_2.in_features))
    assert torch.equal(proj.linear_2.bias, torch.zeros(proj.linear_2.in_features))
    with safe_open(str(ckpt / "trainable.safetensors"), "pt") as f:
        assert torch.equal(proj.linear_1.weight, f.get_tensor("projector.linear_1.weight"))


def test_the_lora_export_holds_merged_weights_that_differ_from_the_base(trained):
    preset, ckpt, folder = trained["lora"]
    with safe_open(str(ckpt / "trainable.safetensors"), "pt") as f:
        assert any("lora_B" in k for k in f.keys())
    hf = LlavaForConditionalGeneration.from_pretrained(folder)
    base, _ = stages.load_language(preset.language)
    name = "layers.0.self_attn.q_proj.weight"
    merged = dict(hf.model.language_model.named_parameters())[name]
    assert not any("lora" in n for n, _ in hf.named_parameters())
    assert (merged - dict(base.model.named_parameters())[name]).abs().max() > 1e-4


def test_the_card_names_the_preset_the_data_and_the_measured_scores(trained, stage2_samples, monkeypatch, tmp_path):
    preset, ckpt, _ = trained["mlp2x_gelu"]
    monkeypatch.setenv("LLAVA_LITE_OUTPUTS", str(tmp_path / "outputs"))  # this test's own instruction data
    io.write_json(tmp_path / "outputs" / "tiny" / "instruct" / "train.json", stage2_samples)
    recs = [{"qtype": "count", "correct": True}, {"qtype": "count", "correct": False},
            {"qtype": "colour", "correct": True}]  # fmt: skip
    save(ckpt / "exact_test.json", recs, score(recs))
    try:
        card = (export.export(ckpt, tmp_path / "hf", preset) / "README.md").read_text()
    finally:
        (ckpt / "exact_test.json").unlink()
    n = {t: sum(s["type"] == t for s in stage2_samples) for t in ("complex", "conversation", "detail", "exact")}
    assert "# llava-lite (tiny preset)" in card
    assert f"{len(stage2_samples)} samples (" + ", ".join(f"{t} {c}" for t, c in n.items() if c) + ")" in card
    assert "exact-answer accuracy, test split: **0.667** over 3 questions (count 0.500, colour 1.000)" in card
    assert "optimizer steps: 1, batch 4" in card and "mlp2x_gelu" in card and "tiny-lm, fully fine-tuned" in card
    assert "data:image/png;base64," in card


def test_cli_export_writes_the_folder_and_refuses_to_overwrite(trained, tmp_path):
    _, ckpt, _ = trained["mlp2x_gelu"]  # the tiny preset as it is
    out = tmp_path / "hf"
    assert main(["export", "--preset", "tiny", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    assert {"config.json", "model.safetensors", "processor_config.json", "README.md"} <= {p.name for p in out.iterdir()}
    assert main(["export", "--preset", "tiny", "--checkpoint", str(ckpt), "--out", str(out)]) == 1
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--overwrite"]) == 0


def test_the_pipeline_gives_our_reply(trained, compared):
    folder = trained["lora"][2]
    ours = compared("lora")["ours_text"]
    pipe = pipeline("image-text-to-text", model=str(folder), device="cpu")
    out = pipe(text=export.messages_for(scene_image(), QUESTION), max_new_tokens=16, return_full_text=False)
    assert out[0]["generated_text"] == ours


@pytest.mark.slow
def test_the_served_export_answers_an_image_url_request_with_our_greedy_reply(trained, compared, tmp_path):
    folder = trained["lora"][2]
    ours = compared("lora")
    log_path = tmp_path / "serve.log"
    with export.serve(folder, log_path=log_path, env={"OMP_NUM_THREADS": "1"}) as base_url:
        assert base_url.endswith("/v1")
        reply = export.ask_served(base_url, str(folder), scene_image(), QUESTION, max_tokens=16)
    assert reply.content == ours["ours_text"]
    assert reply.usage["prompt_tokens"] == ours["prompt_length"]  # our prompt, image tokens included
    assert log_path.read_text().count('"POST /v1/chat/completions HTTP/1.1" 200') == 1


def test_the_request_carries_the_picture_as_a_png_data_url():
    image = scene_image()
    (message,) = export.image_messages(image, QUESTION)
    picture, text = message["content"]
    assert message["role"] == "user" and text == {"type": "text", "text": QUESTION}
    head, data = picture["image_url"]["url"].split(",", 1)
    assert picture["type"] == "image_url" and head == "data:image/png;base64"
    back = Image.open(pyio.BytesIO(base64.b64decode(data)))
    assert back.format == "PNG" and back.tobytes() == image.convert(back.mode).tobytes()


def test_serve_without_the_transformers_command_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(export, "serve_command", lambda: None)
    with pytest.raises(FileNotFoundError, match=r"pip install 'transformers\[serving\]'"):
        with export.serve(tmp_path):
            pass


# ------------------------------------------------------------------ what became what
@pytest.fixture(scope="module")
def tiny_tower():
    return stages.load_vision(get_preset("tiny").vision)


@pytest.mark.parametrize("name", ["linear", "mlp2x_gelu", "lora"])
def test_the_name_map_names_every_exported_tensor_and_each_copied_one_holds_ours(tiny_tower, name):
    preset, tower = variant_preset(name), tiny_tower
    lm, tok = stages.load_language(preset.language)
    model = stages.build_llava(preset, lm, tok, tower)
    stages.prepare_stage2(preset, model, None, seed=0)
    rows = export.name_map(model, tower)
    ours = {f"visual.{k}": t for k, t in tower.visual.state_dict().items()} | {
        k: t.clone() for k, t in model.state_dict().items()
    }
    hf, _ = export.to_hf(model, tok, tower, preset.model.stage2_template)
    theirs = hf.state_dict()
    assert sorted(r["hf"] for r in rows) == sorted(theirs)  # every tensor named, once
    for r in rows:
        assert r["ours"] in ours or r["ours"] == "-", r
        if r["how"] in ("copied", "tied to embed_tokens"):
            assert torch.equal(theirs[r["hf"]], ours[r["ours"]]), r
        elif r["how"].endswith("third of the fused in_proj"):
            assert torch.equal(theirs[r["hf"]], ours[r["ours"]].chunk(3)["qkv".index(r["how"][0])]), r
    merged = [r for r in rows if r["how"] == "LoRA merged in"]
    assert bool(merged) == (name == "lora") and all(".base_layer." in r["ours"] for r in merged)
    identity = [r["hf"] for r in rows if r["ours"] == "-"]
    assert identity == (["model.multi_modal_projector.linear_2.weight", "model.multi_modal_projector.linear_2.bias"]
                        if name == "linear" else [])  # fmt: skip


def test_the_collapsed_name_map_counts_one_tensor_per_layer(tiny_tower):
    preset, tower = get_preset("tiny"), tiny_tower
    lm, tok = stages.load_language(preset.language)
    model = stages.build_llava(preset, lm, tok, tower)
    rows = export.name_map(model, tower, collapse=True)
    assert sum(r["tensors"] for r in rows) == len(export.name_map(model, tower))
    assert {
        "part": "vision tower",
        "ours": "visual.transformer.resblocks.N.attn.in_proj_weight",
        "hf": "model.vision_tower.encoder.layers.N.self_attn.k_proj.weight",
        "how": "k third of the fused in_proj",
        "tensors": 4,
    } in rows  # the tiny CLIP has 4 blocks
    assert {
        "part": "language model",
        "ours": "lm.model.layers.N.mlp.down_proj.weight",
        "hf": "model.language_model.layers.N.mlp.down_proj.weight",
        "how": "copied",
        "tensors": 4,
    } in rows
    assert {"part": "head", "ours": "lm.lm_head.weight", "hf": "lm_head.weight", "how": "tied to embed_tokens",
            "tensors": 1} in rows  # fmt: skip


def test_every_file_of_the_export_is_described(trained):
    folder = trained["linear"][2]
    rows = export.files(folder)
    assert [r["file"] for r in rows] == sorted(p.name for p in folder.iterdir())
    assert all(r["holds"] for r in rows), [r["file"] for r in rows if not r["holds"]]
    size = {r["file"]: r["KiB"] for r in rows}["model.safetensors"]
    assert size == round((folder / "model.safetensors").stat().st_size / 1024, 1)
