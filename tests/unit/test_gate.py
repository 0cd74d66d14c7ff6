"""Gate functions against naive per-token references, including ties and group-limited selection."""


import torch

from moeray.router.gate import grouped_sigmoid_topk


def naive_softmax_topk(logits, k, renorm):
    ids, ws = [], []
    for row in logits:
        p = torch.softmax(row.double(), -1)
        order = sorted(range(len(p)), key=lambda e: (-float(p[e]), e))[:k]
        w = torch.tensor([float(p[e]) for e in order])
        if renorm:
            w = w / w.sum()
        ids.append(order)
        ws.append(w)
    return torch.tensor(ids), torch.stack(ws)


def naive_grouped(logits, bias, k, n_group, topk_group, renorm, scaling):
    """Per token: {expert id: weight} chosen by DeepSeek-V3's rule, in float64."""
    out = []
    per = logits.shape[1] // n_group
    for row in logits:
        s = torch.sigmoid(row.double())
        c = s + bias.double()
        gscore = [sum(sorted(c[g * per:(g + 1) * per].tolist(), reverse=True)[:2]) for g in range(n_group)]
        groups = sorted(range(n_group), key=lambda g: (-gscore[g], g))[:topk_group]
        cand = [x for g in groups for x in range(g * per, (g + 1) * per)]
        chosen = sorted(cand, key=lambda x: (-float(c[x]), x))[:k]
        total = sum(float(s[x]) for x in chosen) if renorm else 1.0
        out.append({x: float(s[x]) / total * scaling for x in chosen})
    return out


def test_grouped_sigmoid_topk_matches_naive():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(128, 16, generator=g)
    bias = torch.rand(16, generator=g) * 0.2
    for n_group, topk_group, k in [(1, 1, 2), (4, 1, 2), (4, 2, 3), (8, 3, 4)]:
        for renorm in (True, False):
            ids, w = grouped_sigmoid_topk(logits, bias, k, n_group, topk_group, renorm, 2.5)
            ref = naive_grouped(logits, bias, k, n_group, topk_group, renorm, 2.5)
            for t in range(logits.shape[0]):
                got = {int(e): float(x) for e, x in zip(ids[t], w[t])}
                assert set(got) == set(ref[t])
                assert all(abs(got[e] - ref[t][e]) < 1e-5 for e in got)


def test_group_limit_excludes_experts_outside_chosen_groups():
    # group 0 has the single best expert, but group 1 has the best top-2 sum: only group 1 may be chosen
    logits = torch.full((1, 8), -5.0)
    logits[0, 0] = 5.0
    logits[0, 4], logits[0, 5] = 3.0, 3.0
    ids, _ = grouped_sigmoid_topk(logits, torch.zeros(8), 2, n_group=2, topk_group=1, renormalize=True, scaling=1.0)
    assert sorted(ids[0].tolist()) == [4, 5]


def test_correction_bias_changes_choice_not_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 10.0])
    ids, w = grouped_sigmoid_topk(logits, bias, 1, 1, 1, renormalize=False, scaling=1.0)
    assert ids.tolist() == [[3]]
    assert torch.allclose(w, torch.sigmoid(torch.tensor([[-1.0]])))
