"""The correctness protocol's teacher-forcing check (DESIGN.md)."""

from __future__ import annotations

import torch


def teacher_forcing_failures(ref_logits: torch.Tensor, prompt_len: int, generated: list[int],
                             tol: float = 1e-3) -> list[tuple[int, int, float]]:
    """ref_logits [T_total, V] of the reference run over prompt + generated. Each generated token must be an
    argmax of the reference logits at the previous position within `tol`. Returns failures as
    (index in generated, token, logit gap to the max)."""
    bad = []
    for i, tok in enumerate(generated):
        row = ref_logits[prompt_len - 1 + i]
        gap = float(row.max() - row[tok])
        if gap > tol:
            bad.append((i, tok, gap))
    return bad


def hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()


def assert_teacher_forced(hf_model, prompts, params, outs) -> None:
    """Every output ran to max_tokens and each token passes the teacher-forcing check."""
    for p, sp, o in zip(prompts, params, outs, strict=True):
        assert len(o.token_ids) == sp.max_tokens
        assert o.finish_reason == "length"
        assert teacher_forcing_failures(hf_logits(hf_model, p + o.token_ids), len(p), o.token_ids) == []
