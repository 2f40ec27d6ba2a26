"""The recall testbed: the MQAR generator's layout, distances and determinism, the data file round trip, the
scorer, and the quick recipe end to end (``lincomp distill recall --quick``)."""

import json
import warnings

import pytest
import torch

from lincomp.models import recall as R
from lincomp.models.distill_cli import run_recall

V = R.RecallVocab(keys=16, values=12)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("pairs,length", [(1, 4), (4, 64), (8, 40), (16, 257)])
def test_layout(pairs, length):
    b = R.make_batch(6, pairs, length, seed=3, vocab=V)
    ids, N = b.input_ids, 6
    assert ids.shape == (N, length) and b.query_pos.shape == (N, pairs) == b.key_pos.shape
    keys, values = ids[:, 0:2 * pairs:2], ids[:, 1:2 * pairs:2]
    assert ((keys >= V.key_start) & (keys < V.value_start)).all()
    assert ((values >= V.value_start) & (values < V.size)).all()
    for row in range(N):
        assert len(set(keys[row].tolist())) == pairs                       # distinct keys
        q = b.query_pos[row]
        assert (q >= 2 * pairs).all() and (q + 1 < length).all() and ((q - 2 * pairs) % 2 == 0).all()
        assert sorted(b.key_pos[row].tolist()) == list(range(0, 2 * pairs, 2))   # every key asked once
        # the query repeats its key, the answer is that key's value
        assert torch.equal(ids[row, q], ids[row, b.key_pos[row]])
        assert torch.equal(ids[row, q + 1], ids[row, b.key_pos[row] + 1])
        rest = torch.ones(length, dtype=torch.bool)
        rest[:2 * pairs] = False
        rest[q], rest[q + 1] = False, False
        assert (ids[row, rest] == R.FILL).all()
        lab = b.labels[row]
        assert torch.equal(lab[q + 1], ids[row, q + 1]) and int((lab != -100).sum()) == pairs
    assert (b.distance >= 1).all() and (b.distance <= length - 2).all()


def test_distances_spread_to_full_length():
    b = R.make_batch(64, 8, 1024, seed=0, vocab=V)
    d = b.distance.flatten().double()
    assert d.max() > 0.9 * 1024 and d.min() < 64
    far = R.bucket_accuracy(torch.ones_like(b.distance, dtype=torch.bool), b.distance, 64)
    assert far["n_far"] > far["n_near"] > 0      # query positions uniform: most keys far away


def test_deterministic_by_seed():
    a, b, c = (R.make_batch(4, 8, 128, seed=s, vocab=V) for s in (5, 5, 6))
    for x, y in [(a.input_ids, b.input_ids), (a.query_pos, b.query_pos), (a.labels, b.labels)]:
        assert torch.equal(x, y)
    assert not torch.equal(a.input_ids, c.input_ids)
    step = R.batches([4, 8], 64, 3, seed=1, vocab=V)
    assert torch.equal(step(7)["input_ids"], step(7)["input_ids"])
    assert int((step(0)["labels"] != -100).sum()) == 3 * 4 and int((step(1)["labels"] != -100).sum()) == 3 * 8


@pytest.mark.parametrize("kw,field", [({"pairs": 0}, "pairs"), ({"pairs": 17}, "pairs"), ({"length": 30}, "length")])
def test_bad_input(kw, field):
    args = {"pairs": 8, "length": 64, **kw}
    with pytest.raises(ValueError, match=field):
        R.make_batch(2, args["pairs"], args["length"], vocab=V)


