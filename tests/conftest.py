"""Shared pytest setup: GPU tests carry the `gpu` marker and skip where CUDA is absent."""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run `make test` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def one_thread():
    """Many tiny ops: with OpenMP threads on a shared 2-core machine each op spin-waits (a 2x160 tanh
    measured at 14 ms); one thread is ~100x faster there. Restored after the test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory):
    """Token shards of a small demo corpus (vocab 512), built once per session: engine-level tests."""
    import data

    root = tmp_path_factory.mktemp("demo_shards")
    data.write_raw_corpus("demo", root / "raw", demo_size_mb=0.3)
    data.train_bpe([root / "raw" / "train.txt"], root / "tok.json", vocab_size=512)
    data.write_token_shards(root / "tok.json", root / "raw", root / "shards")
    return root / "shards"


@pytest.fixture
def no_tf32():
    """fp32 matmuls in full precision for the duration of a test (GPU comparisons)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
