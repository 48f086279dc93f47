"""One training loop for every structattn model: progress, atomic checkpoints, exact resume,
bf16 autocast on CUDA and data-parallel training under ``torchrun``.

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
the epoch and every random-number state (torch CPU and CUDA, Python ``random``, NumPy), one set
per process.

Distributed: launched as ``torchrun --nproc_per_node N script.py`` (``WORLD_SIZE > 1``), the
trainer initialises the process group (gloo on CPU, NCCL on CUDA; an already initialised group
is used as it is and left open), wraps the model in
``DistributedDataParallel``, gives rank ``r`` the batches ``r, r + N, r + 2N, ...`` of each epoch
(a step consumes N batches, one per process; a last incomplete group is dropped), and writes
checkpoints from rank 0 only.  The user's script does not change.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import pickle
import random
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_NAME",
    "TrainSummary",
    "Trainer",
    "read_checkpoint",
    "write_checkpoint",
]

CHECKPOINT_FORMAT = "structattn.checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]
LossFn = Callable[[nn.Module, Any], "torch.Tensor | Mapping[str, torch.Tensor]"]

_REQUIRED_KEYS = {
    "model": Mapping,
    "optimizer": Mapping,
    "step": int,
    "epoch": int,
    "batch_in_epoch": int,
    "rng": list,
}


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
        checkpoint_dir: where ``checkpoint.pt`` is written; ``None`` disables checkpoints.
        checkpoint_every: also write a checkpoint every this many steps (one is always
            written at the end when ``checkpoint_dir`` is set).
        resume: ``True`` continues from ``checkpoint_dir/checkpoint.pt`` when it exists (and
            starts fresh otherwise); a path continues from that file, which must exist.
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
            vocabularies' ``to_dict()`` and model hyper-parameters).
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

        already_initialised = dist.is_available() and dist.is_initialized()
        distributed = already_initialised or int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0")) if distributed else 0
        self.device = _resolve_device(device, self.local_rank if distributed else None)
        if amp is None:
            amp = self.device.type == "cuda"
        if amp and self.device.type != "cuda":
            raise ValueError("amp (bf16 autocast) is only supported with a CUDA device")
        self.amp = bool(amp)
        self._owns_process_group = False
        if distributed and not already_initialised:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self._owns_process_group = True
        self.world_size = dist.get_world_size() if distributed else 1
        self.rank = dist.get_rank() if distributed else 0

        self._model = model.to(self.device)
        self.optimizer = (
            optimizer if isinstance(optimizer, torch.optim.Optimizer)
            else optimizer(self._model.parameters())
        )
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise ValueError("optimizer must be an Optimizer or a factory that returns one")
        self.scheduler = scheduler(self.optimizer) if scheduler is not None else None
        adapter = _LossAdapter(self._model, loss_fn or _model_loss)
        if self.world_size > 1:
            self._network: nn.Module = nn.parallel.DistributedDataParallel(
                adapter,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=find_unused_parameters,
            )
        else:
            self._network = adapter

        self.train_batches = train_batches
        self.max_steps, self.epochs = max_steps, epochs
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.checkpoint_every = checkpoint_every
        self.resume = resume
        self.grad_clip = grad_clip
        self.seed = seed
        self.log_fn = log_fn
        self.log_every = log_every
        self.eval_fn = eval_fn
        self.eval_every = eval_every
        self.progress = progress and self.rank == 0
        self.extra = dict(extra or {})
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.history: list[dict[str, Any]] = []

    @property
    def model(self) -> nn.Module:
        """The user's model (never the DistributedDataParallel wrapper)."""
        return self._model

    @property
    def checkpoint_path(self) -> Path | None:
        """``checkpoint_dir / "checkpoint.pt"``, or ``None`` without a checkpoint directory."""
        return None if self.checkpoint_dir is None else self.checkpoint_dir / CHECKPOINT_NAME

    # ------------------------------------------------------------------ training loop

    def fit(self) -> TrainSummary:
        """Train until ``max_steps`` or ``epochs`` is reached; returns a :class:`TrainSummary`.

        A process group this trainer created is destroyed when ``fit`` returns.
        """
        try:
            return self._fit()
        finally:
            if self._owns_process_group and dist.is_initialized():
                dist.destroy_process_group()
                self._owns_process_group = False

    def _fit(self) -> TrainSummary:
        resume_from = self._resume_path()
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        else:
            _seed_everything(self.seed + self.rank)
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
                total = _group_count(batches, self.world_size)
                batch_bar = tqdm(
                    total=total, initial=self.batch_in_epoch, desc=f"epoch {self.epoch}",
                    unit="batch", leave=False, disable=not self.progress, dynamic_ncols=True,
                )
                ran_any = self.batch_in_epoch > 0
                with batch_bar:
                    for batch in self._shard(batches, self.batch_in_epoch):
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

    def _shard(self, batches: Iterable[Any], skip_groups: int) -> Iterator[Any]:
        """This rank's batch of every complete group of ``world_size``, from a group on."""
        world, rank = self.world_size, self.rank
        if isinstance(batches, Sequence):
            for group in range(skip_groups, len(batches) // world):
                yield batches[group * world + rank]
            return
        iterator = itertools.islice(iter(batches), skip_groups * world, None)
        while True:
            group = list(itertools.islice(iterator, world))
            if len(group) < world:
                return
            yield group[rank]

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
        if self.world_size > 1:
            mean_loss = mean_loss.clone()
            dist.all_reduce(mean_loss)
            mean_loss /= self.world_size
        value = float(mean_loss)
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
        if self.world_size > 1:
            dist.barrier()

    def _emit(self, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        self.history.append(record)
        if self.log_fn is not None:
            self.log_fn(record)

    # ------------------------------------------------------------------ checkpoints

    def _resume_path(self) -> Path | None:
        if self.resume is False or self.resume is None:
            return None
        if self.resume is True:
            path = self.checkpoint_path
            return path if path is not None and path.exists() else None
        path = Path(self.resume)
        if not path.exists():
            raise FileNotFoundError(f"resume checkpoint {path} does not exist")
        return path

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint payload (this process's view; RNG states of all ranks gathered)."""
        rng = _rng_state()
        if self.world_size > 1:
            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, rng)
            rngs = gathered
        else:
            rngs = [rng]
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "model": self._model.state_dict(),
            "model_class": f"{type(self._model).__module__}.{type(self._model).__qualname__}",
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "seed": self.seed,
            "world_size": self.world_size,
            "rng": rngs,
            "extra": self.extra,
        }

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path | None:
        """Write a checkpoint atomically (rank 0 writes; every rank must call it).

        Args:
            path: target file; default ``checkpoint_dir / "checkpoint.pt"``.

        Returns:
            The path written, or ``None`` on ranks other than 0.
        """
        target = Path(path) if path is not None else self.checkpoint_path
        if target is None:
            raise ValueError("path is required when the trainer has no checkpoint_dir")
        payload = self.state_dict()
        written = None
        if self.rank == 0:
            write_checkpoint(payload, target)
            written = target
        if self.world_size > 1:
            dist.barrier()
        return written

    def load_checkpoint(self, path: str | os.PathLike) -> dict[str, Any]:
        """Restore model, optimizer, scheduler, counters and random states from ``path``.

        Raises:
            ValueError: the file is corrupt, truncated, not a structattn checkpoint, or does
                not match this model.
        """
        state = read_checkpoint(path)
        try:
            self._model.load_state_dict(state["model"])
        except RuntimeError as err:
            raise ValueError(f"checkpoint {path} does not match the model: {err}") from err
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as err:
            raise ValueError(f"checkpoint {path} does not match the optimizer: {err}") from err
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.epoch = state["epoch"]
        self.batch_in_epoch = state["batch_in_epoch"]
        rngs = state["rng"]
        if len(rngs) == self.world_size:
            _set_rng_state(rngs[self.rank])
        else:
            warnings.warn(
                f"checkpoint {path} was written by {len(rngs)} processes and this run has "
                f"{self.world_size}; random streams are reseeded, so the run will not match an "
                "uninterrupted one exactly",
                stacklevel=2,
            )
            _seed_everything(self.seed + 7919 * self.step + self.rank)
        return state


def write_checkpoint(payload: Mapping[str, Any], path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same directory, fsync, then ``os.replace``.

    A crash mid-write leaves the previous file intact and no partial file behind.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "wb") as handle:
            torch.save(dict(payload), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    with contextlib.suppress(OSError):
        directory = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load and validate a structattn checkpoint with ``torch.load(weights_only=True)``.

    Returns:
        The checkpoint dict: ``model`` (state dict), ``optimizer``, ``scheduler``, ``step``,
        ``epoch``, ``batch_in_epoch``, ``rng``, ``extra``, ``model_class``, ``world_size``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is corrupt or truncated, holds arbitrary Python objects, or is
            not a structattn checkpoint (no format marker or missing fields).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "weights_only" in str(err).lower():
            raise ValueError(
                f"{path} is not a structattn checkpoint: it holds Python objects that a "
                f"weights-only load refuses ({str(err).splitlines()[0]})"
            ) from err
        raise ValueError(f"{path} is not a readable checkpoint (corrupt file): {err}") from err
    except Exception as err:  # zip, EOF and decoding errors all mean a damaged file
        raise ValueError(
            f"{path} is not a readable checkpoint (corrupt or truncated file): {err}"
        ) from err
    if not isinstance(state, Mapping) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path} is not a structattn checkpoint (no '{CHECKPOINT_FORMAT}' format marker); "
            "it may be a bare state_dict or another program's file"
        )
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"{path} has checkpoint version {state.get('version')!r}; this structattn reads "
            f"version {CHECKPOINT_VERSION}"
        )
    for key, kind in _REQUIRED_KEYS.items():
        if not isinstance(state.get(key), kind):
            raise ValueError(f"{path} is a damaged structattn checkpoint: field {key!r} is missing")
    return dict(state)


# ---------------------------------------------------------------------- helpers


def _check_positive(value: int | None, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def _resolve_device(device: str | torch.device, local_rank: int | None) -> torch.device:
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from err
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available; use device='cpu'")
        if local_rank is not None:
            resolved = torch.device("cuda", local_rank)
        elif resolved.index is None:
            resolved = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(resolved)
    elif resolved.type != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    return resolved


def _group_count(batches: Iterable[Any], world_size: int) -> int | None:
    try:
        return len(batches) // world_size  # type: ignore[arg-type]
    except TypeError:
        return None


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


# The global NumPy stream is legacy API, but user code may draw from it, so it is seeded,
# saved and restored like the others.


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    """Every random state, as tensors and plain Python values (weights-only loadable)."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)  # noqa: NPY002
    return {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: Mapping[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (
            "MT19937",
            numpy["keys"].numpy().astype(np.uint32),
            numpy["position"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
