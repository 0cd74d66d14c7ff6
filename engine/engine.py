"""The step loop: schedule -> run -> postprocess. No Ray; the gating actor wraps it.

    engine = Engine(dense, transport, EngineConfig(...))
    engine.add_request("r1", prompt_ids, SamplingParams(max_tokens=32, temperature=0.0))
    while engine.has_unfinished():
        deltas = engine.step()          # one StepDelta per sequence that produced a token (or finished)

`device` (the gating actor's placement as a torch device: cpu, cuda:0, npu:0) is where the dense weights (cast
to the serving dtype), the paged KV cache, attention, gate, shared experts and sampling live; the scheduler,
block tables and sequences stay on the host. Per step the host sends token ids and block tables over and gets
the sampled ids back once. A CPU engine runs exactly this code with device="cpu".
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moeray.common.errors import RequestError
from moeray.common.sampling import PromptLogprobs, RequestOutput, SamplingParams, StepDelta
from moeray.engine.block_manager import BlockManager, build_kv_cache
from moeray.engine.paged_cache import PagedKVCache
from moeray.engine.prefix import PrefixCache
from moeray.engine.runner import ModelRunner
from moeray.engine.sampler import SampleResult, make_generator, sample
from moeray.engine.scheduler import ScheduledChunk, Scheduler
from moeray.engine.sequence import Sequence
from moeray.engine.structured import Grammars
from moeray.engine.transport import ExpertTransport
from moeray.models.dense import cast_dense


@dataclass(frozen=True, slots=True)
class EngineConfig:
    block_size: int = 16
    num_blocks: int = 512
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    micro_batches: int = 1
    kv_cache_bytes: int | None = None  # all cache pools together; replaces num_blocks when set
    kv_cache_dtype: torch.dtype | None = None  # storage (None: the model's dtype); reads give the model's dtype
    prefix_caching: bool = True  # full blocks stay cached after their request (engine/block_manager.py)
    dtype: torch.dtype = torch.float32  # weights and compute (the serving dtype); float32 is exact

    def __post_init__(self) -> None:
        assert self.block_size > 0 and self.num_blocks > 0 and self.max_num_batched_tokens > 0
        assert self.max_num_seqs > 0 and self.micro_batches >= 0  # 0: chosen per step (engine/runner.py)


class RequestTooLargeError(RequestError):
    """A request can never fit the KV-cache budget or the model's context."""


def validate_request(cfg, config: EngineConfig, prompt_ids: list[int], params: SamplingParams) -> None:
    """Raise RequestError naming the problem if this request can never be served by an engine with `config`."""
    params.validate()
    if not prompt_ids:
        raise RequestError("prompt is empty: send at least one token")
    bad = [t for t in prompt_ids if not (isinstance(t, int) and 0 <= t < cfg.vocab_size)]
    if bad:
        raise RequestError(f"prompt token ids {bad[:5]} are outside the vocabulary 0..{cfg.vocab_size - 1}")
    total = len(prompt_ids) + params.max_tokens
    if total > cfg.max_position_embeddings:
        raise RequestTooLargeError(
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds the model's "
            f"context of {cfg.max_position_embeddings} tokens: shorten the prompt or lower max_tokens")
    need = -(-total // config.block_size)
    if config.kv_cache_bytes is None and need > config.num_blocks:
        raise RequestTooLargeError(
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) needs {need} KV blocks of "
            f"{config.block_size} tokens but the cache has {config.num_blocks}: lower max_tokens or raise "
            "kv_cache_blocks")


