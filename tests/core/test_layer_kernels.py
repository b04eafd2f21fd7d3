"""Decoder layers in one C++ call (layer_kernels.cpp): the same bits as their kernels one by one,
for fp32, w8a8 and w4a8 linears, used wherever a step can be one call and nowhere else."""

from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch

from recyclegpt.core import RecycleGPT, float_kernels, quant_kernels
from recyclegpt.core.batching import BatchedDecoder
from recyclegpt.core.cpu_kernels import MAX_STEP_TOKENS, PROMPT_STEP_TOKENS, build
from recyclegpt.core.fastpath import prepare_for_decoding, use_step_kernels
from recyclegpt.core.step_kernels import WHOLE_LAYERS_SWITCH

from .conftest import tiny_config

DECODERS = ("standard", "alternating", "speculative")


@pytest.fixture(scope="module", autouse=True)
def kernels_built() -> None:
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler: the kernels cannot be built here (layers run eagerly)")
    assert build() is not None


def needs(quantize: str | None) -> None:
    if quantize is None and not float_kernels.available():
        pytest.skip("this CPU lacks AVX2 and FMA: fp32 linears run F.linear, not the one-call layers")
    if quantize is not None and not quant_kernels.dynamic_available():
        pytest.skip("this CPU runs no int8-activation kernel (AVX2 or AVX-512 VNNI)")


