"""A tiny random RecycleGPT with a tiny byte-level BPE tokenizer, and a real recyclegpt-serve process (with its openai client)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from openai import OpenAI
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from recyclegpt.core import RecycleGPT

from ..conftest import tiny_config

TEXT = """
The little robot walked to the market and bought three red apples. It counted them twice,
because robots like to be sure. Then it walked home along the river, where the ducks were
singing a song about bread. Once upon a time there was a girl named Lily who loved to paint.
She painted the sky, the sea and her cat Tom, who never sat still. "Mom, look!" she said.
Her mother smiled and hung the painting on the wall. To be, or not to be, that is the question:
whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune. 1234567890
Ünïcödé text, naïve café, 東京 and emoji 🙂 keep the byte-level tokenizer honest.
"""
EOS = "<|endoftext|>"


def build_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([TEXT] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS)


def build_model_dir(path: Path, max_seq_len: int = 128, hidden_size: int = 32, num_layers: int = 2) -> Path:
    """Save a tiny random RecycleGPT with its tokenizer (no chat template) into ``path``."""
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = tiny_config(tokenizer, max_seq_len=max_seq_len, hidden_size=hidden_size, num_layers=num_layers)
    RecycleGPT(config).save_pretrained(str(path), tokenizer=tokenizer)
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """recyclegpt-serve in its own process group, stopped with SIGINT (then SIGKILL) at the end.

    ``with ServerProcess(args) as server:`` waits until it is ready and stops it when the block ends.
    """

    def __init__(self, args: list[str], env: dict[str, str] | None = None, api_key: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        exe = shutil.which("recyclegpt-serve", path=str(Path(sys.executable).parent)) or "recyclegpt-serve"
        self.process = subprocess.Popen(
            [exe, *args, "--host", "127.0.0.1", "--port", str(self.port)],
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def __enter__(self) -> ServerProcess:
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def openai_client(self, api_key: str | None = None, timeout: float = 60) -> OpenAI:
        """The official openai client for this server (with its API key unless another is given)."""
        return OpenAI(
            base_url=f"{self.url}/v1", api_key=api_key or self.api_key or "none", max_retries=0, timeout=timeout
        )

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.process.stdout.read()}")
            try:
                if httpx.get(f"{self.url}/health", headers=self.headers, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.process.stdout.read()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("serve") / "tiny-recyclegpt")


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> OpenAI:
    """The official openai client of the test module's ``server``."""
    return server.openai_client()
