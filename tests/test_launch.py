"""The shipped accelerate configs for several GPUs: FSDP beside DDP and DeepSpeed ZeRO-2."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.utils import FullyShardedDataParallelPlugin

from llava_lite.paths import PACKAGE_DIR
from llava_lite.train import latest_checkpoint, load_trained

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
