"""The training loop: one :class:`Trainer` for every structattn model.

The contract with a model is one method::

    class MyModel(nn.Module):
        def loss(self, batch) -> torch.Tensor | dict[str, torch.Tensor]:
            ...   # a scalar to minimise, or {"loss": scalar, **extras_to_log}

(or pass ``loss_fn(model, batch)``).  Batches come from ``train_batches(epoch)``, a callable
that returns the batches of one epoch in an order fixed by the epoch number alone (for example
:class:`structattn.data.batching.Seq2SeqBatches`), so a resumed run replays the same batches.

Determinism: on CPU, two runs with the same seed, data and thread count give bitwise equal
parameters, and a run resumed from any checkpoint ends bitwise equal to the uninterrupted run:
the checkpoint holds the parameters, optimizer and scheduler state, step, epoch, position in
the epoch and every random-number state, one set per process.

The other jobs live beside this file: checkpoint files (``checkpoint.py``), putting a
checkpoint's state back into the model, optimizer and scheduler (``restore.py``), the run
directory's lock (``rundir.py``), recorded settings (``settings.py``), random states
(``rng.py``) and data-parallel set-up (``distributed.py``).
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from structattn.app.training.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    CHECKPOINT_VERSION,
    read_checkpoint,
    to_checkpoint_data,
    write_checkpoint,
)
from structattn.app.training.distributed import Distributed
from structattn.app.training.errors import RunDirectoryError, RunExistsError
from structattn.app.training.restore import restore_objects
from structattn.app.training.rng import capture_rng_state, restore_rng_state, seed_everything
from structattn.app.training.rundir import RunDirectory
from structattn.app.training.settings import (
    check_same_settings,
    describe_differences,
    differing_settings,
    run_settings,
)

__all__ = ["TrainSummary", "Trainer"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]
LossFn = Callable[[nn.Module, Any], "torch.Tensor | Mapping[str, torch.Tensor]"]


@dataclass
class TrainSummary:
    """What :meth:`Trainer.fit` returns.

    Attributes:
        step: optimizer steps taken in total (across resumes).
        epoch: epochs completed.
        loss: mean training loss over the last logging window (``nan`` if no step ran).
        history: every record passed to the log callback by this process (rank 0 only).
    """

    step: int
    epoch: int
    loss: float
    history: list[dict[str, Any]] = field(default_factory=list)


class _LossAdapter(nn.Module):
    """Routes ``forward`` to the model's loss, so DistributedDataParallel sees the call."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Any:
        return self.loss_fn(self.model, batch)


def _model_loss(model: nn.Module, batch: Any) -> Any:
    return model.loss(batch)


