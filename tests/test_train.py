"""Trainer: exact resume, the training loop, bad arguments, DDP on gloo.

Checkpoint files, settings, the run-directory lock and disk faults: test_checkpoint_faults.py.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from structattn.app.training import CHECKPOINT_NAME, Trainer, read_checkpoint

torch.set_num_threads(1)

NUM_EXAMPLES, BATCH = 40, 8
FEATURES = torch.randn(NUM_EXAMPLES, 4, generator=torch.Generator().manual_seed(0))
TARGETS = FEATURES @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1


class TinyRegressor(nn.Module):
    """A linear model whose loss draws from every random stream the trainer restores."""

    def __init__(self, seed: int = 0, dropout: float = 0.2) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.linear = nn.Linear(4, 1)
        self.dropout = nn.Dropout(dropout)

    def loss(self, batch):
        inputs, targets = batch
        jitter = 1.0 + 0.01 * random.random() + 0.01 * float(np.random.rand())  # noqa: NPY002
        predictions = self.linear(self.dropout(inputs)).squeeze(-1) * jitter
        error = predictions - targets
        return {"loss": error.pow(2).mean(), "mae": error.abs().mean().detach()}


def epoch_batches(epoch: int):
    order = torch.randperm(NUM_EXAMPLES, generator=torch.Generator().manual_seed(100 + epoch))
    return [
        (FEATURES[order[i : i + BATCH]], TARGETS[order[i : i + BATCH]])
        for i in range(0, NUM_EXAMPLES, BATCH)
    ]


def make_trainer(model: nn.Module, **kwargs) -> Trainer:
    kwargs.setdefault("max_steps", 23)
    kwargs.setdefault("log_every", 1)
    kwargs.setdefault("train_batches", epoch_batches)
    return Trainer(
        model,
        lambda params: torch.optim.Adam(params, lr=0.05),
        scheduler=lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, 4, 0.9),
        grad_clip=5.0,
        seed=3,
        progress=False,
        **kwargs,
    )


def parameters_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


class Crash(Exception):
    pass


def crash_at(step: int):
    def log(record):
        if record["kind"] == "train" and record["step"] == step:
            raise Crash

    return log


def epoch_batch_generator(epoch: int):
    yield from epoch_batches(epoch)


@pytest.mark.parametrize(
    "batches", [epoch_batches, epoch_batch_generator], ids=["sequence", "generator"]
)
def test_resume_after_crash_gives_bitwise_identical_parameters(tmp_path, batches):
    reference = TinyRegressor()
    make_trainer(reference, train_batches=batches).fit()

    with pytest.raises(Crash):
        make_trainer(
            TinyRegressor(),
            train_batches=batches,
            checkpoint_dir=tmp_path,
            checkpoint_every=7,
            log_fn=crash_at(9),
        ).fit()
    saved = read_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert (saved["step"], saved["epoch"], saved["batch_in_epoch"]) == (7, 1, 2)

    resumed = TinyRegressor(seed=99)  # a different start: everything must come from the file
    summary = make_trainer(
        resumed, train_batches=batches, checkpoint_dir=tmp_path, resume=True
    ).fit()

    assert summary.step == 23
    expected, got = parameters_of(reference), parameters_of(resumed)
    assert all(torch.equal(expected[name], got[name]) for name in expected)


@pytest.mark.parametrize("split", [1, 4, 5, 10, 22], ids=lambda step: f"step{step}")
def test_resume_from_any_split_point_is_bitwise_exact_through_a_file_round_trip(tmp_path, split):
    reference = TinyRegressor()
    make_trainer(reference).fit()
    # Checkpoint exactly at `split` (5 batches per epoch: 5 and 10 end an epoch), then a
    # fresh process-like start from a different initialisation.
    make_trainer(TinyRegressor(), max_steps=split, checkpoint_dir=tmp_path).fit()
    resumed = TinyRegressor(seed=7)
    make_trainer(resumed, checkpoint_dir=tmp_path, resume=True).fit()
    expected, got = parameters_of(reference), parameters_of(resumed)
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_same_seed_gives_identical_runs():
    first, second = TinyRegressor(), TinyRegressor()
    make_trainer(first, max_steps=6).fit()
    make_trainer(second, max_steps=6).fit()
    assert torch.equal(first.linear.weight, second.linear.weight)


def test_epochs_stop_training_and_count_every_batch():
    summary = make_trainer(TinyRegressor(), max_steps=None, epochs=2).fit()
    assert (summary.step, summary.epoch) == (2 * NUM_EXAMPLES // BATCH, 2)


def test_log_and_eval_records_reach_the_callback():
    records = []
    trainer = make_trainer(
        TinyRegressor(),
        max_steps=4,
        log_fn=records.append,
        eval_every=2,
        eval_fn=lambda model: {"weight_norm": model.linear.weight.norm()},
    )
    trainer.fit()
    kinds = [(r["kind"], r["step"]) for r in records]
    assert kinds == [
        ("train", 1),
        ("train", 2),
        ("eval", 2),
        ("train", 3),
        ("train", 4),
        ("eval", 4),
    ]
    assert {"loss", "mae", "lr", "grad_norm"} <= set(records[0])
    assert isinstance(records[2]["weight_norm"], float)


def test_resume_true_without_checkpoint_starts_fresh(tmp_path):
    summary = make_trainer(TinyRegressor(), max_steps=3, checkpoint_dir=tmp_path, resume=True).fit()
    assert summary.step == 3
    assert read_checkpoint(tmp_path / CHECKPOINT_NAME)["step"] == 3


def test_missing_resume_file_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_trainer(TinyRegressor(), resume=tmp_path / "nope.pt").fit()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_steps": 0}, "max_steps"),
        ({"max_steps": None, "epochs": None}, "max_steps or epochs"),
        ({"device": "tpu"}, "device"),
        ({"amp": True}, "amp"),
        ({"checkpoint_every": 5}, "checkpoint_dir"),
        ({"log_every": -1}, "log_every"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_trainer(TinyRegressor(), **kwargs)


def test_loss_must_be_a_differentiable_scalar():
    class NoGrad(TinyRegressor):
        def loss(self, batch):
            return torch.zeros(())

    with pytest.raises(ValueError, match="loss does not require grad"):
        make_trainer(NoGrad(), max_steps=1).fit()


DDP_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from torch import nn
    from structattn.app.training import Trainer

    torch.set_num_threads(1)
    out = sys.argv[1]
    features = torch.randn(40, 4, generator=torch.Generator().manual_seed(0))
    targets = features @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1

    class Linear(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.linear = nn.Linear(4, 1)

        def loss(self, batch):
            inputs, goal = batch
            return (self.linear(inputs).squeeze(-1) - goal).pow(2).mean()

    def batches(epoch):
        order = torch.randperm(40, generator=torch.Generator().manual_seed(100 + epoch))
        return [(features[order[i:i + 4]], targets[order[i:i + 4]]) for i in range(0, 40, 4)]

    model = Linear()
    trainer = Trainer(model, lambda p: torch.optim.SGD(p, lr=0.05), batches, epochs=3,
                      checkpoint_dir=out, progress=False)
    summary = trainer.fit()
    torch.save({"weight": model.linear.weight.detach(), "bias": model.linear.bias.detach(),
                "step": summary.step}, f"{out}/rank{trainer.rank}.pt")
    """
)


