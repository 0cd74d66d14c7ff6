"""One vectorised sampler for the whole batch: penalties, logit bias, minimum length, a grammar's token mask,
temperature, top-k, top-p, min-p, per-request seeds, log-probabilities with top-k alternatives.

A batch where every request is greedy and asks for nothing else takes the fast path: one argmax. Otherwise each
step is a fixed number of batched tensor ops over [S, V]; the only per-row work is drawing the noise of seeded
requests from their own generators (the draw depends only on (seed, position), so a seeded request gives the same
tokens on every transport, after preemption and after a resume on another gating actor).

Draws: one batched torch.multinomial for unseeded rows, the inverse CDF of a uniform from the request's own
generator for seeded ones.
Log-probabilities are those of the raw model distribution (vLLM's default `raw_logprobs`), before any penalty,
mask or temperature.

Device: the logits stay on the engine's device (cpu, cuda, npu); per-request settings become small tensors
there, decisions that depend only on the settings are taken on the host (no device sync for them), and the
sampled ids come back to the host once, as one [S] tensor. Seeded draws take their uniform from the request's CPU
generator (the same number on every device) and move it over in one copy.

Legend: S = sequences sampled this step, V = vocab, R = rows that need a given step.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from moeray.common.sampling import TopLogprobs
from moeray.engine.sequence import Sequence

NEG_INF = float("-inf")
HOST = torch.device("cpu")  # tensors built from Python lists and the requests' generators (said explicitly)


@dataclass(slots=True)
class SampleResult:
    tokens: list[int]
    logprobs: list[float | None]  # the sampled token's, where asked for
    top_logprobs: list[TopLogprobs | None]  # the request's top_logprobs alternatives, where asked for


def make_generator(seed: int | None) -> torch.Generator:
    """A request's own generator: seeded requests give the same tokens on every transport."""
    g = torch.Generator(device=HOST)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def sample(logits: torch.Tensor, seqs: list[Sequence], allowed: torch.Tensor | None = None,
           eos_token_ids: Seq[int] = ()) -> SampleResult:
    """logits [S, V] (one row per sequence) -> one token per sequence.

    allowed: optional bool [S, V], False where a grammar forbids the token (rows without a grammar all True).
    eos_token_ids: what min_tokens holds back, beside each request's stop_token_ids.
    """
    params = [s.params for s in seqs]
    S = len(seqs)
    if allowed is None and all(p.greedy and p.plain and not p.logprobs and not p.top_logprobs for p in params):
        tokens = logits.argmax(-1).tolist()  # the fast path: greedy, nothing else asked for (one sync)
        return SampleResult(tokens, [None] * S, [None] * S)
    if allowed is not None:
        allowed = allowed.to(logits.device)
    raw = logits.float()
    x = _processed(raw, seqs, allowed, eos_token_ids)
    tokens_t = x.argmax(-1)
    rand = [i for i, p in enumerate(params) if not p.greedy]
    if rand:
        tokens_t[rand] = _draw(x[rand], [seqs[i] for i in rand])
    tokens = tokens_t.tolist()  # the step's one device -> host copy of ids
    logprobs, top = _logprobs(raw, params, tokens)
    return SampleResult(tokens, logprobs, top)


def _processed(raw: torch.Tensor, seqs: list[Sequence], allowed: torch.Tensor | None,
               eos_token_ids: Seq[int]) -> torch.Tensor:
    """Penalties, logit bias, min_tokens and the grammar mask applied to a copy of the logits."""
    params = [s.params for s in seqs]
    if allowed is None and all(p.plain for p in params):
        return raw
    x = raw.clone()
    V, dev = x.shape[1], x.device
    pen = [i for i, p in enumerate(params)
           if p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0]
    if pen:
        _apply_penalties(x, pen, seqs, V)
    rows, cols, vals = [], [], []
    for i, p in enumerate(params):
        for tok, bias in p.logit_bias.items():
            if tok < V:
                rows.append(i)
                cols.append(tok)
                vals.append(float(bias))
    if rows:
        x.index_put_((torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)),
                     torch.tensor(vals, dtype=x.dtype, device=dev), accumulate=True)
    rows, cols = [], []
    for i, (s, p) in enumerate(zip(seqs, params, strict=True)):
        if len(s.output_ids) < p.min_tokens:
            banned = {*p.stop_token_ids, *(() if p.ignore_eos else eos_token_ids)}
            rows.extend([i] * len(banned))
            cols.extend(banned)
    if rows:
        x[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)] = NEG_INF
    if allowed is not None:
        x.masked_fill_(~allowed[:, :V], NEG_INF)
    return x


