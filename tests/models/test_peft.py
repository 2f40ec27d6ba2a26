"""peft + a linearised model: a plain get_peft_model(model, LoraConfig(...)) trains lincomp's learned tensors with
the adapter, saves them in the adapter file and restores them with PeftModel.from_pretrained; generate works through
peft; peft_auto(False) opts out and with_lincomp(config) opts one config back in."""

import copy
import json

import pytest
import torch

from lincomp import presets
from lincomp.models import linearize, set_attention_mode
from lincomp.models.adapters import install_peft_hook, peft_auto, with_lincomp
from lincomp.testing import rel_err

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
LIZARD = presets.lizard(window=6, sinks=2, feature_dim=8)
PARTS = ("feature_q.weight", "feature_k.weight", "gate.proj.weight", "sink_logits", "alpha")


def _lora(**kw):
    return peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, **kw)


def _trainable_lincomp(model):
    return {n for n, p in model.named_parameters() if p.requires_grad and ".lincomp." in n}


def test_plain_lora_trains_lincomp_and_gradients_reach_it(llama):
    model = peft.get_peft_model(linearize(copy.deepcopy(llama), LIZARD, target="reference"), _lora())
    trainable = _trainable_lincomp(model)
    for part in PARTS:
        assert any(n.endswith(part) for n in trainable), part
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    model.train()
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        if n in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert install_peft_hook() and install_peft_hook()                         # idempotent: one wrapper
    from peft.tuners.tuners_utils import BaseTuner
    assert not getattr(BaseTuner.inject_adapter.__wrapped__, "_lincomp_hook", False)


def test_opt_out_freezes_lincomp_and_with_lincomp_opts_back_in(llama):
    with peft_auto(False):
        plain = peft.get_peft_model(linearize(copy.deepcopy(llama), LIZARD, target="reference"), _lora())
        assert not _trainable_lincomp(plain) and plain.peft_config["default"].modules_to_save is None
        model = peft.get_peft_model(linearize(copy.deepcopy(llama), LIZARD, target="reference"),
                                    with_lincomp(_lora()))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable)
    for part in PARTS:
        assert any(".lincomp." in n and n.endswith(part) for n in trainable), part
    with pytest.raises(TypeError, match="peft_auto"):
        peft_auto("no")
    peft_auto(False)
    try:                                                                       # a plain call sets it for good
        assert not _trainable_lincomp(peft.get_peft_model(linearize(copy.deepcopy(llama), LIZARD, target="reference"),
                                                          _lora()))
    finally:
        peft_auto(True)
    untouched = peft.get_peft_model(copy.deepcopy(llama), _lora())             # no linearised layer: as peft does
    assert untouched.peft_config["default"].modules_to_save is None


@pytest.mark.parametrize("explicit", [False, True], ids=["plain", "with_lincomp"])
def test_trained_lincomp_tensors_save_and_reload_with_the_adapter(llama, tmp_path, explicit):
    config = with_lincomp(_lora()) if explicit else _lora()
    model = peft.get_peft_model(linearize(copy.deepcopy(llama), LIZARD, target="reference"), config)
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
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["lincomp"]
    base = linearize(copy.deepcopy(llama), LIZARD, target="reference")        # fresh (random gate init)
    back = peft.PeftModel.from_pretrained(base, tmp_path)
    restored = dict(back.named_parameters())
    assert all(torch.equal(restored[n], after[n]) for n in before)             # bit-exact
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


def test_hook_refuses_unknown_peft_with_a_warning(monkeypatch):
    from peft.tuners.tuners_utils import BaseTuner
    install_peft_hook()
    monkeypatch.setattr(BaseTuner, "inject_adapter", BaseTuner.inject_adapter.__wrapped__)   # as before linearize
    monkeypatch.setattr(peft, "__version__", "0.13.2")
    with pytest.warns(UserWarning, match="with_lincomp"):
        assert install_peft_hook() is False
    assert not getattr(BaseTuner.inject_adapter, "_lincomp_hook", False)
    monkeypatch.setenv("LINCOMP_PEFT_AUTO", "0")
    monkeypatch.setattr(peft, "__version__", "0.21.2")
    assert install_peft_hook() is False and not getattr(BaseTuner.inject_adapter, "_lincomp_hook", False)
