"""CPU cost per token of a grammar's token mask: llguidance (what moeray uses) vs xgrammar, same run.

    python -m moeray.bench.structured [--vocab 32000] [--repeats 5] [--out bench/results/structured.json]

For each library and tokenizer (the demo model's, and a byte-level BPE of --vocab tokens trained on Python's
standard library source, about the size of real vocabularies), a JSON schema is compiled once (timed), then a fixed
valid document (its tokens) is replayed: per token, compute the next-token bitmask and accept the token. Reported:
compile time and median microseconds per token over --repeats replays, with the CPU flags. xgrammar is optional
(not a dependency: it pulls triton); it is measured when importable, e.g. PYTHONPATH=/tmp/xg after
`pip install --target /tmp/xg --no-deps xgrammar apache-tvm-ffi`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import sysconfig
import time
from pathlib import Path

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "email": {"type": "string"},
    "tags": {"type": "array", "items": {"type": "string"}},
    "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                                 "zip": {"type": "string"}},
                "required": ["street", "city", "zip"]}},
    "required": ["name", "age", "email", "tags", "address"]}
DOCUMENT = {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org",
            "tags": ["mathematician", "writer", "analyst", "engine"],
            "address": {"street": "12 St James's Square", "city": "London", "zip": "SW1Y 4JH"}}
DEMO_TOKENIZER = Path(__file__).resolve().parents[1] / "models" / "demo_model" / "tokenizer.json"


def big_tokenizer(vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|eos|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))[:1500]
    tok.train_from_iterator((p.read_bytes().decode("utf-8", "replace") for p in files), trainer)
    return tok


def measure_llguidance(tok, ids: list[int], repeats: int) -> dict:
    import llguidance

    t0 = time.perf_counter()
    lltok = llguidance.LLTokenizer(tok.to_str(), n_vocab=tok.get_vocab_size(), eos_token=tok.token_to_id("<|eos|>"))
    tokenizer_s = time.perf_counter() - t0
    options = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
    t0 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults=options)
    matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
    compile_s = time.perf_counter() - t0
    per_token = []
    for _ in range(repeats):
        matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
        t0 = time.perf_counter()
        for t in ids:
            matcher.compute_bitmask()
            assert matcher.consume_token(t), matcher.get_error()
        per_token.append((time.perf_counter() - t0) / len(ids))
    return {"tokenizer_s": tokenizer_s, "compile_s": compile_s, "us_per_token": 1e6 * statistics.median(per_token)}


def measure_xgrammar(tok, ids: list[int], repeats: int) -> dict:
    import transformers
    import xgrammar as xgr

    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>")
    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=tok.get_vocab_size())
    compiler = xgr.GrammarCompiler(info)
    tokenizer_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))
    compile_s = time.perf_counter() - t0
    bitmask = xgr.allocate_token_bitmask(1, tok.get_vocab_size())
    per_token = []
    for _ in range(repeats):
        matcher = xgr.GrammarMatcher(compiled)
        t0 = time.perf_counter()
        for t in ids:
            matcher.fill_next_token_bitmask(bitmask)
            assert matcher.accept_token(t)
        per_token.append((time.perf_counter() - t0) / len(ids))
    return {"tokenizer_s": tokenizer_s, "compile_s": compile_s, "us_per_token": 1e6 * statistics.median(per_token)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("bench/results/structured.json"))
    args = ap.parse_args(argv)
    from tokenizers import Tokenizer

    from moeray.bench.common import host_info

    text = json.dumps(DOCUMENT, separators=(",", ":"))
    tokenizers = {"demo": Tokenizer.from_file(str(DEMO_TOKENIZER)), f"bpe{args.vocab}": big_tokenizer(args.vocab)}
    results = {"host": host_info(), "document_chars": len(text), "runs": []}
    for tname, tok in tokenizers.items():
        ids = tok.encode(text).ids
        for lib, fn in (("llguidance", measure_llguidance), ("xgrammar", measure_xgrammar)):
            try:
                r = fn(tok, ids, args.repeats)
            except ImportError as e:
                r = {"skipped": f"{lib} not importable: {e}"}
            results["runs"].append({"tokenizer": tname, "vocab": tok.get_vocab_size(), "tokens": len(ids),
                                    "library": lib, **r})
            print(json.dumps(results["runs"][-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
