"""The full model's log-probabilities of a sequence: whole, piece by piece, and against a plain forward."""

from __future__ import annotations

import torch

from recyclegpt.core import RecycleConfig, RecycleGPT
from recyclegpt.core.logprobs import FullModelScorer, sequence_logprobs


def _model() -> RecycleGPT:
    torch.manual_seed(0)
    return RecycleGPT(RecycleConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, max_seq_len=64)).eval()


def test_sequence_logprobs_equal_a_plain_forward():
    model = _model()
    ids = torch.randint(0, 97, (20,)).tolist()
    scored = sequence_logprobs(model, ids, top=3)
    with torch.no_grad():
        reference = model(torch.tensor([ids]))[0].float().log_softmax(-1)
    assert scored[0].logprob is None and scored[0].token == ids[0]
    for t in range(1, len(ids)):
        assert abs(scored[t].logprob - float(reference[t - 1, ids[t]])) < 1e-5
        best = reference[t - 1].topk(3)
        assert [i for i, _ in scored[t].top] == best.indices.tolist()
        assert max(v for _, v in scored[t].top) >= scored[t].logprob


def test_scoring_in_pieces_equals_scoring_at_once():
    model = _model()
    ids = torch.randint(0, 97, (17,)).tolist()
    whole = sequence_logprobs(model, ids, top=2)
    scorer = FullModelScorer(model, capacity=32, top=2)
    pieces = scorer.score(ids[:5]) + scorer.score(ids[5:6]) + scorer.score(ids[6:])
    assert [p.token for p in pieces] == ids and scorer.length == len(ids)
    assert pieces[0].logprob is None
    for a, b in zip(whole[1:], pieces[1:], strict=True):
        assert abs(a.logprob - b.logprob) < 1e-5
        assert [i for i, _ in a.top] == [i for i, _ in b.top]
