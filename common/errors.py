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
