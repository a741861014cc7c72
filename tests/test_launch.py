"""The shipped accelerate configs for several GPUs: FSDP beside DDP and DeepSpeed ZeRO-2; torch's own
FSDP over the tiny LLaVA on CPU processes."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.utils import FullyShardedDataParallelPlugin

from llava_lite.paths import PACKAGE_DIR
from llava_lite.train import latest_checkpoint, load_trained

import fsdp_cpu_worker
from llava_fixtures import tiny_llava, tiny_tokenizer

HERE = Path(__file__).parent
FSDP_NEEDS_GPUS = (
    "FSDP needs two GPUs: accelerate 1.x shards only on accelerator devices. Under the shipped config "
    "(fsdp_sync_module_states: true) its plugin stops on a CPU machine with 'RuntimeError: There are "
    "currently no available devices found, must be one of XPU, CUDA, MLU, NPU, MUSA, or HPU'; without it "
    "each launched process sees DistributedType.NO and trains alone, unsharded; Accelerator(cpu=True) "
    "gives MULTI_CPU, i.e. DDP (the 2-process CPU run of tests/test_stages.py). torch's own fully_shard "
    "does run on CPU with gloo, but the project's loop shards through accelerate"
)


def test_the_fsdp_config_parses_as_accelerate_reads_it_and_shards_everything():
    cfg = ClusterConfig.from_yaml_file(PACKAGE_DIR / "launch" / "fsdp.yaml")
    assert str(cfg.distributed_type).endswith("FSDP") and not cfg.use_cpu
    fsdp = cfg.fsdp_config
    assert fsdp["fsdp_sharding_strategy"] == "FULL_SHARD" and fsdp["fsdp_use_orig_params"] is True
    assert fsdp["fsdp_auto_wrap_policy"] == "SIZE_BASED_WRAP" and fsdp["fsdp_min_num_params"] == 10_000_000


def test_accelerate_refuses_fsdp_without_a_gpu_which_is_why_the_fsdp_run_needs_gpus():
    """The reason the FSDP run below skips on a CPU machine, checked: the plugin built as the
    shipped config asks (modules' states synced from rank 0) wants an accelerator device."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the FSDP run below is the check")
    cfg = ClusterConfig.from_yaml_file(PACKAGE_DIR / "launch" / "fsdp.yaml")
    assert cfg.fsdp_config["fsdp_sync_module_states"] is True
    with pytest.raises(RuntimeError, match="no available devices found"):
        FullyShardedDataParallelPlugin(sync_module_states=True)


@pytest.mark.slow
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="torch built without gloo")
def test_torch_fully_shard_on_two_cpu_processes_takes_the_unsharded_steps_and_gathers_whole_weights(tmp_path):
    """torch's FSDP2 (``fully_shard``, gloo) over the tiny preset's LLaVA as ``stages.build_llava``
    makes it for cached features: each decoder layer, then the whole model, sharded over 2 CPU
    processes, each taking its half of every global batch of real stage-2 samples (the project's
    collator, the model's forward, ``token_loss`` summed and divided by the global batch's learned
    tokens as the loop does), AdamW and gradient clipping on the shards.

    Proves: every parameter is split between the ranks (neither holds it whole); the 3 steps'
    losses and gradient norms equal, within 1e-5 relative, those of one unsharded process on the same global batches
    (the two halves accumulated, as the loop's ``grad_accum=2`` does); the full state dict gathered
    afterwards loads strictly into a fresh LlavaLite and equals the unsharded model within 1e-5.
    Does not prove the project's loop shards: ``train.train`` goes through accelerate, which refuses
    FSDP without GPUs (above); the 2-GPU test below runs the loop itself, sharded."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    ranks = str(fsdp_cpu_worker.RANKS)
    cmd = [torchrun, "--standalone", "--nproc_per_node", ranks, str(HERE / "fsdp_cpu_worker.py"), str(tmp_path)]
    two = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    threads = torch.get_num_threads()
    try:  # the unsharded reference, in this process while the two ranks run
        torch.set_num_threads(1)
        reference, losses, norms = fsdp_cpu_worker.run(world_size=1)
    finally:
        torch.set_num_threads(threads)
    _, err = two.communicate(timeout=300)
    assert two.returncode == 0, err[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    whole = dict(reference.named_parameters())
    assert set(ranks[0]["held"]) == set(whole)
    for name, p in whole.items():
        (place0, shard0), (place1, shard1) = ranks[0]["held"][name], ranks[1]["held"][name]
        assert place0 == place1 == "(Shard(dim=0),)", name
        assert shard0[0] + shard1[0] == p.shape[0] and shard0[0] < p.shape[0], f"{name} is not split: {shard0}"
    assert ranks[0]["losses"] == ranks[1]["losses"] and ranks[0]["norms"] == ranks[1]["norms"]
    assert len(losses) == 3 and losses[0] > losses[-1]
    assert ranks[0]["losses"] == pytest.approx(losses, rel=1e-5)
    assert ranks[0]["norms"] == pytest.approx(norms, rel=1e-5)  # the gradients averaged over ranks, not summed
    _, fresh, _, _ = fsdp_cpu_worker.build()
    initial = {n: p.detach().clone() for n, p in fresh.named_parameters()}
    fresh.load_state_dict(torch.load(tmp_path / "full_state.pt", weights_only=True), strict=True)
    for name, p in fresh.named_parameters():
        assert not torch.equal(p, initial[name]), f"{name} did not train"
        worst = (p - whole[name].detach()).abs().max().item()
        assert worst <= 1e-5, f"{name}: the gathered weight is {worst:.2e} from the unsharded one"


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason=FSDP_NEEDS_GPUS)
def test_fsdp_trains_the_tiny_llava_on_two_gpus_and_its_checkpoint_loads_back(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    cmd = [accelerate, "launch", "--config_file", str(PACKAGE_DIR / "launch" / "fsdp.yaml"), "--num_processes", "2",
           "--fsdp_min_num_params", "1000", str(HERE / "fsdp_worker.py"), str(tmp_path)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(s["distributed_type"].endswith("FSDP") and s["processes"] == 2 and s["steps"] == 3 for s in ranks)
    assert math.isfinite(ranks[0]["last"]["loss"]) and ranks[0]["last"]["loss"] == ranks[1]["last"]["loss"]
    tok = tiny_tokenizer()
    model = tiny_llava(tok, seed=1)
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt.name == "checkpoint-3"
    load_trained(model, ckpt)  # every trained weight whole, in its own shape (not one rank's shard)
    assert not torch.equal(model.projector.linear_1.weight, tiny_llava(tok, seed=1).projector.linear_1.weight)
