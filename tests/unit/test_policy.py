"""Health and autoscaling policies driven by a fake clock."""

import pytest
from pydantic import ValidationError

from moeray.common.config import ServeConfig
from moeray.router.policy import (
    AutoscaleConfig,
    AutoscaleState,
    GroupStats,
    HealthTracker,
    HungWatch,
    StartWatch,
    decide_replicas,
)

CONFIG = AutoscaleConfig(min_replicas=1, max_replicas=4, target_utilization=0.5, upscale_delay_s=10,
                         downscale_delay_s=30, cooldown_s=20)
HOT, COLD, OK = GroupStats(busy_fraction=0.9), GroupStats(busy_fraction=0.1), GroupStats(busy_fraction=0.4)


def drive(stats, replicas, times, config=CONFIG):
    """Call decide_replicas at each time with the same stats, applying each decision; -> counts seen."""
    state, seen = AutoscaleState(), []
    for now in times:
        replicas = decide_replicas(config, {0: stats}, {0: replicas}, now, state)[0]
        seen.append(replicas)
    return seen


def test_scale_up_only_after_the_delay():
    assert drive(HOT, 1, [0, 5, 9.9]) == [1, 1, 1]
    assert drive(HOT, 1, [0, 5, 10]) == [1, 1, 2]


def test_scale_up_jumps_proportionally():
    assert drive(GroupStats(busy_fraction=1.0), 1, [0, 10])[-1] == 2
    assert drive(GroupStats(busy_fraction=1.0), 2, [0, 10])[-1] == 4


def test_cooldown_separates_changes():
    # up at 10; hot again from 15 but the next change waits for the cool-down (until 30)
    assert drive(HOT, 1, [0, 10, 15, 25, 29.9, 30]) == [1, 2, 2, 2, 2, 4]


def test_scale_down_one_at_a_time_after_the_delay():
    assert drive(COLD, 3, [0, 29, 30, 45, 50, 70, 80]) == [3, 3, 2, 2, 2, 2, 1]


def test_bounds_hold():
    assert drive(HOT, 4, [0, 10, 100]) == [4, 4, 4]
    assert drive(COLD, 1, [0, 100, 200]) == [1, 1, 1]
    assert drive(OK, 6, [0]) == [4]  # above max: moved inside at once


def test_a_break_in_the_load_restarts_the_timer():
    state = AutoscaleState()
    for now, stats in [(0, HOT), (5, OK), (12, HOT), (21.9, HOT)]:
        assert decide_replicas(CONFIG, {0: stats}, {0: 1}, now, state) == {0: 1}
    assert decide_replicas(CONFIG, {0: HOT}, {0: 1}, 22, state) == {0: 2}


def test_missing_stats_keep_the_count():
    assert decide_replicas(CONFIG, {}, {0: 2}, 100, AutoscaleState()) == {0: 2}


def test_config_rejects_inverted_bounds_and_unknown_fields():
    with pytest.raises(ValidationError, match=r"max_replicas \(1\) must be >= min_replicas \(2\)"):
        AutoscaleConfig(min_replicas=2, max_replicas=1)
    with pytest.raises(ValidationError, match="extra"):
        AutoscaleConfig(max_replica=3)
    with pytest.raises(ValidationError):
        AutoscaleConfig(target_utilization=0.0)


def test_unhealthy_after_threshold_failures():
    tracker = HealthTracker(failure_threshold=3, recovery_successes=2)
    assert [tracker.record_failure(7, now=t) for t in (0, 1, 2)] == [False, False, True]
    assert tracker.unhealthy() == {7}
    assert tracker.unhealthy_for_s(7, now=12) == 10


def test_a_success_resets_the_failure_count():
    tracker = HealthTracker(failure_threshold=2)
    tracker.record_failure(1, now=0)
    tracker.record_success(1, now=1)
    tracker.record_failure(1, now=2)
    assert tracker.is_healthy(1)


def test_died_is_unhealthy_at_once_and_recovers_after_successes():
    tracker = HealthTracker(failure_threshold=3, recovery_successes=2)
    assert tracker.record_died(4, now=0)
    assert not tracker.is_healthy(4)
    assert not tracker.record_success(4, now=1)
    assert tracker.record_success(4, now=2)
    assert tracker.is_healthy(4) and tracker.unhealthy_for_s(4, now=3) == 0.0


def test_unknown_actors_are_healthy():
    assert HealthTracker().is_healthy(99)


def test_an_actor_failing_every_ping_for_after_s_is_restarted_once_per_hang():
    w = HungWatch(after_s=10.0)
    assert [w.record("a", False, t) for t in (0.0, 5.0, 9.9)] == [False, False, False]
    assert w.record("a", False, 10.0)  # failing since 0.0 for 10 s: kill it so Ray restarts it
    assert not any(w.record("a", False, t) for t in (12.0, 30.0, 300.0))  # restarting (loading): never again
    assert not w.record("a", True, 301.0)  # back
    assert not w.record("a", False, 302.0)
    assert w.record("a", False, 312.0)  # a new hang, a new window


def test_a_success_resets_the_window_and_actors_are_independent():
    w = HungWatch(after_s=10.0)
    w.record("a", False, 0.0)
    w.record("b", False, 0.0)
    w.record("a", True, 8.0)
    assert not w.record("a", False, 12.0)  # failing only since 12.0
    assert w.record("b", False, 12.0)
    w.forget("b")
    assert not w.record("b", False, 13.0)  # forgotten (replaced): a fresh window


def test_a_constructor_running_after_s_is_killed_once_per_process():
    w = StartWatch(after_s=60.0)
    assert not w.record("a", 0, 0.0)  # waiting for a node: not in its constructor, never a hang
    assert not w.record("a", 0, 1000.0)
    assert [w.record("a", 41, t) for t in (1000.0, 1030.0, 1059.9)] == [False, False, False]
    assert w.record("a", 41, 1060.0)  # process 41 in its constructor for 60 s: kill it
    assert not w.record("a", 41, 1200.0)  # once per process
    assert not w.record("a", 42, 1201.0)  # Ray's new process: its own clock
    assert w.record("a", 42, 1261.0)
    assert not w.record("b", 42, 1261.0)  # keys are independent
    assert not w.record("a", 0, 1262.0)  # started (alive): forgotten
    assert not w.record("a", 42, 1263.0)


def test_hung_restart_s_shorter_than_one_ping_timeout_is_refused_naming_both_fields():
    with pytest.raises(ValidationError, match="hung_restart_s.*health_timeout_s"):
        ServeConfig(hung_restart_s=1.0, health_timeout_s=2.0)
    with pytest.raises(ValueError, match="hung_restart_s must be > 0"):
        HungWatch(0.0)
