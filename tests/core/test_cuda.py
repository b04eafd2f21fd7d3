"""The decoders, the batched decoder, quantized layers and a training step on a CUDA GPU.

CI has no GPU, so these skip there; they run wherever torch sees one (the device checks record it).
"""

from __future__ import annotations

import pytest
import torch

from recyclegpt.core import RecycleGPT, recycle_losses
from recyclegpt.core.batching import BatchedDecoder
from recyclegpt.core.checkpoint import load_pretrained, save_pretrained
from recyclegpt.core.speculation import forget_acceptance

from .conftest import PATTERN, pattern_trained, tiny_config
from .test_batching import run_staggered

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.fixture(scope="module")
def trained_cpu() -> RecycleGPT:
    """The tests' pattern-trained tiny model (high acceptance), on the CPU in fp32."""
    return pattern_trained(tiny_config())


def on_gpu(model: RecycleGPT, dtype: torch.dtype) -> RecycleGPT:
    clone = RecycleGPT(model.config)
    clone.load_state_dict(model.state_dict())
    return clone.to(device="cuda", dtype=dtype).eval()


def prompts() -> list[torch.Tensor]:
    return [torch.tensor([PATTERN[:n]]) for n in (1, 3, 6)] + [torch.tensor([[7, 3, 50, 11]])]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("draft_policy", ["fixed", "adaptive", "tree"])
def test_speculative_equals_standard_on_cuda(trained_cpu, dtype, draft_policy) -> None:
    # In bf16 this holds for the pattern model, whose logit gaps are wide: a real model's k-token and
    # 1-token steps round differently in bf16 and can break a near-tie the other way (docs/gpu.md).
    model = on_gpu(trained_cpu, DTYPES[dtype])
    for prompt in prompts():
        standard = model.generate(prompt.cuda(), 30)
        forget_acceptance(model)
        speculative = model.generate(prompt.cuda(), 30, decoding="speculative", draft_policy=draft_policy)
        assert speculative.sequences.device.type == "cuda"
        assert torch.equal(speculative.sequences, standard.sequences)
        assert speculative.full_model_calls <= standard.full_model_calls


@pytest.mark.parametrize("dtype", DTYPES)
def test_alternating_on_cuda_follows_the_pattern(trained_cpu, dtype) -> None:
    model = on_gpu(trained_cpu, DTYPES[dtype])
    out = model.generate(torch.tensor([PATTERN[:4]], device="cuda"), 18, decoding="alternating")
    assert out.new_tokens[0].tolist() == (PATTERN * 4)[4 : 4 + 18]
    assert out.module_calls == 9


def test_fp32_cuda_logits_match_the_cpu(trained_cpu) -> None:
    tokens = torch.tensor([PATTERN * 3])
    cpu_logits = trained_cpu(tokens)
    gpu_logits = on_gpu(trained_cpu, torch.float32)(tokens.cuda()).cpu()
    torch.testing.assert_close(gpu_logits, cpu_logits, atol=2e-4, rtol=2e-4)
    cpu_tokens = trained_cpu.generate(tokens[:, :5], 20).sequences
    gpu_tokens = on_gpu(trained_cpu, torch.float32).generate(tokens[:, :5].cuda(), 20).sequences.cpu()
    assert torch.equal(gpu_tokens, cpu_tokens)


@pytest.mark.parametrize("decoding", ["standard", "alternating"])
def test_batched_decoder_on_cuda_equals_solo(trained_cpu, decoding) -> None:
    model = on_gpu(trained_cpu, torch.float32)
    requests = [(PATTERN[: 1 + i], 6 + 3 * i) for i in range(5)]
    results = run_staggered(BatchedDecoder(model, decoding, max_batch_size=3, capacity=48), requests, join_every=0)
    for i, (prompt, max_new) in enumerate(requests):
        solo = model.generate(torch.tensor([prompt], device="cuda"), max_new, decoding=decoding)
        assert results[i] == solo.new_tokens[0].tolist(), i


@pytest.mark.parametrize("quantize", ["int8", "int4", "w8a8"])
def test_quantized_model_on_cuda_decodes_losslessly_and_reloads(trained_cpu, tmp_path, quantize) -> None:
    save_pretrained(trained_cpu, tmp_path / "fp32")
    model = load_pretrained(tmp_path / "fp32", quantize=quantize, device="cuda")
    prompt = torch.tensor([PATTERN[:3]], device="cuda")
    standard = model.generate(prompt, 24)
    assert torch.equal(model.generate(prompt, 24, decoding="speculative").sequences, standard.sequences)
    save_pretrained(model, tmp_path / quantize)
    reloaded = load_pretrained(tmp_path / quantize, device="cuda")
    assert torch.equal(reloaded.generate(prompt, 24).sequences, standard.sequences)


def test_bf16_autocast_training_step_on_cuda_learns() -> None:
    torch.manual_seed(0)
    model = RecycleGPT(tiny_config()).cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sequence = torch.tensor(PATTERN * 8, device="cuda")
    batch = torch.stack([sequence.roll(-shift)[:48] for shift in range(len(PATTERN))])
    losses = []
    for _ in range(40):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = recycle_losses(model, batch, feature_weight=1.0).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0]
