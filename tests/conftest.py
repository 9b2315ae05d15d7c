import os

# The Triton kernels run on CPU tensors only under the Triton interpreter, which
# must be enabled before triton is first imported (i.e. before test collection).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def one_thread():
    """Tiny matmuls on 2 shared cores: OpenMP threads only contend (10x slower here)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def fresh_dynamo():
    """Reset dynamo before and after a test that compiles: its recompile limit (8)
    would otherwise make later compiles of the same model class run eagerly."""
    import torch

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="session")
def tok():
    """The tiny model folder's byte-level BPE tokenizer (tests/model_folder.py)."""
    from model_folder import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def ids(tok):
    """``model_folder.TEXT`` (a line of code) as input ids ``[1, n]``."""
    from model_folder import TEXT

    return tok(TEXT, return_tensors="pt").input_ids
