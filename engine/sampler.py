"""Per-request sampling: greedy, temperature, top-k, top-p, seeded generators, log-probs.

Legend: S = sequences sampled this step, V = vocab.
"""

from __future__ import annotations

import torch

from moeray.engine.sequence import Sequence


def make_generator(seed: int | None) -> torch.Generator:
    """A request's own generator: seeded requests give the same tokens on every transport."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[float | None]]:
    """logits [S, V] (fp32, one row per sequence) -> (token ids, log-probs under the unmodified distribution
    when the request asked for them)."""
    tokens: list[int] = []
    logprobs: list[float | None] = []
    for row, seq in zip(logits, seqs, strict=True):
        p = seq.params
        if p.greedy:
            tok = int(torch.argmax(row))
        else:
            if p.seed is not None:
                # the draw depends only on (seed, position): the same on every transport, after preemption and
                # after a resume on another gating actor
                seq.generator.manual_seed((p.seed * 1_000_003 + seq.num_tokens) % (2**63))
            tok = _sample_row(row, p.temperature, p.top_k, p.top_p, seq.generator)
        tokens.append(tok)
        logprobs.append(float(torch.log_softmax(row, -1)[tok]) if p.logprobs else None)
    return tokens, logprobs


def _sample_row(row: torch.Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator) -> int:
    scaled = row / temperature  # [V]
    if top_k and top_k < scaled.numel():
        kth = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, -1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, -1)
        drop = (cum - sorted_p) >= top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=gen))
