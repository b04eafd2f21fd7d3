"""The fast decode path: fused projections, weight-only int8, int4 and fp16, w8a8, quantized save/reload, draft planning."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recyclegpt.core import RecycleGPT, float_kernels, quant_kernels
from recyclegpt.core import quantize as quantize_module
from recyclegpt.core.bench import decoder_runs
from recyclegpt.core.bench import main as bench_main
from recyclegpt.core.fastpath import FusedAttention, FusedMLP, prepare_for_decoding
from recyclegpt.core.quantize import (
    Fp16Linear,
    Int4Linear,
    Int8Linear,
    W4A8Linear,
    W8A8Linear,
    quantize_activations,
    quantize_weight,
    quantize_weight_int4,
)
from recyclegpt.core.speculation import (
    MAX_PROBE_INTERVAL,
    DraftPlanner,
    StepCosts,
    draft_planner,
    forget_acceptance,
    remember_acceptance,
)

from .conftest import tiny_config


def assert_speculative_equals_standard(model: RecycleGPT, prompts: list[torch.Tensor]) -> None:
    """Greedy speculative decoding, fixed and adaptive draft lengths, gives standard's tokens."""
    for prompt in prompts:
        standard = model.generate(prompt, 20)
        for policy in ("fixed", "adaptive"):
            forget_acceptance(model)
            out = model.generate(prompt, 20, decoding="speculative", draft_length=3, draft_policy=policy)
            assert torch.equal(out.sequences, standard.sequences)


def test_quantize_weight_reconstructs_within_half_a_step() -> None:
    weight = torch.randn(64, 48)
    quantized, scales = quantize_weight(weight)
    assert quantized.dtype == torch.int8 and scales.shape == (64,)
    error = (quantized.float() * scales[:, None] - weight).abs()
    assert bool((error <= scales[:, None] / 2 + 1e-6).all())


@pytest.mark.parametrize("layer_type", [Int8Linear, Int4Linear, Fp16Linear, W8A8Linear, W4A8Linear])
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_quantized_linear_matches_its_dequantized_weight(rows: int, layer_type) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96, bias=True)
    layer = layer_type.from_linear(linear)
    x = torch.randn(1, rows, 64)
    expected = torch.nn.functional.linear(x, layer.dequantized(), linear.bias)
    out = layer(x)
    assert out.shape == (1, rows, 96) and out.dtype == torch.float32
    assert torch.allclose(out, expected, atol=0.05, rtol=0.02)  # bf16 activations (and int4 scales) inside


@pytest.mark.parametrize("layer_type", [Int8Linear, Int4Linear, Fp16Linear, W8A8Linear, W4A8Linear])
def test_quantized_rows_do_not_depend_on_their_neighbours(layer_type) -> None:
    # A k-token verification must compute each row as a 1-token step would: splitting 5-7 rows into
    # kernel calls of 4 + the rest keeps that, bit for bit.
    torch.manual_seed(0)
    layer = layer_type.from_linear(torch.nn.Linear(64, 96, bias=False))
    x = torch.randn(1, 8, 64)
    one_by_one = torch.cat([layer(x[:, i : i + 1]) for i in range(8)], dim=1)
    for rows in range(1, 9):
        assert torch.equal(layer(x[:, :rows]), one_by_one[:, :rows])


@pytest.mark.parametrize("layer_type", [Int8Linear, Int4Linear, Fp16Linear, W8A8Linear, W4A8Linear])
def test_selected_rows_compute_what_the_full_layer_gives_there(layer_type) -> None:
    torch.manual_seed(0)
    layer = layer_type.from_linear(torch.nn.Linear(64, 96, bias=True))
    ids = torch.randperm(96)[:32]
    rows = layer.select_rows(ids)
    assert type(rows) is layer_type and rows.out_features == 32
    x = torch.randn(3, 64)
    assert torch.equal(rows(x), layer(x)[:, ids])
    if issubclass(layer_type, Int4Linear):
        with pytest.raises(ValueError, match="multiple of 16"):
            layer.select_rows(ids[:20])


