"""The model runner's micro-batch ping-pong (a micro-batch's next layer starts as soon as its experts answered)
and partial failure (rows whose experts could not be computed fail only their request)."""

import torch
from support.teacher import assert_teacher_forced
from support.tiny_models import build, load_hf

from moeray.common import SamplingParams
from moeray.engine.engine import Engine, EngineConfig
from moeray.engine.runner import AUTO_MIN_SEQS, ModelRunner
from moeray.engine.transport import ExpertRowsFailed, LocalTransport
from moeray.models.reference import ReferenceModel
from moeray.router.table import RoutingTable

FAMILY = "qwen3_moe"  # every layer MoE


class RecordingTransport(LocalTransport):
    overlaps = True  # pretend the experts are remote so micro_batches=0 may split

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.events: list[tuple[str, int]] = []

    def submit(self, layer, x, ids, weights):
        self.events.append(("submit", layer))
        return layer, super().submit(layer, x, ids, weights)

    def wait(self, handle):
        layer, out = handle
        self.events.append(("wait", layer))
        return out


class FailingTransport(LocalTransport):
    """The `fail_at`-th expert call loses its first row (as if no replica of its experts were left)."""

    def __init__(self, *a, fail_at: int, **kw) -> None:
        super().__init__(*a, **kw)
        self.fail_at, self.num_calls = fail_at, 0

    def wait(self, handle):
        self.num_calls += 1
        if self.num_calls == self.fail_at:
            out = handle.clone()
            out[0] = 0.0
            raise ExpertRowsFailed("layer 0: experts [3] have no live replica", out, torch.tensor([0]))
        return handle


def engine_with(transport_cls, micro_batches, **kw):
    ref = ReferenceModel.from_pretrained(build(FAMILY), num_expert_groups=2)
    table = RoutingTable.round_robin(list(ref.cfg.moe_layers), ref.cfg.num_experts, 2)
    tr = transport_cls(dict(enumerate(ref.groups)), table, **kw)
    return Engine(ref.dense, tr, EngineConfig(num_blocks=128, micro_batches=micro_batches)), tr


def workload(n, seed=0, max_tokens=6):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 128, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    return prompts, [SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)] * n


def test_two_micro_batches_run_as_a_ping_pong():
    eng, tr = engine_with(RecordingTransport, 2)
    prompts, params = workload(4)
    eng.add_request("a", prompts[0], params[0])
    eng.add_request("b", prompts[1], params[1])
    eng.step()
    layers = list(eng.cfg.moe_layers)
    want = [("submit", layers[0]), ("submit", layers[0])]
    for prev, nxt in zip(layers, layers[1:], strict=False):
        want += [("wait", prev), ("submit", nxt), ("wait", prev), ("submit", nxt)]
    want += [("wait", layers[-1]), ("wait", layers[-1])]
    assert tr.events == want  # A's layer l+1 is submitted before B's layer l is waited for


def test_auto_micro_batches_split_only_batches_of_enough_sequences():
    eng, tr = engine_with(RecordingTransport, 0)
    runner: ModelRunner = eng.runner
    prompts, params = workload(AUTO_MIN_SEQS)
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        eng.add_request(f"r{i}", p, sp)
    chunks = eng.scheduler.schedule()
    assert runner.num_micro_batches(chunks) == 2
    assert runner.num_micro_batches(chunks[:AUTO_MIN_SEQS - 1]) == 1
    local = LocalTransport(tr.groups, tr.table)
    assert ModelRunner(eng.dense, eng.cache, local, 0).num_micro_batches(chunks) == 1  # nothing to overlap


def test_rows_that_could_not_be_computed_fail_only_their_request():
    eng, tr = engine_with(FailingTransport, 1, fail_at=7)  # the first decode step's first call
    prompts, params = workload(5)
    outs = eng.generate(prompts, params)
    failed = [o for o in outs if o.finish_reason.startswith("error")]
    assert len(failed) == 1 and "error: unavailable: layer 0" in failed[0].finish_reason
    ok = [(p, sp, o) for p, sp, o in zip(prompts, params, outs, strict=True) if o not in failed]
    assert len(ok) == 4
    assert_teacher_forced(load_hf(FAMILY), *map(list, zip(*ok, strict=True)))
    assert eng.num_free_blocks == 128
