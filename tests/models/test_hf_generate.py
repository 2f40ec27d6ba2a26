"""model.generate() on a linearised causal LM through LincompCache: greedy tokens equal lincomp.models.generate
and the full-sequence argmax, seeded sampling equals sampling without a cache, streamers, GenerationConfig, left
padding, flat memory, and clear errors for what a constant-size state cannot do."""

import copy

import pytest
import torch

from lincomp import presets
from lincomp.models import generate as lincomp_generate
from lincomp.models import linearize
from lincomp.models.cache import LincompCache
from lincomp.models.modules import LinearizedAttention

transformers = pytest.importorskip("transformers")
LIZARD = presets.lizard(window=6, sinks=2, feature_dim=8)


@pytest.fixture(scope="module")
def model(linearised_llama):
    return linearised_llama(LIZARD)


def _prompt(B=2, n=9, seed=0):
    return torch.randint(3, 64, (B, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("target", ["reference", "auto"])
def test_greedy_matches_lincomp_generate_and_full_sequence_argmax(linearised_llama, target):
    if target == "auto":
        pytest.importorskip("tvm")
    model = linearised_llama(LIZARD, target)
    ids = _prompt()
    out = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert out.shape == (2, 19)
    assert torch.equal(out, lincomp_generate(model, ids, 10).sequences)
    with torch.no_grad():   # teacher forcing over the whole sequence: each generated token is that argmax
        full = model(out, use_cache=False).logits
    assert torch.equal(full[:, 8:-1].argmax(-1), out[:, 9:])


def test_sampling_is_seeded_and_equals_sampling_without_cache(model):
    ids = _prompt()
    cfg = transformers.GenerationConfig(do_sample=True, top_k=20, temperature=0.9, max_new_tokens=10,
                                        pad_token_id=0, eos_token_id=None)
    torch.manual_seed(11)
    a = model.generate(ids, generation_config=cfg)
    torch.manual_seed(11)
    b = model.generate(ids, generation_config=cfg)
    torch.manual_seed(11)
    nocache = model.generate(ids, generation_config=cfg, use_cache=False)   # full recompute each step
    torch.manual_seed(12)
    other = model.generate(ids, generation_config=cfg)
    assert torch.equal(a, b) and torch.equal(a, nocache) and not torch.equal(a, other)


def test_streamer_sees_every_token(model):
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.reshape(-1).clone())

        def end(self):
            self.ended = True

    ids = _prompt(B=1)
    s = Collect()
    out = model.generate(ids, max_new_tokens=6, do_sample=False, streamer=s, pad_token_id=0, eos_token_id=None)
    assert s.ended and torch.equal(torch.cat(s.chunks), out[0])


def test_left_padded_batch_decodes_each_sequence_as_alone(model):
    short, long = _prompt(1, 5, seed=1), _prompt(1, 9, seed=2)
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :4] = 0
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    out = model.generate(batch, attention_mask=mask, **kw)
    assert torch.equal(out[0, 9:], model.generate(short, **kw)[0, 5:])
    assert torch.equal(out[1, 9:], model.generate(long, **kw)[0, 9:])


def test_cache_memory_is_flat_in_the_context_length(linearised_llama):
    """The cache's tensor bytes after a 1K, 4K and 16K-token context are equal (about 10 s on 2 CPU cores)."""
    pytest.importorskip("tvm")
    model = linearised_llama(LIZARD, "auto")
    sizes = {}
    for n in (1024, 4096, 16384):
        cache = LincompCache(model)
        ids = torch.randint(3, 64, (1, n), generator=torch.Generator().manual_seed(n))
        model.generate(ids, max_new_tokens=2, do_sample=False, cache=cache, pad_token_id=0, eos_token_id=None)
        assert cache.get_seq_length() == n + 1
        sizes[n] = cache.state_bytes()
    assert 0 < sizes[1024] == sizes[4096] == sizes[16384], sizes


def test_what_a_constant_state_cannot_do_raises(model, llama):
    ids = _prompt()
    with pytest.raises(NotImplementedError, match="beam"):
        model.generate(ids, max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)
    partial = linearize(copy.deepcopy(llama), {"model.layers.1.*": LIZARD}, target="reference")
    with pytest.raises(ValueError, match="every attention layer linearised"):
        partial.generate(ids, max_new_tokens=3, pad_token_id=0)
    with pytest.raises(ValueError, match="use_cache=False"):     # a DynamicCache hands lincomp past keys
        model.generate(ids, max_new_tokens=3, cache=transformers.DynamicCache(), pad_token_id=0)


def test_teacher_mode_generates_with_the_dynamic_cache(model, llama):
    from lincomp.models import attention_mode
    ids = _prompt()
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    with attention_mode(model, "teacher"):
        assert torch.equal(model.generate(ids, **kw), llama.generate(ids, **kw))
    assert all(m.mode == "student" for m in model.modules() if isinstance(m, LinearizedAttention))


def test_small_steps_run_on_one_thread_and_the_count_comes_back(model, monkeypatch):
    """A tiny model's steps skip torch's thread wake-ups (SERIAL_STEP_WORK); big ones keep every thread; the
    thread count is restored after generate, also when a step raises."""
    import lincomp.models.cache as cache_mod
    from lincomp.models import set_attention_mode
    seen = []
    layer = next(m for m in model.modules() if isinstance(m, LinearizedAttention))
    hook = layer.register_forward_pre_hook(lambda m, a: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    between = []   # generate's own work between steps (a logits processor): on one thread too

    def record(ids, scores):
        between.append(torch.get_num_threads())
        return scores
    try:
        model.generate(_prompt(), logits_processor=transformers.LogitsProcessorList([record]), **kw)
        assert between == [1, 1, 1]
        lincomp_generate(model, _prompt(), 3)
        # forwards: the prompt + 2 steps (generate feeds not its last token), the prompt + 3 steps (lincomp's)
        assert len(seen) == 3 + 4 and set(seen) == {1} and torch.get_num_threads() == 2
        seen.clear()
        monkeypatch.setattr(cache_mod, "SERIAL_STEP_WORK", 0)
        model.generate(_prompt(), **kw)
        assert len(seen) == 3 and set(seen) == {2}
        monkeypatch.undo()
        set_attention_mode(model, "teacher")
        with pytest.raises(ValueError, match="student"):
            model.generate(_prompt(), cache=LincompCache(model), **kw)
        assert torch.get_num_threads() == 2
    finally:
        set_attention_mode(model, "student")
        hook.remove()
        torch.set_num_threads(before)