def _apply_penalties(x: torch.Tensor, pen: list[int], seqs: list[Sequence], V: int) -> None:
    """vLLM's order: repetition (prompt and output tokens), then frequency and presence (output tokens)."""
    R, dev = len(pen), x.device
    out_counts = _counts([seqs[i].output_ids for i in pen], V, dev)  # [R, V]
    sub = x[pen]
    reps = [seqs[i].params.repetition_penalty for i in pen]
    if any(r != 1.0 for r in reps):
        seen = _counts([seqs[i].prompt_ids for i in pen], V, dev).gt(0) | out_counts.gt(0)
        r = torch.tensor(reps, dtype=x.dtype, device=dev)[:, None].expand(R, V)
        sub = torch.where(seen, torch.where(sub > 0, sub / r, sub * r), sub)
    freq = torch.tensor([seqs[i].params.frequency_penalty for i in pen], dtype=x.dtype, device=dev)
    pres = torch.tensor([seqs[i].params.presence_penalty for i in pen], dtype=x.dtype, device=dev)
    sub = sub - freq[:, None] * out_counts - pres[:, None] * out_counts.gt(0).to(x.dtype)
    x[pen] = sub


def _counts(id_lists: list[list[int]], V: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[R, V] float counts of each id in each list, on `device` (the lists padded on the host, one copy over,
    one scatter)."""
    width = max((len(ids) for ids in id_lists), default=0)
    counts = torch.zeros(len(id_lists), V + 1, device=device)
    if width:
        padded = torch.full((len(id_lists), width), V, dtype=torch.long, device=HOST)
        for r, ids in enumerate(id_lists):
            if ids:
                padded[r, :len(ids)] = torch.tensor(ids, dtype=torch.long, device=HOST).clamp_(max=V)
        padded = padded.to(device)
        counts.scatter_add_(1, padded, torch.ones(padded.shape, device=device))
    return counts[:, :V]


def _draw(x: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """x [R, V] processed logits of the sampled rows -> [R] tokens, after temperature, top-k, top-p, min-p.

    Rows fall into three groups, each done in one go: top-k rows work on the k largest logits only (torch.topk,
    then top-p inside them), top-p rows on the fully sorted row, the rest on the whole row unsorted.
    """
    params = [s.params for s in seqs]
    R, V = x.shape
    dev = x.device
    temp = torch.tensor([p.temperature for p in params], dtype=x.dtype, device=dev)
    y = x / temp[:, None]
    tokens = torch.empty(R, dtype=torch.long, device=dev)
    with_k = [r for r, p in enumerate(params) if 0 < p.top_k < V]
    with_p = [r for r, p in enumerate(params) if not 0 < p.top_k < V and p.top_p < 1.0]
    rest = [r for r, p in enumerate(params) if not 0 < p.top_k < V and p.top_p >= 1.0]
    if with_k:
        ks = [params[r].top_k for r in with_k]
        k = torch.tensor(ks, device=dev)
        vals, ids = y[with_k].topk(max(ks), -1)  # sorted, largest first
        vals.masked_fill_(torch.arange(vals.shape[1], device=dev)[None, :] >= k[:, None], NEG_INF)
        tokens[with_k] = ids.gather(1, _pick(_top_p(vals, [params[r] for r in with_k]), _rows(seqs, with_k)))[:, 0]
    if with_p:
        vals, ids = y[with_p].sort(-1, descending=True)
        tokens[with_p] = ids.gather(1, _pick(_top_p(vals, [params[r] for r in with_p]), _rows(seqs, with_p)))[:, 0]
    if rest:
        tokens[rest] = _pick(_min_p(y[rest].softmax(-1), [params[r] for r in rest]), _rows(seqs, rest))[:, 0]
    return tokens


def _rows(seqs: list[Sequence], rows: list[int]) -> list[Sequence]:
    return [seqs[r] for r in rows]


def _top_p(vals: torch.Tensor, params) -> torch.Tensor:
    """Sorted logits (largest first) -> probabilities after top-p (the smallest prefix reaching it) and min-p."""
    probs = vals.softmax(-1)
    if any(p.top_p < 1.0 for p in params):
        top_p = torch.tensor([p.top_p for p in params], dtype=vals.dtype, device=vals.device)
        before = probs.cumsum(-1) - probs  # mass of the more likely tokens
        probs = probs.masked_fill(before >= top_p[:, None], 0.0)
    return _min_p(probs, params)


def _min_p(probs: torch.Tensor, params) -> torch.Tensor:
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], dtype=probs.dtype, device=probs.device)
        probs = probs.masked_fill(probs < min_p[:, None] * probs.amax(-1, keepdim=True), 0.0)
    return probs


def _pick(probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """probs [R, W] (unnormalised) -> [R, 1] column drawn per row. Unseeded rows: one batched multinomial;
    seeded rows: a uniform from the request's generator, reseeded from (seed, position), then the inverse CDF."""
    probs = probs.nan_to_num(0.0)
    empty = probs.sum(-1) <= 0  # every token masked (cannot happen with a grammar, which always allows one)
    probs[:, 0] += empty.to(probs.dtype)  # such a row draws column 0; no host sync to find out whether any is
    out = torch.empty(len(seqs), 1, dtype=torch.long, device=probs.device)
    seeded = [r for r, s in enumerate(seqs) if s.params.seed is not None]
    unseeded = [r for r, s in enumerate(seqs) if s.params.seed is None]
    if unseeded:
        out[unseeded] = torch.multinomial(probs[unseeded], 1)
    if seeded:
        u = torch.empty(len(seeded), 1, dtype=probs.dtype, device=HOST)  # drawn from the requests' CPU generators
        for i, r in enumerate(seeded):
            s = seqs[r]
            g = s.generator if s.generator is not None else torch.Generator(device=HOST)
            g.manual_seed((s.params.seed * 1_000_003 + s.num_tokens) % (2**63))
            u[i] = torch.rand(1, generator=g, dtype=probs.dtype, device=HOST)
        u = u.to(probs.device)
        cdf = probs[seeded].cumsum(-1)
        pos = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
        out[seeded] = pos.clamp_(max=probs.shape[1] - 1)
    return out


def _logprobs(raw: torch.Tensor, params, tokens: list[int]) -> tuple[list[float | None], list[TopLogprobs | None]]:
    S = len(tokens)
    want = [i for i, p in enumerate(params) if p.logprobs or p.top_logprobs]
    logprobs: list[float | None] = [None] * S
    top: list[TopLogprobs | None] = [None] * S
    if not want:
        return logprobs, top
    lp = raw[want].log_softmax(-1)  # [R, V]
    sampled = lp.gather(1, torch.tensor([tokens[i] for i in want], device=lp.device)[:, None])[:, 0].tolist()
    k = max(params[i].top_logprobs for i in want)
    if k:
        values, ids = lp.topk(min(k, lp.shape[1]), -1)
        values, ids = values.tolist(), ids.tolist()
    for r, i in enumerate(want):
        logprobs[i] = sampled[r]
        n = params[i].top_logprobs
        if n:
            top[i] = list(zip(ids[r][:n], values[r][:n], strict=True))
    return logprobs, top
