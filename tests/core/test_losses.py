"""The training objective and the frozen-base regime."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from recyclegpt.core import RecycleGPT, recycle_losses


def test_losses_are_aligned_with_their_definition(tiny_model: RecycleGPT) -> None:
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    out = recycle_losses(tiny_model, ids, rec_weight=0.5, feature_weight=0.25)
    with torch.no_grad():
        hidden = tiny_model.base_hidden(ids)
        # Module at position t = 5 reads h[4] and x[5] over the prefix, predicts x[6].
        prev = torch.cat((torch.zeros_like(hidden[:, :1]), hidden[:, :5]), dim=1)
        state = tiny_model.module_hidden(prev, ids[:, :6])
        expected = tiny_model.lm_head(state[:, -1])
    assert torch.allclose(out.module_logits[:, 5], expected, atol=1e-5)
    assert torch.equal(out.targets, ids[:, 1:])
    lm = F.cross_entropy(tiny_model(ids)[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    assert torch.allclose(out.lm_loss, lm, atol=1e-5)
    assert torch.allclose(out.loss, out.lm_loss + 0.5 * out.rec_loss + 0.25 * out.feature_loss)
    assert out.feature_loss > 0


def test_frozen_base_trains_only_the_module(tiny_model: RecycleGPT) -> None:
    base_before = {k: v.clone() for k, v in tiny_model.state_dict().items() if not k.startswith("recycle.")}
    module_before = tiny_model.recycle.fc.weight.clone()
    tiny_model.freeze_base()
    trainable = [p for p in tiny_model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in tiny_model.recycle.parameters()}
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.randint(0, 97, (2, 16))
    for _ in range(3):
        loss = recycle_losses(tiny_model, ids, frozen_base=True).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for key, value in tiny_model.state_dict().items():
        if key in base_before:
            assert torch.equal(value, base_before[key]), key
    assert not torch.equal(tiny_model.recycle.fc.weight, module_before)


def test_distilled_rec_loss_targets_the_detached_base_distribution(tiny_model: RecycleGPT) -> None:
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    out = recycle_losses(tiny_model, ids, distill=True)
    teacher = out.base_logits.detach().float().softmax(-1)
    expected = -(teacher * out.module_logits.float().log_softmax(-1)).sum(-1).mean()
    assert torch.allclose(out.rec_loss, expected, atol=1e-5)
    assert torch.allclose(out.lm_loss, recycle_losses(tiny_model, ids).lm_loss)
    # The rec loss moves the module (and, through h[t-1], the base) but never pulls the base's
    # own logits towards the module: the teacher is detached.
    tiny_model.zero_grad()
    out.rec_loss.backward()
    assert tiny_model.recycle.fc.weight.grad is not None and tiny_model.recycle.fc.weight.grad.abs().sum() > 0
    assert tiny_model.model.norm.weight.grad is not None  # via h[t-1] into the module, as without distill
