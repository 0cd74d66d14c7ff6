"""Controller under faults and load: autoscaled replicas of a hot group (added, later removed), an expert actor
Ray cannot restart is replaced, a hung (stopped) expert or gating actor is restarted with no request lost, a lost
KV shard's blocks are re-replicated. Eventual outcomes, not timings."""

import os
import signal
import threading
from pathlib import Path

import pytest
import ray
from support.streaming import stream_with_fault
from support.teacher import hf_logits, teacher_forcing_failures
from support.tiny_models import build, build_skewed, load_hf
from support.waiting import wait_for

from moeray.actors.deploy import deploy
from moeray.actors.handles import constructor_pid
from moeray.actors.kvshard import RayKVClient
from moeray.common import SamplingParams
from moeray.common.config import AutoscaleConfig, KVStoreConfig, ServeConfig
from moeray.kvstore.ring import HashRing

pytestmark = pytest.mark.slow
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


def replicas(dep, group):
    return len(dep.status()["groups"][str(group)])


def test_hot_group_gets_a_replica_then_loses_it(ray_session):
    auto = AutoscaleConfig(min_replicas=1, max_replicas=2, target_utilization=0.02, downscale_factor=0.5,
                           upscale_delay_s=0.5, downscale_delay_s=2.0, cooldown_s=1.0)
    dep = deploy(ServeConfig(dtype="float32", model=str(build_skewed()), num_expert_groups=4, placement="blocks",
                             kv_cache_blocks=128, health_period_s=0.5, autoscale=auto))
    try:
        stop = threading.Event()

        def load():
            while not stop.is_set():
                dep.generate([list(range(1, 90))] * 4, SamplingParams(max_tokens=32, temperature=0.0,
                                                                      ignore_eos=True))

        t = threading.Thread(target=load, daemon=True)
        t.start()
        wait_for(lambda: replicas(dep, 0) == 2)  # experts 0 and 1 live on group 0: it is the hot one
        assert replicas(dep, 3) == 1
        assert set(dep.status()["groups"]["0"]) <= set(dep.expert_actors)  # the added replica's handle too
        stop.set()
        t.join()
        wait_for(lambda: replicas(dep, 0) == 1)
        wait_for(lambda: "replica_removed" in [e["event"] for e in dep.status()["events"]])
        assert "replica_added" in [e["event"] for e in dep.status()["events"]]
    finally:
        dep.shutdown()


@pytest.fixture(scope="module")
def dep(ray_session):
    d = deploy(ServeConfig(dtype="float32", model=str(build("mixtral")), num_expert_groups=2, kv_cache_blocks=128,
                           health_period_s=0.5, hung_restart_s=4.0, start_timeout_s=12.0,
                           kv_store=KVStoreConfig(enabled=True, num_shards=3, replication=2)))
    yield d
    d.shutdown()


def test_expert_actor_that_cannot_restart_is_replaced(dep):
    hf = load_hf("mixtral")
    prompts = [list(range(5, 60)), list(range(7, 40))]
    victim = dep.expert_actors[1]
    ray.kill(victim, no_restart=True)
    outs = dep.generate(prompts, GREEDY)  # waits on the replacement the controller starts
    for p, o in zip(prompts, outs, strict=True):
        assert teacher_forcing_failures(hf_logits(hf, p + o.token_ids), len(p), o.token_ids) == []
    events = [e["event"] for e in dep.status()["events"]]
    assert "replace" in events
    new = dep.expert_actors[1]  # the replacement, not the handle of the killed actor
    assert new != victim and pid_of(new) > 0


def pid_of(actor):
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)


