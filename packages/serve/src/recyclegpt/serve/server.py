"""Assembling the LitServer: the LitAPI, its OpenAI spec and the optional API-key middleware."""

from __future__ import annotations

from dataclasses import dataclass

import litserve as ls

from recyclegpt.serve.api import RecycleGPTAPI
from recyclegpt.serve.auth import BearerAuthMiddleware
from recyclegpt.serve.spec import OpenAIEndpoints

MAX_REQUEST_BYTES = 4 * 1024 * 1024


@dataclass
class ServeOptions:
    model: str
    model_name: str
    host: str = "127.0.0.1"
    port: int = 8000
    decoding: str = "alternating"
    draft_length: int = 4
    dtype: str = "auto"
    quantize: str = "none"
    max_tokens_limit: int = 512
    max_queue: int = 128
    timeout: float = 120.0
    api_key: str | None = None
    cpu_threads: int | None = None
    max_batch_size: int = 8
    max_kv_mb: float = 4096.0
    log_level: str = "warning"


def build_server(options: ServeOptions) -> ls.LitServer:
    spec = OpenAIEndpoints(
        options.model_name,
        decoding=options.decoding,
        draft_length=options.draft_length,
        max_tokens_limit=options.max_tokens_limit,
        max_queue=options.max_queue,
        model_path=options.model,
    )
    api = RecycleGPTAPI(
        options.model,
        options.dtype,
        spec,
        options.cpu_threads,
        options.max_batch_size,
        options.max_kv_mb,
        options.quantize,
        options.draft_length,
    )
    middlewares = [(BearerAuthMiddleware, {"api_key": options.api_key})] if options.api_key else []
    return ls.LitServer(
        api,
        accelerator="auto",  # the GPU when there is one, else the CPU
        devices=1,
        timeout=options.timeout,  # seconds a request may wait in the queue before a 504
        max_payload_size=MAX_REQUEST_BYTES,
        middlewares=middlewares,
        disable_openapi_url=True,
    )


def serve(options: ServeOptions) -> None:
    """Block serving until interrupted."""
    server = build_server(options)
    server.run(
        host=options.host,
        port=options.port,
        num_api_servers=1,  # one API process, so max_queue bounds every request in flight
        log_level=options.log_level,
        generate_client_file=False,
    )
