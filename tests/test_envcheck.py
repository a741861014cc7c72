import pytest
import torch

from llava_lite import envcheck


def test_training_device_names_what_is_missing(monkeypatch):
    """``--device`` of the trainers: a GPU that is not here, or a name torch does not know, fails at
    once with the flag in the message."""
    assert envcheck.training_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="not a device name"):
        envcheck.training_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA GPU.*--device cpu"):
        envcheck.training_device("cuda")


@pytest.mark.parametrize(
    "report, preset",
    [
        ({"cuda": False}, "tiny"),
        ({"cuda": True, "gpu_memory_gib": 15.0}, "colab"),
        ({"cuda": True, "gpu_memory_gib": 80.0}, "full"),
    ],
)
def test_suggested_preset_follows_the_gpu_and_its_memory(report, preset):
    assert envcheck.suggested_preset(report) == preset


def test_versions_name_every_package_the_lessons_use():
    versions = envcheck.versions()
    assert set(envcheck.PACKAGES) == set(versions)
    assert versions["torch"] == torch.__version__.split("+")[0] and versions["papermill"] != "not installed"
