"""Training through lincomp::attention runs each forward once: the forward op saves what the backward needs
(the window kernels' log-sum-exp, the linear kernels' states and normalisers) and the backward op runs only
backward kernels. Launches are counted on the Triton interpreter (CPU tensors) and on the reference path."""

import os

import pytest
import torch

from lincomp import presets
from lincomp.backends import ops
from lincomp.reference import reference
from lincomp.testing import random_inputs, rel_err

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET", "") != "1":   # tests/conftest.py sets it before triton loads
    pytest.skip("needs TRITON_INTERPRET=1 set before triton is imported", allow_module_level=True)

TRITON_SPECS = {
    "swa-sinks": presets.sliding_window(4, sinks=2),
    "lizard": presets.lizard(window=4, sinks=2, feature_dim=4),
}


class Counter:
    """Wraps ``module.name`` and counts its calls."""

    def __init__(self, monkeypatch, module, name):
        self.calls = 0
        inner = getattr(module, name)

        def counted(*args, **kwargs):
            self.calls += 1
            return inner(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)


def _counters(monkeypatch):
    from lincomp.lower.triton import linear_op, window_launch
    return {"window_fwd": Counter(monkeypatch, window_launch, "window_forward"),
            "window_bwd": Counter(monkeypatch, window_launch, "window_backward"),
            "linear_fwd": Counter(monkeypatch, linear_op, "run_forward"),
            "linear_bwd": Counter(monkeypatch, linear_op, "run_backward")}


def _leaves(spec, seed=0):
    inp = random_inputs(spec, B=1, H=2, Hkv=1, L=12, D=16, dtype=torch.float32, seed=seed)
    return {n: t.requires_grad_() for n, t in inp.items()}


def _attention(spec, leaves, target, fallback="error", spec_json=None):
    w = {n: leaves.get(n) for n in ops.WEIGHT_NAMES}
    spec_json = spec_json or ops.spec_to_json(spec)
    return torch.ops.lincomp.attention(leaves["q"], leaves["k"], leaves["v"], spec_json, 0.3,
                                       w["g"], w["feature_weight_q"], w["feature_weight_k"], w["sink_logits"],
                                       w["window_gamma"], w["alpha"], None, target, fallback)


def _check_grads(spec, leaves, o, grads):
    """Values and gradients against the fp64 reference (docs/semantics.md section 5: fp32 within 1e-4)."""
    ref = {n: t.detach().double().requires_grad_() for n, t in leaves.items()}
    r = reference(spec, **ref, scale=0.3)
    assert rel_err(o, r) < 1e-4
    go = torch.ones_like(r)
    want = torch.autograd.grad(r, list(ref.values()), go)
    for n, a, b in zip(leaves, grads, want):
        assert rel_err(a, b) < 1e-4, n


@pytest.mark.interpreter
@pytest.mark.parametrize("name", list(TRITON_SPECS))
def test_triton_forward_runs_once_per_training_step(name, monkeypatch):
    spec = TRITON_SPECS[name]
    family = "window" if spec.linear is None else "linear"
    counts = _counters(monkeypatch)
    leaves = _leaves(spec)
    o = _attention(spec, leaves, "triton")
    assert counts[f"{family}_fwd"].calls == 1
    grads = torch.autograd.grad(o.sum(), list(leaves.values()))
    assert counts[f"{family}_fwd"].calls == 1, "the backward ran the forward again"
    assert counts[f"{family}_bwd"].calls == 1
    _check_grads(spec, leaves, o.detach(), grads)


@pytest.mark.interpreter
def test_triton_forward_runs_once_under_aot_autograd(monkeypatch):
    """The same through AOTAutograd (fake tensors, a traced joint graph): the saved tensors are graph values."""
    spec = TRITON_SPECS["swa-sinks"]
    counts = _counters(monkeypatch)
    leaves = _leaves(spec, seed=1)
    torch._dynamo.reset()
    spec_json = ops.spec_to_json(spec)   # json.dumps does not trace
    step = torch.compile(lambda lv: _attention(spec, lv, "triton", spec_json=spec_json).sum(), backend="aot_eager",
                         fullgraph=True)
    loss = step(leaves)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    assert counts["window_fwd"].calls == 1 and counts["window_bwd"].calls == 1
    with torch.no_grad():
        o = _attention(spec, leaves, "triton")
    _check_grads(spec, leaves, o, grads)


