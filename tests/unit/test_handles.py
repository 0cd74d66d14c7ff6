"""actors/handles.py: the one classification of Ray call errors (no Ray session needed)."""

from __future__ import annotations

import asyncio
import concurrent.futures

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError

from moeray.actors.handles import classify, translate
from moeray.common.errors import (
    ActorGoneError,
    ActorTimeoutError,
    ActorTransientError,
    BackendUnavailableError,
    RequestError,
)


def test_unavailable_is_transient_not_death():
    # ActorUnavailableError subclasses RayActorError: a naive `except RayActorError` would call it death
    assert classify(ActorUnavailableError("network blip", b"1" * 16)) is ActorTransientError


@pytest.mark.parametrize("error", [ActorDiedError(), RayActorError()])
def test_died_is_gone(error):
    assert classify(error) is ActorGoneError


@pytest.mark.parametrize("error", [GetTimeoutError("slow"), concurrent.futures.TimeoutError(), asyncio.TimeoutError()])
def test_timeouts(error):
    assert classify(error) is ActorTimeoutError


def test_errors_raised_on_purpose_pass_through():
    e = RequestError("prompt: too long")
    assert classify(e) is None
    assert translate(e, "gating actor 0") is e


def test_translated_error_names_the_actor_and_is_unavailable():
    e = translate(ActorDiedError(), "expert actor 3")
    assert isinstance(e, ActorGoneError) and isinstance(e, BackendUnavailableError)
    assert e.actor == "expert actor 3" and str(e).startswith("expert actor 3 died")
    assert translate(e, "other") is e  # translating twice changes nothing
