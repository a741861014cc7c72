"""The small long jobs the kill tests run to the end, interrupted or not (tests/kill_worker.py
runs them in a child process that is killed; the tests run them whole for the reference)."""

from pathlib import Path

from llava_lite import conversation as conv
from llava_lite.data import Collator, encode_samples
from llava_lite.train import TrainConfig, train

from llava_fixtures import NUM_IMAGE_TOKENS, fake_features, tiny_llava, tiny_tokenizer, world_samples


def train_config(stage: int) -> TrainConfig:
    if stage == 1:
        return TrainConfig(stage=1, batch_size=4, max_steps=6, lr=1e-2, save_every=2, log_every=1)
    return TrainConfig(stage=2, batch_size=4, grad_accum=2, max_steps=6, lr=3e-3, save_every=2, log_every=1)


def train_job(stage: int, out, resume: bool = False):
    """Stage ``stage`` of the tiny LLaVA, 6 steps, a checkpoint every 2; returns the model."""
    tok = tiny_tokenizer()
    model = tiny_llava(tok)
    template = conv.get_template("plain" if stage == 1 else "chat", tok)
    data = [s for s in world_samples(40)[1] if (s["type"] == "caption") == (stage == 1)]
    examples, _ = encode_samples(data, template, NUM_IMAGE_TOKENS, 256)
    train(model, examples, Collator(tok.pad_token_id, features=fake_features), train_config(stage), Path(out),
          resume=resume, progress=False)  # fmt: skip
    return model


def lm_job(out):
    """The tiny-LM pretraining of the lab, 8 steps of a 1-layer LM, a checkpoint every 2, evals at 4 and 8."""
    from llava_lite.lab.config import LMArchitecture, LMDocuments, LMRuntime, LMTraining  # noqa: PLC0415
    from llava_lite.lab.lm import pretrain_lm  # noqa: PLC0415  (the lab, only for this job)

    contexts = world_samples(70)[0]
    arch = LMArchitecture(lm_hidden=32, lm_layers=1, lm_heads=2, lm_intermediate=64, vocab_size=300)
    training = LMTraining(steps=8, batch_size=4, warmup=2, bf16=False)
    runtime = LMRuntime(eval_every=4, eval_scenes=2, checkpoint_every=2, threads=1)
    pretrain_lm(contexts[:66], contexts[66:], Path(out), arch, LMDocuments(qa_per_doc=3), training, runtime,
                progress=False)  # fmt: skip
