"""Checkpoint loading: sharded index, only the requested experts, clear errors for missing/mis-shaped tensors."""

import json

import pytest
import torch
from safetensors.torch import save_file
from support.tiny_models import build

from moeray.common.errors import CheckpointError
from moeray.models.checkpoint import Checkpoint, load_expert_weights
from moeray.models.config import ModelConfig
from moeray.models.reference import ReferenceModel


def test_sharded_checkpoint_loads_same_model(tmp_path):
    src = build("qwen3_moe")
    ckpt = Checkpoint(src)
    names = sorted(ckpt.names())
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate([names[:half], names[half:]]):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: ckpt.get(n, dtype=torch.bfloat16 if "experts" in n else torch.float32) for n in part},
                  str(tmp_path / fname))
        weight_map.update({n: fname for n in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    a = ReferenceModel.from_pretrained(src)
    b = ReferenceModel.from_pretrained(tmp_path)
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    # experts stored in bf16 here: close, computed in fp32
    assert (a.forward(ids) - b.forward(ids)).abs().max().item() < 5e-2
    assert b.groups[0].slots(0)  # loaded


def test_only_requested_experts_are_loaded():
    cfg = ModelConfig.from_pretrained(build("mixtral"))
    w = load_expert_weights(cfg, Checkpoint(build("mixtral")), {1: [3, 5]})
    assert list(w) == [1] and sorted(w[1]) == [3, 5]


def test_missing_tensor_names_it_and_shape(tmp_path):
    src = build("mixtral")
    ckpt = Checkpoint(src)
    keep = {n: ckpt.get(n) for n in ckpt.names() if n != "model.norm.weight"}
    save_file(keep, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*\(64,\)"):
        ReferenceModel.from_pretrained(tmp_path)


def test_misshaped_tensor_is_named(tmp_path):
    src = build("mixtral")
    ckpt = Checkpoint(src)
    tensors = {n: ckpt.get(n) for n in ckpt.names()}
    tensors["model.layers.0.block_sparse_moe.experts.2.w2.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"experts\.2\.w2\.weight.*expected"):
        ReferenceModel.from_pretrained(tmp_path)


def test_no_checkpoint_files(tmp_path):
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Checkpoint(tmp_path)