def test_dataset_round_trip_and_scoring(tmp_path):
    b = R.make_batch(3, 4, 48, seed=1, vocab=V)
    R.save_dataset(b, tmp_path / "d.safetensors", V, {"note": 1})
    b2, v2, info = R.load_dataset(tmp_path / "d.safetensors")
    assert v2 == V and info == {"note": 1} and torch.equal(b2.input_ids, b.input_ids)
    assert torch.equal(b2.key_pos, b.key_pos)

    class Oracle(torch.nn.Module):
        """Answers every query right except those whose key is more than 8 tokens back (scores the scorer)."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids):
            logits = torch.zeros(*input_ids.shape, V.size)
            for r in range(input_ids.shape[0]):
                for p in range(1, input_ids.shape[1]):
                    for j in range(0, p, 2):
                        if input_ids[r, j] == input_ids[r, p] and p - j <= 8 and input_ids[r, p] >= V.key_start:
                            logits[r, p, input_ids[r, j + 1]] = 1.0
                            break
            return type("Out", (), {"logits": logits})()

    acc = R.query_accuracy(Oracle(), b2, window=2)
    d = b.distance
    assert acc["n_near"] == int((d <= 8).sum()) and acc["n_far"] == int((d > 8).sum())
    assert acc["far"] == 0.0 and (acc["near"] is None or acc["near"] == 1.0)


def test_quick_recipe_end_to_end(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = run_recall(quick=True, seed=0, out_dir=str(tmp_path), progress=False, log=lambda m: None)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(r["rows"]))
    assert saved["format"] == "lincomp-recall-results-1"
    for row in saved["rows"]:
        assert {"window", "pairs", "length", "accuracy"} <= set(row)
        a = row["accuracy"]
        for who in ("teacher", "window_only", "student"):
            assert {"near", "far", "all", "n_near", "n_far"} <= set(a[who])
            assert a[who]["n_near"] + a[who]["n_far"] == saved["eval_sequences"] * row["pairs"]
        assert set(a["students"]) == {"lizard", "lolcats"} and row["best_student"] in a["students"]
        # the teacher learned something: near queries well above chance (4 standard errors)
        n = a["teacher"]["n_near"]
        p = saved["chance"]
        assert a["teacher"]["near"] > p + 4 * (p * (1 - p) / n) ** 0.5, a["teacher"]
    assert (tmp_path / "teacher" / "config.json").exists()
    assert sorted(p.name for p in (tmp_path / "students").iterdir()) == ["lizard.safetensors", "lolcats.safetensors"]
    assert list((tmp_path / "data").glob("eval_p*_L48.safetensors"))


def test_dense_queries():
    b = R.make_batch(5, 4, 40, seed=2, vocab=V, queries=16)       # every free slot a query
    assert b.query_pos.shape == (5, 16) and not (b.input_ids[:, 8:] == R.FILL).any()
    for row in range(5):
        assert set(b.key_pos[row].tolist()) == {0, 2, 4, 6}          # every key asked at least once
        assert torch.equal(b.input_ids[row, b.query_pos[row] + 1], b.input_ids[row, b.key_pos[row] + 1])
    with pytest.raises(ValueError, match="queries"):
        R.make_batch(1, 4, 40, vocab=V, queries=17)


def test_dense_batches_vary_the_query_count():
    step = R.batches([4], 40, 2, seed=3, vocab=V, dense="mixed")
    counts = {int((step(i)["labels"] != -100).sum()) // 2 for i in range(40)}
    assert min(counts) < 10 < max(counts) and counts <= set(range(4, 17))   # 4 (eval layout) .. 16 (all slots)
    assert torch.equal(step(5)["input_ids"], step(5)["input_ids"])
    full = R.batches([4], 40, 2, seed=3, vocab=V, dense="all")
    assert int((full(0)["labels"] != -100).sum()) == 2 * 16
    with pytest.raises(ValueError, match="dense"):
        R.batches([4], 40, 2, vocab=V, dense="some")


def test_cli_stage2_defaults_and_flags(monkeypatch):
    """Stage 2 trains at the evaluation length by default (far keys in view during training); the repeatable
    options keep the recipe's defaults when left out, --train-pairs 0 trains on the evaluation counts."""
    import argparse

    from lincomp.models import distill_cli

    p = argparse.ArgumentParser()
    distill_cli.register(p.add_subparsers())       # reads the recipe's defaults: before the stand-in
    seen = {}
    monkeypatch.setattr(distill_cli, "run_recall", lambda **kw: seen.update(kw))

    def call(*extra):
        seen.clear()
        a = p.parse_args(["distill", "recall", *extra])
        assert a.func(a) == 0
        return dict(seen)

    d = distill_cli._defaults(run_recall)
    kw = call()
    assert "train_pairs" not in kw and "pairs" not in kw       # the recipe's own defaults
    assert kw["finetune_length"] == d["finetune_length"] == d["length"] and kw["feature_dim"] == d["feature_dim"]
    assert set(d["train_pairs"]) <= set(d["pairs"])                # the training layout is one of those scored
    assert call("--train-pairs", "0")["train_pairs"] is None
    kw = call("--train-pairs", "8", "--train-pairs", "32", "--finetune-length", "256", "--feature-dim", "32")
    assert kw["train_pairs"] == [8, 32] and kw["finetune_length"] == 256 and kw["feature_dim"] == 32
    assert "teacher" not in kw                                     # the teacher's seed is --seed
    kw = call("--seed", "1", "--teacher-seed", "0")
    assert kw["seed"] == 1 and kw["teacher"] == R.RecallTeacherConfig(seed=0)



