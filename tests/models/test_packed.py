"""Packed training rows through a linearised transformers model: position_ids restarting per document, or the
flash-attention kwargs ``cu_seq_lens_q/k``, reach the kernels as ``cu_seqlens`` (each document attended on its
own), the same as running the documents one by one; a mask that is not the block-diagonal pattern raises."""

import copy
import math
import warnings

import pytest
import torch

from lincomp import presets
from lincomp.documents import cu_seqlens_of
from lincomp.models import linearize
from lincomp.models.packing import check_packed_mask, cu_seqlens_from_position_ids
from lincomp.testing import rel_err

transformers = pytest.importorskip("transformers")

LENGTHS = [5, 1, 9, 4]
SPECS = {"lizard": presets.lizard(window=4, sinks=2, feature_dim=8, chunk_size=4),
         "gla": presets.gla("scalar", chunk_size=4), "swa": presets.sliding_window(3)}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _docs(vocab: int):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (1, n), generator=g) for n in LENGTHS]


def _packed(docs):
    ids = torch.cat(docs, 1)
    pos = torch.cat([torch.arange(d.shape[1]) for d in docs])[None]
    return ids, pos


def test_position_ids_to_cu_seqlens():
    assert cu_seqlens_from_position_ids(torch.tensor([[0, 1, 2, 0, 0, 1]])).tolist() == [0, 3, 4, 6]
    assert cu_seqlens_from_position_ids(torch.arange(7)[None]) is None


def test_check_packed_mask_rejects_other_masks():
    cu = cu_seqlens_of([2, 3])
    doc = torch.tensor([0, 0, 1, 1, 1])
    block = (doc[:, None] == doc[None, :]) & torch.ones(5, 5, dtype=torch.bool).tril()
    check_packed_mask(block[None, None], cu, causal=True)
    with pytest.raises(ValueError, match="block-diagonal causal"):
        check_packed_mask(torch.ones(5, 5, dtype=torch.bool).tril()[None, None], cu, causal=True)
    with pytest.raises(ValueError, match="cannot also have padding"):
        check_packed_mask(torch.tensor([[True] * 4 + [False]]), cu, causal=True)


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("how", ["position_ids", "flash_kwargs"])
def test_packed_row_equals_documents_one_by_one(llama, name, how):
    model = linearize(copy.deepcopy(llama), SPECS[name], target="auto")
    for p in model.parameters():   # non-trivial learned parts (gates, feature maps, alpha, sinks)
        p.data.add_(0.05 * torch.randn_like(p))
    docs = _docs(model.config.vocab_size)
    ids, pos = _packed(docs)
    kw = {"position_ids": pos}
    if how == "flash_kwargs":
        cu = cu_seqlens_of(LENGTHS)
        kw.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(LENGTHS), max_length_k=max(LENGTHS))
    with torch.no_grad():
        packed = model(ids, use_cache=False, **kw).logits
        alone = torch.cat([model(d, use_cache=False).logits for d in docs], 1)
        whole = model(ids, use_cache=False).logits      # one long document: must differ
    assert rel_err(packed, alone) <= 1e-4
    assert rel_err(whole, alone) > 1e-3


def test_packed_training_gradients(llama):
    """Gradients of a packed loss == the sum of the documents' losses (through the reference's autograd)."""
    model = linearize(copy.deepcopy(llama), SPECS["lizard"], target="reference")
    docs = _docs(model.config.vocab_size)
    ids, pos = _packed(docs)
    params = [p for p in model.parameters() if p.requires_grad]
    lp = torch.log_softmax(model(ids, position_ids=pos, use_cache=False).logits, -1).sum()
    g_packed = torch.autograd.grad(lp, params, allow_unused=True)
    la = sum(torch.log_softmax(model(d, use_cache=False).logits, -1).sum() for d in docs)
    g_alone = torch.autograd.grad(la, params, allow_unused=True)
    for a, b in zip(g_packed, g_alone):
        if b is not None:
            assert rel_err(a, b) <= 1e-4


def test_compiled_packed_row_with_flash_kwargs(llama):
    """torch.compile: cu_seq_lens_q/k reach the op as cu_seqlens with no graph break; == eager."""
    model = linearize(copy.deepcopy(llama), SPECS["gla"], target="reference")
    docs = _docs(model.config.vocab_size)
    ids, pos = _packed(docs)
    cu = cu_seqlens_of(LENGTHS)
    kw = dict(position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(LENGTHS),
              max_length_k=max(LENGTHS), use_cache=False)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(ids, **kw).logits
        # fullgraph: a graph break raises; Inductor off keeps the test short (the op is what matters here)
        compiled = torch.compile(model, backend="lincomp", fullgraph=True,
                                 options={"inductor": False})(ids, **kw).logits
    torch._dynamo.reset()
    assert rel_err(compiled, eager) <= 1e-5
    alone = torch.cat([model(d, use_cache=False).logits for d in docs], 1)
    assert rel_err(compiled, alone) <= 1e-4


def test_pack_documents_rows_positions_and_labels():
    from lincomp.models.packing import pack_documents
    docs = [torch.arange(1, 4), torch.arange(10, 12), torch.arange(20, 29), torch.arange(30, 31)]
    rows = pack_documents(docs, 6)
    assert [r["input_ids"].shape[1] for r in rows] == [5, 6, 4]   # 3+2 | 6 (cut) | 3 (rest) + 1
    assert rows[0]["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert rows[0]["labels"].tolist() == [[-100, 2, 3, -100, 11]]
    assert rows[2]["position_ids"].tolist() == [[0, 1, 2, 0]]
    assert torch.equal(torch.cat([r["input_ids"][0] for r in rows]), torch.cat(docs))


def test_distill_on_packed_rows(llama):
    """Layer-local transfer: the softmax target of a packed row is block-diagonal (the student then runs
    exactly the teacher, document by document); both stages train on packed rows."""
    from lincomp.models import distill as D
    from lincomp.models.packing import pack_documents
    student = linearize(copy.deepcopy(llama), SPECS["lizard"], target="reference")
    docs = [d[0] for d in _docs(student.config.vocab_size)]
    rows = pack_documents(docs, 12)
    assert len(rows) == 3 and rows[0]["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0]]
    batch = rows[0]
    with torch.no_grad(), D.LayerLocalTransfer(student) as t:
        out = student(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    alone = torch.cat([llama(d[None], use_cache=False).logits for d in docs[:2]], 1)
    assert len(t.losses) == 2 and rel_err(out, alone) <= 1e-5
    res = D.distill(student, llama, rows, attention_steps=2, finetune_steps=2, task_loss="lm", progress=False)
    assert all(math.isfinite(v) for log in (res.last("attention"), res.last("finetune")) for v in log.values()
               if isinstance(v, float))
