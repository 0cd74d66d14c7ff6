"""The grouped expert GEMM against a per-token loop; slot loading and clear errors."""

import pytest
import torch
import torch.nn.functional as F

from moeray.experts.group import ExpertGroup

D, I, E = 16, 24, 6


def weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {e: (torch.randn(2 * I, D, generator=g) * 0.3, torch.randn(D, I, generator=g) * 0.3) for e in range(E)}


def per_token_reference(w, x, rows, ids, ws, limit=None):
    out = torch.zeros(x.shape[0], D, dtype=torch.float64)
    for r, e, wt in zip(rows.tolist(), ids.tolist(), ws.tolist()):
        gu, dn = w[e]
        h = gu.double() @ x[r].double()
        gate, up = h[:I], h[I:]
        if limit is not None:
            gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
        out[r] += wt * (dn.double() @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("limit", [None, 0.5])
def test_grouped_gemm_matches_per_token_loop(limit):
    w = weights()
    grp = ExpertGroup(D, I, swiglu_limit=limit)
    grp.load(3, w)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, D, generator=g)
    rows = torch.randint(0, 20, (50,), generator=g)
    ids = torch.randint(0, E, (50,), generator=g)
    ws = torch.rand(50, generator=g)
    out = grp.forward(3, x, rows, ids, ws)
    assert torch.allclose(out.double(), per_token_reference(w, x, rows, ids, ws, limit), atol=1e-5)


def test_empty_pairs_give_zeros():
    grp = ExpertGroup(D, I)
    grp.load(0, weights())
    out = grp.forward(0, torch.randn(4, D), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long),
                      torch.empty(0))
    assert torch.equal(out, torch.zeros(4, D))


def test_unknown_layer_and_expert_are_clear_errors():
    grp = ExpertGroup(D, I)
    w = weights()
    grp.load(0, {0: w[0], 2: w[2]})
    with pytest.raises(KeyError, match="layer 5"):
        grp.forward(5, torch.randn(1, D), torch.tensor([0]), torch.tensor([0]), torch.tensor([1.0]))
    with pytest.raises(KeyError, match=r"experts \[1\] are not loaded"):
        grp.forward(0, torch.randn(1, D), torch.tensor([0]), torch.tensor([1]), torch.tensor([1.0]))


def test_load_and_unload_slots_at_run_time():
    grp = ExpertGroup(D, I)
    w = weights()
    grp.load(0, {0: w[0], 1: w[1]})
    grp.load(0, {4: w[4]})
    assert grp.loaded() == {0: [0, 1, 4]}
    grp.unload(0, [1])
    assert grp.loaded() == {0: [0, 4]}
    x = torch.randn(2, D)
    out = grp.forward(0, x, torch.tensor([0, 1]), torch.tensor([4, 0]), torch.tensor([1.0, 0.5]))
    ref = per_token_reference(w, x, torch.tensor([0, 1]), torch.tensor([4, 0]), torch.tensor([1.0, 0.5]))
    assert torch.allclose(out.double(), ref, atol=1e-5)
    with pytest.raises(KeyError, match="not loaded"):
        grp.unload(0, [1])


def test_wrong_weight_shape_is_rejected():
    grp = ExpertGroup(D, I)
    with pytest.raises(ValueError, match="expected gate_up"):
        grp.load(0, {0: (torch.zeros(I, D), torch.zeros(D, I))})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_all_slot_path_matches_the_per_expert_loop(dtype, monkeypatch):
    """The decode-sized bmm over every slot against the per-expert loop it replaces, on the same pairs."""
    import moeray.experts.group as group

    w = weights(3)
    grp = ExpertGroup(D, I, swiglu_limit=0.7, dtype=dtype)
    grp.load(1, w)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(16, D, generator=g)
    rows = torch.arange(16).repeat_interleave(2)
    ids = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(16)]).reshape(-1)
    ws = torch.rand(32, generator=g)
    assert group.use_batched(torch.bincount(ids, minlength=E).tolist())
    batched = grp.forward(1, x, rows, ids, ws)
    monkeypatch.setattr(group, "use_batched", lambda counts: False)
    looped = grp.forward(1, x, rows, ids, ws)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert (batched - looped).abs().max() <= tol * looped.abs().max()
    if dtype == torch.float32:
        ref = per_token_reference(w, x, rows, ids, ws, 0.7)
        assert torch.allclose(batched.double(), ref, atol=1e-5)


def test_batched_path_is_chosen_by_shape():
    from moeray.experts.group import use_batched

    assert use_batched([3, 2, 4, 1])  # decode: every slot hit, few rows each
    assert not use_batched([1, 0, 0, 1])  # B = 1: two experts of four
    assert not use_batched([200, 180, 190, 210])  # prefill: big per-expert GEMMs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_pair_loop_matches_the_sorted_loop(dtype, monkeypatch):
    """<= TINY_PAIRS pairs (B = 1 decode) take a loop over the pairs; the same result as the sorted per-slot loop
    and, in fp32, the per-token reference -- also with two pairs on one row and an expert hit twice."""
    import moeray.experts.group as group

    w = weights(5)
    grp = ExpertGroup(D, I, dtype=dtype)
    grp.load(2, w)
    x = torch.randn(3, D, generator=torch.Generator().manual_seed(6))
    rows, ids, ws = torch.tensor([0, 0, 2, 1]), torch.tensor([4, 1, 4, 3]), torch.tensor([0.6, 0.4, 1.0, 0.25])
    assert rows.numel() <= group.TINY_PAIRS
    tiny = grp.forward(2, x, rows, ids, ws)
    monkeypatch.setattr(group, "TINY_PAIRS", 0)
    looped = grp.forward(2, x, rows, ids, ws)
    tol = 1e-6 if dtype == torch.float32 else 3e-2
    assert (tiny - looped).abs().max() <= tol * looped.abs().max()
    if dtype == torch.float32:
        assert torch.allclose(tiny.double(), per_token_reference(w, x, rows, ids, ws), atol=1e-5)
    # one row sent (B = 1 decode: the first pair's output is the accumulator)
    x1, rows1, ids1, ws1 = x[1:2], torch.tensor([0, 0]), torch.tensor([3, 1]), torch.tensor([0.7, 0.3])
    looped1 = grp.forward(2, x1, rows1, ids1, ws1)
    monkeypatch.setattr(group, "TINY_PAIRS", 4)
    tiny1 = grp.forward(2, x1, rows1, ids1, ws1)
    assert tiny1.shape == (1, D) and (tiny1 - looped1).abs().max() <= tol * looped1.abs().max()
    if dtype == torch.float32:
        assert torch.allclose(tiny1.double(), per_token_reference(w, x1, rows1, ids1, ws1), atol=1e-5)
    with pytest.raises(KeyError, match=r"experts \[9\] are not loaded"):
        grp.forward(2, x, torch.tensor([0]), torch.tensor([9]), torch.tensor([1.0]))


def test_nbytes_counts_the_packed_copies():
    """bf16 on CPU: a slot the per-expert loop used is also held oneDNN-packed; weight_bytes says so."""
    from moeray.experts.group import mkldnn_packing_available

    grp = ExpertGroup(D, I, dtype=torch.bfloat16)
    grp.load(0, weights())
    plain = grp.nbytes()
    assert plain == E * 3 * D * I * 2
    grp.forward(0, torch.randn(1, D), torch.tensor([0]), torch.tensor([2]), torch.tensor([1.0]))
    assert grp.nbytes() > plain if mkldnn_packing_available() else grp.nbytes() == plain
