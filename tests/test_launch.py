"""The shipped accelerate configs for several GPUs: FSDP beside DDP and DeepSpeed ZeRO-2."""

from accelerate.commands.config.config_args import ClusterConfig

from llava_lite.paths import PACKAGE_DIR


def test_the_fsdp_config_parses_as_accelerate_reads_it_and_shards_everything():
    cfg = ClusterConfig.from_yaml_file(PACKAGE_DIR / "launch" / "fsdp.yaml")
    assert str(cfg.distributed_type).endswith("FSDP") and not cfg.use_cpu
    fsdp = cfg.fsdp_config
    assert fsdp["fsdp_sharding_strategy"] == "FULL_SHARD" and fsdp["fsdp_use_orig_params"] is True
    assert fsdp["fsdp_auto_wrap_policy"] == "SIZE_BASED_WRAP" and fsdp["fsdp_min_num_params"] == 10_000_000
