"""transformers' twin of the base: the same weights in ``LlamaForCausalLM``, decoded with ``generate``.

The benchmarks compare against it, and its logits are the reference the base must match.
"""

from __future__ import annotations

from typing import Any

import torch

from recyclegpt.core.model import RecycleGPT


def transformers_peer(model: RecycleGPT) -> Any:
    """A ``LlamaForCausalLM`` holding the base weights of ``model`` (every key but ``recycle.*``)."""
    from transformers import LlamaForCausalLM

    weight = model.lm_head.weight
    peer = LlamaForCausalLM(model.config.to_hf())
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("recycle.")}
    peer.load_state_dict(state, strict=True)
    return peer.to(device=weight.device, dtype=weight.dtype).eval()


@torch.inference_mode()
def peer_generate(peer: Any, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy ``generate`` with the KV cache, exactly ``max_new_tokens`` new tokens (EOS ignored)."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        use_cache=True,
        eos_token_id=None,
        pad_token_id=0,
    )
    prompt = prompt.to(peer.device)
    return peer.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