def test_kernels_without_backward_run_one_forward(monkeypatch):
    """The reference has no backward kernels: with inputs that require grad the op differentiates the
    reference itself, once; neither a kernel nor a second reference evaluation runs."""
    spec, target = TRITON_SPECS["lizard"], "reference"
    import lincomp.runtime.kernel as K
    direct, inner = Counter(monkeypatch, ops, "reference"), Counter(monkeypatch, K, "reference")
    launched = Counter(monkeypatch, ops.torch.ops.lincomp, "attention_forward")
    leaves = _leaves(spec, seed=2)
    o = _attention(spec, leaves, target)
    assert (direct.calls, inner.calls, launched.calls) == (1, 0, 0)
    grads = torch.autograd.grad(o.sum(), list(leaves.values()))
    assert (direct.calls, inner.calls, launched.calls) == (1, 0, 0), "the backward evaluated the forward again"
    _check_grads(spec, leaves, o.detach(), grads)
    with torch.no_grad():   # inference goes through the forward op
        _attention(spec, {n: t.detach() for n, t in leaves.items()}, target)
    assert launched.calls == 1


@pytest.mark.parametrize("name", sorted(presets.PAPER_SPECS))
def test_every_preset_has_tvm_backward_kernels(name):
    """Every spec family (windows, pooled keys, linear, shared and sum hybrids) trains on TVM's own backward."""
    pytest.importorskip("tvm")
    kernel = ops.get_kernel(ops.spec_to_json(presets.PAPER_SPECS[name]()), "tvm", "error")
    assert kernel.backward_unsupported() is None and kernel.has_backward()


def test_no_private_torch_api_in_the_ops():
    import inspect
    src = inspect.getsource(ops)
    assert "torch._C" not in src and "_ForceDispatchKeyGuard" not in src


def _packed_row_grads(spec, lengths, target, seed, monkeypatch):
    """A packed row of documents of these lengths through the op on ``target``: checks values and gradients of
    every input against the fp64 reference with cu_seqlens and that the reference was never called."""
    from lincomp.testing import packed_inputs
    import lincomp.runtime.kernel as K
    x = packed_inputs(spec, lengths, H=2, Hkv=1, D=16, seed=seed)
    cu = x.pop("cu_seqlens")
    leaves = {n: t.requires_grad_() for n, t in x.items()}
    w = {n: leaves.get(n) for n in ops.WEIGHT_NAMES}
    refs = Counter(monkeypatch, ops, "reference"), Counter(monkeypatch, K, "reference")
    o = torch.ops.lincomp.attention(leaves["q"], leaves["k"], leaves["v"], ops.spec_to_json(spec), 0.3, w["g"],
                                    w["feature_weight_q"], w["feature_weight_k"], w["sink_logits"], w["window_gamma"],
                                    w["alpha"], None, target, "error", "", cu)
    probe = torch.randn(o.shape, generator=torch.Generator().manual_seed(0))
    grads = torch.autograd.grad((o * probe).sum(), list(leaves.values()))
    assert refs[0].calls == refs[1].calls == 0
    ref = {n: t.detach().double().requires_grad_() for n, t in leaves.items()}
    r = reference(spec, **ref, scale=0.3, cu_seqlens=cu)
    assert rel_err(o, r) < 1e-4
    want = torch.autograd.grad((r * probe.double()).sum(), list(ref.values()))
    for n, a, b in zip(leaves, grads, want):
        assert rel_err(a, b) < 1e-4, n
    return cu


@pytest.mark.interpreter
@pytest.mark.parametrize("name", ["swa-sinks", "lizard", "gla"])
def test_triton_packed_row_backward_runs_backward_kernels_per_document(name, monkeypatch):
    """A packed row (documents of 1, 4, 3 and 4 tokens: two share a length and run stacked) through the op on
    Triton: the backward runs the kernels' own backward per document group (the forward again, no reference),
    values and gradients of every input against the fp64 reference with cu_seqlens."""
    from lincomp.documents import cu_seqlens_of
    spec = TRITON_SPECS.get(name) or presets.gla("scalar", chunk_size=4)
    family = "window" if spec.linear is None else "linear"
    counts = _counters(monkeypatch)
    cu = _packed_row_grads(spec, [1, 4, 3, 4], "triton", 3, monkeypatch)
    assert torch.equal(cu, cu_seqlens_of([1, 4, 3, 4]))
    assert counts[f"{family}_bwd"].calls >= 1


@pytest.mark.parametrize("name", ["swa-sinks", "gla"])
def test_tvm_packed_row_backward_runs_backward_kernels_per_document(name, monkeypatch):
    """The same on TVM: the window and linear backward kernels serve each document group, no reference call."""
    pytest.importorskip("tvm")
    spec = TRITON_SPECS.get(name) or presets.gla("scalar", chunk_size=16)
    _packed_row_grads(spec, [1, 4, 3, 4, 20], "tvm", 4, monkeypatch)
