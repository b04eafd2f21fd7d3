"""What the inference worker does with one choice: tokens in, decoding, text (and logprobs) out as it comes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from recyclegpt.core import GenerationOutput, RecycleGPT
from recyclegpt.core.logprobs import FullModelScorer, TokenLogprob
from recyclegpt.serve.prompts import encode_chat, encode_completion
from recyclegpt.serve.protocol import ApiError
from recyclegpt.serve.streaming import LockstepGenerate
from recyclegpt.serve.text import TextStream


@dataclass
class Job:
    """One choice of a validated request with the server's defaults filled in, as the worker receives it."""

    prompt: str | list[int] | None = None  # completions
    messages: list[dict[str, str]] | None = None  # chat
    max_tokens: int | None = None  # None: up to max_tokens_limit or the end of the context; 0: echo only
    max_tokens_param: str = "max_tokens"
    max_tokens_limit: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    decoding: str = "standard"
    draft_length: int = 4
    draft_policy: str = "adaptive"  # speculative: adaptive (step-cost-aware), fixed draft_length or tree
    stream: bool = False  # send the text as it is generated
    echo: bool = False  # the answer starts with the prompt (and its logprobs)
    logprobs: int | None = None  # None: no logprobs; k: each token's logprob and the k most likely there
    index: int = 0  # the choice's index in the answer
    arrival: float = 0.0  # time.time() when the API process received the request

    @property
    def prompt_param(self) -> str:
        return "messages" if self.messages is not None else "prompt"