def test_fp16_linear_computes_in_fp32_over_fp16_weights() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96, bias=True)
    layer = Fp16Linear.from_linear(linear)
    assert layer.weight.dtype == torch.float16
    x = torch.randn(3, 64)
    expected = torch.nn.functional.linear(x, linear.weight.half().float(), linear.bias)
    assert torch.allclose(layer(x), expected, atol=1e-5)  # fp32 activations and sums: no bf16 inside
    # A bf16 model keeps the fp16 weight (no second rounding); its activations go through the fp32 kernel.
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.float16 and layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.weight, linear.weight.detach().half())
    assert torch.allclose(layer(x.bfloat16()).float(), expected, atol=0.05)


def test_fp16_refuses_a_weight_beyond_its_range() -> None:
    linear = torch.nn.Linear(8, 16)
    with torch.no_grad():
        linear.weight[3, 2] = 1e6
    with pytest.raises(ValueError, match="exceeds fp16's range"):
        Fp16Linear.from_linear(linear)


def test_fp16_linear_without_the_cpu_kernel_falls_back_to_its_weight(monkeypatch) -> None:
    torch.manual_seed(0)
    layer = Fp16Linear.from_linear(torch.nn.Linear(64, 96, bias=False))
    x = torch.randn(2, 64)
    with_kernel = layer(x)
    monkeypatch.setattr(quantize_module, "fp16_kernel_available", lambda: False)
    assert torch.allclose(layer(x), with_kernel, atol=1e-5)


def test_activations_round_to_int8_levels_in_blocks_of_32() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 96) * torch.logspace(-3, 2, 96)  # blocks of very different sizes
    x[1, 32:64] = 0.0
    rounded = quantize_activations(x)
    blocks, got = x.view(3, 3, 32), rounded.view(3, 3, 32)
    step = blocks.abs().amax(dim=-1, keepdim=True) / 127
    assert bool(((got - blocks).abs() <= step / 2 * (1 + 1e-5)).all())  # within half a level of its block
    levels = got / torch.where(step > 0, step, 1.0)
    assert torch.allclose(levels, levels.round(), atol=1e-3) and bool((levels.abs() <= 127 + 1e-3).all())
    assert torch.equal(got[1, 1], torch.zeros(32))  # an all-zero block stays zero (no 0/0)
    assert quantize_activations(x.bfloat16()).dtype == torch.bfloat16


def test_w8a8_layer_computes_the_rounded_activations_product_with_or_without_its_kernel(monkeypatch) -> None:
    torch.manual_seed(0)
    layer = W8A8Linear.from_linear(torch.nn.Linear(64, 96, bias=True))
    x = torch.randn(4, 64)
    expected = torch.nn.functional.linear(quantize_activations(x), layer.dequantized(), layer.bias)
    tolerance = {"atol": 0.05, "rtol": 0.02} if quantize_module.rounds_to_bf16("w8a8") else {"atol": 1e-4, "rtol": 1e-5}
    torch.testing.assert_close(layer(x), expected, **tolerance)
    monkeypatch.setenv(quant_kernels.ENV_SWITCH, "0")  # torch's int8 kernel on the rounded activations
    for cached in (quant_kernels.available, quant_kernels.dynamic_isa):
        cached.cache_clear()
    try:
        fresh = W8A8Linear.from_linear(torch.nn.Linear(64, 96, bias=True))
        fresh.load_state_dict(layer.state_dict())
        assert fresh.make_kernel()[0].args == (fresh.torch_kernel,)
        torch.testing.assert_close(fresh(x), expected, atol=0.05, rtol=0.02)  # bf16 activations there
    finally:
        monkeypatch.delenv(quant_kernels.ENV_SWITCH)
        for cached in (quant_kernels.available, quant_kernels.dynamic_isa):
            cached.cache_clear()


