"""The fused CPU step kernels: same layer as eager (within rounding), rows independent of their
neighbours (exactly), and the decoders' relations kept on top of them."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from torch import nn

from recyclegpt.core import RecycleGPT, cpu_kernels, quant_kernels, step_kernels
from recyclegpt.core.fastpath import prepare_for_decoding, use_step_kernels
from recyclegpt.core.model import DecoderLayer, RMSNorm
from recyclegpt.core.quantize import fp16_kernel_available
from recyclegpt.core.step_kernels import KernelDecoderLayer, KernelRMSNorm

from .conftest import tiny_config


@pytest.fixture(scope="module", autouse=True)
def kernels_built() -> None:
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler: the step kernels cannot be built here (decoding runs eager layers)")
    assert step_kernels.load() is not None, "a C++ compiler is present but the step kernels did not build (see the log)"


def kernel_model(dtype: torch.dtype, **overrides) -> RecycleGPT:
    torch.manual_seed(0)
    model = RecycleGPT(tiny_config(**overrides)).eval()
    return prepare_for_decoding(model).to(dtype)


def step(model: RecycleGPT, prompt: torch.Tensor, new: torch.Tensor, kernels: bool, **cache_args):
    """Prefill ``prompt``, then one step over ``new``: the step's hidden states and the cache."""
    use_step_kernels(model, kernels)
    cache = model.new_cache("base", prompt.shape[0], 64)
    with torch.inference_mode():
        model.base_hidden(prompt, cache=cache)
        return model.base_hidden(new, cache=cache), cache


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("new_tokens", [1, 3])
def test_kernel_step_computes_the_eager_layer(dtype: torch.dtype, tolerance: float, new_tokens: int) -> None:
    model = kernel_model(dtype)
    assert isinstance(model.model.layers[0], KernelDecoderLayer)
    prompt, new = torch.randint(0, 97, (2, 9)), torch.randint(0, 97, (2, new_tokens))
    eager, eager_cache = step(model, prompt, new, kernels=False)
    fused, fused_cache = step(model, prompt, new, kernels=True)
    assert isinstance(model.recycle.layers[0], KernelDecoderLayer)
    assert isinstance(model.model.norm, KernelRMSNorm) and isinstance(model.recycle.norm, KernelRMSNorm)
    torch.testing.assert_close(fused, eager, atol=tolerance, rtol=tolerance)
    end = 9 + new_tokens
    for fused_part, eager_part in ((fused_cache.keys, eager_cache.keys), (fused_cache.values, eager_cache.values)):
        torch.testing.assert_close(fused_part[:, :, :, :end], eager_part[:, :, :, :end], atol=tolerance, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_kernel_computes_a_row_as_it_would_alone(dtype: torch.dtype) -> None:
    kernels = step_kernels.load()
    heads, kv_heads, head_dim, start, rows = 4, 2, 8, 5, 4
    x, delta, weight = (
        torch.randn(1, rows, 32, dtype=dtype),
        torch.randn(1, rows, 32, dtype=dtype),
        torch.rand(32).to(dtype),
    )
    qkv = torch.randn(1, rows, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    cos, sin = torch.rand(1, 1, rows, head_dim).to(dtype), torch.rand(1, 1, rows, head_dim).to(dtype)
    keys, values = (
        torch.randn(1, kv_heads, 16, head_dim, dtype=dtype),
        torch.randn(1, kv_heads, 16, head_dim, dtype=dtype),
    )
    one_keys, one_values = keys.clone(), values.clone()
    together = kernels.rope_attend(qkv, cos, sin, keys, values, start, step_kernels.NO_MASK, heads, kv_heads)
    for i in range(rows):
        row = slice(i, i + 1)
        assert torch.equal(
            kernels.rms_norm(x[:, row].contiguous(), weight, 1e-5), kernels.rms_norm(x, weight, 1e-5)[:, row]
        )
        summed, normed = kernels.add_rms_norm(x[:, row].contiguous(), delta[:, row].contiguous(), weight, 1e-5)
        assert torch.equal(summed, (x + delta)[:, row])  # the residual add rounds as torch's add rounds
        assert torch.equal(normed, kernels.add_rms_norm(x, delta, weight, 1e-5)[1][:, row])
        assert torch.equal(kernels.silu_mul(qkv[:, row].contiguous()), kernels.silu_mul(qkv)[:, row])
        alone = kernels.rope_attend(
            qkv[:, row].contiguous(),
            cos[:, :, row].contiguous(),
            sin[:, :, row].contiguous(),
            one_keys,
            one_values,
            start + i,
            step_kernels.NO_MASK,
            heads,
            kv_heads,
        )
        assert torch.equal(alone, together[:, row])
    assert torch.equal(one_keys, keys) and torch.equal(one_values, values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim, width", [(64, 1536), (12, 44)])  # SmolLM2's; odd sizes: the one-lane tails
def test_the_avx2_code_gives_the_one_lane_codes_bits(dtype: torch.dtype, head_dim: int, width: int) -> None:
    kernels = step_kernels.load()
    if not kernels.set_step_kernels_avx2(True):
        pytest.skip("this CPU has no AVX2: only the one-lane code runs")
    torch.manual_seed(0)
    heads, kv_heads, rows, start = 6, 2, 5, 37
    x, delta, weight = (
        torch.randn(2, rows, width, dtype=dtype),
        torch.randn(2, rows, width, dtype=dtype),
        torch.rand(width),
    )
    gate_up = torch.randn(2, rows, 2 * width, dtype=dtype) * 8  # SiLU far into both tails
    gate_up[0, 0, :3] = torch.tensor([-100.0, 100.0, 0.0])
    qkv = torch.randn(2, rows, (heads + 2 * kv_heads) * head_dim, dtype=dtype) * 3
    cos, sin = torch.rand(1, 1, rows, head_dim).to(dtype), torch.rand(1, 1, rows, head_dim).to(dtype)
    cache = torch.randn(2, 2, kv_heads, 64, head_dim, dtype=dtype)
    mask = torch.zeros(1, 1, rows, start + rows, dtype=dtype)
    mask[..., 3:9] = float("-inf")

    def outputs() -> list[torch.Tensor]:
        keys, values = cache[0].clone(), cache[1].clone()
        results = [
            kernels.rms_norm(x, weight.to(dtype), 1e-5),
            *kernels.add_rms_norm(x, delta, weight.to(dtype), 1e-5),
            kernels.silu_mul(gate_up),
        ]
        for attention_mask in (step_kernels.NO_MASK, mask):
            results.append(kernels.rope_attend(qkv, cos, sin, keys, values, start, attention_mask, heads, kv_heads))
        return [*results, keys, values]

    try:
        vectorised = outputs()
        assert not kernels.set_step_kernels_avx2(False)
        one_lane = outputs()
    finally:
        kernels.set_step_kernels_avx2(True)
    for got, expected in zip(vectorised, one_lane, strict=True):
        assert torch.equal(got, expected)
    assert torch.isfinite(vectorised[3]).all()  # SiLU of +-100


@pytest.mark.skipif(not fp16_kernel_available(), reason="needs FBGEMM's fp16 GEMM (x86 CPU builds of torch)")
def test_a_k_token_step_gives_exactly_what_k_one_token_steps_give() -> None:
    # fp16 weights: the linears' rows are independent too (fp32 and bf16 GEMMs block rows together).
    torch.manual_seed(0)
    model = prepare_for_decoding(RecycleGPT(tiny_config()).eval(), quantize="fp16")
    prompt, new = torch.randint(0, 97, (1, 6)), torch.randint(0, 97, (1, 4))
    together, cache = step(model, prompt, new, kernels=True)
    alone = model.new_cache("base", 1, 64)
    with torch.inference_mode():
        model.base_hidden(prompt, cache=alone)
        one_by_one = torch.cat([model.base_hidden(new[:, i : i + 1], cache=alone) for i in range(4)], dim=1)
    assert torch.equal(together, one_by_one)
    assert torch.equal(cache.keys[:, :, :, :10], alone.keys[:, :, :, :10])


def test_left_padded_rows_decode_as_they_would_alone() -> None:
    model = kernel_model(torch.float32)
    short, long = torch.randint(0, 97, (1, 3)), torch.randint(0, 97, (1, 7))
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], dim=1), long])
    mask = torch.ones_like(batch)
    mask[0, :4] = 0
    together = model.generate(batch, 12, attention_mask=mask).sequences
    assert torch.equal(together[0, 4:], model.generate(short, 12).sequences[0])
    assert torch.equal(together[1], model.generate(long, 12).sequences[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_speculative_equals_standard_on_the_kernels(dtype: torch.dtype, prompts) -> None:
    model = kernel_model(dtype)
    for prompt in prompts:
        standard = model.generate(prompt, 24).sequences
        for draft_length in (1, 3, 5):
            out = model.generate(prompt, 24, decoding="speculative", draft_length=draft_length, draft_policy="fixed")
            assert torch.equal(out.sequences, standard)


def test_prompts_and_training_run_the_eager_layer(monkeypatch) -> None:
    model = kernel_model(torch.float32)
    calls = []
    real = step_kernels.load()

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(real, name)

    monkeypatch.setattr(step_kernels, "load", lambda: Spy())
    cache = model.new_cache("base", 1, 64)
    with torch.inference_mode():
        model.base_hidden(torch.randint(0, 97, (1, step_kernels.PROMPT_STEP_TOKENS + 1)), cache=cache)
        assert calls == []  # a long prompt is compute, not overhead
        model.base_hidden(torch.randint(0, 97, (1, 1)), cache=cache)
        assert "decode_stack_step" in calls  # fp32 over the fp32 matmul: the whole step in one call
    calls.clear()
    model.base_hidden(torch.randint(0, 97, (1, 1)), cache=model.new_cache("base", 1, 8))  # grad enabled
    assert calls == []


def test_kernels_turn_off_over_the_same_weights() -> None:
    model = kernel_model(torch.float32)
    ids = torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        fused = model(ids)
    attention = model.model.layers[0].self_attn
    prepare_for_decoding(model, step_kernels=False)
    assert type(model.model.layers[0]) is DecoderLayer and type(model.recycle.layers[0]) is DecoderLayer
    assert type(model.model.norm) is RMSNorm and type(model.recycle.norm) is RMSNorm
    assert model.model.layers[0].self_attn is attention
    assert type(model.lm_head) is nn.Linear and type(attention.qkv_proj) is nn.Linear  # torch's matmul again
    with torch.no_grad():  # no cache: the eager layer ran either way, over another fp32 matmul
        torch.testing.assert_close(model(ids), fused, atol=1e-5, rtol=1e-5)


def test_the_environment_switch_turns_kernels_off(monkeypatch) -> None:
    monkeypatch.setenv(step_kernels.ENV_SWITCH, "0")
    step_kernels.load.cache_clear()
    try:
        model = prepare_for_decoding(RecycleGPT(tiny_config()).eval())
        assert type(model.model.layers[0]) is DecoderLayer
    finally:
        monkeypatch.delenv(step_kernels.ENV_SWITCH)
        step_kernels.load.cache_clear()
    assert step_kernels.load() is not None


def test_quantizing_a_model_already_on_the_kernels_decodes_with_the_quantized_weights(prompts) -> None:
    model = kernel_model(torch.float32)
    model.generate(prompts[2], 4)  # a kernel step has looked its linears up
    prepare_for_decoding(model, quantize="int8")
    torch.manual_seed(0)
    fresh = prepare_for_decoding(RecycleGPT(tiny_config()).eval(), quantize="int8")
    prompt, new = torch.randint(0, 97, (1, 6)), torch.randint(0, 97, (1, 1))
    assert torch.equal(step(model, prompt, new, kernels=True)[0], step(fresh, prompt, new, kernels=True)[0])


def test_kernels_are_built_at_the_first_cpu_step_and_a_failed_build_decodes_eagerly(monkeypatch, caplog) -> None:
    from torch.utils import cpp_extension

    torch.manual_seed(0)
    eager = prepare_for_decoding(RecycleGPT(tiny_config()).eval(), step_kernels=False)
    ids = torch.randint(0, 97, (1, 5))
    expected = eager.generate(ids, 10).sequences
    builds = []

    def failing_build(*args, **kwargs):
        builds.append(kwargs["name"])
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(cpp_extension, "load_inline", failing_build)
    caches = (step_kernels.load, cpu_kernels.build, quant_kernels.available, quant_kernels.dynamic_isa)
    for cache in caches:
        cache.cache_clear()
    try:
        torch.manual_seed(0)
        model = prepare_for_decoding(RecycleGPT(tiny_config()).eval())
        assert isinstance(model.model.layers[0], KernelDecoderLayer) and builds == []  # nothing built yet
        with caplog.at_level("WARNING", logger=cpu_kernels.__name__):
            assert torch.equal(model.generate(ids, 10).sequences, expected)
        assert builds == ["recyclegpt_cpu_kernels"]  # tried once, then eager
        assert "CPU kernels unavailable (RuntimeError: no compiler here)" in caplog.text
        torch.manual_seed(0)
        quantized = prepare_for_decoding(RecycleGPT(tiny_config()).eval(), quantize="w8a8")
        assert quantized.generate(ids, 10).sequences.shape == expected.shape  # w8a8 without its kernels decodes too
    finally:
        for cache in caches:
            cache.cache_clear()
