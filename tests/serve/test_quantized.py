"""The server on the int4 fast path: it loads ``--quantize int4`` and serves what the quantized model decodes."""

from __future__ import annotations

import pytest
import torch

from recyclegpt.core import RecycleGPT
from recyclegpt.core.quantize import Int4Linear

from .conftest import ServerProcess


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    args = ["--model", str(tiny_model_dir), "--dtype", "fp32", "--cpu-threads", "1", "--quantize", "int4"]
    with ServerProcess([*args, "--decoding", "standard"]) as process:
        yield process


def test_int4_server_returns_the_quantized_models_greedy_tokens(client, tiny_model_dir):
    model = RecycleGPT.from_pretrained(str(tiny_model_dir), dtype=torch.float32, quantize="int4")
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, Int4Linear)
    prompt = "Once upon a time"
    ids = torch.tensor([model.tokenizer(prompt)["input_ids"]])
    expected = model.generate(ids, 12).new_tokens[0].tolist()
    answer = client.completions.create(model="tiny-recyclegpt", prompt=prompt, max_tokens=12, temperature=0)
    assert answer.usage.completion_tokens == len(expected)
    assert answer.choices[0].text == model.tokenizer.decode(expected)
