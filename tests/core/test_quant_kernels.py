"""This project's packed int8 AVX-512 matmuls: the quantized weight's product in fp32 (with int8
activations for w8a8's), every row computed as it would be alone (bit for bit), and torch's kernels
where they are switched off."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

import pytest
import torch

from recyclegpt.core import RecycleGPT, quant_kernels
from recyclegpt.core.cpu_kernels import build
from recyclegpt.core.fastpath import prepare_for_decoding
from recyclegpt.core.quantize import (
    Int4Linear,
    Int8Linear,
    W4A8Linear,
    W8A8Linear,
    quantize_activations,
    quantize_weight,
    quantize_weight_int4,
    rounds_to_bf16,
)

from .conftest import tiny_config


@pytest.fixture(scope="module", autouse=True)
def kernels_built() -> None:
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler: the packed kernels cannot be built here (torch's kernels run)")


def needs_packed() -> None:
    if not quant_kernels.available():
        pytest.skip(f"CPU capability {torch.backends.cpu.get_cpu_capability()}: the packed kernel needs AVX-512")


def int8_case(out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    q, scales = quantize_weight(torch.randn(out_features, in_features))
    packed, packed_scales = quant_kernels.pack_int8(q, scales)
    return (q.double() * scales.double()[:, None]), packed, packed_scales


def matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, out_features: int) -> torch.Tensor:
    return build().int8_matmul(x, packed, scales, out_features)


def assert_each_row_as_alone(
    kernel: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, out: torch.Tensor
) -> None:
    """``out`` = ``kernel(x)`` for 22 rows holds, bit for bit, what each row gives alone, and so does
    every first 1..9 rows computed together (every row-pass split)."""
    flat = x.view(-1, x.shape[-1])
    alone = torch.cat([kernel(flat[i : i + 1]) for i in range(flat.shape[0])])
    assert torch.equal(out.view(alone.shape), alone)
    for rows in range(1, 10):
        assert torch.equal(kernel(flat[:rows]), alone[:rows])


# Shapes: whole tiles of 64 outputs, and not (zero rows pad the last tile).
@pytest.mark.parametrize("shape", [(128, 64), (40, 96), (200, 32)])
def test_packed_matmul_computes_the_quantized_product_row_by_row(shape) -> None:
    needs_packed()
    out_features, in_features = shape
    weight, packed, scales = int8_case(out_features, in_features)
    x = torch.randn(2, 11, in_features)  # 22 rows: passes of 8, 8 and 6
    out = matmul(x, packed, scales, out_features)
    assert out.shape == (2, 11, out_features) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), x.double() @ weight.T, atol=1e-4, rtol=1e-5)  # fp32, no bf16 rounding
    assert_each_row_as_alone(lambda rows: matmul(rows, packed, scales, out_features), x, out)
    in_bf16 = matmul(x.bfloat16(), packed, scales, out_features)
    assert in_bf16.dtype == torch.bfloat16
    assert torch.equal(in_bf16, matmul(x.bfloat16().float(), packed, scales, out_features).bfloat16())


def test_a_layout_that_does_not_match_is_refused() -> None:
    needs_packed()
    _, packed, scales = int8_case(32, 64)
    with pytest.raises(RuntimeError, match="int8 weight must be packed tiles"):
        matmul(torch.randn(1, 48), packed, scales, 32)
    with pytest.raises(RuntimeError, match="scales must be fp32"):
        matmul(torch.randn(1, 64), packed, scales[:32], 32)
    with pytest.raises(RuntimeError, match="fp32 or bf16"):
        matmul(torch.randn(1, 64).double(), packed, scales, 32)


def test_int8_layers_use_the_packed_kernel_and_torchs_when_it_is_switched_off(monkeypatch) -> None:
    needs_packed()
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(torch.nn.Linear(64, 96, bias=True))
    x = torch.randn(3, 64)
    packed = layer(x)
    assert layer._kernel[0].__name__ == "int8_matmul"
    assert not rounds_to_bf16("int8") and rounds_to_bf16("int4")  # int4 runs torch's kernel
    int4 = Int4Linear.from_linear(torch.nn.Linear(64, 96))
    int4(x)
    assert int4._kernel[0] == int4.torch_kernel
    monkeypatch.setenv(quant_kernels.ENV_SWITCH, "0")
    quant_kernels.available.cache_clear()
    try:
        fresh = Int8Linear.from_linear(torch.nn.Linear(64, 96, bias=True))
        fresh.load_state_dict(layer.state_dict())
        assert rounds_to_bf16("int8")
        torch.testing.assert_close(fresh(x), packed, atol=0.05, rtol=0.02)  # torch's: bf16 activations
        assert fresh._kernel[0] == fresh.torch_kernel
    finally:
        monkeypatch.delenv(quant_kernels.ENV_SWITCH)
        quant_kernels.available.cache_clear()


def needs_dynamic() -> None:
    if not quant_kernels.dynamic_available():
        pytest.skip("no int8-activation kernel here: w8a8 rounds its activations before the int8 kernel instead")


def needs_isa(isa: str) -> bool:
    """The kernels' ``vnni`` argument for ``isa``, or a skip where this CPU cannot run it."""
    if build() is None:
        pytest.skip("the CPU kernels do not build here")
    supported = build().int8_dynamic_supported() if isa == "vnni" else build().int8_dynamic_avx2_supported()
    if not supported:
        pytest.skip(f"this CPU cannot run the {isa} int8-activation kernels")
    return isa == "vnni"


