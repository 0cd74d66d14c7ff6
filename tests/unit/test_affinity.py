"""Cache-aware routing policy, pure: the same prefix goes to the same actor, keys spread over actors, and no
actor is given a request that takes it above 1.25x the mean in-flight count."""

import random

from moeray.router.affinity import affinity_order, load_cap, order_by_affinity, prefix_key


def keys(n, seed=0):
    r = random.Random(seed)
    return [prefix_key([r.randrange(50_000) for _ in range(16)]) for _ in range(n)]


def test_same_prefix_same_actor_and_only_the_first_block_counts():
    p = list(range(100))
    assert prefix_key(p) == prefix_key(p[:16] + [7] * 50)
    assert prefix_key(p) != prefix_key([1] + p[1:])
    assert affinity_order(prefix_key(p), [0, 0, 0]) == affinity_order(prefix_key(p[:20]), [0, 0, 0])


def test_keys_spread_over_actors():
    firsts = [affinity_order(k, [0, 0, 0, 0])[0] for k in keys(2000)]
    counts = [firsts.count(a) for a in range(4)]
    assert min(counts) > 0.7 * 500 and max(counts) < 1.3 * 500


def test_load_bound_holds_when_one_prefix_is_hot():
    loads = [0, 0]
    hot = keys(1)[0]
    for _ in range(40):
        a = affinity_order(hot, loads)[0]
        assert loads[a] + 1 <= load_cap(loads)
        loads[a] += 1
        assert max(loads) <= 1.25 * sum(loads) / 2 + 1
    assert min(loads) > 0  # the hot prefix spilled to the other actor
    assert affinity_order(hot, [0, 0])[0] == affinity_order(hot, [3, 3])[0]  # at equal load it goes home


def test_order_keeps_every_backend_for_failover():
    class B:
        def __init__(self, n):
            self.n = n

        def load(self):
            return self.n

    bs = [B(5), B(0), B(1)]
    order = order_by_affinity(bs, [1, 2, 3])
    assert sorted(id(b) for b in order) == sorted(id(b) for b in bs)
    assert order[-1] is bs[0]  # over the cap: last
