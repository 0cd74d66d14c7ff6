"""Errors moeray raises to its users. Ray errors are translated into these at the actor facades."""

from __future__ import annotations


class MoerayError(Exception):
    """Base class of every error moeray raises on purpose."""


class ConfigError(MoerayError, ValueError):
    """A configuration value is invalid; the message names the field and what to change."""


class CheckpointError(MoerayError, ValueError):
    """A checkpoint is missing a tensor or holds one of the wrong shape."""


class RequestError(MoerayError, ValueError):
    """A request is invalid (bad sampling parameter, prompt too long, ...)."""


class CapacityError(MoerayError):
    """The system is over capacity (queue full, request can never fit the KV budget)."""


class ExpertUnavailableError(MoerayError):
    """No live replica holds an expert slot a step needs."""


class BackendUnavailableError(MoerayError):
    """A backend actor died or cannot be reached, and failover did not help."""


class RequestCancelledError(MoerayError):
    """The request was cancelled before it finished."""


class DuplicateRequestError(RequestError):
    """A request with this request_id is already in flight (on this gating actor, or on this front end)."""


class ActorError(BackendUnavailableError):
    """A call to an actor failed because of the actor, not the request. `actor` names it (role and id)."""

    def __init__(self, message: str, actor: str = "") -> None:
        super().__init__(message)
        self.actor = actor


class ActorGoneError(ActorError):
    """The actor died. Ray may restart it, but a restarted actor has lost its in-memory state (requests, cache)."""


class ActorTransientError(ActorError):
    """The actor could not be reached for a moment (a network blip, a busy node): retry the same actor."""


class ActorTimeoutError(ActorError, TimeoutError):
    """The actor did not answer within the caller's timeout (it may still be working)."""
