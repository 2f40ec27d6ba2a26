"""The TVM kernel as a runtime object: disk cache across processes, one module for every length,
copies of awkward inputs, grad fallback, dtypes, source / config, tuning database, auto target."""

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("tvm")

import lincomp  # noqa: E402
from lincomp import presets  # noqa: E402
from lincomp.reference import reference  # noqa: E402
from lincomp.runtime.kernel import LincompFallbackWarning  # noqa: E402
from lincomp.spec import AttentionSpec  # noqa: E402
from lincomp.testing import random_inputs, rel_err  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SPEC = presets.sliding_window(12, sinks=2)

CHILD = textwrap.dedent("""
    import json, time, torch
    import lincomp
    from lincomp.lower.tvmir import build
    from lincomp.testing import random_inputs
    spec = lincomp.AttentionSpec.from_dict(json.loads({spec!r}))
    x = random_inputs(spec, B=1, H=2, L=50, D=24, seed=0)
    kern = lincomp.compile(spec, target="tvm")
    t0 = time.perf_counter()
    with torch.no_grad():
        o = kern(**x)
    print(json.dumps({{"first_call_s": time.perf_counter() - t0, "stats": build.STATS,
                      "how": [b.how for b in kern._built.values()], "sum": float(o.double().sum())}}))
""")


