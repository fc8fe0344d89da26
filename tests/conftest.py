import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from sparseforge.formats.artifact import REFERENCE_MODEL_DIR  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def single_thread():
    """One intra-op thread for the whole suite: the test machine is small and shared, and torch's threads wait
    for each other when another process holds a core."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(REFERENCE_MODEL_DIR)


@pytest.fixture
def tiny_llama_dir(tmp_path, tokenizer):
    """A tiny random Llama saved as a Hugging Face directory with the bundled tokenizer."""
    from tiny_models import tiny_model

    path = tmp_path / "tiny-llama"
    model = tiny_model("llama")
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