@pytest.mark.parametrize("quantize", ["w8a8", "w4a8"])
def test_int8_activation_models_speculative_equals_standard_and_reloads(tmp_path: Path, prompts, quantize: str) -> None:
    torch.manual_seed(0)
    model = prepare_for_decoding(RecycleGPT(tiny_config(intermediate_size=40)).eval(), quantize=quantize)
    layer = model.model.layers[0]
    base_type = W4A8Linear if quantize == "w4a8" else W8A8Linear
    assert type(layer.mlp.gate_up_proj) is base_type and type(layer.self_attn.qkv_proj) is base_type
    assert type(model.lm_head) is W8A8Linear and type(model.recycle.layers[0].mlp.gate_up_proj) is W8A8Linear
    assert type(layer.mlp.down_proj) is Int8Linear  # K = 40: not whole blocks of 32, so int8 weight-only
    assert_speculative_equals_standard(model, prompts)
    model.save_pretrained(tmp_path / quantize)
    loaded = RecycleGPT.from_pretrained(tmp_path / quantize)
    assert loaded.config.extra["decoding_setup"] == {"fuse": True, "quantize": quantize}
    assert type(loaded.model.layers[1].self_attn.qkv_proj) is base_type
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    with pytest.raises(ValueError, match=f"already quantized as {quantize}"):
        RecycleGPT.from_pretrained(tmp_path / quantize, quantize="int8")


def test_int4_weight_takes_half_a_byte_per_value() -> None:
    layer = Int4Linear.from_linear(torch.nn.Linear(64, 96))
    assert layer.weight.dtype == torch.uint8 and layer.weight.shape == (96, 32)  # two 4-bit values a byte


def test_fusing_is_exact(tiny_model: RecycleGPT, prompts) -> None:
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        before = tiny_model(ids)
    expected = [tiny_model.generate(p, 20, decoding="alternating").sequences for p in prompts]
    prepare_for_decoding(tiny_model, fuse=True, step_kernels=False)  # the kernels: test_step_kernels.py
    assert isinstance(tiny_model.model.layers[0].self_attn, FusedAttention)
    assert isinstance(tiny_model.recycle.layers[0].mlp, FusedMLP)
    with torch.no_grad():
        assert torch.allclose(tiny_model(ids), before, atol=1e-6)
    for prompt, sequences in zip(prompts, expected, strict=True):
        assert torch.equal(tiny_model.generate(prompt, 20, decoding="alternating").sequences, sequences)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_model_speculative_equals_standard(tiny_model: RecycleGPT, prompts, dtype: torch.dtype) -> None:
    model = prepare_for_decoding(tiny_model.to(dtype), quantize="int8")
    linears = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(linears) == 3 * 4 + 2  # qkv, o, gate_up, down in 2 base + 1 module layers; module fc; LM head
    assert isinstance(model.lm_head, Int8Linear) and isinstance(model.recycle.fc, Int8Linear)
    for prompt in prompts:
        standard = model.generate(prompt, 20)
        for policy in ("fixed", "adaptive"):
            forget_acceptance(model)
            for g in (1, 3):
                out = model.generate(prompt, 20, decoding="speculative", draft_length=g, draft_policy=policy)
                assert torch.equal(out.sequences, standard.sequences)


def test_int8_changes_logits_only_slightly(tiny_model: RecycleGPT) -> None:
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        reference = tiny_model(ids)
        quantized = prepare_for_decoding(tiny_model, quantize="int8")(ids)
    assert (quantized - reference).abs().max() < 0.05 * reference.abs().max()