class Trainer:
    """Trains one model: ``Trainer(model, optimizer, train_batches, max_steps=...).fit()``.

    Args:
        model: an ``nn.Module`` with ``loss(batch)`` (or give ``loss_fn``).
        optimizer: an optimizer factory ``params -> Optimizer`` (called after the model is
            moved to ``device``), or an optimizer already built on ``model.parameters()``.
        train_batches: ``epoch -> iterable of batches``; the order must depend only on the
            epoch (and a seed of its own), never on global random state.  Batches are moved
            to the device with ``.to(device)``, recursively through dicts, lists and tuples.
        max_steps: stop after this many optimizer steps in total.
        epochs: stop after this many epochs in total (at least one of the two is required).
        checkpoint_dir: the run directory, where ``checkpoint.pt`` is written; ``None``
            disables checkpoints.  While :meth:`fit` runs, the directory is locked against a
            second run, and on start temporary files left by a killed run are removed.
        checkpoint_every: also write a checkpoint every this many steps (one is always
            written at the end when ``checkpoint_dir`` is set).
        resume: ``True`` continues from ``checkpoint_dir/checkpoint.pt`` when it exists (and
            starts fresh otherwise); a path continues from that file, which must exist.
        overwrite: start afresh even though ``checkpoint_dir`` holds the checkpoint of an
            earlier run, which the new one replaces.  Without it (and without ``resume``),
            such a directory is refused with :class:`RunExistsError`: nothing is lost by
            running twice into one directory.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (under torchrun, CUDA uses
            ``cuda:$LOCAL_RANK``).
        amp: bf16 autocast; ``None`` turns it on exactly when training on CUDA.
        grad_clip: clip the global gradient norm to this value.
        seed: seeds torch, ``random`` and NumPy at the start of a fresh run (rank ``r`` uses
            ``seed + r``); model initialisation is the caller's business.
        scheduler: ``optimizer -> LR scheduler``, stepped after every optimizer step.
        loss_fn: ``(model, batch) -> loss``; default ``model.loss(batch)``.
        log_fn: called with a dict per log record (``kind`` ``"train"`` or ``"eval"``,
            ``step``, ``epoch``, metrics) on rank 0.
        log_every: steps per training log record.
        eval_fn: ``model -> dict of metrics``, run on rank 0 in eval mode without gradients
            every ``eval_every`` steps and at the end; it must not use collectives.
        eval_every: steps between evaluations (``None``: only at the end).
        progress: show tqdm bars for epochs and batches (rank 0 only).
        extra: plain data stored in every checkpoint under ``"extra"`` (for example the
            vocabularies' ``to_dict()``); NumPy values and paths are converted to plain
            Python, anything a weights-only load cannot read is refused here.
        config: the caller's settings that define the run (hyper-parameters, data size, ...;
            not the run length).  They are recorded with the trainer's own (model class,
            optimizer and its hyper-parameters, scheduler, grad_clip, seed) in every
            checkpoint, and resuming with any of them changed is refused.
        allow_config_change: resume even when the settings differ (a warning lists them).
        find_unused_parameters: passed to DistributedDataParallel, for models whose loss
            does not touch every parameter each step.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | OptimizerFactory,
        train_batches: Callable[[int], Iterable[Any]],
        *,
        max_steps: int | None = None,
        epochs: int | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
        resume: bool | str | os.PathLike = False,
        overwrite: bool = False,
        device: str | torch.device = "cpu",
        amp: bool | None = None,
        grad_clip: float | None = None,
        seed: int = 0,
        scheduler: SchedulerFactory | None = None,
        loss_fn: LossFn | None = None,
        log_fn: Callable[[dict[str, Any]], None] | None = None,
        log_every: int = 50,
        eval_fn: Callable[[nn.Module], Mapping[str, float]] | None = None,
        eval_every: int | None = None,
        progress: bool = True,
        extra: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
        allow_config_change: bool = False,
        find_unused_parameters: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if loss_fn is None and not callable(getattr(model, "loss", None)):
            raise ValueError("model must define loss(batch), or pass loss_fn=(model, batch)")
        if not callable(train_batches):
            raise ValueError("train_batches must be a callable epoch -> iterable of batches")
        if max_steps is None and epochs is None:
            raise ValueError("give max_steps or epochs (or both) so training can stop")
        _check_positive(max_steps, "max_steps")
        _check_positive(epochs, "epochs")
        _check_positive(checkpoint_every, "checkpoint_every")
        _check_positive(log_every, "log_every")
        _check_positive(eval_every, "eval_every")
        if grad_clip is not None and not (
            isinstance(grad_clip, (int, float)) and grad_clip > 0 and math.isfinite(grad_clip)
        ):
            raise ValueError(f"grad_clip must be a positive number or None, got {grad_clip!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if checkpoint_every is not None and checkpoint_dir is None:
            raise ValueError("checkpoint_every needs checkpoint_dir")
        if resume is True and checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir (or pass the checkpoint path)")
        if config is not None and not isinstance(config, Mapping):
            raise ValueError(f"config must be a mapping of settings, got {type(config).__name__}")
        if checkpoint_dir is not None and Path(checkpoint_dir).exists() and not Path(
            checkpoint_dir
        ).is_dir():
            raise RunDirectoryError(
                f"checkpoint_dir {checkpoint_dir} is a file; give a directory (new or existing)"
            )
        self.extra = to_checkpoint_data(dict(extra or {}), "extra")

        self.parallel = Distributed.setup(device)
        self.device = self.parallel.device
        if amp is None:
            amp = self.device.type == "cuda"
        if amp and self.device.type != "cuda":
            self.parallel.close()
            raise ValueError("amp (bf16 autocast) is only supported with a CUDA device")
        self.amp = bool(amp)

        self._model = model.to(self.device)
        self.optimizer = (
            optimizer if isinstance(optimizer, torch.optim.Optimizer)
            else optimizer(self._model.parameters())
        )
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise ValueError("optimizer must be an Optimizer or a factory that returns one")
        self.scheduler = scheduler(self.optimizer) if scheduler is not None else None
        # Recorded after the scheduler is built (it adds `initial_lr`, which is left out) and
        # before any step, so the learning rate is the configured one.
        self.settings = run_settings(
            self._model, self.optimizer, scheduler=self.scheduler, grad_clip=grad_clip,
            seed=seed, config=config,
        )
        adapter = _LossAdapter(self._model, loss_fn or _model_loss)
        self._network = self.parallel.wrap(adapter, find_unused_parameters)

        self.train_batches = train_batches
        self.max_steps, self.epochs = max_steps, epochs
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.checkpoint_every = checkpoint_every
        self.resume = resume
        self.overwrite = bool(overwrite)
        self.allow_config_change = bool(allow_config_change)
        self.grad_clip = grad_clip
        self.seed = seed
        self.log_fn = log_fn
        self.log_every = log_every
        self.eval_fn = eval_fn
        self.eval_every = eval_every
        self.progress = progress and self.rank == 0
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.history: list[dict[str, Any]] = []

    @property
    def model(self) -> nn.Module:
        """The user's model (never the DistributedDataParallel wrapper)."""
        return self._model

    @property
    def world_size(self) -> int:
        """Number of data-parallel processes."""
        return self.parallel.world_size

    @property
    def rank(self) -> int:
        """This process's rank."""
        return self.parallel.rank

    @property
    def local_rank(self) -> int:
        """This process's rank on its machine (its CUDA device index under torchrun)."""
        return int(os.environ.get("LOCAL_RANK", "0")) if self.world_size > 1 else 0

    @property
    def checkpoint_path(self) -> Path | None:
        """``checkpoint_dir / "checkpoint.pt"``, or ``None`` without a checkpoint directory."""
        return None if self.checkpoint_dir is None else self.checkpoint_dir / CHECKPOINT_NAME

    # ------------------------------------------------------------------ training loop

    def fit(self) -> TrainSummary:
        """Train until ``max_steps`` or ``epochs`` is reached; returns a :class:`TrainSummary`.

        Raises:
            RunLockedError: another live run holds ``checkpoint_dir``.
            RunDirectoryError: ``checkpoint_dir`` cannot be created or written.
            SettingsMismatchError: resuming with other settings (see ``config``).

        The run directory is released, and a process group this trainer created destroyed,
        when ``fit`` returns or raises.
        """
        run_directory = (
            RunDirectory(self.checkpoint_dir)
            if self.checkpoint_dir is not None and self.rank == 0 else None
        )
        try:
            if run_directory is not None:
                run_directory.acquire()
            return self._fit()
        finally:
            if run_directory is not None:
                run_directory.release()
            self.parallel.close()

    def _fit(self) -> TrainSummary:
        resume_from = self._resume_path()
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        else:
            seed_everything(self.seed + self.rank)
        self._model.train()
        window_loss = torch.zeros((), device=self.device)
        window_steps = 0
        last_loss = math.nan
        extras: dict[str, float] = {}
        epoch_bar = tqdm(
            total=self.epochs, initial=self.epoch, desc="epochs", unit="epoch",
            disable=not self.progress, dynamic_ncols=True,
        )
        try:
            while not self._done():
                batches = self.train_batches(self.epoch)
                batch_bar = tqdm(
                    total=self.parallel.group_count(batches), initial=self.batch_in_epoch,
                    desc=f"epoch {self.epoch}", unit="batch", leave=False,
                    disable=not self.progress, dynamic_ncols=True,
                )
                ran_any = self.batch_in_epoch > 0
                with batch_bar:
                    for batch in self.parallel.shard(batches, self.batch_in_epoch):
                        ran_any = True
                        loss, extras = self._train_step(batch)
                        self.step += 1
                        self.batch_in_epoch += 1
                        window_loss += loss
                        window_steps += 1
                        batch_bar.update(1)
                        if self.step % self.log_every == 0:
                            last_loss = self._log_train(window_loss / window_steps, extras)
                            batch_bar.set_postfix(loss=f"{last_loss:.4g}")
                            window_loss.zero_()
                            window_steps = 0
                        if self.eval_every and self.step % self.eval_every == 0:
                            self._evaluate()
                        if self.checkpoint_every and self.step % self.checkpoint_every == 0:
                            self.save_checkpoint()
                        if self.max_steps is not None and self.step >= self.max_steps:
                            break
                    else:
                        if not ran_any:
                            raise ValueError(
                                f"train_batches({self.epoch}) gave no batch"
                                + (f" for {self.world_size} processes" if self.world_size > 1
                                   else "")
                            )
                        self.epoch += 1
                        self.batch_in_epoch = 0
                        epoch_bar.update(1)
        finally:
            epoch_bar.close()
        if window_steps:
            last_loss = self._log_train(window_loss / window_steps, extras)
        if self.eval_fn is not None and not (
            self.eval_every and self.step % self.eval_every == 0 and self.step > 0
        ):
            self._evaluate()
        if self.checkpoint_dir is not None:
            self.save_checkpoint()
        return TrainSummary(self.step, self.epoch, last_loss, list(self.history))

    def _done(self) -> bool:
        if self.max_steps is not None and self.step >= self.max_steps:
            return True
        return self.epochs is not None and self.epoch >= self.epochs

    def _train_step(self, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        batch = _to_device(batch, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            output = self._network(batch)
        loss, extras = _split_loss(output)
        loss.backward()
        if self.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(self._model.parameters(), self.grad_clip)
            extras["grad_norm"] = norm.detach()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return loss.detach().float(), extras

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _log_train(self, mean_loss: torch.Tensor, extras: Mapping[str, Any]) -> float:
        value = float(self.parallel.mean(mean_loss))
        if not math.isfinite(value):
            raise RuntimeError(
                f"the training loss is {value} at step {self.step}; lower the learning rate, "
                "clip gradients (grad_clip) or check the model for invalid scores"
            )
        record = {"kind": "train", "step": self.step, "epoch": self.epoch, "loss": value,
                  "lr": float(self.optimizer.param_groups[0]["lr"])}
        record.update({name: _to_float(item) for name, item in extras.items()})
        self._emit(record)
        return value

    def _evaluate(self) -> None:
        if self.eval_fn is None:
            return
        if self.rank == 0:
            self._model.eval()
            try:
                with torch.no_grad(), self._autocast():
                    metrics = self.eval_fn(self._model)
            finally:
                self._model.train()
            record = {"kind": "eval", "step": self.step, "epoch": self.epoch}
            record.update({name: _to_float(item) for name, item in dict(metrics).items()})
            self._emit(record)
        self.parallel.barrier()

    def _emit(self, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        self.history.append(record)
        if self.log_fn is not None:
            self.log_fn(record)

    # ------------------------------------------------------------------ checkpoints

    def _resume_path(self) -> Path | None:
        """The checkpoint to continue from, or None for a fresh run (which an earlier run's
        checkpoint in the directory refuses, unless ``overwrite``)."""
        existing = self.checkpoint_path
        existing = existing if existing is not None and existing.exists() else None
        if self.resume is True:
            return existing
        if self.resume is False or self.resume is None:
            if existing is not None and not self.overwrite:
                raise RunExistsError(
                    f"run directory {self.checkpoint_dir} already holds the checkpoint of an "
                    "earlier run; resume it (--resume), replace it (--overwrite), or choose "
                    "another directory"
                )
            return None
        path = Path(self.resume)
        if not path.exists():
            raise FileNotFoundError(f"resume checkpoint {path} does not exist")
        return path

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint payload (this process's view; RNG states of all ranks gathered)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "model": self._model.state_dict(),
            "model_class": self.settings["model_class"],
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "seed": self.seed,
            "world_size": self.world_size,
            "rng": self.parallel.gather(capture_rng_state()),
            "settings": self.settings,
            "extra": self.extra,
        }

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path | None:
        """Write a checkpoint atomically (rank 0 writes; every rank must call it).

        Args:
            path: target file; default ``checkpoint_dir / "checkpoint.pt"``.

        Returns:
            The path written, or ``None`` on ranks other than 0.

        Raises:
            CheckpointWriteError: the write failed (the previous file is unchanged).
        """
        target = Path(path) if path is not None else self.checkpoint_path
        if target is None:
            raise ValueError("path is required when the trainer has no checkpoint_dir")
        payload = self.state_dict()
        written = None
        if self.rank == 0:
            write_checkpoint(payload, target)
            written = target
        self.parallel.barrier()
        return written

    def load_checkpoint(self, path: str | os.PathLike) -> dict[str, Any]:
        """Restore model, optimizer, scheduler, counters and random states from ``path``.

        Raises:
            SettingsMismatchError: the checkpoint's settings differ from this trainer's and
                ``allow_config_change`` is off.
            CheckpointError: (a ``ValueError``) the file is corrupt, truncated, altered, not a
                structattn checkpoint, or does not fit this model or optimizer.
        """
        state = read_checkpoint(path)
        if self.allow_config_change:
            differences = differing_settings(state["settings"], self.settings)
            if differences:
                warnings.warn(f"resuming {path} with changed settings "
                              f"({describe_differences(differences)})", stacklevel=2)
        else:
            check_same_settings(state["settings"], self.settings, path)
        restore_objects(state, path, self._model, self.optimizer, self.scheduler)
        self.step = state["step"]
        self.epoch = state["epoch"]
        self.batch_in_epoch = state["batch_in_epoch"]
        rngs = state["rng"]
        if len(rngs) == self.world_size:
            restore_rng_state(rngs[self.rank])
        else:
            warnings.warn(
                f"checkpoint {path} was written by {len(rngs)} processes and this run has "
                f"{self.world_size}; random streams are reseeded, so the run will not match an "
                "uninterrupted one exactly",
                stacklevel=2,
            )
            seed_everything(self.seed + 7919 * self.step + self.rank)
        return state


# ---------------------------------------------------------------------- helpers


def _check_positive(value: int | None, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor) or (
        hasattr(batch, "to") and callable(batch.to) and not isinstance(batch, type)
    ):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return type(batch)({key: _to_device(value, device) for key, value in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_to_device(value, device) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(value, device) for value in batch)
    return batch


def _split_loss(output: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    if isinstance(output, Mapping):
        if "loss" not in output:
            raise ValueError("the loss dict must have a 'loss' entry")
        extras = {key: value for key, value in output.items() if key != "loss"}
        loss = output["loss"]
    else:
        loss, extras = output, {}
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError("loss must be a scalar tensor (or a dict whose 'loss' is one)")
    if not loss.requires_grad:
        raise ValueError("loss does not require grad: it is not connected to the parameters")
    return loss.reshape(()), extras


def _to_float(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.detach())
    return value