@pytest.mark.parametrize("isa", ["vnni", "avx2"])
@pytest.mark.parametrize("shape", [(128, 64), (40, 96), (200, 32)])
def test_dynamic_matmul_computes_the_product_of_int8_activations_row_by_row(shape, isa) -> None:
    vnni = needs_isa(isa)
    out_features, in_features = shape
    torch.manual_seed(0)
    q, scales = quantize_weight(torch.randn(out_features, in_features))
    packed, packed_scales = quant_kernels.pack_int8(q, scales, offset=True)

    def dynamic(x: torch.Tensor) -> torch.Tensor:
        return build().int8_dynamic_matmul(x, packed, packed_scales, out_features, vnni)

    x = torch.randn(2, 11, in_features) * torch.linspace(0.01, 10, in_features)  # 22 rows: passes of 6 (2) and 4
    out = dynamic(x)
    assert out.shape == (2, 11, out_features) and out.dtype == torch.float32
    weight = q.double() * scales.double()[:, None]
    torch.testing.assert_close(out.double(), quantize_activations(x).double() @ weight.T, atol=1e-4, rtol=1e-5)
    assert_each_row_as_alone(dynamic, x, out)
    in_bf16 = dynamic(x.bfloat16())
    assert in_bf16.dtype == torch.bfloat16
    assert torch.equal(in_bf16, dynamic(x.bfloat16().float()).bfloat16())
    with pytest.raises(RuntimeError, match="multiple of 32"):
        build().int8_dynamic_matmul(torch.randn(1, 48), packed, packed_scales, out_features, vnni)


@pytest.mark.parametrize("isa", ["vnni", "avx2"])
@pytest.mark.parametrize("shape", [(64, 64), (40, 96), (200, 32)])
def test_int4_dynamic_matmul_computes_q4_1_groups_against_int8_activations(shape, isa) -> None:
    vnni = needs_isa(isa)
    out_features, in_features = shape
    torch.manual_seed(0)
    q, scales, mins = quantize_weight_int4(torch.randn(out_features, in_features))
    packed = quant_kernels.pack_int4(q, scales, mins)

    def dynamic(x: torch.Tensor) -> torch.Tensor:
        return build().int4_dynamic_matmul(x, *packed, out_features, vnni)

    x = torch.randn(2, 11, in_features) * torch.linspace(0.01, 10, in_features)  # 22 rows: passes of 3 (2) and 1
    out = dynamic(x)
    assert out.shape == (2, 11, out_features) and out.dtype == torch.float32
    groups = q.double().view(out_features, -1, 32)
    weight = groups * scales.half().double()[..., None] + mins.half().double()[..., None]  # fp16 scales inside
    expected = quantize_activations(x).double() @ weight.view(out_features, in_features).T
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-5)
    assert_each_row_as_alone(dynamic, x, out)
    in_bf16 = dynamic(x.bfloat16())  # read and written in bf16 by the kernel: the fp32 result, rounded
    assert in_bf16.dtype == torch.bfloat16 and torch.equal(in_bf16, dynamic(x.bfloat16().float()).bfloat16())
    with pytest.raises(RuntimeError, match="int4 scales and minimums must be fp16"):
        build().int4_dynamic_matmul(x, packed[0], packed[1].float(), packed[2], out_features, vnni)
    assert quant_kernels.pack_int4(q, scales * 1e6, mins) is None  # beyond fp16: the layer uses torch's kernel


