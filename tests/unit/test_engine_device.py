"""The engine's device is one value threaded through (Engine(device=...)): dense weights, paged cache, runner,
attention metadata, sampling and the expert wire all follow it. These run with device="cpu", the same code a GPU
runs. A tensor created without an explicit device lands on torch's default device; setting that default to
`meta` while a step runs makes any such tensor fail (or corrupt the tokens), so equal outputs prove every tensor
of the step path is created on the engine's device or explicitly on the host."""

import collections
import traceback
from pathlib import Path

import pytest
import torch
from support.tiny_models import FAMILIES, build
from support.tiny_v4 import build as build_v4
from torch.overrides import TorchFunctionMode

import moeray.engine
from moeray.common import SamplingParams
from moeray.common.config import ServeConfig
from moeray.engine.engine import Engine, EngineConfig
from moeray.engine.paged_cache import SeqBlocks
from moeray.engine.transport import LocalTransport
from moeray.engine.wire import host_routing, pack_rows, scatter_rows
from moeray.models.dense import cast_dense
from moeray.models.reference import ReferenceModel
from moeray.router.dispatch import plan_dispatch
from moeray.router.gate import Gate
from moeray.router.table import RoutingTable


def engine_for(family: str, num_groups: int = 1, **kw) -> Engine:
    ref = ReferenceModel.from_pretrained(build(family), num_expert_groups=num_groups)
    table = RoutingTable.round_robin(list(ref.cfg.moe_layers), ref.cfg.num_experts, num_groups)
    return Engine(ref.dense, LocalTransport(dict(enumerate(ref.groups)), table),
                  EngineConfig(num_blocks=64, block_size=4, **kw), device="cpu")


def run(eng: Engine, default_device: str | None = None):
    prompts = [list(range(1, 12)), [7, 8, 9], [5]]
    params = [SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, prompt_logprobs=2),
              SamplingParams(max_tokens=5, temperature=0.8, top_p=0.9, top_k=5, seed=3, logprobs=True, top_logprobs=2,
                             repetition_penalty=1.1, presence_penalty=0.2, logit_bias={3: 1.0}, min_tokens=2),
              SamplingParams(max_tokens=5, temperature=0.7, min_p=0.05, seed=11, frequency_penalty=0.3)]
    if default_device is not None:
        torch.set_default_device(default_device)
    try:
        outs = eng.generate(prompts, params)
    finally:
        torch.set_default_device(None)
    return [(o.token_ids, o.logprobs, o.top_logprobs, o.prompt_logprobs) for o in outs]


@pytest.mark.parametrize("family", FAMILIES)
def test_no_step_tensor_lands_on_the_default_device(family):
    eng = engine_for(family)
    assert run(eng, "meta") == run(eng)


@pytest.mark.parametrize(("name", "block_size"), [("a", 16), ("b", 12)])
def test_no_v4_step_tensor_lands_on_the_default_device(name, block_size):
    ref = ReferenceModel.from_pretrained(build_v4(name), num_expert_groups=1)
    table = RoutingTable.round_robin(list(ref.cfg.moe_layers), ref.cfg.num_experts, 1)
    eng = Engine(ref.dense, LocalTransport({0: ref.groups[0]}, table),
                 EngineConfig(num_blocks=64, block_size=block_size), device="cpu")
    prompts, sp = [list(range(2, 60)), [7, 8, 9]], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    want = [o.token_ids for o in eng.generate(prompts, sp)]
    torch.set_default_device("meta")  # compressed rows, the indexer's top-k, sliding windows
    try:
        got = [o.token_ids for o in eng.generate(prompts, sp)]
    finally:
        torch.set_default_device(None)
    assert got == want


def test_micro_batches_and_a_dispatch_plan_stay_on_the_engine_device():
    eng = engine_for("qwen3_moe", num_groups=2, micro_batches=2)  # two groups: plan_dispatch + combine per layer
    assert run(eng, "meta") == run(eng)


def test_weights_cache_and_runner_are_on_the_engine_device():
    eng = engine_for("qwen3_moe", dtype=torch.bfloat16)
    assert eng.device == eng.cache.device == eng.runner.device == torch.device("cpu")
    assert {p.device for p in eng.dense.parameters()} == {torch.device("cpu")}
    assert {t.device for layer in eng.cache.storage for t in layer.values()} == {torch.device("cpu")}
    assert {t.dtype for layer in eng.cache.storage for t in layer.values()} == {torch.bfloat16}