def test_torchrun_with_two_cpu_processes_matches_one_process_on_joined_batches(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["step"] == ranks[1]["step"] == 3 * 10 // 2
    assert torch.equal(ranks[0]["weight"], ranks[1]["weight"])
    assert read_checkpoint(tmp_path / CHECKPOINT_NAME)["world_size"] == 2

    # One process on the concatenation of each pair of batches takes the same steps, since
    # DDP averages the two processes' gradients of equally sized mean losses.
    def joined(epoch):
        order = torch.randperm(40, generator=torch.Generator().manual_seed(100 + epoch))
        return [(FEATURES[order[i : i + 8]], TARGETS[order[i : i + 8]]) for i in range(0, 40, 8)]

    single = TinyRegressor(dropout=0.0)
    torch.manual_seed(0)
    single.linear = nn.Linear(4, 1)

    def plain_loss(model, batch):
        inputs, goal = batch
        return (model.linear(inputs).squeeze(-1) - goal).pow(2).mean()

    Trainer(
        single,
        lambda p: torch.optim.SGD(p, lr=0.05),
        joined,
        epochs=3,
        loss_fn=plain_loss,
        progress=False,
    ).fit()
    torch.testing.assert_close(single.linear.weight.detach(), ranks[0]["weight"])
    torch.testing.assert_close(single.linear.bias.detach(), ranks[0]["bias"])