def test_the_avx2_kernels_give_the_vnni_kernels_results_bit_for_bit() -> None:
    needs_isa("vnni"), needs_isa("avx2")
    torch.manual_seed(0)
    weight, x = torch.randn(200, 96), torch.randn(7, 96) * 3
    q, scales = quantize_weight(weight)
    packed = quant_kernels.pack_int8(q, scales, offset=True)
    vnni, avx2 = (build().int8_dynamic_matmul(x, *packed, 200, flag) for flag in (True, False))
    assert torch.equal(vnni, avx2)
    packed = quant_kernels.pack_int4(*quantize_weight_int4(weight))
    vnni, avx2 = (build().int4_dynamic_matmul(x, *packed, 200, flag) for flag in (True, False))
    assert torch.equal(vnni, avx2)


def test_the_kernels_follow_torchs_view_of_the_cpu(monkeypatch) -> None:
    """``ATEN_CPU_CAPABILITY=avx2`` (torch reporting AVX2) picks the AVX2 kernels; the switch turns both off."""
    needs_isa("avx2")
    try:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
        quant_kernels.dynamic_isa.cache_clear()
        assert quant_kernels.dynamic_isa() == "avx2" and not quant_kernels.dynamic_uses_vnni()
        layer = W8A8Linear.from_linear(torch.nn.Linear(64, 96))
        layer(torch.randn(2, 64))
        assert layer._kernel[0].__name__ == "int8_dynamic_matmul" and layer._kernel[-1] is False
        monkeypatch.setenv(quant_kernels.ENV_SWITCH, "0")
        quant_kernels.dynamic_isa.cache_clear()
        assert quant_kernels.dynamic_isa() is None
    finally:
        monkeypatch.undo()
        quant_kernels.dynamic_isa.cache_clear()


def test_int8_activation_layers_use_the_dynamic_kernels() -> None:
    needs_dynamic()
    w8a8, w4a8 = W8A8Linear.from_linear(torch.nn.Linear(64, 96)), W4A8Linear.from_linear(torch.nn.Linear(64, 96))
    for layer in (w8a8, w4a8):
        layer(torch.randn(2, 64))
    assert w8a8._kernel[0].__name__ == "int8_dynamic_matmul" and w4a8._kernel[0].__name__ == "int4_dynamic_matmul"
    assert not rounds_to_bf16("w8a8") and not rounds_to_bf16("w4a8")


@pytest.mark.parametrize("quantize", ["int8", "int4", "w8a8", "w4a8"])
def test_a_verification_step_computes_what_one_token_steps_do(quantize: str) -> None:
    needs_dynamic() if quantize in ("w8a8", "w4a8") else needs_packed()
    torch.manual_seed(0)
    model = prepare_for_decoding(RecycleGPT(tiny_config()).eval(), quantize=quantize)
    prompt, new = torch.randint(0, 97, (1, 6)), torch.randint(0, 97, (1, 5))
    with torch.inference_mode():
        cache = model.new_cache("base", 1, 32)
        model.base_hidden(prompt, cache=cache)
        together = model.base_hidden(new, cache=cache)
        cache = model.new_cache("base", 1, 32)
        model.base_hidden(prompt, cache=cache)
        alone = torch.cat([model.base_hidden(new[:, i : i + 1], cache=cache) for i in range(5)], dim=1)
    assert torch.equal(together, alone)
