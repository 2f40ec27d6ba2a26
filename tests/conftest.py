"""Shared test setup: hypothesis profiles, the Triton interpreter on CPU-only machines, GPU skips.

Profiles: ``ci`` (default; a fixed example budget, no deadline) and ``dev`` (more examples).
Choose with ``HYPOTHESIS_PROFILE=dev``.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # Triton kernels run through the numpy interpreter on a CPU-only machine
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def llama():
    """A tiny random Llama with grouped-query attention (4 query heads, 2 key/value heads)."""
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def linearised_llama(llama):
    """``make(spec, target)``: a copy of ``llama`` linearised with ``spec``, its learned tensors moved off their
    initialisation by seeded noise (so sinks, gates and feature maps all matter)."""
    import copy

    from lincomp.models import learned_parameters, linearize

    def make(spec, target="reference"):
        model = linearize(copy.deepcopy(llama), spec, target=target)
        torch.manual_seed(7)
        with torch.no_grad():
            for p in learned_parameters(model):
                p.add_(0.1 * torch.randn_like(p))
        return model
    return make