class Engine:
    """Runs jobs on a loaded model with core's decoders."""

    def __init__(self, model: RecycleGPT, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.context = model.config.max_seq_len
        self.vocab_size = model.config.vocab_size
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_id = eos if eos is not None else model.config.eos_token_id
        self._token_texts: dict[int, str] = {}

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

    def token_text(self, token: int) -> str:
        """A token's own text (as logprobs show it)."""
        if (text := self._token_texts.get(token)) is None:
            text = self._token_texts[token] = self.tokenizer.decode([token], clean_up_tokenization_spaces=False)
        return text

    def start(self, job: Job) -> Completion:
        """Admit a job: tokenise and check it (ApiError(400) when it does not fit)."""
        return Completion(self, job)

    def sampling(self, job: Job) -> dict[str, Any]:
        """A job's sampling arguments, as core's decoders (``generate`` and ``BatchedDecoder``) take them."""
        return {"temperature": job.temperature, "top_p": job.top_p, "seed": job.seed, "eos_token_id": self.eos_id}

    def generation(self, completion: Completion) -> LockstepGenerate:
        """Core's ``generate`` for a completion in its job's decoding mode, run by ``advance()``."""
        job = completion.job
        return LockstepGenerate(
            self.model,
            completion.prompt,
            completion.max_new,
            decoding=job.decoding,
            draft_length=job.draft_length,
            draft_policy=job.draft_policy,
            **self.sampling(job),
        )

    def run(self, job: Job) -> Iterator[dict[str, Any]]:
        """One job alone through ``model.generate``: its messages (see Completion), the final one last."""
        completion = self.start(job)
        if opening := completion.opening():
            yield opening
        if completion.max_new > 0:
            generation = self.generation(completion)
            try:
                while not completion.finished and (new_ids := generation.advance()):
                    if (delta := completion.push(new_ids)) is not None:
                        yield delta
            except ValueError as err:  # core names the bad argument
                raise ApiError(400, str(err)) from None
            finally:
                completion.settle(generation)
        yield completion.close()


class Completion:
    """One choice as it is generated: token ids in, the messages for the API process out.

    Messages: ``{"text", "logprobs"?}`` deltas (streamed jobs only; the first carries the echoed
    prompt), then a final ``{"text", "finish_reason", "usage", "stats", "logprobs"?}`` (for a plain
    job the whole text). Logprob entries are ``[token text, logprob or None, [[text, logprob], ...],
    text offset]``: the full model's own log-probabilities, whatever the decoder (core's logprobs).
    """

    def __init__(self, engine: Engine, job: Job) -> None:
        self.engine = engine
        self.job = job
        self.prompt = engine.encode(job)
        self.max_new = engine.budget(job, len(self.prompt))
        self.text = TextStream(engine.tokenizer, engine.eos_id, job.stop)
        self.generated: list[int] = []  # every new token id, EOS included
        self.scorer: FullModelScorer | None = None
        if job.logprobs is not None:
            self.scorer = FullModelScorer(engine.model, len(self.prompt) + self.max_new, job.logprobs)
        self.reported = 0  # generated tokens whose logprobs were sent
        self.offset = 0  # characters of the choice's text so far (for text_offset)
        self.pending = ""  # text not yet sent
        self.pending_logprobs: list[list[Any]] = []
        self.admitted = time.time()
        self.first_token_at: float | None = None
        self.cost: dict[str, Any] = {"full_model_calls": 0, "module_calls": 0, "acceptance_rate": 0.0}
        self.drafts = {"drafts": 0, "draft_tokens": 0, "accepted_tokens": 0, "accepted_per_position": []}

    @property
    def finished(self) -> bool:
        return self.text.finished or len(self.generated) >= self.max_new

    def opening(self) -> dict[str, Any] | None:
        """The echoed prompt and its logprobs (also scores the prompt as the context of later logprobs)."""
        echo = ""
        if self.job.echo:
            prompt = self.job.prompt
            echo = prompt if isinstance(prompt, str) else self.engine.tokenizer.decode(prompt)
        if self.scorer is not None:
            scores = self.scorer.score(self.prompt)
            if self.job.echo:
                self.pending_logprobs += self._entries(scores)
        self.pending += echo
        self.offset = len(echo)
        if self.job.stream and (self.pending or self.pending_logprobs):
            return self._delta()
        return None

    def push(self, new_ids: list[int]) -> dict[str, Any] | None:
        """Take new token ids; for a streamed job return the delta they release, if any."""
        if self.first_token_at is None:
            self.first_token_at = time.time()
        room = self.max_new - len(self.generated)
        if self.text.finished or room <= 0:
            return None
        new_ids = new_ids[:room]
        self.generated += new_ids
        self.pending += self.text.push(new_ids)
        if self.scorer is not None:
            self._score(self.text.released_tokens())
        if self.job.stream and (self.pending or self.pending_logprobs) and not self.finished:
            return self._delta()
        return None

    def settle(self, generation: LockstepGenerate) -> None:
        """Stop the completion's ``generate`` (if it still runs) and keep what it spent."""
        generation.stop()
        if generation.output is not None:
            self.cost = decoder_cost(generation.output)
            self.drafts = draft_counts(generation.output, generation.group_sizes)

    def close(self) -> dict[str, Any]:
        """The final message (the budget ran out, EOS or a stop sequence ended the text)."""
        self.pending += self.text.close()
        self._score(self.text.completion_tokens)
        done = time.time()
        completion_tokens = self.text.completion_tokens
        message = {
            "text": self.pending,
            "finish_reason": self.text.finish_reason,
            "usage": {
                "prompt_tokens": len(self.prompt),
                "completion_tokens": completion_tokens,
                "total_tokens": len(self.prompt) + completion_tokens,
            },
            "stats": {
                "decoding": self.job.decoding,
                "generate_seconds": round(done - self.admitted, 6),
                **self.cost,
            },
            "timing": {  # wall-clock times, for the API process's metrics
                "admitted": self.admitted,
                "first_token": self.first_token_at or done,
                "done": done,
            },
            "drafts": self.drafts,
        }
        if self.scorer is not None:
            message["logprobs"] = self.pending_logprobs
        return message

    def _delta(self) -> dict[str, Any]:
        message: dict[str, Any] = {"text": self.pending}
        if self.scorer is not None:
            message["logprobs"] = self.pending_logprobs
        self.pending, self.pending_logprobs = "", []
        return message

    def _score(self, upto: int) -> None:
        """Score generated tokens up to ``upto`` (those whose text is out) and queue their entries."""
        if self.scorer is None or upto <= self.reported:
            return
        scores = self.scorer.score(self.generated[self.reported : upto])
        self.reported = upto
        self.pending_logprobs += self._entries(scores)

    def _entries(self, scores: list[TokenLogprob]) -> list[list[Any]]:
        entries = []
        for score in scores:
            text = self.engine.token_text(score.token)
            top = [[self.engine.token_text(token), value] for token, value in score.top]
            entries.append([text, score.logprob, top if score.logprob is not None else None, self.offset])
            self.offset += len(text)
        return entries


def decoder_cost(out: GenerationOutput | None) -> dict[str, Any]:
    """What generate spent (also when a stop sequence ended it early)."""
    if out is None:
        raise RuntimeError("generate ended without an output")
    return {
        "full_model_calls": out.full_model_calls,
        "module_calls": out.module_calls,
        "acceptance_rate": round(out.acceptance_rate, 4),
    }


def draft_counts(out: GenerationOutput | None, group_sizes: list[int]) -> dict[str, Any]:
    """Speculative counters as vLLM names them, from generate's totals and its token groups: after the
    first token (the prompt's), each group is one verified draft, ``size - 1`` of its tokens accepted."""
    if out is None or not out.drafted_tokens:
        return {"drafts": 0, "draft_tokens": 0, "accepted_tokens": 0, "accepted_per_position": []}
    per_position: list[int] = []
    for size in group_sizes[1:]:
        for position in range(size - 1):
            if position == len(per_position):
                per_position.append(0)
            per_position[position] += 1
    return {
        "drafts": len(group_sizes) - 1,
        "draft_tokens": out.drafted_tokens,
        "accepted_tokens": out.accepted_tokens,
        "accepted_per_position": per_position,
    }