def test_quantized_save_reloads_identically(tmp_path: Path, tiny_model: RecycleGPT) -> None:
    model = prepare_for_decoding(tiny_model, quantize="int8")
    model.save_pretrained(tmp_path / "int8")
    loaded = RecycleGPT.from_pretrained(tmp_path / "int8")
    assert isinstance(loaded.lm_head, Int8Linear)
    assert loaded.config.extra["decoding_setup"] == {"fuse": True, "quantize": "int8"}
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    assert torch.equal(loaded.generate(ids, 10).sequences, model.generate(ids, 10).sequences)
    size = (tmp_path / "int8" / "model.safetensors").stat().st_size
    tiny_model_size = sum(p.numel() * 4 for p in RecycleGPT(tiny_config()).parameters())
    assert size < tiny_model_size  # int8 weights (plus the fp32 embeddings) take less room


def test_from_pretrained_quantizes(tmp_path: Path, tiny_model: RecycleGPT) -> None:
    tiny_model.save_pretrained(tmp_path / "fp32")
    loaded = RecycleGPT.from_pretrained(tmp_path / "fp32", quantize="int8")
    assert isinstance(loaded.model.layers[1].mlp.gate_up_proj, Int8Linear)
    assert loaded.new_cache("base", 1, 8).keys.dtype == torch.float32  # caches keep the compute dtype
    with pytest.raises(ValueError, match="quantize must be one of"):
        RecycleGPT.from_pretrained(tmp_path / "fp32", quantize="int3")


