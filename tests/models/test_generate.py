"""lincomp.models.generate: token-by-token decoding equals the full forward; the cache stays flat."""

import copy
import warnings

import pytest
import torch

from lincomp import presets
from lincomp.models import generate, linearize, set_attention_mode
from lincomp.testing import rel_err

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.mark.parametrize("spec", [presets.lizard(window=6, sinks=2, feature_dim=8), presets.lolcats(block=4, feature_dim=8),
                                  presets.sliding_window(5), presets.gla("vector")],
                         ids=["lizard", "lolcats", "swa", "gla"])
def test_generate_equals_the_full_forward(llama, spec):
    model = linearize(copy.deepcopy(llama), spec, target="reference")
    prompt = torch.randint(0, 64, (2, 7))
    out = generate(model, prompt, 6, output_logits=True)
    assert out.sequences.shape == (2, 13) and torch.equal(out.sequences[:, :7], prompt)
    with torch.no_grad():
        full = model(out.sequences).logits
    assert rel_err(out.logits, full) < 1e-5
    assert torch.equal(out.sequences[:, 7:], full[:, 6:-1].argmax(-1))   # greedy


def test_cache_memory_is_flat_as_the_context_grows(llama):
    model = linearize(copy.deepcopy(llama), presets.lizard(window=4, sinks=2, feature_dim=4), target="reference")
    out = generate(model, torch.randint(0, 64, (1, 1)), 40)
    sizes = out.cache_bytes           # after context lengths 1, 2, ..., 41
    assert sizes[0] < sizes[4]        # the window fills up ...
    assert len(set(sizes[5:])) == 1   # ... then the cache stays the same size (window keys + (S, z) state)
    assert sizes[-1] < 4 * 2 * 41 * 2 * 8 * 4   # far below a 41-token KV cache (layers * k,v * L * Hkv * D * 4 B)


def test_generate_rejects_what_it_cannot_decode(llama):
    with pytest.raises(ValueError, match="linearised model"):
        generate(llama, torch.zeros(1, 3, dtype=torch.long), 2)
    model = linearize(copy.deepcopy(llama), presets.sliding_window(4), target="reference")
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, torch.zeros(1, 3, dtype=torch.long), -1)
    with pytest.raises(ValueError, match="input_ids"):
        generate(model, torch.zeros(3, dtype=torch.long), 2)
    set_attention_mode(model, "teacher")
    with pytest.raises(ValueError, match="student"):
        generate(model, torch.zeros(1, 3, dtype=torch.long), 2)


def test_eos_stops_generation(llama):
    model = linearize(copy.deepcopy(llama), presets.sliding_window(4), target="reference")
    prompt = torch.randint(0, 64, (1, 5))
    first = generate(model, prompt, 1).sequences[0, -1].item()
    out = generate(model, prompt, 10, eos_token_id=first)
    assert out.sequences.shape == (1, 6)


@pytest.mark.parametrize("target", ["auto", "triton"])
def test_generate_with_the_compiled_decoders(llama, target):
    """target="auto" decodes with TVMDecoder on the CPU; "triton" with TritonDecoder (the interpreter here)."""
    if target == "triton":
        pytest.importorskip("triton")
    model = linearize(copy.deepcopy(llama), presets.lizard(window=6, sinks=2, feature_dim=8), target=target)
    prompt = torch.randint(0, 64, (2, 7))
    out = generate(model, prompt, 5, output_logits=True)
    with torch.no_grad():
        full = model(out.sequences).logits
    assert rel_err(out.logits, full) < 1e-4
    assert len(set(out.cache_bytes[-4:])) == 1
