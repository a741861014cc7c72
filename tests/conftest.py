import os
import random
from pathlib import Path

import pytest

from llava_lite import world
from llava_lite.config import WorldConfig

from llava_fixtures import tiny_llava, tiny_tokenizer, world_samples


@pytest.fixture(scope="session")
def outputs_dir(tmp_path_factory) -> Path:
    """One outputs folder for the whole session (the notebooks build on each other's files)."""
    path = tmp_path_factory.mktemp("outputs")
    old = os.environ.get("LLAVA_LITE_OUTPUTS")
    os.environ["LLAVA_LITE_OUTPUTS"] = str(path)
    yield path
    if old is None:
        os.environ.pop("LLAVA_LITE_OUTPUTS", None)
    else:
        os.environ["LLAVA_LITE_OUTPUTS"] = old


@pytest.fixture(scope="session")
def small_world(tmp_path_factory) -> Path:
    """A small shapes world on disk, shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("world")
    world.generate(WorldConfig(splits={"pretrain": 30, "train": 60, "val": 20, "test": 20}), root, progress=False)
    return root


@pytest.fixture
def rng() -> random.Random:
    return random.Random(0)


@pytest.fixture(scope="module")
def tok():
    """The test tokenizer (the shipped tiny LM's), one per test module: models may add tokens to it."""
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def samples():
    """Symbolic-teacher samples of 40 scenes (captions, conversations, exact questions)."""
    return world_samples(40)[1]


@pytest.fixture(scope="module")
def exact_setup():
    """A tokenizer, a tiny untrained LLaVA over it, and exact-question samples of 30 scenes."""
    tok = tiny_tokenizer()
    return tok, tiny_llava(tok, seed=3), world_samples(30, kinds=("exact",))[1]


@pytest.fixture
def ctrl_c():
    """SIGINT as an interactive terminal has it (Python's default handler raises KeyboardInterrupt),
    also where the suite runs as a background job that ignores SIGINT; the handler is put back after."""
    import signal  # only the Ctrl-C tests need it

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models (``pytestmark = pytest.mark.usefixtures(
    "one_thread")``): their steps are too small to share, and on a busy two-core machine two threads
    waiting on each other made a reply take 5 s instead of 0.1 s."""
    import torch  # only the modules that ask for it

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
