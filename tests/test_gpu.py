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


@pytest.mark.parametrize("keys", [33, 700, 4096])
def test_entmax_bisect_triton_kernel_matches_cpu_path(monkeypatch, route_entmax_to_triton,
                                                      keys):
    """float32 on CUDA takes the fused Triton kernel; probabilities and both gradients
    agree with the float64 general path on CPU (per-row alpha 1-2.5 with softmax rows)."""
    pytest.importorskip("triton")
    calls = route_entmax_to_triton(("cuda",))  # opt-in by default
    gen = torch.Generator().manual_seed(keys)
    scores = torch.randn(64, keys, generator=gen) * 3
    mask = torch.rand(64, keys, generator=gen) > 0.2
    mask[:, 0] = True
    alpha = 1.0 + 1.5 * torch.rand(64, 1, generator=gen)
    alpha[:4] = 1.0
    weights = torch.randn(64, keys, generator=gen)

    def run(device, dtype):
        z = scores.to(device, dtype).clone().requires_grad_(True)
        a = alpha.to(device, dtype).clone().requires_grad_(True)
        probs = sa.entmax_bisect(z, a, mask=mask.to(device))
        (probs * weights.to(device, dtype)).sum().backward()
        return probs.detach().double().cpu(), z.grad.double().cpu(), a.grad.double().cpu()

    probs, grad_z, grad_alpha = run("cuda", torch.float32)
    assert len(calls) == 1, "the Triton path was not taken"
    expected, expected_z, expected_alpha = run("cpu", torch.float64)
    assert (probs[~mask] == 0).all() and (grad_z[~mask] == 0).all()
    assert torch.allclose(probs, expected, atol=1e-5, rtol=0)
    assert torch.allclose(grad_z, expected_z, atol=1e-4 * expected_z.abs().max().item(), rtol=0)
    assert torch.allclose(grad_alpha, expected_alpha, rtol=1e-3,
                          atol=1e-3 * expected_alpha.abs().max().item())
    # A scalar alpha, and the general path when the kernel is switched off.
    for value in (1.3, 1.7):
        found = sa.entmax_bisect(scores.cuda(), value, mask=mask.cuda()).double().cpu()
        assert torch.allclose(found, sa.entmax_bisect(scores.double(), value, mask=mask),
                              atol=1e-5, rtol=0)
    assert len(calls) == 3
    monkeypatch.setenv("STRUCTATTN_TRITON", "0")
    sa.entmax_bisect(scores.cuda(), 1.3)
    assert len(calls) == 3


class _Pair:
    def __init__(self, source, target):
        self.source, self.target = tuple(source), tuple(target)


#: the Bible task's emission: a word translation table, trained over the batch's words
WORD_EMISSION = {"lexical_emission": True, "contextual_emission": False,
                 "stateful_emission": False, "batch_vocabulary": True}


@pytest.mark.parametrize("emission", [{}, WORD_EMISSION], ids=["contextual", "word"])
@pytest.mark.parametrize("mode", MODES)
def test_seq2seq_trains_on_cuda_under_bf16_autocast(mode, emission):
    examples = [_Pair("abc", "xyz"), _Pair("ba", "yx"), _Pair("cab", "zxy"), _Pair("a", "x")]
    source_vocab = Vocab.build([e.source for e in examples])
    target_vocab = Vocab.build([e.target for e in examples])
    batch = collate_seq2seq(examples, source_vocab, target_vocab).to("cuda")
    torch.manual_seed(0)
    model = Seq2Seq(len(source_vocab), len(target_vocab), mode=mode, embed_dim=8,
                    hidden=16, **emission).cuda()
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