def counted_calls(monkeypatch, stack_calls: list | None = None) -> list[tuple[int, int]]:
    """(tokens, layers) of every decode_layers_step and decode_stack_step call from now on (the latter
    also into ``stack_calls``)."""
    kernels, calls = build(), []
    layers_step, stack_step = kernels.decode_layers_step, kernels.decode_stack_step

    def counted_layers(x, tensors, ints, eps, *rest):  # noqa: ANN001, ANN002, ANN202
        calls.append((x.shape[1], len(eps) // 2))
        return layers_step(x, tensors, ints, eps, *rest)

    def counted_stack(ids, embed, prev, input_linear, input_ints, tensors, ints, eps, *rest):  # noqa: ANN001, ANN002, ANN202
        calls.append((ids.shape[1], len(eps) // 2))
        if stack_calls is not None:
            stack_calls.append((ids.shape[1], len(eps) // 2))
        return stack_step(ids, embed, prev, input_linear, input_ints, tensors, ints, eps, *rest)

    monkeypatch.setattr(kernels, "decode_layers_step", counted_layers)
    monkeypatch.setattr(kernels, "decode_stack_step", counted_stack)
    return calls


def prepared_pair(quantize: str | None, dtype: torch.dtype = torch.float32, **config):
    """The same prepared model twice: layers as one call, and kernel by kernel."""
    torch.manual_seed(0)
    plain = RecycleGPT(tiny_config(num_layers=3, **config)).eval()
    whole = prepare_for_decoding(copy.deepcopy(plain), quantize=quantize).to(dtype)
    one_by_one = prepare_for_decoding(copy.deepcopy(plain), quantize=quantize)
    use_step_kernels(one_by_one, whole_layers=False)
    return whole, one_by_one.to(dtype)


@pytest.mark.parametrize(
    "quantize, dtype",
    [
        (None, torch.float32),
        ("w8a8", torch.float32),
        ("w4a8", torch.float32),
        ("w8a8", torch.bfloat16),
        ("w4a8", torch.bfloat16),
    ],
)
def test_layers_in_one_call_give_the_bits_of_their_kernels_one_by_one(monkeypatch, prompts, quantize, dtype) -> None:
    needs(quantize)
    whole, one_by_one = prepared_pair(quantize, dtype, hidden_size=64, num_heads=4)
    stack_calls: list[tuple[int, int]] = []
    calls = counted_calls(monkeypatch, stack_calls)
    for decoding, policy in [*((name, "adaptive") for name in DECODERS), ("speculative", "tree")]:
        for prompt in prompts:
            ours, theirs = (m.generate(prompt, 7, decoding=decoding, draft_policy=policy) for m in (whole, one_by_one))
            assert torch.equal(ours.sequences, theirs.sequences), (decoding, policy, prompt.shape)
    assert (1, 3) in calls and (1, 1) in calls  # one-token steps of the base's 3 layers and the module's 1
    assert all(layers in (1, 3) for _, layers in calls) and max(tokens for tokens, _ in calls) > 1
    assert (1, 3) in stack_calls and (2, 1) in stack_calls  # whole steps: the base's, the module's catch-up
    calls.clear()
    one_by_one.generate(prompts[2], 4)
    assert calls == []
    assert_same_states(whole, one_by_one, prompts)


def assert_same_states(model: RecycleGPT, reference: RecycleGPT, prompts: list[torch.Tensor]) -> None:
    """The base's and the module's states and caches, step by step, are the reference's to the bit."""
    caches = [(m.new_cache("base", 1, 40), m.new_cache("module", 1, 40)) for m in (model, reference)]
    with torch.inference_mode():
        for ids in (prompts[2], prompts[1], prompts[0]):
            states = []
            for m, (base_cache, module_cache) in zip((model, reference), caches, strict=True):
                hidden = m.base_hidden(ids, cache=base_cache)
                states.append((hidden, m.module_hidden(hidden, ids, cache=module_cache)))
            assert torch.equal(states[0][0], states[1][0]) and torch.equal(states[0][1], states[1][1])
    for ours, theirs in zip(caches[0], caches[1], strict=True):
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)


def test_padded_rows_decode_in_one_call_as_they_would_alone(monkeypatch, prompts) -> None:
    needs(None)
    whole, one_by_one = prepared_pair(None)
    long, short = prompts[2][0], prompts[1][0]
    batch = torch.stack((long, torch.cat((torch.zeros(len(long) - len(short), dtype=torch.long), short))))
    mask = (torch.arange(len(long)) >= len(long) - len(short)).long().expand(2, -1).clone()
    mask[0] = 1
    calls = counted_calls(monkeypatch)
    together = whole.generate(batch, 6, attention_mask=mask, output_hidden_states=True)
    assert calls  # the padded batch's steps ran as one call, with the padding mask
    reference = one_by_one.generate(batch, 6, attention_mask=mask, output_hidden_states=True)
    assert torch.equal(together.hidden_states, reference.hidden_states)
    assert torch.equal(together.new_tokens[0], whole.generate(prompts[2], 6).new_tokens[0])
    assert torch.equal(together.new_tokens[1], whole.generate(prompts[1], 6).new_tokens[0])


@pytest.mark.parametrize("quantize", [None, "w8a8"])
def test_a_short_prompt_runs_as_steps_with_the_bits_of_one_token_steps(monkeypatch, quantize) -> None:
    needs(quantize)
    torch.manual_seed(0)
    model = prepare_for_decoding(RecycleGPT(tiny_config(num_layers=3, hidden_size=64)).eval(), quantize=quantize)
    prompt = torch.randint(0, 97, (1, 2 * MAX_STEP_TOKENS + 5))
    calls = counted_calls(monkeypatch)
    with torch.inference_mode():
        cache = model.new_cache("base", 1, 64)
        hidden = model.base_hidden(prompt, cache=cache)
        assert [tokens for tokens, _ in calls] == [MAX_STEP_TOKENS, MAX_STEP_TOKENS, 5]
        step_cache = model.new_cache("base", 1, 64)
        steps = torch.cat(
            [model.base_hidden(prompt[:, i : i + 1], cache=step_cache) for i in range(prompt.shape[1])], 1
        )
    assert torch.equal(hidden, steps)
    assert torch.equal(cache.keys, step_cache.keys) and torch.equal(cache.values, step_cache.values)


def test_a_padded_batch_of_short_prompts_decodes_as_each_prompt_alone(monkeypatch) -> None:
    needs(None)
    torch.manual_seed(0)
    model = prepare_for_decoding(RecycleGPT(tiny_config(num_layers=3)).eval())
    long, short = torch.randint(0, 97, (40,)), torch.randint(0, 97, (23,))
    batch = torch.stack((long, torch.cat((torch.zeros(len(long) - len(short), dtype=torch.long), short))))
    mask = torch.ones_like(batch)
    mask[1, : len(long) - len(short)] = 0
    calls = counted_calls(monkeypatch)
    together = model.generate(batch, 6, attention_mask=mask)
    assert (MAX_STEP_TOKENS, 3) in calls  # the prompts ran as steps, with the padding mask
    for row, prompt in enumerate((long, short)):
        assert torch.equal(together.new_tokens[row], model.generate(prompt.view(1, -1), 6).new_tokens[0])


def test_a_step_that_cannot_be_one_call_runs_layer_by_layer(monkeypatch, prompts) -> None:
    needs(None)
    calls = counted_calls(monkeypatch)
    torch.manual_seed(0)
    plain = RecycleGPT(tiny_config(num_layers=3)).eval()
    prepare_for_decoding(copy.deepcopy(plain), quantize="int8").generate(prompts[2], 4)  # weight-only int8
    prepare_for_decoding(RecycleGPT(tiny_config(attention_bias=True)).eval()).generate(prompts[2], 4)  # biased q/k/v
    assert calls == []
    featured = prepare_for_decoding(RecycleGPT(tiny_config(num_layers=3, feature_layers=[1])).eval())
    featured.generate(prompts[1], 4, decoding="speculative", draft_length=2)
    assert (1, 1) in calls and (1, 3) not in calls  # the base keeps layer 1's output: a call a layer


def test_reloaded_quantized_weights_are_what_the_next_call_reads(monkeypatch, prompts) -> None:
    needs("w8a8")
    torch.manual_seed(0)
    model = prepare_for_decoding(RecycleGPT(tiny_config(num_layers=3)).eval(), quantize="w8a8")
    model.generate(prompts[2], 4)  # the one-call layers have read the kernels' packed weights
    torch.manual_seed(1)
    other = prepare_for_decoding(RecycleGPT(tiny_config(num_layers=3)).eval(), quantize="w8a8")
    model.load_state_dict(other.state_dict())
    assert_same_states(model, other, prompts)


def test_the_environment_switch_turns_one_call_layers_off(monkeypatch, prompts) -> None:
    needs(None)
    monkeypatch.setenv(WHOLE_LAYERS_SWITCH, "0")
    calls = counted_calls(monkeypatch)
    torch.manual_seed(0)
    prepare_for_decoding(RecycleGPT(tiny_config()).eval()).generate(prompts[2], 4)
    assert calls == []


def test_only_decode_steps_look_the_layers_up(prompts) -> None:
    needs("w8a8")
    torch.manual_seed(0)
    model = prepare_for_decoding(RecycleGPT(tiny_config(num_layers=3)).eval(), quantize="w8a8")
    long_prompt = torch.randint(0, 97, (1, PROMPT_STEP_TOKENS + 4))
    model.base_hidden(long_prompt)  # no cache, grad enabled: not a decode step
    with torch.inference_mode():
        model.base_hidden(long_prompt, cache=model.new_cache("base", 1, 64))  # a long prompt: compute
    assert model.model.layers_step._whole is None  # nothing looked up, nothing packed for the kernels
    model.generate(prompts[2], 3)
    assert model.model.layers_step.whole() is not None


def test_a_deep_copy_runs_one_call_over_its_own_weights(prompts) -> None:
    needs(None)
    torch.manual_seed(0)
    model = prepare_for_decoding(RecycleGPT(tiny_config(num_layers=3)).eval())
    model.generate(prompts[2], 3)  # its stacks have looked their layers up
    twin = copy.deepcopy(model)
    for copied, original in ((twin, model), (model, twin)):
        tensors = copied.model.layers_step.whole().tensors
        assert tensors[2] is copied.model.layers[0].self_attn.qkv_proj.weight
        assert tensors[2] is not original.model.layers[0].self_attn.qkv_proj.weight


def test_bf16_steps_over_fp32_kernel_linears_run_layer_by_layer(monkeypatch, prompts) -> None:
    needs(None)
    whole, one_by_one = prepared_pair(None, torch.bfloat16)
    calls = counted_calls(monkeypatch)
    for decoding in DECODERS:
        ours, theirs = (m.generate(prompts[2], 5, decoding=decoding) for m in (whole, one_by_one))
        assert torch.equal(ours.sequences, theirs.sequences), decoding
    assert calls == []  # the fp32 matmul takes fp32 only: bf16 layers call their kernels one by one


@pytest.mark.parametrize("quantize", [None, "w8a8", "w4a8"])
def test_a_heads_pick_in_one_call_gives_the_logits_and_tokens_of_the_head(quantize) -> None:
    needs(quantize)
    torch.manual_seed(0)
    model = prepare_for_decoding(RecycleGPT(tiny_config(num_layers=2, hidden_size=64)).eval(), quantize=quantize)
    drafting = copy.deepcopy(model)
    drafting.set_draft_vocab(torch.arange(0, 97, 3))
    states = torch.randn(5, 64)
    states[3] = states[1]  # equal rows, equal picks
    with torch.inference_mode():
        for m in (model, drafting):
            picked = m.head_pick(m._draft_head(), states)
            assert picked is not None
            logits, tokens = picked
            assert torch.equal(logits, m.draft_head_logits(states)) and torch.equal(tokens, logits.max(-1).indices)
            token, probability = m.greedy_draft(states)
            m.head_pick, pick = None, m.head_pick
            assert torch.equal(token, m.greedy_draft(states)[0]) and torch.equal(probability, m.greedy_draft(states)[1])
            m.head_pick = pick
        assert set(drafting.greedy_draft_token(states).tolist()) <= set(range(0, 97, 3))
        assert torch.equal(model.greedy_base_token(states), model.base_logits(states).max(-1).indices)


def test_the_pick_takes_the_first_of_equal_maxima_and_a_nan_first() -> None:
    needs(None)
    kernels = build()
    weight = torch.zeros(6, 32)
    weight[2, 0] = weight[4, 0] = 1.0  # channels 2 and 4 tie for the largest logit
    x = torch.zeros(3, 32)
    x[0, 0] = 1.0
    x[1, 0] = float("nan")  # every logit NaN: the first
    x[2, 0] = -1.0  # 2 and 4 tie for the smallest, the other four for the largest
    logits, tokens = kernels.head_argmax(x, [weight], [0, 0, 0])
    torch.testing.assert_close(logits, kernels.float_matmul(x, weight), rtol=0, atol=0, equal_nan=True)
    assert tokens.tolist() == [2, 0, 0] == logits.max(-1).indices.tolist()
    weight[5, 1] = float("inf")  # logit 5 is inf * 0: a NaN after the larger finite logits 2 and 4
    logits, tokens = kernels.head_argmax(x[:1], [weight], [0, 0, 0])
    assert logits[0, 5].isnan() and tokens.tolist() == [5] == logits.max(-1).indices.tolist()
    assert kernels.head_argmax(x[:1].unsqueeze(0), [weight], [0, 0, 0])[1].shape == (1, 1)


def test_padded_and_positioned_steps_are_whole_steps_with_the_bits_of_the_layers_path(monkeypatch, prompts) -> None:
    """Padded rows (per-row positions, a padding mask) and a continuous batch's steps run as whole
    steps, and give what the layer-by-layer path gives."""
    needs(None)
    whole, one_by_one = prepared_pair(None)
    stack_calls: list[tuple[int, int]] = []
    counted_calls(monkeypatch, stack_calls)
    batch = torch.randint(1, 97, (2, 5))
    mask = torch.ones_like(batch)
    mask[1, :2] = 0
    for decoding in ("standard", "alternating"):
        ours, theirs = (m.generate(batch, 6, decoding=decoding, attention_mask=mask) for m in (whole, one_by_one))
        assert torch.equal(ours.sequences, theirs.sequences), decoding
    assert (1, 3) in stack_calls and (2, 1) in stack_calls  # the base's and the module's padded steps
    stack_calls.clear()
    with torch.inference_mode():
        for m in (whole, one_by_one):
            cache = m.new_cache("base", 2, 16)
            cache.set_padding(mask)
            prompt = m.base_hidden(batch, cache=cache)  # a padded 5-token prompt: a whole step too
            padded = m.base_hidden(batch[:, :2], cache=cache)  # padding alone, no positions
            positioned = m.base_hidden(batch[:, :2], cache=m.new_cache("base", 2, 16), positions=torch.tensor([[3, 4], [0, 1]]))  # fmt: skip
            if m is whole:
                expected = (prompt, padded, positioned)
        assert all(torch.equal(a, b) for a, b in zip(expected, (prompt, padded, positioned), strict=True))
        assert stack_calls == [(5, 3), (2, 3), (2, 3)]
        stack_calls.clear()
        whole.base_hidden(batch[:, :1].int(), cache=whole.new_cache("base", 2, 16))  # int32 ids: the embedding's path
        whole.base_hidden(batch[:, :1], cache=whole.new_cache("base", 2, 16), positions=torch.zeros(2, 1).int())
        mismatched = whole.new_cache("base", 2, 16)
        mismatched.set_padding(mask)
        mismatched.key_valid = mismatched.key_valid[:1]  # padding of another batch: the layers' path says so
        assert whole.model.layers_step.whole_step(batch[:, :1], mismatched) is None
    assert stack_calls == []


@pytest.mark.parametrize("quantize, dtype", [(None, torch.float32), ("w8a8", torch.bfloat16)])
def test_a_continuous_batch_steps_in_whole_steps_with_the_bits_of_the_layers_path(
    monkeypatch, prompts, quantize, dtype
) -> None:
    needs(quantize)
    whole, one_by_one = prepared_pair(quantize, dtype)
    # Prompts a step long: a longer one prefills as steps in one model and eagerly in the other, and
    # eager matmuls sum in another order (the last bits of its keys differ; its tokens do not).
    prompts = [prompt for prompt in prompts if prompt.shape[1] <= MAX_STEP_TOKENS]
    stack_calls: list[tuple[int, int]] = []
    counted_calls(monkeypatch, stack_calls)
    outputs, caches = {}, {}
    for name, m in (("whole", whole), ("one_by_one", one_by_one)):
        for decoding in ("standard", "alternating"):
            decoder = BatchedDecoder(m, decoding, max_batch_size=len(prompts))
            tokens: dict[int, list[int]] = {}
            for key, prompt in enumerate(prompts):
                tokens[key] = decoder.add(key, prompt[0].tolist(), 5 + key).new_tokens
                for out in decoder.step():  # rows join between steps, at different lengths
                    tokens[out.key] += out.new_tokens
            while len(decoder):
                for out in decoder.step():
                    tokens[out.key] += out.new_tokens
            outputs[name, decoding] = tokens
            # Every layer's keys and values the steps wrote (the rows left them in place): their bits.
            stacks = [decoder.base] + ([decoder.module] if decoder.module is not None else [])
            caches[name, decoding] = [t.clone() for kv in stacks for t in (kv.storage.keys, kv.storage.values)]
        if name == "whole":
            assert (1, 3) in stack_calls and (2, 3) in stack_calls and (2, 1) in stack_calls
            stack_calls.clear()
    for decoding in ("standard", "alternating"):
        assert outputs["whole", decoding] == outputs["one_by_one", decoding], decoding
        ours, theirs = caches["whole", decoding], caches["one_by_one", decoding]
        assert len(ours) == (2 if decoding == "standard" else 4)
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True)), decoding
    assert outputs["whole", "standard"][0] == whole.generate(prompts[0], 5).new_tokens[0].tolist()


@pytest.mark.parametrize("quantize", [None, "w8a8"])
def test_a_refused_step_and_steps_of_other_shapes_leave_the_next_steps_bits_alone(prompts, quantize) -> None:
    """The one-call steps keep their intermediate rows in scratch memory the thread reuses: a step the
    kernel refuses (a token outside the table), and steps of other batch sizes and lengths between
    them (one wide enough to spread over several blocks, traded for one at the next step), do not
    change what a step gives."""
    needs(quantize)
    whole, _ = prepared_pair(quantize)
    kernels, step = build(), whole.model.layers_step
    ids = torch.randint(1, 97, (1, 3))

    def run(ids: torch.Tensor) -> torch.Tensor:
        cache = whole.new_cache("base", ids.shape[0], 32)
        with torch.inference_mode():
            whole.base_hidden(torch.ones(ids.shape[0], 4, dtype=torch.long), cache=cache)
            return whole.base_hidden(ids, cache=cache)

    expected = run(ids)
    cache = whole.new_cache("base", 1, 32)
    whole_layers = step.whole()
    with pytest.raises(RuntimeError, match="outside the table"):
        kernels.decode_stack_step(
            torch.tensor([[5, 10_000]]), step.embedding.weight, torch.empty(0), [], [], whole_layers.tensors,
            whole_layers.ints, whole_layers.eps, step.rotary.cos, step.rotary.sin, cache.keys, cache.values, 0,
            *step.heads, step.norm.weight, step.norm.eps, torch.empty(0), torch.empty(0),
        )  # fmt: skip
    assert cache.keys.abs().sum() == 0  # refused before any layer wrote its keys
    for shape in ((3, 7), (2, 1), (1, 16), (600, 16), (2, 3)):  # 600 x 16 rows outgrow a scratch block
        run(torch.randint(1, 97, shape))
    assert torch.equal(run(ids), expected)


def test_a_cast_or_replaced_weight_is_what_the_next_whole_step_reads(monkeypatch, prompts) -> None:
    """Whole steps keep their per-step-constant arguments between steps: casting the model, or
    replacing its embedding, makes them again (and a cast to bf16 over fp32-matmul linears declines)."""
    needs("w8a8")
    stack_calls: list[tuple[int, int]] = []
    counted_calls(monkeypatch, stack_calls)
    torch.manual_seed(0)
    model = prepare_for_decoding(RecycleGPT(tiny_config(num_layers=3)).eval(), quantize="w8a8")
    model.generate(prompts[2], 4)  # fp32 whole steps made their arguments
    model.to(torch.bfloat16)
    _, reference = prepared_pair("w8a8", torch.bfloat16)
    assert_same_states(model, reference, prompts)  # bf16 w8a8 whole steps, made again
    assert stack_calls and all(layers in (3, 1) for _, layers in stack_calls)
    model.model.embed_tokens.weight = torch.nn.Parameter(reference.model.embed_tokens.weight.detach().clone() * 2)
    reference.model.embed_tokens.weight = torch.nn.Parameter(reference.model.embed_tokens.weight.detach() * 2)
    assert_same_states(model, reference, prompts)  # the new embedding, not the one kept

    stack_calls.clear()
    fp32_kernels = prepare_for_decoding(RecycleGPT(tiny_config(num_layers=3)).eval())
    fp32_kernels.generate(prompts[2], 3)
    assert stack_calls
    stack_calls.clear()
    fp32_kernels.to(torch.bfloat16).generate(prompts[2], 3)
    assert stack_calls == []  # bf16 steps over the fp32 matmul's linears run layer by layer
