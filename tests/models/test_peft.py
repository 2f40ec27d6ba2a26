"""peft + a linearised model: with_lincomp(LoraConfig(...)) trains lincomp's learned tensors with the adapter,
saves them in the adapter file and restores them with PeftModel.from_pretrained; generate works through peft."""

import copy

import pytest
import torch

from lincomp import presets
from lincomp.models import linearize, set_attention_mode
from lincomp.models.adapters import with_lincomp
from lincomp.testing import rel_err

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
LIZARD = presets.lizard(window=6, sinks=2, feature_dim=8)


def _lora(**kw):
    return peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, **kw)


def test_plain_lora_freezes_lincomp_and_with_lincomp_trains_it(llama):
    plain = peft.get_peft_model(linearize(copy.deepcopy(llama), LIZARD, target="reference"), _lora())
    assert not any(p.requires_grad for n, p in plain.named_parameters() if ".lincomp." in n)
    model = peft.get_peft_model(linearize(copy.deepcopy(llama), LIZARD, target="reference"), with_lincomp(_lora()))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable)
    for part in ("feature_q.weight", "feature_k.weight", "gate.proj.weight", "sink_logits", "alpha"):
        assert any(".lincomp." in n and n.endswith(part) for n in trainable), part


def test_trained_lincomp_tensors_save_and_reload_with_the_adapter(llama, tmp_path):
    model = peft.get_peft_model(linearize(copy.deepcopy(llama), LIZARD, target="reference"), with_lincomp(_lora()))
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".lincomp." in n and p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    model(ids, labels=ids).loss.backward()
    opt.step()
    model.eval()
    after = dict(model.named_parameters())
    assert all(not torch.equal(before[n], after[n]) for n in before)          # they really trained
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert sum(".lincomp." in k for k in saved) == len(before)
    base = linearize(copy.deepcopy(llama), LIZARD, target="reference")        # fresh (random gate init)
    back = peft.PeftModel.from_pretrained(base, tmp_path)
    with torch.no_grad():
        assert rel_err(back(ids).logits, want) < 1e-6
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(back.generate(input_ids=ids, **kw), model.generate(input_ids=ids, **kw))
    set_attention_mode(back, "teacher")                                       # mode switches reach the copies
    with torch.no_grad():
        assert rel_err(back(ids).logits, want) > 1e-3


def test_with_lincomp_rejects_configs_without_modules_to_save():
    with pytest.raises(TypeError, match="modules_to_save"):
        with_lincomp(object())
    cfg = with_lincomp(_lora(modules_to_save=["lm_head"]))
    assert cfg.modules_to_save == ["lm_head", "lincomp"] and with_lincomp(cfg).modules_to_save == ["lm_head", "lincomp"]
