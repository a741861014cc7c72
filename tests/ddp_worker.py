"""Run by tests/test_stages.py under torchrun (2 CPU processes) and directly (1 process): trains the
tiny LLaVA a few stage-2 steps with the same global batch, then writes each rank's weights."""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from llava_lite import conversation as conv  # noqa: E402
from llava_lite.data import Collator, encode_samples  # noqa: E402
from llava_lite.train import TrainConfig, train  # noqa: E402

from llava_fixtures import fake_features, tiny_llava, tiny_tokenizer, world_samples  # noqa: E402


def main(out: str):
    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    tok = tiny_tokenizer()
    model = tiny_llava(tok, seed=1)
    initial = {n: p.detach().clone().contiguous() for n, p in model.named_parameters()}
    samples = [s for s in world_samples(40)[1] if s["type"] != "caption"]
    examples, _ = encode_samples(samples, conv.get_template("chat", tok), 4, 256)
    cfg = TrainConfig(stage=2, batch_size=8, grad_accum=2, max_steps=4, lr=3e-3, log_every=1)
    train(
        model,
        examples,
        Collator(tok.pad_token_id, features=fake_features),
        cfg,
        Path(out) / "run",
        accelerator=acc,
        progress=False,
    )
    state = {n: p.detach().contiguous() for n, p in acc.unwrap_model(model).named_parameters()}
    save_file(state, str(Path(out) / f"rank{acc.process_index}.safetensors"))
    save_file(initial, str(Path(out) / f"initial{acc.process_index}.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1])
