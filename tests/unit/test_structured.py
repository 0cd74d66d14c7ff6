"""Structured output: llguidance grammars masking random logits still produce text the grammar accepts."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moeray.common.errors import RequestError
from moeray.common.sampling import SamplingParams
from moeray.engine.sampler import sample
from moeray.engine.sequence import Sequence
from moeray.engine.structured import Grammars, check_grammar

VOCAB = 512  # the model's logits are wider than the tokenizer's vocabulary, as in real checkpoints
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(['{"name": "fox", "age": 12, "tags": ["a", "b"]} The quick brown fox. yes no'] * 50,
                            trainer)
    return tok


@pytest.fixture(scope="module")
def grammars(tokenizer) -> Grammars:
    return Grammars(tokenizer.to_str(), VOCAB, [tokenizer.token_to_id("<|eos|>")])


def run(grammars, tokenizer, spec, seed, max_tokens=80) -> tuple[str, bool]:
    """Sample with random logits under the grammar's mask; (text, stopped by the grammar)."""
    rid = f"r{seed}-{spec['kind']}"
    s = Sequence(rid, [1], SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens, structured=spec))
    grammars.add(rid, spec, [])
    g = torch.Generator().manual_seed(seed)
    eos = tokenizer.token_to_id("<|eos|>")
    stopped = False
    for _ in range(max_tokens):
        logits = torch.randn(1, VOCAB, generator=g) * 2
        tok = sample(logits, [s], grammars.masks([rid]), [eos]).tokens[0]
        assert tok < tokenizer.get_vocab_size()  # ids past the tokenizer's vocabulary are masked out
        s.output_ids.append(tok)
        if tok == eos or grammars.accept(rid, tok):
            stopped = True
            break
    grammars.forget(rid)
    return tokenizer.decode([t for t in s.output_ids if t != eos]), stopped


@pytest.mark.parametrize("seed", range(4))
def test_json_schema_output_validates_and_is_compact(grammars, tokenizer, seed):
    text, stopped = run(grammars, tokenizer, {"kind": "json", "value": json.dumps(SCHEMA)}, seed, 120)
    assert stopped, text
    jsonschema.validate(json.loads(text), SCHEMA)
    outside_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    assert not re.search(r"\s", outside_strings), text


def test_regex_and_choice(grammars, tokenizer):
    for seed in range(3):
        text, stopped = run(grammars, tokenizer, {"kind": "regex", "value": r"[0-9]{3}-(yes|no)"}, seed)
        assert stopped and re.fullmatch(r"[0-9]{3}-(yes|no)", text), text
        text, stopped = run(grammars, tokenizer, {"kind": "choice", "value": json.dumps(["fox", "quick dog"])}, seed)
        assert stopped and text in ("fox", "quick dog"), text


def test_gbnf_and_lark_grammars(grammars, tokenizer):
    gbnf = 'root ::= "a" ("b" | "c")+ "."'
    text, _ = run(grammars, tokenizer, {"kind": "grammar", "value": gbnf}, 0, 20)
    assert re.fullmatch(r"a[bc]+\.?", text), text
    lark = 'start: "yes" | "no"'
    text, stopped = run(grammars, tokenizer, {"kind": "grammar", "value": lark}, 1)
    assert stopped and text in ("yes", "no")


def test_resume_replays_the_tokens_it_has(grammars, tokenizer):
    spec = {"kind": "regex", "value": "abc"}
    grammars.add("resumed", spec, tokenizer.encode("ab").ids)
    allowed = grammars.masks(["resumed"])[0]
    assert allowed.nonzero().flatten().tolist() == [tokenizer.token_to_id("c")]
    grammars.forget("resumed")


@pytest.mark.parametrize("spec", [
    {"kind": "json", "value": "{not json"},
    {"kind": "regex", "value": "(unclosed"},
    {"kind": "choice", "value": "[]"},
    {"kind": "grammar", "value": "start: undefined_rule"},
])
def test_bad_grammars_are_request_errors_naming_structured(spec):
    with pytest.raises(RequestError, match="^structured"):
        check_grammar(spec)
