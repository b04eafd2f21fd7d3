"""The fp32 decode matmul: the product within rounding, each row exactly what it gives alone, the
same parameters as nn.Linear, and the decoders' relations kept on top of it."""

from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch
from torch import nn

from recyclegpt.core import RecycleGPT, float_kernels
from recyclegpt.core.cpu_kernels import build
from recyclegpt.core.fastpath import prepare_for_decoding, use_step_kernels
from recyclegpt.core.float_kernels import KernelLinear, KernelStep

from .conftest import tiny_config


@pytest.fixture(scope="module", autouse=True)
def kernel_runs() -> None:
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler: the kernels cannot be built here (linears run F.linear)")
    if build() is None or not build().float_matmul_supported():
        pytest.skip("this CPU lacks AVX2 and FMA: linears run F.linear")
    assert float_kernels.available()


@pytest.mark.parametrize("in_features, out_features", [(64, 96), (100, 37), (576, 960), (13, 5)])
def test_the_kernel_computes_the_product(in_features: int, out_features: int) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=generator)
    x = torch.randn(2, 11, in_features, generator=generator)
    out = build().float_matmul(x, weight)
    assert out.shape == (2, 11, out_features) and out.dtype == torch.float32
    reference = (x.double() @ weight.double().T).float()
    torch.testing.assert_close(out, reference, atol=1e-5 * in_features**0.5, rtol=1e-5)


@pytest.mark.parametrize("in_features", [64, 100])
def test_every_row_is_what_it_gives_alone_whatever_the_rows_beside_it(in_features: int) -> None:
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(83, in_features, generator=generator)
    x = torch.randn(29, in_features, generator=generator)
    alone = torch.cat([build().float_matmul(row, weight) for row in x.split(1)])
    for rows in range(2, 30):
        for start in (0, 29 - rows):
            assert torch.equal(build().float_matmul(x[start : start + rows], weight), alone[start : start + rows])


def test_a_transposed_weight_is_read_as_its_values() -> None:
    weight = torch.randn(40, 24).T  # not contiguous
    x = torch.randn(3, 40)
    assert torch.equal(build().float_matmul(x, weight), build().float_matmul(x, weight.contiguous()))


def test_kernel_linear_shares_nn_linears_parameters_and_trains_through_f_linear() -> None:
    torch.manual_seed(0)
    plain = nn.Linear(16, 8)
    layer = KernelLinear.from_linear(plain)
    assert layer.weight is plain.weight and layer.bias is plain.bias
    assert list(layer.state_dict()) == list(plain.state_dict())
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), plain(x), atol=1e-6, rtol=1e-6)
    layer(x).sum().backward()  # grad enabled on trainable weights: F.linear, with gradients
    assert plain.weight.grad is not None and plain.bias.grad is not None


def test_the_fast_path_puts_kernel_linears_in_place_and_keeps_the_head_tied() -> None:
    torch.manual_seed(0)
    model = prepare_for_decoding(RecycleGPT(tiny_config(tie_embeddings=True)).eval())
    assert isinstance(model.lm_head, KernelLinear) and isinstance(model.recycle.fc, KernelLinear)
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, KernelLinear)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    use_step_kernels(model, False)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight


def test_kernel_linears_decode_as_plain_linears_would(prompts) -> None:
    torch.manual_seed(0)
    model = prepare_for_decoding(RecycleGPT(tiny_config()).eval())
    with torch.inference_mode():
        fast = model.generate(prompts[2], max_new_tokens=12, decoding="standard").sequences
        use_step_kernels(model, False)
        plain = model.generate(prompts[2], max_new_tokens=12, decoding="standard").sequences
    assert torch.equal(fast, plain)  # a random tiny model's greedy choices are far from ties


def test_the_environment_switch_turns_the_kernel_off(monkeypatch) -> None:
    float_kernels.usable.cache_clear()
    monkeypatch.setenv(float_kernels.ENV_SWITCH, "0")
    try:
        layer = KernelLinear.from_linear(nn.Linear(32, 8, bias=False))
        x = torch.randn(3, 32)
        with torch.no_grad():
            assert not float_kernels.runs_kernel(x, layer.weight)
            assert torch.equal(layer(x), nn.functional.linear(x, layer.weight))
    finally:
        float_kernels.usable.cache_clear()


def test_a_draft_vocabularys_head_rows_compute_what_the_full_head_gives_there() -> None:
    torch.manual_seed(0)
    model = prepare_for_decoding(RecycleGPT(tiny_config()).eval())
    model.set_draft_vocab(torch.tensor([3, 7, 8, 40, 41, 90]))
    state = torch.randn(2, 5, model.config.hidden_size)
    with torch.inference_mode():
        full = model.lm_head(state)
        drafted = model.draft_head_logits(state)
    assert torch.equal(drafted, full[..., model.draft_ids])


def test_a_deep_copy_of_a_model_that_has_decoded_steps_over_its_own_weights(prompts) -> None:
    torch.manual_seed(0)
    model = prepare_for_decoding(RecycleGPT(tiny_config()).eval())
    model.generate(prompts[2], 3)  # its step layers have looked their linears up
    twin = copy.deepcopy(model)
    for copied, original in ((twin, model), (model, twin)):
        layer = copied.model.layers[0]
        qkv_step = layer.step_parts()[2]
        assert isinstance(qkv_step, KernelStep) and qkv_step.weight is layer.self_attn.qkv_proj.weight
        assert qkv_step.weight is not original.model.layers[0].self_attn.qkv_proj.weight
        assert layer.step_parts()[-1].tensors[2] is layer.self_attn.qkv_proj.weight  # the one-call layer's too
    assert torch.equal(twin.generate(prompts[2], 6).sequences, model.generate(prompts[2], 6).sequences)


def test_prompts_run_torchs_matmul_and_steps_the_kernel() -> None:
    layer = KernelLinear.from_linear(nn.Linear(64, 40, bias=False))
    prompt, step = torch.randn(2, float_kernels.MAX_STEP_TOKENS + 1, 64), torch.randn(2, 3, 64)
    with torch.no_grad():
        assert torch.equal(layer(prompt), nn.functional.linear(prompt, layer.weight))
        assert torch.equal(layer(step), build().float_matmul(step, layer.weight))
        rows = step.view(-1, 64)  # a head over many rows (a batch's last states) stays on the kernel
        assert torch.equal(layer(rows), build().float_matmul(rows, layer.weight))
