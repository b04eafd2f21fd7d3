"""What the inference worker does with one request: tokens in, model.generate, text out as it comes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from recyclegpt.core import GenerationOutput, RecycleGPT
from recyclegpt.core.precision import dtype_name
from recyclegpt.core.precision import resolve_dtype as core_resolve_dtype
from recyclegpt.serve.prompts import encode_chat, encode_completion
from recyclegpt.serve.protocol import ApiError
from recyclegpt.serve.streaming import TokenStream
from recyclegpt.serve.text import TextStream


@dataclass
class Job:
    """A validated request with the server's defaults filled in, as the worker receives it."""

    prompt: str | list[int] | None = None  # completions
    messages: list[dict[str, str]] | None = None  # chat
    max_tokens: int | None = None  # None: up to max_tokens_limit or the end of the context
    max_tokens_param: str = "max_tokens"
    max_tokens_limit: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    decoding: str = "standard"
    draft_length: int = 4
    stream: bool = False  # send the text as it is generated

    @property
    def prompt_param(self) -> str:
        return "messages" if self.messages is not None else "prompt"


def resolve_dtype(choice: str, device: str) -> str:
    """``auto``: bf16 on a CUDA GPU with bf16 support or a CPU with native bf16, else fp32 (core decides)."""
    return dtype_name(core_resolve_dtype(choice, device))


class Engine:
    """Runs jobs on a loaded model with core's decoders."""

    def __init__(self, model: RecycleGPT, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.context = model.config.max_seq_len
        self.vocab_size = model.config.vocab_size
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_id = eos if eos is not None else model.config.eos_token_id

    def encode(self, job: Job) -> list[int]:
        """Prompt token ids; ApiError(400) when the prompt is empty, off-vocabulary or too long."""
        if job.messages is not None:
            ids = encode_chat(self.tokenizer, job.messages)
        else:
            ids = encode_completion(self.tokenizer, job.prompt)
        param = job.prompt_param
        if not ids:
            raise ApiError(400, f"invalid '{param}': it encodes to no tokens", param)
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise ApiError(400, f"invalid '{param}': token ids must lie in [0, {self.vocab_size})", param)
        if len(ids) >= self.context:
            raise ApiError(
                400,
                f"invalid '{param}': the prompt is {len(ids)} tokens, the model's context is {self.context} "
                "and leaves no room for a completion",
                param,
            )
        return ids

    def budget(self, job: Job, prompt_length: int) -> int:
        """New tokens to generate: the request's max_tokens, or as many as the limits allow."""
        room = self.context - prompt_length
        if job.max_tokens is None:
            return min(job.max_tokens_limit, room)
        if job.max_tokens > room:
            raise ApiError(
                400,
                f"invalid '{job.max_tokens_param}': the prompt ({prompt_length} tokens) plus {job.max_tokens} new "
                f"tokens exceeds the model's context of {self.context} tokens",
                job.max_tokens_param,
            )
        return job.max_tokens

    def run(self, job: Job) -> Iterator[dict[str, Any]]:
        """Yield {"text"} deltas while generating (streamed jobs only), then {"text", "finish_reason", "usage", "stats"}.

        Generation stops as soon as the text is complete (EOS, a stop sequence or max tokens).
        """
        prompt = self.encode(job)
        max_new = self.budget(job, len(prompt))
        text = TextStream(self.tokenizer, self.eos_id, job.stop)
        pending = ""  # text not yet sent
        start = time.perf_counter()
        with TokenStream(
            self.model,
            prompt,
            max_new,
            decoding=job.decoding,
            draft_length=job.draft_length,
            temperature=job.temperature,
            top_p=job.top_p,
            eos_token_id=self.eos_id,
            seed=job.seed,
        ) as tokens:
            try:
                for new_ids in tokens:
                    pending += text.push(new_ids)
                    if text.finished:
                        break
                    if job.stream and pending:
                        yield {"text": pending}
                        pending = ""
            except ValueError as err:  # core names the bad argument
                raise ApiError(400, str(err)) from None
        seconds = time.perf_counter() - start
        pending += text.close()
        yield {
            "text": pending,
            "finish_reason": text.finish_reason,
            "usage": {
                "prompt_tokens": len(prompt),
                "completion_tokens": text.completion_tokens,
                "total_tokens": len(prompt) + text.completion_tokens,
            },
            "stats": {"decoding": job.decoding, "generate_seconds": round(seconds, 6), **decoder_cost(tokens.output)},
        }


def decoder_cost(out: GenerationOutput | None) -> dict[str, Any]:
    """What generate spent (also when a stop sequence ended it early)."""
    if out is None:
        raise RuntimeError("generate ended without an output")
    return {
        "full_model_calls": out.full_model_calls,
        "module_calls": out.module_calls,
        "acceptance_rate": round(out.acceptance_rate, 4),
    }