def test_cast_dense_moves_and_casts_routers_stay_fp32():
    ref = ReferenceModel.from_pretrained(build("qwen3_moe"), num_expert_groups=1)
    dense = cast_dense(ref.dense, torch.bfloat16, device=torch.device("cpu"))
    routers = {id(p) for m in dense.modules() if isinstance(m, Gate) for p in m.parameters()}
    assert routers and all(p.dtype == torch.float32 for p in dense.parameters() if id(p) in routers)
    assert all(p.dtype == torch.bfloat16 for p in dense.parameters() if id(p) not in routers)
    assert {b.device for b in dense.buffers()} == {torch.device("cpu")}


def test_kv_store_payloads_are_host_tensors_on_any_default_device():
    eng = engine_for("deepseek_v3")
    eng.generate([list(range(1, 10))], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    tables = SeqBlocks([[0, 1] for _ in eng.cache.pools])  # the pages the request wrote (kept for prefix reuse)
    payload = eng.cache.read_block(tables, 0)
    torch.set_default_device("meta")
    try:
        again = eng.cache.read_block(tables, 0)
        eng.cache.write_block(tables, 1, payload)  # block 1 := block 0
        moved = eng.cache.read_block(tables, 1)
    finally:
        torch.set_default_device(None)
    for a, b, c in zip(payload, again, moved, strict=True):
        for name in a:
            assert a[name].device.type == "cpu" and torch.equal(a[name], b[name]) and torch.equal(a[name], c[name])


def test_host_routing_is_exact():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (33, 8), generator=g)
    weights = torch.rand(33, 8, generator=g)
    hi, hw = host_routing(ids, weights)
    assert hi.dtype == torch.long and torch.equal(hi, ids)
    assert hw.dtype == torch.float32 and torch.equal(hw, weights)


def test_object_store_rows_are_packed_to_the_host_in_one_buffer():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 8, generator=g)
    ids = torch.randint(0, 4, (10, 2), generator=g)
    w = torch.rand(10, 2, generator=g)
    batches = plan_dispatch(ids, w, [[0], [1], [0], [1]])
    rows = pack_rows(x, batches, torch.bfloat16, "cpu")
    assert len(rows) == len(batches) == 2
    assert all(r.device.type == "cpu" and r.dtype == torch.bfloat16 for r in rows)
    assert rows[0].untyped_storage().data_ptr() == rows[1].untyped_storage().data_ptr()  # one copy for all
    for b, r in zip(batches, rows, strict=True):
        assert torch.equal(r, x[b.token_ids].to(torch.bfloat16))
    out = scatter_rows(10, 8, batches, [r.float() for r in rows], torch.float32, x.device)
    assert out.shape == (10, 8) and out.device == x.device


def test_gating_device_is_accepted_without_fallback():
    assert ServeConfig(gating_device="gpu").gating_device == "gpu"
    assert ServeConfig(gating_device="npu", device="npu").gating_device == "npu"


class DeviceReads(TorchFunctionMode):
    """Counts the calls that read a tensor's values on the host (on a GPU: a device -> host copy and a sync), by
    the moeray source file (relative to the package root) whose code made them."""

    READS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__int__,
             torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.cpu}
    ROOT = Path(moeray.engine.__file__).resolve().parents[1]  # the folder holding engine/, models/, experts/

    def __init__(self) -> None:
        super().__init__()
        self.by_file: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            ours = [Path(f.filename).resolve() for f in traceback.extract_stack()[:-1]]
            ours = [p.relative_to(self.ROOT) for p in ours if p.is_relative_to(self.ROOT)
                    and p.relative_to(self.ROOT).parts[0] not in ("tests", ".venv")]
            if ours:
                self.by_file[ours[-1].as_posix()] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_step_reads_the_device_once_outside_the_expert_groups(family):
    """Attention, gate, cache and sampling of a prefill step and of a decode step of 4 sequences read device
    values on the host exactly once: the sampled ids (in-process expert groups do their own reads)."""
    eng = engine_for(family)
    for i in range(4):
        eng.add_request(f"r{i}", list(range(1, 5 + 3 * i)), SamplingParams(max_tokens=8, temperature=0.0,
                                                                           ignore_eos=True))
    for _ in range(3):  # prefill (one chunk each), first decode, second decode
        with DeviceReads() as reads:
            eng.step()
        engine_reads = {f: n for f, n in reads.by_file.items() if not f.startswith("experts/")}
        assert engine_reads == {"engine/sampler.py": 1}