def _child(cache: Path, spec: AttentionSpec) -> dict:
    env = dict(os.environ, LINCOMP_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", CHILD.format(spec=spec.to_json(indent=None))], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_process_loads_from_disk_cache(tmp_path):
    spec = AttentionSpec(window={"kind": "1d", "left": 9, "right": 3}, prefix=2, sinks=1)
    first = _child(tmp_path, spec)
    second = _child(tmp_path, spec)
    assert first["how"] == ["compiled"] and first["stats"]["compiled"] == 1
    assert second["how"] == ["loaded"] and second["stats"]["compiled"] == 0
    assert second["sum"] == first["sum"]
    # loading a .so is much cheaper than parsing + compiling + linking one
    assert second["stats"]["load_s"] < 0.5 * first["stats"]["compile_s"], (first, second)
    assert list(tmp_path.glob("tvm/*/window-*.so"))


def test_one_module_for_every_length():
    from lincomp.lower.tvmir import build
    kern = lincomp.compile(SPEC, target="tvm", config={"window": {"block_m": 16, "block_n": 16}})
    before = None
    for L in (5, 31, 64, 97, 300):
        x = random_inputs(SPEC, H=2, L=L, D=16, seed=L)
        with torch.no_grad():
            o = kern(**x)
        assert rel_err(o, reference(SPEC, **{k: v.double() for k, v in x.items()})) <= 1e-4
        if before is None:
            before = build.STATS["compiled"] + build.STATS["loaded"]
    assert len(kern._mods) == 1
    assert build.STATS["compiled"] + build.STATS["loaded"] == before


def test_noncontiguous_and_misaligned_inputs_are_copied():
    x = random_inputs(SPEC, B=2, H=2, L=40, D=16, seed=1)
    q_t = x["q"].transpose(1, 2).contiguous().transpose(1, 2)           # [B, H, L, D] view of [B, L, H, D]
    buf = torch.empty(x["k"].numel() + 1)
    k_mis = buf[1:].view_as(x["k"])                                      # 4 bytes off alignment
    k_mis.copy_(x["k"])
    kern = lincomp.compile(SPEC, target="tvm")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            o = kern(q_t, k_mis, x["v"], sink_logits=x["sink_logits"])
    texts = [str(w.message) for w in caught]
    assert any("copying q" in t and "non-contiguous" in t for t in texts), texts
    assert any("copying k" in t and "misaligned" in t for t in texts), texts
    assert rel_err(o, reference(SPEC, **{k: v.double() for k, v in x.items()})) <= 1e-4


def test_requires_grad_trains_on_the_backward_kernels(monkeypatch):
    """A window spec and one with pooled keys both train on the generated backward kernels: no fallback
    warning, the reference never runs, and gradients (of q and the pooled spec's learned pooling weights)
    match the reference."""
    import lincomp.backends.ops as ops
    import lincomp.runtime.kernel as K
    calls = []
    for mod in (ops, K):
        monkeypatch.setattr(mod, "reference", lambda *a, _f=mod.reference, **kw: calls.append(1) or _f(*a, **kw))
    pooled = presets.clear_pool(radius=2, factor=2, grid=(4, 4), text_tokens=2)
    for spec in (SPEC, pooled):
        x = random_inputs(spec, H=2, L=30, D=16, seed=2)
        rest = {n: t for n, t in x.items() if n not in "qkv"}
        q = x["q"].clone().requires_grad_(True)
        kern = lincomp.compile(spec, target="tvm")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            o = kern(q, x["k"], x["v"], **rest)
            o.square().sum().backward()
        fell_back = [str(w.message) for w in caught if issubclass(w.category, LincompFallbackWarning)]
        assert not fell_back and not calls, (fell_back, len(calls))
        q2 = x["q"].clone().requires_grad_(True)
        reference(spec, q2, x["k"], x["v"], **rest).square().sum().backward()
        assert rel_err(q.grad, q2.grad) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_widened(dtype):
    spec = presets.lizard(window=6, feature_dim=4)
    x = random_inputs(spec, H=2, L=33, D=16, seed=3, dtype=dtype)
    with torch.no_grad():
        o = lincomp.compile(spec, target="tvm")(**x)
    assert o.dtype == dtype
    assert rel_err(o, reference(spec, **{k: v.double() for k, v in x.items()})) <= 1e-2


def test_float64_falls_back_with_a_reason():
    x = random_inputs(SPEC, H=2, L=20, D=16, seed=4, dtype=torch.float64)
    with pytest.warns(LincompFallbackWarning, match="float64"):
        o = lincomp.compile(SPEC, target="tvm")(**x)
    assert o.dtype == torch.float64 and rel_err(o, reference(SPEC, **x)) <= 1e-12


def test_bad_gate_values_raise():
    spec = presets.gla("vector")
    x = random_inputs(spec, H=2, L=20, D=8, seed=5)
    kern = lincomp.compile(spec, target="tvm")
    for bad, match in ((0.5, "must be <= 0"), (float("nan"), "NaN or Inf"), (float("-inf"), "NaN or Inf")):
        g = x["g"].clone()
        g[0, 1, 3, 2] = bad
        with pytest.raises(ValueError, match=match):
            kern(**dict(x, g=g))


def test_source_config_and_preview():
    spec = presets.lolcats(block=4, feature_dim=4)
    kern = lincomp.compile(spec, target="tvm")
    preview = kern.source                     # before any call: generated for a preview size
    assert "def window_fwd" in preview and "def linear_fwd" in preview and "preview" in preview
    x = random_inputs(spec, H=2, L=21, D=8, seed=6)
    with torch.no_grad():
        kern(**x)
    src = kern.source
    for needle in ("@T.prim_func", "def features_q", "def linear_fwd", "def window_fwd", "exp2(", "kv_offsets",
                   "T.parallel"):
        assert needle in src, needle
    assert set(kern.config) == {"window_fwd", "linear_fwd"} and kern.config["window_fwd"]["params"]["block_m"] > 0
    assert {c["source"] for c in kern.config.values()} <= {"db", "nearest", "default"}
    assert kern.config["linear_fwd"]["key"]["kernel"] == "linear_fwd"


def test_tuning_stores_and_reuses(tmp_path):
    from lincomp.tuning import TuningDB
    db = TuningDB(tmp_path / "db", shipped=None)
    spec = presets.sliding_window(16)
    x = random_inputs(spec, H=2, L=200, D=16, seed=7)
    space = {"window": [{"block_m": 16, "block_n": 16}, {"block_m": 32, "block_n": 16}]}
    kern = lincomp.compile(spec, target="tvm", db=db)
    first = kern.tune(x["q"], x["k"], x["v"], progress=False, space=space, reps=2)
    assert len(first) == 1 and not first[0].cached and len(first[0].candidates) == 2
    again = lincomp.compile(spec, target="tvm", db=db).tune(x["q"], x["k"], x["v"], progress=False, space=space)
    assert again[0].cached and again[0].config == first[0].config
    # a fresh kernel reads the tuned config for this bucket (L=250 shares the bucket of L=200)
    fresh = lincomp.compile(spec, target="tvm", db=db)
    y = random_inputs(spec, H=2, L=250, D=16, seed=8)
    with torch.no_grad():
        fresh(**y)
    assert fresh.config["window_fwd"]["source"] == "db"
    assert {k: fresh.config["window_fwd"]["params"][k] for k in ("block_m", "block_n")} == \
        {k: first[0].config[k] for k in ("block_m", "block_n")}
    stored = json.loads(next((tmp_path / "db").glob("*.json")).read_text())
    assert any(e["backend"] == "tvm" and e["kernel"] == "window_fwd" for e in stored["entries"].values())


def test_auto_target_uses_tvm_on_cpu():
    kern = lincomp.compile(SPEC, target="auto")
    x = random_inputs(SPEC, H=2, L=20, D=16, seed=9)
    with torch.no_grad():
        kern(**x)
    assert kern.kernel_for(torch.device("cpu")).target == "tvm"


def test_import_lincomp_does_not_import_tvm():
    code = "import sys, lincomp; lincomp.compile; assert 'tvm' not in sys.modules, 'tvm imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))


@pytest.mark.parametrize("name", ["window", "lizard", "minilm-like"])
def test_op_backward_takes_transposed_views_silently(name):
    """Models hand the op [B, L, H, D] activations transposed to [B, H, L, D] (views): forward and backward
    make them contiguous without a copy warning (the caller never chose that layout), and the gradients match
    the reference's."""
    from lincomp.backends import ops
    from lincomp.lower.tvmir.kernel import TVMCopyWarning
    spec = {"window": SPEC, "lizard": presets.lizard(window=8, sinks=2, feature_dim=4, chunk_size=16),
            "minilm-like": AttentionSpec(window={"kind": "1d", "left": 5, "right": 5}, causal=False, prefix=1,
                                         combine="shared", linear={"feature_map": "hedgehog", "feature_dim": 4,
                                                                   "chunk_size": 16})}[name]
    x = random_inputs(spec, B=2, H=2, L=37, D=8, seed=6)
    views = {n: x[n].transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True) for n in "qkv"}
    assert not views["q"].is_contiguous()
    rest = {n: t for n, t in x.items() if n not in "qkv"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", TVMCopyWarning)
        warnings.simplefilter("error", LincompFallbackWarning)
        o = torch.ops.lincomp.attention(views["q"], views["k"], views["v"], ops.spec_to_json(spec), target="tvm",
                                        **rest)
        o.square().sum().backward()
    ref = {n: x[n].double().requires_grad_(True) for n in "qkv"}
    reference(spec, **ref, **{n: t.double() for n, t in rest.items()}).square().sum().backward()
    assert all(rel_err(views[n].grad, ref[n].grad) <= 1e-4 for n in "qkv")
