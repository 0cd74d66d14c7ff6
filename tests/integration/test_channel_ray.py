"""tensor_transport: socket (the CPU default) on Ray: expert calls travel over the actors' channels, not Ray tasks;
layer answers are bit-equal to the object store's; fp32 stays exact; a restarted expert actor is reconnected through
the probe that finds it back, and no request is lost."""

import pytest
import ray
import torch
from support.teacher import assert_teacher_forced
from support.tiny_models import build, load_hf

from moeray.actors.channel import ChannelTransport
from moeray.actors.deploy import deploy
from moeray.actors.transport import RayTransport
from moeray.common import SamplingParams
from moeray.common.config import ServeConfig

FAMILY = "qwen3_moe"


def workload(n=5, seed=11, max_tokens=14):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 128, (int(torch.randint(4, 40, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    return prompts, [SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)] * n


@pytest.fixture(scope="module")
def dep(ray_session):
    d = deploy(ServeConfig(model=str(build(FAMILY)), dtype="float32", num_expert_groups=2, kv_cache_blocks=128,
                           controller=False, expert_num_cpus=0.25, expert_call_timeout_s=60.0,
                           namespace="moeray-channel"))
    yield d
    d.shutdown()


def test_auto_on_cpu_is_the_socket_and_calls_skip_ray_tasks(dep):
    g0 = dep.status()["gating"][0]
    assert g0["tensor_transport"] == "socket"
    before = ray.get([a.stats.remote() for a in dep.expert_actors.values()])
    prompts, params = workload()
    outs = dep.generate(prompts, params)
    assert_teacher_forced(load_hf(FAMILY), prompts, params, outs)
    after = ray.get([a.stats.remote() for a in dep.expert_actors.values()])
    g1 = dep.status()["gating"][0]
    # the step time's parts: dispatch and expert wait lie inside the steps' wall; so does the run-queue wait
    busy = g1["busy_s"] - g0["busy_s"]
    parts = sum(g1["transport_stats"][k] - g0["transport_stats"][k] for k in ("dispatch_s", "wait_s"))
    assert 0 < parts <= busy, (parts, busy)
    assert 0 <= g1["cpu_wait_s"] - g0["cpu_wait_s"] <= busy
    for a, b in zip(before, after, strict=True):
        calls, chan = b["calls"] - a["calls"], b["channel_calls"] - a["channel_calls"]
        assert calls > 0 and chan == calls, (calls, chan)  # every expert call came over the channel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_answers_bit_equal_to_the_object_store(dep, dtype):
    cfg, table = dep.model_cfg, dep.table
    layer = list(cfg.moe_layers)[0]
    g = torch.Generator().manual_seed(0)
    trs = [ChannelTransport(dict(dep.expert_actors), table, wire_dtype=dtype),
           RayTransport(dict(dep.expert_actors), table, wire_dtype=dtype)]
    for t in (1, 16, 64):
        x = torch.randn(t, cfg.hidden_size, generator=g)
        ids = torch.rand(t, cfg.num_experts, generator=g).topk(cfg.num_experts_per_tok).indices
        w = torch.softmax(torch.rand(ids.shape, generator=g), dim=-1)
        sock, store = (tr.wait(tr.submit(layer, x, ids, w)) for tr in trs)
        assert sock.dtype == torch.float32  # combined in the engine's dtype
        assert torch.equal(sock, store), (t, float((sock - store).abs().max()))
        assert float(sock.abs().sum()) > 0
    trs[0].close()


def test_restarted_expert_is_reconnected_and_no_request_is_lost(dep):
    st0 = dep.status()["gating"][0]["transport_stats"]
    victim = dep.expert_actors[0]
    old_pid = ray.get(victim.stats.remote())["pid"]
    ray.kill(victim, no_restart=False)  # Ray restarts it: a new process, a new channel address
    prompts, params = workload(n=4, seed=12, max_tokens=10)
    outs = dep.generate(prompts, params)
    assert_teacher_forced(load_hf(FAMILY), prompts, params, outs)
    st1 = dep.status()["gating"][0]["transport_stats"]
    assert ray.get(victim.stats.remote())["pid"] != old_pid
    assert st1["connects"] > st0["connects"]  # the gating actor connected to the new process
    assert st1["failed_rows"] == st0["failed_rows"]


def test_unreachable_channel_falls_back_to_the_object_store(dep):
    """An actor whose channel cannot be connected to (here: a poisoned address; in a cluster, a firewalled port) is
    called through Ray's object store: same answers, counted, and back on its channel once a probe says it moved."""
    cfg, table = dep.model_cfg, dep.table
    layer = list(cfg.moe_layers)[0]
    g = torch.Generator().manual_seed(4)
    sock = ChannelTransport(dict(dep.expert_actors), table)
    store = RayTransport(dict(dep.expert_actors), table)
    bogus = {"uds": "/nonexistent/moeray.sock", "tcp": ["127.0.0.1", 1], "token": "00" * 32, "node_id": "elsewhere"}
    for a in dep.expert_actors:
        sock.backend.addresses[a] = bogus
    x = torch.randn(16, cfg.hidden_size, generator=g)
    ids = torch.rand(16, cfg.num_experts, generator=g).topk(cfg.num_experts_per_tok).indices
    w = torch.softmax(torch.rand(ids.shape, generator=g), dim=-1)
    got = sock.wait(sock.submit(layer, x, ids, w))
    assert torch.equal(got, store.wait(store.submit(layer, x, ids, w)))
    assert sock.stats["fallbacks"] == len(dep.expert_actors) and sock.stats["failed_rows"] == 0
    assert sock.backend.clients == {}  # nothing connected
    for a in dep.expert_actors:  # a probe's answer (the actor's real address) ends the fallback
        sock.backend._learn(a, ray.get(dep.expert_actors[a].channel_address.remote()))
    assert torch.equal(sock.wait(sock.submit(layer, x, ids, w)), got)
    assert sock.stats["connects"] == len(dep.expert_actors)
    sock.close()
