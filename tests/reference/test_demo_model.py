"""The bundled demo model (models/demo_model, trained by scripts/train_demo_model.py): it loads in moeray, its
logits match transformers, its validation perplexity through moeray equals the reference computation and is
far below the unigram perplexity, and a fixed prompt's greedy continuation passes teacher forcing."""

import json
import math
from pathlib import Path

import pytest
import torch
from support.teacher import hf_logits, teacher_forcing_failures

from moeray.common.config import default_model_path
from moeray.models.reference import ReferenceModel

MODEL = Path(default_model_path())


@pytest.fixture(scope="module")
def models():
    import transformers as tf

    hf = tf.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    return ReferenceModel.from_pretrained(MODEL), hf


@pytest.fixture(scope="module")
def sample():
    return json.loads((MODEL / "validation_sample.json").read_text())


def test_bundled_model_is_small_and_complete():
    names = {p.name for p in MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    assert sum(p.stat().st_size for p in MODEL.iterdir()) <= 25 * 2**20
    assert json.loads((MODEL / "config.json").read_text())["model_type"] == "deepseek_v3"


def test_logits_match_transformers(models, sample):
    ours, hf = models
    ids = torch.tensor([sample["token_ids"][:128], sample["token_ids"][128:256]])
    with torch.no_grad():
        ref = hf(ids).logits
    assert (ours.forward(ids) - ref).abs().max().item() <= 1e-4


def test_validation_perplexity_matches_reference_and_beats_unigram(models, sample):
    ours, hf = models
    ids = torch.tensor(sample["token_ids"][:1024]).view(4, 256)
    nll_ours = torch.nn.functional.cross_entropy(ours.forward(ids)[:, :-1].reshape(-1, ours.cfg.vocab_size),
                                                 ids[:, 1:].reshape(-1))
    with torch.no_grad():
        nll_ref = torch.nn.functional.cross_entropy(hf(ids).logits[:, :-1].reshape(-1, ours.cfg.vocab_size),
                                                    ids[:, 1:].reshape(-1))
    ppl_ours, ppl_ref = math.exp(nll_ours.item()), math.exp(nll_ref.item())
    assert abs(ppl_ours / ppl_ref - 1) <= 1e-3
    assert ppl_ours < 0.5 * sample["unigram_perplexity_full_validation"]


def test_greedy_continuation_passes_teacher_forcing(models):
    from tokenizers import Tokenizer

    ours, hf = models
    tok = Tokenizer.from_file(str(MODEL / "tokenizer.json"))
    prompt = tok.encode("ROMEO:\nBut soft, what light through yonder window breaks?\n").ids
    out = ours.generate(torch.tensor([prompt]), max_new_tokens=32)[0].tolist()
    assert teacher_forcing_failures(hf_logits(hf, out), len(prompt), out[len(prompt):]) == []
    assert tok.decode(out[len(prompt):]).strip()
