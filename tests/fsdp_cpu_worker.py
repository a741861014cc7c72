"""Run by tests/test_launch.py under torchrun (2 CPU processes, gloo): the tiny preset's LLaVA
(shipped tiny LM, features of the shipped tiny CLIP) sharded with torch's ``fully_shard``, each
decoder layer and then the whole model, trained a few stage-2 steps; each rank takes its half of
every global batch. Each rank writes its step losses and what it holds of each parameter; rank 0
the full state dict gathered after training.

:func:`run` with ``world_size=1`` is the unsharded reference on the same global batches (the test
calls it in its own process)."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from llava_lite import stages, world  # noqa: E402
from llava_lite.config import WorldConfig, get_preset  # noqa: E402
from llava_lite.conversation import IGNORE  # noqa: E402
from llava_lite.data import Collator, plan_batches  # noqa: E402
from llava_lite.model import token_loss  # noqa: E402
from llava_lite.train import set_trainable  # noqa: E402

from llava_fixtures import world_samples  # noqa: E402

STEPS, BATCH, SCENES, RANKS = 3, 8, 12, 2  # 12 scenes make 24 stage-2 examples: 3 batches of 8


def build():
    """A fresh tiny-preset LLaVA for cached features (no tower inside), its tokenizer and the tower."""
    preset = get_preset("tiny")
    lm, tok = stages.load_language(preset.language)
    tower = stages.load_vision(preset.vision)
    return preset, stages.build_llava(preset, lm, tok, tower), tok, tower


def data(preset, tok, tower):
    """Stage-2 examples of the symbolic teacher's samples and the frozen tower's real features of
    their rendered scenes (what the feature cache holds), keyed by file name."""
    scenes = world.sample_world(WorldConfig(splits={"train": SCENES}, seed=0))["train"]
    with torch.no_grad():
        feats = tower(tower.pixels([world.render(s) for s in scenes]))  # [N, P, Dv]
    by_name = {s.file_name: f for s, f in zip(scenes, feats)}
    samples = [s for s in world_samples(SCENES)[1] if s["type"] in stages.STAGE_TYPES[2]]
    _, examples, _ = stages.stage_examples(preset, tok, samples, 2, tower.num_patches)
    return examples, Collator(tok.pad_token_id, features=by_name.__getitem__)


def run(world_size: int = 1, rank: int = 0, mesh=None) -> tuple[torch.nn.Module, list[float], list[float]]:
    """``STEPS`` stage-2 steps; returns the model, each step's loss (the mean over every learned
    token of the global batch) and its gradient norm before clipping. With ``mesh`` the model is
    sharded over it first and this rank takes its half of each global batch; without, one process
    takes both halves one after the other, accumulating their gradients (as the loop's
    ``grad_accum=2`` would). Not the whole batch in one forward: its other padding sums the same
    values in another order, and AdamW's first steps turn that rounding into 1.6e-5 (measured) on a
    weight whose gradient is near zero."""
    torch.set_flush_denormal(True)
    preset, model, tok, tower = build()
    examples, collator = data(preset, tok, tower)
    cfg = preset.stage2
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard  # only the sharded run needs it

        for layer in model.lm.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    groups = set_trainable(model, 2)  # after sharding: its parameters are the DTensor shards now
    lrs = {"projector": cfg.lr, "lm": cfg.lm_lr or cfg.lr}
    opt = torch.optim.AdamW([{"params": ps, "lr": lrs[n]} for n, ps in groups], weight_decay=cfg.weight_decay)
    batches = plan_batches([len(e.enc) for e in examples], BATCH, 0, cfg.seed)[:STEPS]
    assert len(batches) == STEPS, f"{len(examples)} examples make fewer than {STEPS} batches of {BATCH}"
    model.train()
    losses, norms = [], []
    for global_batch in batches:
        n_tokens = sum(sum(t != IGNORE for t in examples[i].enc.labels[1:]) for i in global_batch)
        parts = [global_batch[rank::world_size]] if mesh is not None else [global_batch[r::RANKS] for r in range(RANKS)]
        total = torch.zeros(())
        for part in parts:
            batch = collator([examples[i] for i in part])
            out = model(input_ids=batch["input_ids"], image_features=batch["image_features"])  # right-padded
            loss_sum = token_loss(out.logits, batch["labels"], reduction="sum")
            (loss_sum * world_size / n_tokens).backward()  # the gradients' reduction averages over ranks
            total += loss_sum.detach()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)  # over all shards
        norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if world_size > 1:
            dist.all_reduce(total)
        losses.append(total.item() / n_tokens)
    return model, losses, norms


def main(out: str):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # only here
    from torch.distributed.device_mesh import init_device_mesh  # only the sharded run needs it

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    assert world_size == RANKS, f"launched on {world_size} processes; the reference takes the batch in {RANKS} halves"
    model, losses, norms = run(world_size, rank, init_device_mesh("cpu", (world_size,)))
    # what this rank holds of each parameter: its placement on the mesh and its own shard's shape
    held = {n: [str(p.placements), list(p.to_local().shape)] for n, p in model.named_parameters()}
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"losses": losses, "norms": norms, "held": held}))
    if rank == 0:
        torch.save(state, Path(out) / "full_state.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
