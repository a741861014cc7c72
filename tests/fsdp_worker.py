"""Run by tests/test_launch.py under ``accelerate launch --config_file llava_lite/launch/fsdp.yaml``:
a few stage-2 steps of the tiny LLaVA through the project's loop with its weights sharded, then
each rank's summary (steps, last loss) as JSON."""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).parent))
from llava_lite import conversation as conv  # noqa: E402
from llava_lite.data import Collator, encode_samples  # noqa: E402
from llava_lite.train import TrainConfig, train  # noqa: E402

from llava_fixtures import fake_features, tiny_llava, tiny_tokenizer, world_samples  # noqa: E402


def main(out: str):
    torch.set_num_threads(1)
    acc = Accelerator()  # the launch config's FSDP settings arrive through the environment
    tok = tiny_tokenizer()
    model = tiny_llava(tok, seed=1)
    samples = [s for s in world_samples(40)[1] if s["type"] != "caption"]
    examples, _ = encode_samples(samples, conv.get_template("chat", tok), 4, 256)
    cfg = TrainConfig(stage=2, batch_size=8, grad_accum=2, max_steps=3, lr=3e-3, log_every=1, precision="fp32")
    summary = train(
        model, examples, Collator(tok.pad_token_id, features=fake_features), cfg, Path(out) / "run",
        accelerator=acc, progress=False,
    )  # fmt: skip
    summary["distributed_type"] = str(acc.distributed_type)
    (Path(out) / f"rank{acc.process_index}.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main(sys.argv[1])
