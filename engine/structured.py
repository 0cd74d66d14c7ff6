"""Structured output: a grammar per request, compiled by llguidance, its token mask applied in the sampler.

    grammars = Grammars(tokenizer_json, vocab_size=cfg.vocab_size, eos_token_ids=cfg.eos_token_ids)
    grammars.add("r1", {"kind": "json", "value": schema_json}, output_ids=[])
    allowed = grammars.masks(seqs)        # bool [S, V] or None when no sequence has a grammar
    grammars.accept("r1", token)          # True once the grammar is complete (the request then stops)

Kinds (vLLM's `structured_outputs`): json (a JSON schema; compact, no free whitespace), regex, choice (a JSON list
of strings), grammar (Lark, or GBNF when it has `::=`). llguidance was picked over xgrammar by measured CPU cost
per token (bench/structured.py). No Ray, no tokenizer library: llguidance reads tokenizer.json itself.
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch

from moeray.common.errors import RequestError

COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


def grammar_source(spec: dict[str, Any]) -> str:
    """{"kind", "value"} -> an llguidance grammar string. Raises RequestError naming `structured` when malformed."""
    import llguidance

    kind, value = spec.get("kind"), spec.get("value")
    try:
        if kind == "json":
            schema = json.loads(value)
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=COMPACT_JSON)
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(value)
        if kind == "choice":
            choices = json.loads(value)
            if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
                raise ValueError("choice must be a non-empty list of strings")
            return llguidance.LLMatcher.grammar_from_regex("|".join(f"({re.escape(c)})" for c in choices))
        if kind == "grammar":
            from llguidance.gbnf_to_lark import GbnfToLarkError, any_to_lark

            try:
                return llguidance.LLMatcher.grammar_from_lark(any_to_lark(value))
            except GbnfToLarkError as e:
                raise ValueError(str(e)) from None
    except (ValueError, TypeError, RecursionError) as e:
        raise RequestError(f"structured: {kind}: {e}") from None
    raise RequestError(f"structured: unknown kind {kind!r}")


def check_grammar(spec: dict[str, Any]) -> None:
    """Raise RequestError naming `structured` when the grammar does not compile (no tokenizer needed)."""
    import llguidance

    error = llguidance.LLMatcher.validate_grammar(grammar_source(spec))
    if error:
        raise RequestError(f"structured: the {spec.get('kind')} grammar is invalid: {error}")


class Grammars:
    """The grammar matchers of the requests in flight on one engine, keyed by request id."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: list[int] | tuple[int, ...]) -> None:
        import llguidance

        eos = list(eos_token_ids) or None
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos)
        self.vocab_size = vocab_size
        self.matchers: dict[str, Any] = {}
        self._bits = torch.arange(32, dtype=torch.int32)

    def add(self, request_id: str, spec: dict[str, Any], output_ids: list[int]) -> None:
        """Compile the request's grammar and replay the tokens it already has (a resumed request)."""
        import llguidance

        matcher = llguidance.LLMatcher(self.tokenizer, grammar_source(spec), log_level=0)
        if matcher.is_error():
            raise RequestError(f"structured: the {spec.get('kind')} grammar is invalid: {matcher.get_error()}")
        for tok in output_ids:
            matcher.consume_token(tok)
        self.matchers[request_id] = matcher

    def forget(self, request_id: str) -> None:
        self.matchers.pop(request_id, None)

    def masks(self, request_ids: list[str]) -> torch.Tensor | None:
        """bool [S, V]: True where the token is allowed; rows without a grammar allow everything."""
        rows = [(i, self.matchers[r]) for i, r in enumerate(request_ids) if r in self.matchers]
        if not rows:
            return None
        words = (self.vocab_size + 31) // 32
        bitmask = torch.full((len(request_ids), words), -1, dtype=torch.int32)
        for i, matcher in rows:
            bitmask[i] = torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.int32)[:words]
        bits = (bitmask[:, :, None] >> self._bits) & 1  # [S, words, 32]
        return bits.reshape(len(request_ids), words * 32)[:, :self.vocab_size].bool()

    def accept(self, request_id: str, token: int) -> bool:
        """Advance the request's grammar by its sampled token; True when the grammar is complete."""
        matcher = self.matchers.get(request_id)
        if matcher is None:
            return False
        matcher.consume_token(token)
        return matcher.is_stopped()
