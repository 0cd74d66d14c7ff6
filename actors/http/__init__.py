"""The OpenAI-compatible HTTP API (FastAPI over Starlette, served by uvicorn), over the gRPC front end's `Frontend`.

    GET  /v1/models, /v1/models/{model}   the served models
    POST /v1/completions                  text or token-id prompt; `stream: true` answers Server-Sent Events
    POST /v1/chat/completions             messages rendered with the model's chat template
    POST /tokenize, /detokenize           as vLLM has them
    GET  /health, /version, /metrics      open (no token); /metrics is Prometheus text
    GET  /openapi.json                    the API's schema

Modules: schemas (request bodies, OpenAI-shaped errors), chat (chat templates), stream (a call's runs, client
disconnects, SSE framing), answers (response and chunk shapes), metrics (Prometheus), app (routes), server.
"""

from moeray.actors.http.app import OpenAIApp
from moeray.actors.http.chat import ChatTemplate
from moeray.actors.http.schemas import APIError, api_error_for
from moeray.actors.http.server import HTTPServer, serve_http

__all__ = ["APIError", "ChatTemplate", "HTTPServer", "OpenAIApp", "api_error_for", "serve_http"]
