"""GPU paths of the multi-head layer and the Transformer seq2seq: CPU answers on CUDA, and
bf16 autocast training.  Skipped where no CUDA device exists."""

import pytest
import torch

from structattn.data.batching import Seq2SeqBatch
from structattn.models.transformer import TRANSFORMER_MODES, TransformerSeq2Seq
from structattn.nn.multihead import MultiheadAttention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("normalizer", ["softmax", "sparsemax", "entmax15", "entmax-heads"])
@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_agrees_between_cpu_and_cuda(normalizer, need_weights):
    torch.manual_seed(0)
    layer = MultiheadAttention(16, 4, batch_first=True, normalizer=normalizer).double()
    x = torch.randn(3, 7, 16, dtype=torch.double)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[0, -3:] = True
    expected, _ = layer(x, x, x, key_padding_mask=padding, need_weights=need_weights)
    found, _ = layer.cuda()(x.cuda(), x.cuda(), x.cuda(), key_padding_mask=padding.cuda(),
                            need_weights=need_weights)
    assert torch.allclose(found.cpu(), expected, atol=1e-8)


@pytest.mark.parametrize("mode", sorted(TRANSFORMER_MODES))
def test_transformer_trains_on_cuda_under_bf16_autocast(mode):
    torch.manual_seed(0)
    source = torch.randint(3, 9, (4, 5), device="cuda")
    source_mask = torch.ones(4, 5, dtype=torch.bool, device="cuda")
    source_mask[0, -2:] = False
    target = torch.cat([torch.ones(4, 1, dtype=torch.long, device="cuda"), source,
                        torch.full((4, 1), 2, device="cuda")], 1)
    target_mask = torch.cat([torch.ones(4, 1, dtype=torch.bool, device="cuda"), source_mask,
                             torch.ones(4, 1, dtype=torch.bool, device="cuda")], 1)
    batch = Seq2SeqBatch(source, source_mask, target, target_mask, torch.arange(4))
    model = TransformerSeq2Seq(9, 9, mode=mode, d_model=32, num_heads=2).cuda()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        outputs = model.beam_search(source, source_mask, beam_size=2, max_length=6)
    assert len(outputs) == 4
