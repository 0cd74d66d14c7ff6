"""Tiny checkpoints in DeepSeek's published quantized layouts, made by quantizing tiny random transformers models,
plus the oracle: the same model with the dequantized weights, in fp32, as a plain checkpoint.

- V3 (HF names): every attention/MLP projection float8_e4m3fn (F8_E4M3) with a float32 `<name>_scale_inv`
  [ceil(O/bo), ceil(I/bi)] (partial edge blocks); embeddings, norms, the router, the bias and lm_head as they
  were; `quantization_config` {quant_method fp8, fmt e4m3, weight_block_size, activation_scheme dynamic}; an MTP
  layer `model.layers.<num_hidden_layers>.*` as the hub has.
- V4 (DeepSeek's hub names, or transformers' saved names): attention wq_a/wq_b/wkv/wo_a/wo_b, indexer wq_b and
  the shared expert in FP8 blocks with float8_e8m0fnu (F8_E8M0) scales `<module>.scale` (`scale_fmt: ue8m0`);
  routed experts MXFP4: int8 (I8) [O, I/2], two e2m1 codes per byte low nibble first, F8_E8M0 [O, I/32]
  (`expert_dtype: fp4`, top level as in V4 or inside quantization_config as in V4.1), or FP8 blocks
  (`expert_dtype: fp8`, V4-Base); compressor, indexer weights_proj, gate, hc_*, norms, sinks stay plain;
  `mtp.0.*` tensors as the hub has.
"""

from __future__ import annotations

import functools
import json
import re
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moeray.experts.quant_formats import dequant_fp8_blocks, dequant_mxfp4, quantize_fp8_blocks, quantize_mxfp4

V3_QUANTIZED = re.compile(r"\.(self_attn\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|q_proj)|"
                          r"mlp\.(gate_proj|up_proj|down_proj)|mlp\.shared_experts\.\w+|"
                          r"mlp\.experts\.\d+\.\w+)\.weight$")
V4_FP8 = re.compile(r"\.(attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|attn\.indexer\.wq_b|ffn\.shared_experts\.w[123])\.weight$")
V4_EXPERT = re.compile(r"\.ffn\.experts\.\d+\.w[123]\.weight$")


def _read(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _write(out: Path, tensors: dict[str, torch.Tensor], config: dict, src: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=1))
    for extra in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (src / extra).exists():
            (out / extra).write_text((src / extra).read_text())
    return out


def quantize_v3(src: Path, out: Path, block: tuple[int, int], oracle: Path | None = None,
                with_mtp: bool = True) -> Path:
    """Write `src` (a plain tiny DeepSeek-V3 folder) quantized as the hub publishes V3; `oracle` gets the
    dequantized fp32 weights under the original config."""
    tensors, config = _read(src), json.loads((src / "config.json").read_text())
    q, deq = {}, {}
    for name, t in tensors.items():
        if V3_QUANTIZED.search(name):
            w8, s = quantize_fp8_blocks(t, block)
            q[name], q[name + "_scale_inv"] = w8, s
            deq[name] = dequant_fp8_blocks(w8, s, block)
        else:
            q[name] = deq[name] = t.float() if t.is_floating_point() else t
    if with_mtp:  # the hub's MTP layer: one layer past num_hidden_layers (here a copy of the last layer)
        n = config["num_hidden_layers"]
        for name in list(q):
            if name.startswith(f"model.layers.{n - 1}."):
                q[name.replace(f"layers.{n - 1}.", f"layers.{n}.")] = q[name].clone()
    qconfig = dict(config, quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                                "weight_block_size": list(block)})
    if oracle is not None:
        _write(oracle, deq, config, src)
    return _write(out, q, qconfig, src)


def _to_hub_name(name: str) -> str:
    top = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
           "model.hc_head.hc_fn": "hc_head_fn", "model.hc_head.hc_base": "hc_head_base",
           "model.hc_head.hc_scale": "hc_head_scale"}
    if name in top:
        return top[name]
    if name.endswith(".weight_scale_inv"):
        name = name[:-len(".weight_scale_inv")] + ".scale"
    return name.removeprefix("model.")


def quantize_v4(src: Path, out: Path, block: tuple[int, int], names: str = "hub", expert_dtype: str = "fp4",
                expert_dtype_in_quant_config: bool = False, oracle: Path | None = None, with_mtp: bool = True) -> Path:
    """Write `src` (a plain tiny DeepSeek-V4 folder, transformers' saved names) quantized as DeepSeek publishes
    V4 (`names="hub"`) or with transformers' names (`names="transformers"`: same tensors, saved names,
    scales `<module>.weight_scale_inv`)."""
    tensors, config = _read(src), json.loads((src / "config.json").read_text())
    q, deq = {}, {}
    for name, t in tensors.items():
        if V4_EXPERT.search(name) and expert_dtype == "fp4":
            codes, s = quantize_mxfp4(t)
            q[name], q[name + "_scale_inv"] = codes, s
            deq[name] = dequant_mxfp4(codes, s)
        elif V4_FP8.search(name) or V4_EXPERT.search(name):
            w8, s = quantize_fp8_blocks(t, block, scale_fmt="ue8m0")
            q[name], q[name + "_scale_inv"] = w8, s
            deq[name] = dequant_fp8_blocks(w8, s, block)
        else:
            q[name] = deq[name] = t
    if with_mtp:  # the hub's MTP block (its own layer, embedding copy and head)
        q["mtp.0.attn_norm.weight"] = torch.ones(config["hidden_size"])
        q["mtp.0.ffn.gate.weight"] = torch.zeros(config["n_routed_experts"], config["hidden_size"])
    if names == "hub":
        q = {_to_hub_name(k): v for k, v in q.items()}
    quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "scale_fmt": "ue8m0",
             "weight_block_size": list(block)}
    qconfig = dict(config)
    if expert_dtype_in_quant_config:
        quant["expert_dtype"] = expert_dtype
    else:
        qconfig["expert_dtype"] = expert_dtype
    qconfig["quantization_config"] = quant
    if oracle is not None:
        _write(oracle, deq, config, src)
    return _write(out, q, qconfig, src)


@functools.cache
def v3_pair(block: tuple[int, int] = (32, 32)) -> tuple[Path, Path]:
    """(quantized V3 folder, its fp32 oracle) from tiny_models' deepseek_v3, once per process."""
    from support.tiny_models import build

    root = Path(tempfile.mkdtemp(prefix=f"moeray-v3fp8-{block[0]}x{block[1]}-"))
    return quantize_v3(build("deepseek_v3"), root / "fp8", block, oracle=root / "oracle"), root / "oracle"


@functools.cache
def v4_pair(names: str = "hub", expert_dtype: str = "fp4", block: tuple[int, int] = (32, 32),
            in_quant_config: bool = False) -> tuple[Path, Path]:
    """(quantized V4 folder, its fp32 oracle) from tiny_v4's config "a", once per process."""
    from support.tiny_v4 import build

    root = Path(tempfile.mkdtemp(prefix=f"moeray-v4{expert_dtype}-{names}-"))
    return quantize_v4(build("a"), root / "q", block, names, expert_dtype, in_quant_config,
                       oracle=root / "oracle"), root / "oracle"
