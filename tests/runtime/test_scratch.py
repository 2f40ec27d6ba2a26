"""Scratch: a call's intermediates reused between calls, leased per call, poisoned on reuse."""

import threading

import torch

from lincomp.runtime.buffers import POISON_ENV, Scratch


def test_reuses_same_shape_and_replaces_new_shape(monkeypatch):
    monkeypatch.setenv(POISON_ENV, "0")
    s = Scratch()
    with s.lease() as get:
        a = get("fq", (2, 3))
        a.fill_(1.5)
    with s.lease() as get:
        assert get("fq", (2, 3)).data_ptr() == a.data_ptr()      # the same memory: no fresh pages
        b = get("fq", (4, 3))
        assert b.shape == (4, 3) and b.data_ptr() != a.data_ptr()
        assert get("fq", (4, 3), torch.float64).dtype == torch.float64


def test_poison_refills_reused_buffers(monkeypatch):
    monkeypatch.setenv(POISON_ENV, "1")
    s = Scratch()
    with s.lease() as get:
        get("num", (5,)).fill_(2.0)
    with s.lease() as get:
        assert torch.isnan(get("num", (5,))).all()   # a kernel that forgets an element shows NaN, not old data


def test_concurrent_leases_never_share():
    s = Scratch()
    seen, barrier = [], threading.Barrier(2)

    def call():
        with s.lease() as get:
            seen.append(get("fk", (8,)).data_ptr())
            barrier.wait()   # both leases are held at once
    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == 2
    s.clear()
    with s.lease() as get:
        get("fk", (8,))
    assert len(s._free) == 1   # cleared, then the one lease returned
