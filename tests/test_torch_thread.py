"""Every forward of a Parser runs on one thread, whichever thread asks (``TorchThread``)."""
from __future__ import annotations

import threading

import numpy as np

from ihp_backend.core.inference import Parser, TorchThread
from tests.conftest import person_image


def test_calls_from_many_threads_run_on_one_thread_and_nested_calls_run_directly():
    runner = TorchThread()
    seen: list[int] = []

    def inner():
        seen.append(threading.get_ident())
        return 2

    def outer():
        seen.append(threading.get_ident())
        return runner.run(inner) + 1  # nested: would deadlock if it were queued

    answers = []
    threads = [threading.Thread(target=lambda: answers.append(runner.run(outer))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert answers == [3, 3, 3, 3]
    assert len(seen) == 8 and len(set(seen)) == 1
    assert seen[0] not in {t.ident for t in threads} | {threading.get_ident()}


def test_exceptions_reach_the_caller():
    def fails():
        raise ValueError("bad click")

    try:
        TorchThread().run(fails)
    except ValueError as e:
        assert str(e) == "bad click"
    else:
        raise AssertionError("no exception")


def test_parser_forwards_from_request_threads_run_on_one_thread(tiny_checkpoint, monkeypatch):
    parser = Parser.from_file(tiny_checkpoint, threads=1, max_side=64, precision="float32")
    image, _ = person_image()
    forward = parser._forward_kept  # a click's forward on the CPU
    idents: list[int] = []

    def recorded(*args, **kwargs):
        idents.append(threading.get_ident())
        return forward(*args, **kwargs)

    monkeypatch.setattr(parser, "_forward_kept", recorded)
    results = {}

    def click(i):
        results[i] = parser.parse(image, np.array([[50.0, 160.0, 1], [120.0, 160.0, 2]]), zoom=False).labels

    threads = [threading.Thread(target=click, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    click(3)  # and from this thread
    assert len(idents) == 4 and len(set(idents)) == 1
    assert idents[0] != threading.get_ident()
    for i in range(1, 4):
        np.testing.assert_array_equal(results[i], results[0])


def test_parsers_build_and_run_their_networks_on_the_process_torch_thread(tiny_checkpoint, monkeypatch):
    """One OpenMP team per process: a network built on another thread left that thread a team,
    and libgomp then let the forward's team idle between parallel regions (12% slower forwards,
    bench/forward_thread.py). Every CPU Parser shares TorchThread.shared() and builds there."""
    import ihp_backend.core.inference as inference
    built_on: list[int] = []
    fold = inference.fold_batchnorm

    def recorded(net):
        built_on.append(threading.get_ident())
        return fold(net)

    monkeypatch.setattr(inference, "fold_batchnorm", recorded)
    a = Parser.from_file(tiny_checkpoint, threads=1, max_side=64, precision="float32")
    b = Parser.from_file(tiny_checkpoint, threads=1, max_side=64, precision="float32")
    shared = TorchThread.shared()
    assert a._torch_thread is shared and b._torch_thread is shared
    assert len(built_on) == 2 and set(built_on) == {shared.run(threading.get_ident)}
    assert built_on[0] != threading.get_ident()
    # a forked child (threads do not survive a fork) gets a thread of its own
    monkeypatch.setattr(TorchThread, "_shared", (-1, shared))
    assert TorchThread.shared() is not shared


def test_the_precision_probe_runs_on_the_torch_thread(tiny_checkpoint, monkeypatch):
    """precision 'auto' on a CPU with native bfloat16 times both types at load: on the torch
    thread, its probe input too (filling it is a parallel op that would give the caller a team)."""
    import torch

    import ihp_backend.core.inference as inference
    seen: list[int] = []
    real = inference.faster_dtype

    def recorded(net, x, **kw):
        seen.append(threading.get_ident())
        return real(net, x, repeats=1, **kw)

    monkeypatch.setattr(inference, "pick_precision", lambda precision, device: torch.bfloat16)
    monkeypatch.setattr(inference, "faster_dtype", recorded)
    p = Parser.from_file(tiny_checkpoint, threads=1, max_side=64, precision="auto")
    assert seen == [TorchThread.shared().run(threading.get_ident)]
    assert p.dtype in (torch.float32, torch.bfloat16)
