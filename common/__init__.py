"""Shared configuration models, errors and small types."""

from moeray.common.errors import MoerayError, RequestError
from moeray.common.sampling import RequestOutput, SamplingParams, StepDelta

__all__ = ["MoerayError", "RequestError", "RequestOutput", "SamplingParams", "StepDelta"]