@pytest.mark.parametrize("role", ["expert", "gating"])
def test_hung_actor_is_restarted_and_no_request_is_lost(dep, role):
    """No replica to route to: without the restart every request would wait for the stopped process forever."""
    hf = load_hf("mixtral")
    prompts = [list(range(5, 60)), list(range(7, 40)), list(range(3, 30))]
    pid = pid_of(dep.expert_actors[0] if role == "expert" else dep.gating[0])
    try:  # SIGSTOP: alive for Ray, answering nothing
        s = stream_with_fault(dep, prompts, GREEDY, f"hung-{pid}", 4, lambda: os.kill(pid, signal.SIGSTOP))
    finally:
        try:
            os.kill(pid, signal.SIGCONT)  # if the test failed before the controller killed it
        except ProcessLookupError:
            pass
    toks = s.tokens
    assert {d.finish_reason for d in s.last.values()} == {"length"}, s.last
    for p, t in zip(prompts, toks, strict=True):
        assert len(t) == GREEDY.max_tokens
        assert teacher_forcing_failures(hf_logits(hf, p + t), len(p), t) == []
    hung = [e for e in dep.status()["events"] if e["event"] == "hung_restart"]
    assert hung and hung[-1].get("actor" if role == "expert" else "gating") == 0
    assert pid_of(dep.expert_actors[0] if role == "expert" else dep.gating[0]) != pid  # a new process


def in_openat(pid: int) -> bool:
    """Some thread of `pid` sits in openat(2) (x86-64 syscall 257): blocked opening the FIFO."""
    try:
        return any(Path(f"/proc/{pid}/task/{t}/syscall").read_text().split()[0] == "257"
                   for t in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return False


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux /proc")
def test_actor_stuck_in_its_constructor_is_started_again(dep):
    """Ray's restart of expert actor 0 (actor 1's handle went stale with its replacement above) blocks for good
    reading its weights (the file is a FIFO nobody writes, as on a hung mount): Ray reports it restarting forever.
    The controller kills that process after start_timeout_s; the next one reads the real file (put back once the
    first was stuck) and serves."""
    hf = load_hf("mixtral")
    old = pid_of(dep.expert_actors[0])
    weights = sorted(Path(dep.config.model).glob("*.safetensors"))
    aside = [w.with_name(w.name + ".aside") for w in weights]
    for w, a in zip(weights, aside, strict=True):
        w.rename(a)
        os.mkfifo(w)
    try:
        ray.kill(dep.expert_actors[0], no_restart=False)
        def stuck():  # Ray's new process (the table may name the old one for a moment), blocked on the FIFO
            p = constructor_pid(dep.expert_actors[0])
            return p if p not in (0, old) and in_openat(p) else 0

        pid = wait_for(stuck, what="the restart's constructor blocked opening the FIFO")
    finally:
        for w, a in zip(weights, aside, strict=True):
            os.remove(w)
            a.rename(w)
    wait_for(lambda: any(e["event"] == "start_hung" and e.get("actor") == 0 and e["pid"] == pid
                         for e in dep.status()["events"]), timeout_s=60, what="start_hung")
    prompts = [list(range(5, 60))]
    outs = dep.generate(prompts, GREEDY)
    assert teacher_forcing_failures(hf_logits(hf, prompts[0] + outs[0].token_ids), len(prompts[0]),
                                    outs[0].token_ids) == []
    assert pid_of(dep.expert_actors[0]) != pid


def test_lost_kv_shard_gets_its_blocks_back(dep):
    dep.generate([list(range(1, 120)), list(range(2, 100))], GREEDY)
    ray.get(dep.gating[0].flush_kv.remote())
    acked = ray.get(dep.gating[0].acked_keys.remote())
    ring = HashRing(list(dep.kv_shards), replication=2)
    victim = "kv-0"
    should_hold = {k for k in acked if victim in ring.owners(k)}
    assert should_hold
    ray.kill(dep.kv_shards[victim], no_restart=False)  # Ray restarts it empty; the controller repairs it
    # no acknowledged block is lost: every one reads back through the engine's client from a surviving replica
    client = RayKVClient(dep.kv_shards, replication=2)
    assert [k for k in acked if client.get_many([k]) == [None]] == []

    def repaired():
        try:
            handle = ray.get_actor  # noqa: F841 - the deployment's handle stays valid across restarts
            keys = set(ray.get(dep.kv_shards[victim].keys.remote(), timeout=5))
        except Exception:  # noqa: BLE001 - restarting
            return False
        return should_hold <= keys

    wait_for(repaired)
    assert [k for k in acked if client.get_many([k]) == [None]] == []  # and after the repair