class Engine:
    def __init__(self, dense: torch.nn.Module, transport: ExpertTransport, config: EngineConfig,
                 decode: Callable[[list[int]], str] | None = None, prefix: PrefixCache | None = None,
                 grammars: Grammars | None = None, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.dense, self.cfg, self.config = cast_dense(dense, config.dtype, device=self.device), dense.cfg, config
        self.cache: PagedKVCache
        self.blocks: BlockManager
        self.cache, self.blocks = build_kv_cache(dense.cache_spec(), config, prefix, next(dense.parameters()).dtype,
                                                 device=self.device)
        self.prefix = prefix
        self.scheduler = Scheduler(self.blocks, config.max_num_batched_tokens, config.max_num_seqs,
                                   prefix_lookup=prefix.lookup if prefix is not None else None,
                                   prefix_prefetch=prefix.prefetch if prefix is not None else None)
        self.runner = ModelRunner(dense, self.cache, transport, config.micro_batches)
        self.transport = transport
        self.decode = decode
        self.grammars = grammars  # structured output: per-request token masks (engine/structured.py)
        self.seqs: dict[str, Sequence] = {}
        self._arrivals = itertools.count()
        self.stats = {"steps": 0, "prefill_tokens": 0, "decode_tokens": 0}
        self._prompt_lps: dict[str, PromptLogprobs] = {}  # prompt_logprobs gathered over prefill chunks

    # ---- requests ------------------------------------------------------------------------------------
    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise RequestError (naming the problem) if the request can never be served."""
        validate_request(self.cfg, self.config, prompt_ids, params)
        self.blocks.check_fits(len(prompt_ids) + params.max_tokens,
                               f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens})")

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    output_ids: list[int] | None = None) -> None:
        """Queue a request. `output_ids` resumes a sequence that already generated those tokens elsewhere (a
        failed gating actor): its KV is fetched from the store where possible, recomputed otherwise."""
        if request_id in self.seqs:
            raise RequestError(f"request_id {request_id!r} is already in use")
        self.check_request(prompt_ids, params)
        done = list(output_ids or [])
        if len(done) >= params.max_tokens:
            raise RequestError(f"request {request_id!r} already has {len(done)} of max_tokens={params.max_tokens}")
        if params.structured is not None:
            if self.grammars is None:
                raise RequestError("structured: this model ships no tokenizer.json, so it cannot follow a grammar")
            self.grammars.add(request_id, params.structured, done)
        seq = Sequence(request_id, list(prompt_ids), params, output_ids=done, arrival=next(self._arrivals),
                       generator=None if params.greedy else make_generator(params.seed))
        self.seqs[request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Cancel a request and free its blocks. False if it is unknown or already finished."""
        seq = self.seqs.get(request_id)
        if seq is None or seq.finished:
            return False
        self._finish(seq, "cancelled")
        return True

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        self.seqs.pop(seq.request_id, None)
        self._prompt_lps.pop(seq.request_id, None)
        if self.grammars is not None:
            self.grammars.forget(seq.request_id)
        if self.prefix is not None:
            self.prefix.forget(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free

    # ---- the step --------------------------------------------------------------------------------------
    def step(self) -> list[StepDelta]:
        chunks = self.scheduler.schedule()
        if not chunks:
            return []
        for c in chunks:
            if c.seq.prefix_payloads:
                self.prefix.load(self.cache, c.seq, c.seq.prefix_payloads)
            c.seq.prefix_payloads = None
        logits = self.runner.run(chunks)
        if self.runner.failed:  # rows whose experts could not be computed: fail those requests only
            return self._fail_chunks(chunks, logits, self.runner.failed)
        return self._postprocess(chunks, logits)

    def _fail_chunks(self, chunks: list[ScheduledChunk], logits: torch.Tensor,
                     failed: dict[int, str]) -> list[StepDelta]:
        """Finish the requests of the `failed` chunks (chunk index -> why) with an error; postprocess the rest."""
        sampling = [i for i, c in enumerate(chunks) if c.samples]
        deltas = []
        for i, why in failed.items():
            seq = chunks[i].seq
            self._finish(seq, f"error: unavailable: {why}")
            deltas.append(StepDelta(seq.request_id, [], None, f"error: unavailable: {why}", seq.num_cached_prefix))
        keep = [j for j, i in enumerate(sampling) if i not in failed]
        rest = [c for i, c in enumerate(chunks) if i not in failed]
        return deltas + self._postprocess(rest, logits[keep])

    def _postprocess(self, chunks: list[ScheduledChunk], logits: torch.Tensor) -> list[StepDelta]:
        sampling = [c for c in chunks if c.samples]
        for c in chunks:
            c.seq.num_computed += c.num_tokens
            if c.start < len(c.seq.prompt_ids):
                self.stats["prefill_tokens"] += c.num_tokens
            else:
                self.stats["decode_tokens"] += c.num_tokens
        self.stats["steps"] += 1
        if self.runner.prompt_logits:
            self._gather_prompt_logprobs(chunks)
        if self.prefix is not None:
            for c in chunks:
                self.prefix.write_through(self.cache, c.seq)
        self.scheduler.after_step(chunks)
        seqs = [c.seq for c in sampling]
        allowed = self.grammars.masks([s.request_id for s in seqs]) if self.grammars is not None and seqs else None
        out = sample(logits, seqs, allowed, self.cfg.eos_token_ids) if seqs else SampleResult([], [], [])
        deltas = []
        for c, tok, lp, top in zip(sampling, out.tokens, out.logprobs, out.top_logprobs, strict=True):
            seq = c.seq
            first = seq.params.prompt_logprobs is not None and not seq.output_ids
            prompt_lps = self._prompt_lps.pop(seq.request_id, [None]) if first else None
            seq.output_ids.append(tok)
            if lp is not None:
                seq.output_logprobs.append(lp)
            done = self.grammars is not None and self.grammars.accept(seq.request_id, tok)
            reason = self._stop_reason(seq, tok) or ("stop" if done else None)
            if reason is not None:
                self._finish(seq, reason)
            deltas.append(StepDelta(seq.request_id, [tok], [lp] if lp is not None else None, reason,
                                    seq.num_cached_prefix, [top] if top is not None else None, prompt_lps))
        return deltas

    def _gather_prompt_logprobs(self, chunks: list[ScheduledChunk]) -> None:
        """prompt_logprobs: the raw log-probabilities of the prompt tokens this step's chunks predicted (a
        recomputed chunk, after preemption, replaces what it covers)."""
        for c in chunks:
            logits = self.runner.prompt_logits.get(c.seq.request_id)
            if logits is None:
                continue
            lps = torch.log_softmax(logits.float(), dim=-1)  # [m, V]
            targets = torch.tensor(c.seq.prompt_ids[c.start + 1:c.start + 1 + len(lps)], device=lps.device)
            token_lp = lps.gather(1, targets[:, None])  # [m, 1]
            ranks = (lps >= token_lp).sum(1).tolist()  # vLLM's rank: tokens at least as likely, itself included
            k = c.seq.params.prompt_logprobs
            top = lps.topk(k, dim=-1) if k else None
            gathered = self._prompt_lps.setdefault(c.seq.request_id, [None])
            del gathered[c.start + 1:]
            for j, (v, r) in enumerate(zip(token_lp[:, 0].tolist(), ranks, strict=True)):
                alts = list(zip(top.indices[j].tolist(), top.values[j].tolist(), strict=True)) if top else []
                gathered.append((v, r, alts))

    def _stop_reason(self, seq: Sequence, tok: int) -> str | None:
        p = seq.params
        if not p.ignore_eos and tok in self.cfg.eos_token_ids:
            return "eos"
        if tok in p.stop_token_ids:
            return "stop"
        if p.stop and self.decode is not None:
            longest = max(len(s) for s in p.stop)
            tail = self.decode(seq.output_ids[-(longest + 8):])
            if any(s in tail for s in p.stop):
                return "stop"
        if len(seq.output_ids) >= p.max_tokens:
            return "length"
        return None

    # ---- convenience -----------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[RequestOutput]:
        """Run a batch to completion. Every request is checked before any work starts."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        for i, (p, sp) in enumerate(zip(prompts, plist, strict=True)):
            try:
                self.check_request(p, sp)
            except RequestError as e:
                raise type(e)(f"request {i}: {e}") from None
        base = next(self._arrivals)
        outs = {}
        for i, (p, sp) in enumerate(zip(prompts, plist, strict=True)):
            rid = f"gen-{base}-{i}"
            self.add_request(rid, p, sp)
            outs[rid] = RequestOutput(rid, list(p), logprobs=[] if sp.logprobs else None)
        while any(not o.finished for o in outs.values()):
            for d in self.step():
                o = outs.get(d.request_id)
                if o is None:
                    continue
                o.add(d)
        return list(outs.values())

    def running_status(self) -> dict[str, int]:
        st = {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
              "free_blocks": self.blocks.num_free, "preemptions": self.scheduler.num_preemptions, **self.stats,
              "kv_pools": self.blocks.usage(), "prefix_cache": self.blocks.cache_stats()}
        if self.prefix is not None:
            st["kv_store"] = {f: getattr(self.prefix.stats, f) for f in self.prefix.stats.__slots__}
        return st
