"""CLEAR's pooled keys in models: linearize adds a per-layer pool_weight to Flux attention (initialised to
the average), it gets gradients, and distill trains it."""

import copy
import warnings

import pytest
import torch

from lincomp import presets
from lincomp.models import distill as D
from lincomp.models import learned_parameters, linearize
from lincomp.testing import rel_err

diffusers = pytest.importorskip("diffusers")

Hg, Wg, T = 4, 4, 3


@pytest.fixture(scope="module")
def flux():
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                            pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)).eval()


def _batch(B=1):
    g = torch.Generator().manual_seed(1)
    ar = [torch.zeros(1), torch.arange(Hg).float(), torch.arange(Wg).float()]
    return dict(latents=torch.randn(B, Hg * Wg, 8, generator=g), encoder_hidden_states=torch.randn(B, T, 16, generator=g),
                pooled_projections=torch.randn(B, 8, generator=g),
                img_ids=torch.stack(torch.meshgrid(*ar, indexing="ij"), -1).reshape(-1, 3), txt_ids=torch.zeros(T, 3))


def _inputs():
    b = _batch()
    return dict(hidden_states=b["latents"], encoder_hidden_states=b["encoder_hidden_states"],
                pooled_projections=b["pooled_projections"], timestep=torch.tensor([0.5]), img_ids=b["img_ids"],
                txt_ids=b["txt_ids"], joint_attention_kwargs={"lincomp_grid": (Hg, Wg)})


def test_flux_pooled_spec_adds_and_trains_pool_weight(flux):
    spec = presets.clear_pool(radius=2, factor=2, grid=(Hg, Wg), text_tokens=T)
    model = linearize(copy.deepcopy(flux), spec, target="reference")
    learned = list(learned_parameters(model))
    assert len(learned) == 2 and all(p.shape == (2, 2) and torch.all(p == 0.25) for p in learned)
    out = model(**_inputs()).sample
    out.pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learned)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tvm_model = linearize(copy.deepcopy(flux), spec, target="tvm")
        assert rel_err(tvm_model(**_inputs()).sample, out) < 1e-4     # the TVM kernel in the model
        torch._dynamo.reset()
        assert torch._dynamo.explain(model)(**_inputs()).graph_break_count == 0   # pool_weight flows through the op
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="lincomp", options={"inductor": False})
        assert rel_err(compiled(**_inputs()).sample, out) < 1e-6
    torch._dynamo.reset()


def test_distill_trains_pool_weight_with_clear_loss(flux):
    spec = presets.clear_pool(radius=2, factor=2, grid=(Hg, Wg), text_tokens=T)
    student = linearize(copy.deepcopy(flux), spec, target="reference")
    before = [p.detach().clone() for p in learned_parameters(student)]
    # CLEAR trains with its own loss (flow matching + prediction + attention-output MSE): stage 2, with the
    # learned parts (finetune_learned, the default) next to LoRA.
    res = D.distill(student, flux, [_batch(2)], attention_steps=0, finetune_steps=2, finetune_lr=1e-2,
                    task_loss="clear", lora_targets=("to_q",), progress=False)
    assert len(res.history["finetune"]) == 2
    after = list(learned_parameters(student))
    assert all(not torch.equal(a, b) for a, b in zip(after, before))
