"""GPU paths of every alignment distribution, of Pyro enumeration and of table QA: the same
answers on CUDA as on CPU.  Skipped where no CUDA device exists (CI and the CPU machines)."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceEnum_ELBO, config_enumerate

import structattn as sa
from tests.test_distribution_contract import SPECS
from tests.test_table_qa import generated_batch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("spec", SPECS, ids=[spec.name for spec in SPECS])
def test_every_distribution_gives_the_cpu_answers_on_cuda(spec):
    torch.manual_seed(0)
    params = spec.params((3,))
    on_cpu = spec.build(**params)
    on_cuda = spec.build(**{name: value.cuda() for name, value in params.items()})
    assert torch.allclose(on_cuda.attention.cpu(), on_cpu.attention, atol=1e-8)
    value = on_cpu.sample()
    assert torch.allclose(on_cuda.log_prob(value.cuda()).cpu(), on_cpu.log_prob(value),
                          atol=1e-8)
    drawn = on_cuda.sample((5,))
    assert drawn.device.type == "cuda"
    assert torch.isfinite(on_cuda.log_prob(drawn)).all()


def _ibm1_loss(device: str) -> float:
    """TraceEnum_ELBO of a small IBM-1 style model on ``device``."""
    pyro.clear_param_store()
    generator = torch.Generator().manual_seed(0)
    target = torch.randint(0, 6, (4, 5), generator=generator).to(device)
    logits = torch.randn(4, 5, 7, dtype=torch.float64, generator=generator).to(device)
    table = torch.randn(7, 6, dtype=torch.float64, generator=generator).log_softmax(-1)
    table = table.to(device)

    @config_enumerate
    def model():
        with pyro.plate("words", 5, dim=-1), pyro.plate("verses", 4, dim=-2):
            z = pyro.sample("z", sa.CategoricalAlignment(logits=logits))
            pyro.sample("y", dist.Categorical(logits=table[z]), obs=target)

    return TraceEnum_ELBO(max_plate_nesting=2).loss(model, lambda: None)


def test_pyro_enumeration_gives_the_cpu_elbo_on_cuda():
    assert abs(_ibm1_loss("cuda") - _ibm1_loss("cpu")) < 1e-8


@pytest.mark.parametrize("mode", ["soft", "enum", "hard-score", "sparse"])
def test_table_qa_trains_on_cuda_under_bf16_autocast(mode):
    torch.manual_seed(0)
    examples, vocab, batch = generated_batch()
    batch = batch.to("cuda")
    model = sa.models.TableQA(len(vocab), mode=mode).cuda()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    model.eval()
    predictions = model.predict(examples, batch)
    assert len(predictions) == len(examples)
