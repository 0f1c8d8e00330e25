"""Shared fixtures: a tiny byte-level BPE tokenizer and tiny random causal LMs of every supported architecture."""

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.testing_utils import (  # noqa: E402
    TINY_MODEL_TYPES,
    build_tiny_causal_lm,
    build_tiny_tokenizer,
    tiny_corpus,
    tiny_requests,
)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long or heavy test, opt-in with `-m slow`")
    config.addinivalue_line("markers", "integration: uses the real SmolLM2-135M-Instruct model")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_bos_tokenizer():
    return build_tiny_tokenizer(add_bos=True)


@pytest.fixture(params=TINY_MODEL_TYPES)
def model_type(request):
    return request.param


@pytest.fixture
def tiny_model(model_type, tiny_tokenizer):
    return build_tiny_causal_lm(model_type, vocab_size=len(tiny_tokenizer))


@pytest.fixture
def tiny_llama(tiny_tokenizer):
    return build_tiny_causal_lm("llama", vocab_size=len(tiny_tokenizer))


@pytest.fixture
def tiny_gpt2(tiny_tokenizer):
    return build_tiny_causal_lm("gpt2", vocab_size=len(tiny_tokenizer))


@pytest.fixture(scope="session")
def corpus():
    return tiny_corpus()


@pytest.fixture
def requests_list():
    return tiny_requests()


@pytest.fixture(autouse=True, scope="module")
def _single_thread_for_tiny_models(request):
    """Tiny models run fastest on one thread (several threads thrash on a shared 2-core machine); the real-model
    integration tests keep torch's default."""
    if request.node.get_closest_marker("integration") or request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