def test_int4_quantization_keeps_q4_1_weights_exactly() -> None:
    """A weight already in GGUF Q4_1's form (q * scale + min per 32 values, q spanning 0..15) comes back."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (48, 4, 32), generator=generator)
    q[..., 0], q[..., 1] = 0, 15
    scales, mins = torch.rand(48, 4, 1, generator=generator) / 10, torch.randn(48, 4, 1, generator=generator) / 10
    weight = (q * scales + mins).view(48, 128)
    quantized, got_scales, got_mins = quantize_weight_int4(weight)
    assert torch.equal(quantized.view(48, 4, 32), q.to(torch.uint8))
    assert torch.allclose(got_scales, scales[..., 0], rtol=1e-5) and torch.allclose(got_mins, mins[..., 0])
    linear = torch.nn.Linear(128, 48, bias=False)
    linear.weight.data.copy_(weight)
    assert torch.allclose(Int4Linear.from_linear(linear).dequantized(), weight, atol=1e-6)


def test_int4_quantization_error_is_at_most_half_a_step() -> None:
    weight = torch.randn(32, 64)
    q, scales, mins = quantize_weight_int4(weight)
    rebuilt = q.view(32, 2, 32).float() * scales[..., None] + mins[..., None]
    assert bool(((rebuilt.view(32, 64) - weight).abs() <= scales.repeat_interleave(32, 1) / 2 + 1e-6).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_model_speculative_equals_standard(tiny_model: RecycleGPT, prompts, dtype: torch.dtype) -> None:
    model = prepare_for_decoding(tiny_model.to(dtype), quantize="int4")
    assert all(isinstance(layer.mlp.gate_up_proj, Int4Linear) for layer in model.model.layers)
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, Int4Linear)
    assert isinstance(model.lm_head, Int8Linear) and isinstance(model.recycle.layers[0].mlp.down_proj, Int8Linear)
    assert_speculative_equals_standard(model, prompts)


def test_fp16_model_speculative_equals_standard_and_reloads(tmp_path: Path, tiny_model: RecycleGPT, prompts) -> None:
    model = prepare_for_decoding(tiny_model, quantize="fp16")
    linears = [m for m in model.modules() if isinstance(m, Fp16Linear)]
    assert len(linears) == 3 * 4 + 2 and isinstance(model.lm_head, Fp16Linear)  # every linear, head included
    for prompt in prompts:
        standard = model.generate(prompt, 20)
        for g in (1, 4):
            out = model.generate(prompt, 20, decoding="speculative", draft_length=g, draft_policy="fixed")
            assert torch.equal(out.sequences, standard.sequences)
    model.save_pretrained(tmp_path / "fp16")
    loaded = RecycleGPT.from_pretrained(tmp_path / "fp16")
    assert loaded.config.extra["decoding_setup"] == {"fuse": True, "quantize": "fp16"}
    assert isinstance(loaded.model.layers[0].self_attn.qkv_proj, Fp16Linear)
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    with pytest.raises(ValueError, match="already quantized as fp16"):
        RecycleGPT.from_pretrained(tmp_path / "fp16", quantize="int8")


def test_int4_keeps_int8_where_the_kernel_cannot_take_the_weight() -> None:
    model = RecycleGPT(tiny_config(intermediate_size=40))  # gate/up: 80 x 32 fits; down: 32 x 40 does not
    prepare_for_decoding(model, quantize="int4")
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp.gate_up_proj, Int4Linear) and isinstance(mlp.down_proj, Int8Linear)  # 40 % 32 != 0


def test_int4_save_reloads_identically_and_refuses_requantizing(tmp_path: Path, tiny_model: RecycleGPT) -> None:
    model = prepare_for_decoding(tiny_model, quantize="int4")
    model.save_pretrained(tmp_path / "int4")
    loaded = RecycleGPT.from_pretrained(tmp_path / "int4")
    assert isinstance(loaded.model.layers[1].mlp.gate_up_proj, Int4Linear)
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    assert torch.equal(loaded.generate(ids, 10).sequences, model.generate(ids, 10).sequences)
    with pytest.raises(ValueError, match="already quantized as int4"):
        RecycleGPT.from_pretrained(tmp_path / "int4", quantize="int8")


def costs(two: float = 1.05, module: float = 0.2, depth: int = 5) -> StepCosts:
    """A 1-token step costs 1; a k-token step 1 + (two - 1) * (k - 1)."""
    return StepCosts([0.0, *(1 + (two - 1) * (k - 1) for k in range(1, depth + 2))], module)


def test_planner_stops_drafting_when_drafts_are_rejected_and_probes_rarely() -> None:
    planner = DraftPlanner(costs())
    assert planner.plan(5) >= 1  # the prior makes drafting worth a try
    for _ in range(4 * MAX_PROBE_INTERVAL):  # as the decoder does: a verification is observed, a standard step not
        depth = planner.plan(5)
        if depth:
            planner.observe(depth, accepted=0, dropped=False)
    depths = [planner.plan(5) for _ in range(2 * MAX_PROBE_INTERVAL)]
    assert max(depths) == 1 and 1 <= depths.count(1) <= 2  # standard steps, a one-token probe now and then


def test_planner_misses_while_drafting_do_not_delay_the_next_probe() -> None:
    planner = DraftPlanner(costs())
    for _ in range(12):  # a bad stretch: drafts planned (not probes) and rejected
        depth = planner.plan(5)
        if depth and not planner.probing:
            planner.observe(depth, accepted=0, dropped=False)
    assert planner.probe_interval == 1
    assert 1 in [planner.plan(5) for _ in range(2)]  # so the module is tried again at once


def test_planner_drafts_deeper_when_drafts_are_accepted_and_respects_the_limit() -> None:
    planner = DraftPlanner(costs())
    for _ in range(30):
        depth = planner.plan(5)
        planner.observe(depth, accepted=depth, dropped=False)
    assert planner.plan(5) == 5 and planner.plan(2) == 2 and planner.plan(0) == 0


def test_planner_tries_a_depth_again_after_early_misses_there() -> None:
    planner = DraftPlanner(costs())
    planner.acceptance, planner.observed = [0.95, 0.1], [10, 10]  # depth 2 missed early on
    assert planner.plan(2) == 1
    depths = []
    for _ in range(200):  # depth 1 keeps being accepted; depth 2 is not tested while planned away
        depth = planner.plan(2)
        depths.append(depth)
        planner.observe(depth, accepted=depth, dropped=False)
    assert 2 in depths  # its estimate drifted back toward the prior, so it was verified again
    assert depths[-1] == 2  # and, accepted there, it stays


def test_planner_follows_step_costs() -> None:
    cheap, dear = DraftPlanner(costs(two=1.02, module=0.05)), DraftPlanner(costs(two=1.9, module=0.5))
    for planner in (cheap, dear):
        planner.acceptance, planner.observed, planner.probe_interval = [0.6] * 5, [1] * 5, 64
    assert cheap.plan(5) > dear.plan(5)
    assert dear.plan(5) == 0  # 1.6 tokens for 2.4 steps' time does not pay
    assert cheap.keep_drafting(1) and not dear.keep_drafting(1)
    assert DraftPlanner.confident(0.3) and not DraftPlanner.confident(0.001)


def test_step_costs_learn_one_factor_for_full_model_steps_and_draft_times_of_their_own() -> None:
    learned = costs(two=1.2, module=0.5)  # measured: a k-token step 1 + 0.2 (k - 1), a draft 0.5
    measured = list(learned.base_ms)
    for _ in range(60):  # decoding sees 3-token steps take twice, and drafts a fraction of, the measurement
        learned.observe_base(3, 2.8)
        learned.observe_module(0.9, first=True)
        learned.observe_module(0.2, first=False)
    assert learned.base_ms[1:] == pytest.approx([2 * ms for ms in measured[1:]], rel=0.01)  # the shape kept
    assert learned.first_module_ms == pytest.approx(0.9, rel=0.01) and learned.module_ms == pytest.approx(0.2, rel=0.01)
    assert learned.drafting_ms(3) == pytest.approx(0.9 + 2 * 0.2, rel=0.01) and learned.drafting_ms(0) == 0
    learned.observe_base(2, 100.0)  # one step held up counts as twice the estimate at most
    assert learned.base_ms[2] <= 1.1 * 2 * measured[2] + 1e-9
    frozen = learned.as_measured()
    assert frozen.base_ms == measured and frozen.module_ms == frozen.first_module_ms == 0.5
    frozen.observe_base(1, 5.0)
    frozen.observe_module(5.0, first=False)
    assert frozen.base_ms == measured and frozen.module_ms == 0.5  # not learning


def test_planner_drafts_deeper_once_it_has_seen_that_drafts_are_cheap() -> None:
    planner = DraftPlanner(costs(two=1.1, module=0.6))  # a cold, one-off measurement of a draft
    planner.acceptance, planner.observed = [0.6] * 5, [1] * 5
    assert not planner.keep_drafting(1)  # 0.36 tokens expected for 0.7 steps' time
    for _ in range(40):  # chained drafts run with warm caches
        planner.costs.observe_module(0.05, first=False)
    assert planner.keep_drafting(1)


def test_planner_drafts_on_while_the_module_is_confident() -> None:
    planner = DraftPlanner(costs(two=1.1, module=0.05))
    planner.acceptance, planner.observed = [0.6] * 5, [1] * 5
    assert planner.keep_drafting(3, chain_confidence=0.95)  # a confident chain goes on
    assert not planner.keep_drafting(3, chain_confidence=0.05)  # an unlikely one stops
    assert planner.worth_verifying(2, chain_confidence=0.9) and not planner.worth_verifying(2, chain_confidence=0.01)


def test_planner_learns_that_an_underconfident_module_is_accepted_and_drafts_on() -> None:
    planner = DraftPlanner(costs(two=1.1, module=0.05))
    planner.acceptance, planner.observed = [0.6] * 5, [1] * 5
    assert planner.calibrated(0.08) == pytest.approx(0.075)  # before any evidence: taken at its word
    chain = planner.calibrated(0.08) ** 2
    assert not planner.keep_drafting(2, chain_confidence=chain)
    for _ in range(40):  # drafts given 0.08 keep passing verification; those given 0.92 keep failing
        planner.observe(2, accepted=2, dropped=False, confidences=[0.08, 0.08])
        planner.observe(1, accepted=0, dropped=False, confidences=[0.92])
    assert planner.calibrated(0.08) > 0.95 and planner.calibrated(0.92) < 0.05
    assert planner.calibrated(0.5) == pytest.approx(0.55)  # bins without evidence keep their prior
    assert planner.keep_drafting(2, chain_confidence=planner.calibrated(0.08) ** 2)


def test_the_next_call_starts_from_the_learned_calibration(tiny_model: RecycleGPT) -> None:
    planner = draft_planner(tiny_model, 3, remember=False)
    for _ in range(10):
        planner.observe(1, accepted=1, dropped=False, confidences=[0.08])
    remember_acceptance(tiny_model, planner)
    planner.observe(1, accepted=0, dropped=False, confidences=[0.08])  # after the call ended: not kept
    assert draft_planner(tiny_model, 3).calibrated(0.08) == pytest.approx(1.0, abs=0.1)
    assert draft_planner(tiny_model, 3, remember=False).calibrated(0.08) == pytest.approx(0.075)
    forget_acceptance(tiny_model)
    assert draft_planner(tiny_model, 3).calibrated(0.08) == pytest.approx(0.075)


def test_bench_core_prints_steps_and_every_decoder(capsys) -> None:
    bench_main(
        ["--layers", "2", "--hidden", "64", "--vocab", "128", "--prompt-length", "8", "--new-tokens", "6"]
        + ["--repeats", "1", "--dtype", "fp32", "--draft-length", "2"]
    )
    out = capsys.readouterr().out
    assert "measured on: CPU" in out
    for row in ("| fp32 |", "| fp32+int8 |", "| fp32+int4 |", "transformers generate [fp32]", "standard [fp32+int4]"):
        assert row in out
    assert "speculative<=2 [fp32+int8]" in out and "speculative g=2 [fp32]" in out and "5 tokens" in out


def test_bench_core_times_the_models_linears_on_torch_and_the_kernel(capsys) -> None:
    args = ["--layers", "1", "--hidden", "64", "--vocab", "96", "--linears", "--repeats", "1"]
    if not float_kernels.available():
        with pytest.raises(SystemExit, match="needs the fp32 kernel"):
            bench_main(args)
        return
    bench_main(args)
    out = capsys.readouterr().out
    assert "| q/k/v (64 -> 192) |" in out and "| LM head (64 -> 96) |" in out and "64 rows: torch / kernel" in out
    assert "standard [" not in out  # it times linears instead of decoding


def test_bench_core_names_a_trained_module_and_rejects_a_bad_gguf(tiny_model, tmp_path, capsys) -> None:
    tiny_model.save_pretrained(str(tmp_path / "model"))
    with pytest.raises(SystemExit) as bad:
        bench_main(["--model", str(tmp_path / "model"), "--gguf", str(tmp_path / "model")])
    assert "is not a .gguf file" in str(bad.value.code)
    bench_main(
        ["--model", str(tmp_path / "model"), "--new-tokens", "4", "--repeats", "1", "--dtype", "fp32"]
        + ["--quantize", "none", "--no-transformers", "--draft-length", "2", "--torch-matmul", "--layer-by-layer"]
        + ["--batched"]
    )
    out = capsys.readouterr().out
    assert "M module)" in out and "untrained" not in out and "standard [fp32]" in out
    assert "batched standard x1 [fp32]" in out and "batched standard x8 [fp32, layer by layer]" in out
    assert "| fp32, layer by layer |" in out and "standard [fp32, layer by layer]" in out
    if float_kernels.available():  # the fp32 kernel's variant beside torch's matmul
        assert "| fp32, torch matmul |" in out and "standard [fp32, torch matmul]" in out


def test_bench_core_batched_runs_count_every_rows_tokens(tiny_model) -> None:
    prompt = torch.randint(1, 97, (1, 5))
    runs = decoder_runs(tiny_model, prompt, 4, 2, "x", batched=True)
    assert runs["batched standard x1 [x]"]() == 4 and runs["batched standard x8 [x]"]() == 32
    assert "batched standard x8 [x]" not in decoder_runs(tiny_model, prompt, 4, 2, "x")
