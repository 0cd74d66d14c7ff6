"""FrontendConfig: how the gRPC and HTTP front ends listen, admit requests and authenticate callers."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from moeray.common.api import DEFAULT_MAX_PROMPT_BYTES


class FrontendConfig(BaseModel):
    """How the gRPC front end listens and admits requests."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_in_flight: int = Field(256, gt=0, description="requests admitted at once; more get RESOURCE_EXHAUSTED")
    max_message_bytes: int = Field(4 << 20, gt=0, description="gRPC receive limit per message")
    max_prompt_bytes: int = Field(DEFAULT_MAX_PROMPT_BYTES, gt=0)
    auth_token: SecretStr | None = None
    auth_token_path: Path | None = None
    # the Admin service's scale / drain / rebalance need this token (the inference token cannot change the
    # deployment); Status and Metrics take either token
    admin_token: SecretStr | None = None
    admin_token_path: Path | None = None
    tls_cert_path: Path | None = None
    tls_key_path: Path | None = None
    grace_s: float = Field(5.0, ge=0, description="how long stop() lets in-flight requests finish")
    strict_api: bool = Field(False, description="HTTP: refuse unknown request fields instead of ignoring them")

    @model_validator(mode="after")
    def _check(self) -> FrontendConfig:
        if self.max_prompt_bytes >= self.max_message_bytes:
            raise ValueError("max_prompt_bytes must be smaller than max_message_bytes")
        if self.auth_token is not None and self.auth_token_path is not None:
            raise ValueError("give auth_token or auth_token_path, not both")
        if self.auth_token is not None and not self.auth_token.get_secret_value().strip():
            raise ValueError("auth_token is empty; omit it to turn auth off")
        if self.admin_token is not None and self.admin_token_path is not None:
            raise ValueError("give admin_token or admin_token_path, not both")
        if self.admin_token is not None and not self.admin_token.get_secret_value().strip():
            raise ValueError("admin_token is empty; omit it to leave admin operations closed behind auth")
        if (self.tls_cert_path is None) != (self.tls_key_path is None):
            raise ValueError("give both tls_cert_path and tls_key_path, or neither")
        return self

    def resolve_token(self) -> str | None:
        """The inference bearer token, read from auth_token_path when given; None when auth is off."""
        return _resolve(self.auth_token, self.auth_token_path, "auth_token_path")

    def resolve_admin_token(self) -> str | None:
        """The admin bearer token, read from admin_token_path when given; None when none is set."""
        return _resolve(self.admin_token, self.admin_token_path, "admin_token_path")

    @property
    def has_auth(self) -> bool:
        return any(v is not None for v in (self.auth_token, self.auth_token_path, self.admin_token,
                                           self.admin_token_path))


def _resolve(token: SecretStr | None, path: Path | None, field: str) -> str | None:
    if token is not None:
        return token.get_secret_value().strip()
    if path is None:
        return None
    text = path.expanduser().read_text().strip()
    if not text:
        raise ValueError(f"{field} {path} is empty; write a token into it")
    return text
