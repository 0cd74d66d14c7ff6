"""Stream several requests at once and inject a fault mid-stream: the fault tests' common driver."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Streamed:
    tokens: list[list[int]]  # per request, every token delivered
    last: dict[int, object] = field(default_factory=dict)  # request index -> its final delta (finish_reason set)
    fault_at: int | None = None  # how many tokens request 0 had when the fault was injected


def stream_with_fault(dep, prompts, params, prefix: str, after_tokens: int, fault: Callable[[], None]) -> Streamed:
    """Stream every prompt through `dep.stream`; once request 0 has `after_tokens` tokens, call `fault()` once."""
    out = Streamed(tokens=[])

    async def one(i):
        toks = []
        async for d in dep.stream(f"{prefix}-{i}", prompts[i], params):
            toks += d.token_ids
            if d.finish_reason is not None:
                out.last[i] = d
            if i == 0 and len(toks) >= after_tokens and out.fault_at is None:
                out.fault_at = len(toks)
                fault()
        return toks

    async def run():
        return await asyncio.gather(*[one(i) for i in range(len(prompts))])

    out.tokens = asyncio.run(run())
    return out
