"""DeepSeek-V4 checkpoint names: DeepSeek's hub names -> the names transformers 5.24 saves (moeray's canonical).

The hub files (DeepSeek's `inference/convert.py` reads them unchanged) name tensors `embed.weight`,
`head.weight`, `norm.weight`, `hc_head_{fn,base,scale}`, `layers.L.*` and `mtp.N.*`, with FP8/FP4 scales as
`<module>.scale`. transformers' conversion mapping renames them on load; `save_pretrained` writes the layer
part back in DeepSeek's names but the top level as `model.embed_tokens.weight`, `model.norm.weight`,
`model.hc_head.hc_{fn,base,scale}`, `model.layers.L.*` (scales `<module>.weight_scale_inv`). The inside of a
layer (`attn.wq_a`, `attn.indexer.compressor.wkv`, `ffn.experts.E.w1`, `hc_attn_fn`, ...) is the same in both.
"""

from __future__ import annotations

_TOP = {
    "embed.weight": "model.embed_tokens.weight",
    "head.weight": "head.weight",
    "norm.weight": "model.norm.weight",
    "hc_head_fn": "model.hc_head.hc_fn",
    "hc_head_base": "model.hc_head.hc_base",
    "hc_head_scale": "model.hc_head.hc_scale",
}


def uses_hub_names(names: list[str]) -> bool:
    """Whether a V4 checkpoint uses DeepSeek's hub names (unprefixed `layers.` / `embed.weight`)."""
    return any(n.startswith("layers.") or n == "embed.weight" for n in names)


def canonical_v4_name(name: str, stored: set[str]) -> str:
    """A hub tensor name -> its canonical (transformers-saved) name. `<m>.scale` is the scale of `<m>.weight`
    when that weight is stored, and becomes `<m>.weight_scale_inv` (the name transformers and V3 use)."""
    if name.endswith(".scale") and name[:-len(".scale")] + ".weight" in stored:
        name = name[:-len(".scale")] + ".weight_scale_inv"
    if name in _TOP:
        return _TOP[name]
    if name.startswith("layers."):
        return "model." + name
    return name

