"""Backend: one gating actor (or an in-process engine) as the front ends see it -- the contract between the
front ends (gRPC, HTTP) and what serves a model (actors/backend.py's DeploymentBackend, or a test's engine)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

from moeray.common.sampling import SamplingParams, StepDelta


@runtime_checkable
class Backend(Protocol):
    """One gating actor (or an in-process engine) as the front end sees it.

    The front end may hold several backends; it sends each request to the least-loaded one serving its
    model. All methods are called from the front end's event loop.
    """

    model_name: str
    max_context: int  # prompt + generated tokens at most
    vocab_size: int

    def tokenize(self, text: str) -> list[int]:
        """Prompt text -> ids. May be called from a worker thread (long prompts are tokenized off the loop)."""
        ...

    def detokenize(self, ids: list[int]) -> str:
        """Text of generated ids, special tokens (EOS) left out; U+FFFD for an incomplete UTF-8 tail. A backend
        that can keep them takes a keyword `skip_special_tokens: bool = True` (the request's field)."""
        ...

    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[StepDelta]:
        """Stream the request's new tokens; the last delta has finish_reason set. request_id is unique among
        requests in flight. Raises RequestError for a request the engine rejects, CapacityError when full,
        BackendUnavailableError when the engine cannot be reached (the front end then tries another)."""
        ...

    async def cancel(self, request_id: str) -> None:
        """Stop the request and free its blocks; a no-op for an unknown or finished request."""
        ...

    async def status(self) -> dict[str, Any]:
        """{"table_version": int, "actors": [{"name", "kind", "node", "device", "health", "load", ...}], ...}"""
        ...

    async def admin(self, op: str, **kwargs: Any) -> dict[str, Any]:
        """op in "scale" (group, replicas), "drain" (actor), "rebalance", "metrics".

        Returns {"message": str, "table_version": int, ...}; "metrics" returns {"metrics": [{"name", "value",
        "labels"}]}. Raises RequestError for a bad argument, NotImplementedError for an op not built yet.
        """
        ...

    def load(self) -> int:
        """Requests in flight on this backend."""
        ...