def test_teacher_saved_before_a_config_field_existed_still_loads(tmp_path):
    """A cached teacher whose saved config lacks a field added later (``data``) is loaded, not retrained; a
    real difference in the config still retrains."""
    import dataclasses

    pytest.importorskip("transformers")
    from transformers import LlamaForCausalLM

    from lincomp.models.causal_lm import _save_dir_atomically

    cfg = R.QUICK_TEACHER
    saved = cfg.to_json()
    del saved["data"]                                              # as saved before the field existed
    _save_dir_atomically(LlamaForCausalLM(cfg.llama_config()), tmp_path / "t", {"config": saved})
    assert R.load_teacher(tmp_path / "t", cfg) is not None
    assert R.load_teacher(tmp_path / "t", dataclasses.replace(cfg, seed=cfg.seed + 1)) is None


def test_teacher_restarts_from_a_new_init_when_it_stays_on_the_plateau(tmp_path):
    """A teacher below the plateau check's accuracy restarts from seed + 1000 (its checkpoint removed), the last
    attempt always runs to the end, and teacher_info.json records every attempt; a check it passes trains once."""
    import dataclasses

    pytest.importorskip("transformers")
    never = dataclasses.replace(R.QUICK_TEACHER, curriculum=((48, 12, 4),), plateau_check=(5, 1.0), attempts=3)
    model, info = R.train_teacher(never, tmp_path / "t", progress=False)
    got = info["attempts"]
    assert [a["init_seed"] for a in got] == [never.seed, never.seed + 1000, never.seed + 2000]
    assert [a["restarted"] for a in got] == [True, True, False]
    assert all(0 <= a["check_accuracy"] < 1 for a in got)
    assert not list(tmp_path.glob("*.train.safetensors"))              # no checkpoint of a failed attempt left
    assert json.loads((tmp_path / "t" / "teacher_info.json").read_text())["attempts"] == got
    assert R.load_teacher(tmp_path / "t", never) is not None            # cached: loaded, not retrained
    passes = dataclasses.replace(never, plateau_check=(5, 0.0))
    _, info = R.train_teacher(passes, None, progress=False)
    assert [a["restarted"] for a in info["attempts"]] == [False]
    late = dataclasses.replace(never, plateau_check=(10_000, 1.0))        # past the end: checks nothing
    _, info = R.train_teacher(late, None, progress=False)
    assert info["attempts"] == [{"init_seed": never.seed, "check_step": None, "restarted": False}]
    with pytest.raises(ValueError, match="attempts"):
        dataclasses.replace(never, attempts=0)
    with pytest.raises(ValueError, match="plateau_check"):
        dataclasses.replace(never, plateau_check=(5, 2.0))


def test_a_teacher_that_did_not_learn_is_reported_not_scored_silently(tmp_path, monkeypatch):
    """The quick recipe's teacher is far below 99%: results.json says teacher_ok false and the table warns; a
    full (non-quick) run also raises a warning naming the accuracy and what to do."""
    from lincomp.models import distill_cli

    pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = run_recall(quick=True, seed=0, out_dir=str(tmp_path / "q"), progress=False, log=lambda *_: None)
    assert r["teacher_ok"] is False and r["teacher_target"] == 0.99
    assert json.loads((tmp_path / "q" / "results.json").read_text())["teacher_ok"] is False
    assert "WARNING: the teacher is below 99.0%" in distill_cli.format_recall(r)
    assert "WARNING" not in distill_cli.format_recall({**r, "teacher_ok": True})
    monkeypatch.setattr(distill_cli, "RECALL_TEACHER_TARGET", 1.01)   # no teacher passes: the warning fires
    with pytest.warns(UserWarning, match="did not learn the task"):
        run_recall(teacher=R.QUICK_TEACHER, out_dir=None, window=8, length=48, pairs=[4], train_pairs=[4], steps=1, finetune_steps=0,
                   eval_sequences=4, specs=["lizard"], feature_dim=8, progress=False, log=lambda *_: None)
