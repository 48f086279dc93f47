"""GPU paths: the same answers on CUDA as on CPU, and bf16 autocast training.

Skipped where no CUDA device exists (CI and the project's CPU machines).
"""

import pytest
import torch

import structattn as sa
from structattn.data.batching import collate_seq2seq
from structattn.data.vocab import Vocab
from structattn.models.seq2seq import MODES, Seq2Seq

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("fn", [sa.sparsemax, sa.entmax15, sa.entmax_bisect, sa.masked_softmax])
def test_simplex_maps_agree_between_cpu_and_cuda(fn):
    scores = torch.randn(64, 33, dtype=torch.float64)
    mask = torch.rand(64, 33) > 0.2
    mask[:, 0] = True
    expected = fn(scores, mask=mask)
    found = fn(scores.cuda(), mask=mask.cuda()).cpu()
    assert torch.allclose(found, expected, atol=1e-8)


@pytest.mark.parametrize("fn", [sa.sparsemax, sa.entmax15, sa.entmax_bisect])
def test_simplex_maps_accept_bf16_on_cuda(fn):
    scores = torch.randn(128, 40, device="cuda", dtype=torch.bfloat16)
    probs = fn(scores)
    assert probs.dtype == torch.bfloat16
    assert torch.isfinite(probs.float()).all()
    assert torch.allclose(probs.float().sum(-1), torch.ones(128, device="cuda"), atol=2e-2)


class _Pair:
    def __init__(self, source, target):
        self.source, self.target = tuple(source), tuple(target)


@pytest.mark.parametrize("mode", MODES)
def test_seq2seq_trains_on_cuda_under_bf16_autocast(mode):
    examples = [_Pair("abc", "xyz"), _Pair("ba", "yx"), _Pair("cab", "zxy"), _Pair("a", "x")]
    source_vocab = Vocab.build([e.source for e in examples])
    target_vocab = Vocab.build([e.target for e in examples])
    batch = collate_seq2seq(examples, source_vocab, target_vocab).to("cuda")
    torch.manual_seed(0)
    model = Seq2Seq(len(source_vocab), len(target_vocab), mode=mode, embed_dim=8,
                    hidden=16).cuda()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    with torch.no_grad():
        outputs = model.beam_search(batch.source, batch.source_mask, beam_size=2, max_length=4)
    assert len(outputs) == len(examples)
