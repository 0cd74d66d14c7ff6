"""ExpertLoad: the per-(layer, expert) counts EPLB balances, folded lazily, every id counted exactly once."""

import threading

import torch

from moeray.engine.transport import ExpertLoad


def test_counts_equal_a_bincount_of_every_step_across_folds():
    g = torch.Generator().manual_seed(0)
    load = ExpertLoad()
    steps = [torch.randint(0, 8, (n, 2), generator=g) for n in [1, 3, 64, 1] * (ExpertLoad.FOLD // 2 + 3)]
    for ids in steps:
        load.add(5, ids, 8)
        load.add(7, ids[:, :1], 8)
    got = load.take()
    assert got[5] == torch.bincount(torch.cat([s.reshape(-1) for s in steps]), minlength=8).tolist()
    assert got[7] == torch.bincount(torch.cat([s[:, 0] for s in steps]), minlength=8).tolist()
    assert load.take() == {}  # taken: the next window starts empty


def test_take_on_another_thread_loses_and_doubles_nothing():
    load, total = ExpertLoad(), [0] * 4
    taken: list[dict[int, list[int]]] = []
    done = threading.Event()

    def taker() -> None:
        while not done.is_set():
            taken.append(load.take())

    t = threading.Thread(target=taker)
    t.start()
    for i in range(3000):
        ids = torch.tensor([[i % 4, (i + 1) % 4]])
        load.add(0, ids, 4)
        total[i % 4] += 1
        total[(i + 1) % 4] += 1
    done.set()
    t.join()
    taken.append(load.take())
    summed = [sum(d.get(0, [0] * 4)[e] for d in taken) for e in range(4)]
    assert summed == total
