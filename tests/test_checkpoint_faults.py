"""Work that must not be lost or silently corrupted: checksums, plain payloads, recorded
settings, the run-directory lock, disk faults, stale temporaries and damaged fields."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import math
import os
import random
import struct
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from structattn.app.training import (
    CHECKPOINT_NAME,
    CheckpointError,
    CheckpointWriteError,
    RunDirectory,
    RunDirectoryError,
    RunLockedError,
    SettingsMismatchError,
    Trainer,
    read_checkpoint,
    write_checkpoint,
)
from structattn.app.training import checkpoint as checkpoint_module
from structattn.app.training.rundir import LOCK_NAME

torch.set_num_threads(1)

FEATURES = torch.randn(24, 3, generator=torch.Generator().manual_seed(0))
TARGETS = FEATURES.sum(-1)
REPOSITORY = Path(__file__).resolve().parents[1]


class Regressor(nn.Module):
    def __init__(self, outputs: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(3, outputs)

    def loss(self, batch):
        inputs, targets = batch
        return (self.linear(inputs).sum(-1) - targets).pow(2).mean()


class OtherRegressor(Regressor):
    """Same parameters, another class: resuming it from a Regressor run is a change."""


def batches(epoch: int):
    order = torch.randperm(24, generator=torch.Generator().manual_seed(epoch))
    return [(FEATURES[order[i : i + 6]], TARGETS[order[i : i + 6]]) for i in range(0, 24, 6)]


def make_trainer(model=None, lr: float = 0.05, **kwargs) -> Trainer:
    kwargs.setdefault("max_steps", 3)
    return Trainer(
        model if model is not None else Regressor(),
        lambda params: torch.optim.Adam(params, lr=lr),
        batches,
        progress=False,
        **kwargs,
    )


def frame(data: bytes) -> bytes:
    """The documented file format: torch.save's zip with its SHA-256 in the zip comment."""
    tag = b"structattn-sha256:" + hashlib.sha256(data).hexdigest().encode()
    return data[:-2] + struct.pack("<H", len(tag)) + tag


def payload_of(path: Path) -> dict:
    return read_checkpoint(path)


@pytest.fixture
def run_dir(tmp_path) -> Path:
    directory = tmp_path / "run"
    make_trainer(checkpoint_dir=directory, config={"mode": "soft", "hidden": 8}).fit()
    return directory


def one_line(message: str) -> bool:
    return "\n" not in message and message.strip() == message


# ---------------------------------------------------------------------- 12: checksum


def test_checkpoint_stays_a_torch_zip_that_torch_load_opens(run_dir):
    state = torch.load(run_dir / CHECKPOINT_NAME, weights_only=True)
    assert state["step"] == 3
    assert payload_of(run_dir / CHECKPOINT_NAME)["step"] == 3


def test_random_bit_flips_never_load(run_dir, tmp_path):
    original = (run_dir / CHECKPOINT_NAME).read_bytes()
    generator = random.Random(12)
    damaged = tmp_path / "flipped.pt"
    for _ in range(300):
        data = bytearray(original)
        for _ in range(generator.randint(1, 4)):
            position = generator.randrange(len(data))
            data[position] ^= 1 << generator.randrange(8)
        if bytes(data) == original:  # two flips of one bit undo each other
            continue
        damaged.write_bytes(bytes(data))
        with pytest.raises(ValueError, match=str(damaged).replace("\\", "\\\\")) as caught:
            read_checkpoint(damaged)
        assert one_line(str(caught.value))


def test_altered_payload_with_an_old_digest_is_refused_naming_the_file(run_dir, tmp_path):
    data = (run_dir / CHECKPOINT_NAME).read_bytes()
    buffer = io.BytesIO()
    state = torch.load(run_dir / CHECKPOINT_NAME, weights_only=True)
    state["step"] = 99
    torch.save(state, buffer)
    altered = buffer.getvalue()[:-2] + data[-(2 + 82):]  # the genuine file's digest
    path = tmp_path / "altered.pt"
    path.write_bytes(altered)
    with pytest.raises(CheckpointError, match=r"altered\.pt is damaged: its SHA-256"):
        read_checkpoint(path)


def test_plain_torch_save_file_cannot_be_verified(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"format": "structattn.checkpoint", "version": 2}, path)
    with pytest.raises(CheckpointError, match="no SHA-256"):
        read_checkpoint(path)


def test_garbage_and_truncated_files_are_refused(run_dir, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\xffthis is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        read_checkpoint(garbage)
    data = (run_dir / CHECKPOINT_NAME).read_bytes()
    for cut in (1, len(data) // 2, len(data) - 1):
        truncated = tmp_path / "truncated.pt"
        truncated.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated|damaged"):
            read_checkpoint(truncated)


class Payload:
    """An arbitrary object: a weights-only load must refuse to build it."""


def test_python_objects_are_refused_even_with_a_valid_digest(tmp_path):
    buffer = io.BytesIO()
    torch.save({"format": "structattn.checkpoint", "payload": Payload()}, buffer)
    path = tmp_path / "objects.pt"
    path.write_bytes(frame(buffer.getvalue()))
    with pytest.raises(CheckpointError, match="weights-only"):
        read_checkpoint(path)


# ---------------------------------------------------------------------- 13: plain payloads


class Opaque:
    pass


GOOD_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.text(max_size=5),
    st.binary(max_size=5),
    st.integers(-(2**31), 2**31 - 1).map(np.int64),
    st.integers(-100, 100).map(np.int32),
    st.floats(allow_nan=False, width=32).map(np.float32),
    st.floats(allow_nan=False).map(np.float64),
    st.booleans().map(np.bool_),
    st.lists(st.integers(-5, 5), max_size=4).map(np.array),
    st.lists(st.floats(-1, 1), max_size=3).map(lambda xs: np.array(xs, dtype=np.float64)),
    st.text("ab/", max_size=4).map(Path),
    st.text("ab/", max_size=4).map(PurePosixPath),
)
BAD_LEAVES = st.sampled_from([Opaque(), range(3), frozenset({1}), slice(1, 2), np.dtype("f4"),
                              np.array([Opaque()], dtype=object), print,
                              np.datetime64("2026-01-01T00:00")])
VALUES = st.recursive(
    st.one_of(GOOD_LEAVES, BAD_LEAVES),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(st.text("xyz", max_size=3), children, max_size=3),
    ),
    max_leaves=8,
)


class Refused(Exception):
    pass


def reference_plain(value):
    """What the checkpoint must hold for ``value`` (a slow, obvious restatement)."""
    if isinstance(value, np.datetime64):
        raise Refused
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise Refused
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, PurePosixPath):
        return str(value)
    if value == b"":
        raise Refused
    if type(value) in (type(None), bool, int, float, str, bytes):
        return value
    if type(value) is list:
        return [reference_plain(item) for item in value]
    if type(value) is tuple:
        return tuple(reference_plain(item) for item in value)
    if type(value) is dict:
        return {key: reference_plain(item) for key, item in value.items()}
    raise Refused


def minimal_payload(extra) -> dict:
    trainer = make_trainer()
    payload = trainer.state_dict()
    payload["extra"] = extra
    return payload


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=VALUES)
def test_extra_values_are_converted_or_refused_at_save_time(value):
    payload = minimal_payload({"value": value})
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / CHECKPOINT_NAME
        try:
            expected = reference_plain(value)
        except Refused:
            with pytest.raises(CheckpointError, match=r"extra\['value'\]"):
                write_checkpoint(payload, path)
            assert os.listdir(directory) == []  # nothing written, nothing left behind
            with pytest.raises(ValueError, match="extra"):
                make_trainer(extra={"value": value})
            return
        write_checkpoint(payload, path)
        loaded = read_checkpoint(path)["extra"]["value"]
        assert loaded == expected
        assert type(loaded) is type(expected)


def test_numpy_values_from_an_evaluation_round_trip_as_python_numbers(tmp_path):
    extra = {"best_dev": np.float64(0.5), "best_step": np.int64(7), "out": tmp_path,
             "curve": np.arange(3)}
    make_trainer(checkpoint_dir=tmp_path, extra=extra).fit()
    stored = read_checkpoint(tmp_path / CHECKPOINT_NAME)["extra"]
    assert stored == {"best_dev": 0.5, "best_step": 7, "out": str(tmp_path), "curve": [0, 1, 2]}
    assert type(stored["best_dev"]) is float and type(stored["best_step"]) is int


# ---------------------------------------------------------------------- 14: settings


@pytest.mark.parametrize(
    ("change", "setting"),
    [
        ({"lr": 0.01}, "optimizer.lr"),
        ({"seed": 5}, "seed"),
        ({"grad_clip": 1.0}, "grad_clip"),
        ({"model": OtherRegressor()}, "model_class"),
        ({"config": {"mode": "hard", "hidden": 8}}, "config.mode"),
        ({"config": {"mode": "soft", "hidden": 8, "dropout": 0.3}}, "config.dropout"),
        ({"config": {"mode": "soft"}}, "config.hidden"),
        ({"scheduler": lambda opt: torch.optim.lr_scheduler.StepLR(opt, 2)}, "scheduler"),
    ],
)
def test_resuming_with_other_settings_is_refused_listing_them(run_dir, change, setting):
    change = dict(change)
    change.setdefault("config", {"mode": "soft", "hidden": 8})
    before = (run_dir / CHECKPOINT_NAME).read_bytes()
    trainer = make_trainer(max_steps=5, checkpoint_dir=run_dir, resume=True, **change)
    with pytest.raises(SettingsMismatchError, match=rf"{setting}: .* -> ") as caught:
        trainer.fit()
    assert one_line(str(caught.value))
    assert "allow_config_change" in str(caught.value)
    names = [name for name, _, _ in caught.value.differences]
    assert setting in names and all(name.startswith(setting) for name in names)
    assert (run_dir / CHECKPOINT_NAME).read_bytes() == before


def test_allow_config_change_resumes_and_records_the_new_settings(run_dir):
    trainer = make_trainer(lr=0.01, max_steps=5, checkpoint_dir=run_dir, resume=True,
                           config={"mode": "soft", "hidden": 8}, allow_config_change=True)
    with pytest.warns(UserWarning, match=r"optimizer\.lr: 0\.05 -> 0\.01"):
        summary = trainer.fit()
    assert summary.step == 5
    assert read_checkpoint(run_dir / CHECKPOINT_NAME)["settings"]["optimizer.lr"] == 0.01


def test_same_settings_resume_even_after_the_scheduler_moved_the_learning_rate(tmp_path):
    def schedule(optimizer):
        return torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.5)

    make_trainer(checkpoint_dir=tmp_path, scheduler=schedule).fit()
    summary = make_trainer(max_steps=6, checkpoint_dir=tmp_path, resume=True,
                           scheduler=schedule).fit()
    assert summary.step == 6


# ---------------------------------------------------------------------- 15: lock

HOLDER = textwrap.dedent(
    """
    import sys, time
    from structattn.app.training import RunDirectory
    with RunDirectory(sys.argv[1]):
        print("held", flush=True)
        sys.stdin.read()
    """
)


def start_holder(directory: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPOSITORY))
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(directory)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True, env=env,
    )
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_process_on_the_same_run_directory_is_refused(tmp_path):
    directory = tmp_path / "run"
    holder = start_holder(directory)
    try:
        expected = rf"in use by another run \(process {holder.pid}\)"
        with pytest.raises(RunLockedError, match=expected):
            make_trainer(checkpoint_dir=directory).fit()
        assert not (directory / CHECKPOINT_NAME).exists()
    finally:
        holder.kill()
        holder.wait()
    # The kernel dropped the dead holder's lock: the directory is free again.
    assert make_trainer(checkpoint_dir=directory).fit().step == 3


def test_the_lock_is_released_when_fit_returns_or_raises(tmp_path):
    class Boom(Exception):
        pass

    def explode(record):
        raise Boom

    with pytest.raises(Boom):
        make_trainer(checkpoint_dir=tmp_path, log_every=1, log_fn=explode).fit()
    make_trainer(checkpoint_dir=tmp_path).fit()
    with RunDirectory(tmp_path) as run:
        assert run.held


# ---------------------------------------------------------------------- 16: disk faults


def assert_intact(directory: Path, before: bytes) -> None:
    assert (directory / CHECKPOINT_NAME).read_bytes() == before
    assert sorted(p.name for p in directory.iterdir()) == sorted([CHECKPOINT_NAME, LOCK_NAME])


def test_read_only_run_directory_gives_one_line_naming_the_path(run_dir):
    before = (run_dir / CHECKPOINT_NAME).read_bytes()
    run_dir.chmod(0o555)
    try:
        if os.access(run_dir, os.W_OK):
            pytest.skip("this user (root?) can write to a read-only directory")
        with pytest.raises(CheckpointWriteError) as caught:
            make_trainer(max_steps=4, checkpoint_dir=run_dir, resume=True,
                         config={"mode": "soft", "hidden": 8}).fit()
    finally:
        run_dir.chmod(0o755)
    assert str(run_dir / CHECKPOINT_NAME) in str(caught.value)
    assert one_line(str(caught.value))
    assert_intact(run_dir, before)


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.EROFS, "Read-only file system"),
        OSError(errno.ENOSPC, "No space left on device"),
        PermissionError(errno.EACCES, "Permission denied"),
    ],
    ids=["read-only", "full", "permission"],
)
def test_failing_file_system_keeps_the_previous_checkpoint(run_dir, monkeypatch, failure):
    before = (run_dir / CHECKPOINT_NAME).read_bytes()
    real_fsync = os.fsync

    def failing_fsync(descriptor):
        # The temporary file is written and about to be renamed: the worst moment to fail.
        if os.fstat(descriptor).st_size > 0 and not os.path.isdir(f"/proc/self/fd/{descriptor}"):
            raise failure
        real_fsync(descriptor)

    monkeypatch.setattr(checkpoint_module.os, "fsync", failing_fsync)
    trainer = make_trainer(max_steps=4, checkpoint_dir=run_dir, resume=True,
                           config={"mode": "soft", "hidden": 8})
    with pytest.raises(CheckpointWriteError, match=failure.strerror) as caught:
        trainer.fit()
    message = str(caught.value)
    assert one_line(message) and str(run_dir / CHECKPOINT_NAME) in message
    assert_intact(run_dir, before)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 512 KiB tmpfs at ``tmp_path / "disk"`` (skipped where mounting is not allowed)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount_point)],
            capture_output=True, timeout=30,
        ).returncode == 0
    except (OSError, subprocess.SubprocessError):
        mounted = False
    if not mounted:
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=30)


def fill(directory: Path, leave: int) -> None:
    """Fill the file system of ``directory`` until fewer than ``leave`` bytes are free."""
    with open(directory / "filler", "wb") as handle:
        with contextlib.suppress(OSError):
            while os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize > leave:
                handle.write(b"\0" * 4096)
                handle.flush()


def test_a_really_full_disk_keeps_the_previous_checkpoint(small_tmpfs):
    run = small_tmpfs / "run"
    make_trainer(checkpoint_dir=run).fit()
    before = (run / CHECKPOINT_NAME).read_bytes()
    fill(small_tmpfs, leave=len(before) // 2)
    with pytest.raises(CheckpointWriteError, match="No space left on device") as caught:
        make_trainer(max_steps=4, checkpoint_dir=run, resume=True).fit()
    assert one_line(str(caught.value)) and str(run / CHECKPOINT_NAME) in str(caught.value)
    assert_intact(run, before)


def test_a_really_read_only_file_system_keeps_the_previous_checkpoint(small_tmpfs):
    run = small_tmpfs / "run"
    make_trainer(checkpoint_dir=run).fit()
    before = (run / CHECKPOINT_NAME).read_bytes()
    remount = ["mount", "-o", "remount,ro", str(small_tmpfs)]
    assert subprocess.run(remount, capture_output=True, timeout=30).returncode == 0
    with pytest.raises(RunDirectoryError, match="Read-only file system") as caught:
        make_trainer(max_steps=4, checkpoint_dir=run, resume=True).fit()
    assert one_line(str(caught.value)) and str(run) in str(caught.value)
    assert_intact(run, before)


def test_full_disk_reported_by_torch_save_is_one_line(run_dir, monkeypatch):
    before = (run_dir / CHECKPOINT_NAME).read_bytes()

    def full_disk(payload, handle):
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0\n"
                           "frame #0: c10::ThrowEnforceNotMet")

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError, match="inline_container") as caught:
        make_trainer(max_steps=4, checkpoint_dir=run_dir, resume=True,
                     config={"mode": "soft", "hidden": 8}).fit()
    assert one_line(str(caught.value))
    assert_intact(run_dir, before)


def test_run_directory_that_is_a_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "out"
    path.write_text("a file")
    with pytest.raises(RunDirectoryError, match=rf"{path} is a file") as caught:
        make_trainer(checkpoint_dir=path)
    assert one_line(str(caught.value))
    with pytest.raises(RunDirectoryError, match=rf"{path} is a file"):
        RunDirectory(path).acquire()
    with pytest.raises(CheckpointWriteError, match=str(path)):
        write_checkpoint(minimal_payload({}), path / CHECKPOINT_NAME)
    assert path.read_text() == "a file"


def test_cli_reports_a_file_as_out_in_one_line(tmp_path, capsys):
    from structattn.app.cli import main

    path = tmp_path / "out"
    path.write_text("a file")
    code = main(["train", "--steps", "1", "--max-train", "16", "--eval-size", "2",
                 "--hidden", "4", "--embed-dim", "4", "--batch-size", "4", "--no-progress",
                 "--out", str(path)])
    error = capsys.readouterr().err
    assert code == 2
    assert error.startswith("error: ") and error.count("\n") == 1 and str(path) in error


# ---------------------------------------------------------------------- 17: stale temporaries


def test_stale_temporaries_of_a_killed_run_are_removed_on_start(run_dir):
    stale = [run_dir / ".checkpoint.pt.partial-abc123_x.tmp", run_dir / ".best.pt.partial-q1.tmp"]
    kept = [run_dir / ".checkpoint.pt.abc.tmp", run_dir / "notes.partial-1.tmp",
            run_dir / "metrics.json"]
    for path in stale + kept:
        path.write_bytes(b"x" * 100)
    make_trainer(max_steps=4, checkpoint_dir=run_dir, resume=True,
                 config={"mode": "soft", "hidden": 8}).fit()
    assert not any(path.exists() for path in stale)
    assert all(path.exists() for path in kept)


def test_temporaries_of_a_live_run_are_left_alone(tmp_path):
    holder = start_holder(tmp_path)
    try:
        live = tmp_path / ".checkpoint.pt.partial-live.tmp"
        live.write_bytes(b"being written")
        with pytest.raises(RunLockedError):
            make_trainer(checkpoint_dir=tmp_path).fit()
        assert live.read_bytes() == b"being written"
    finally:
        holder.kill()
        holder.wait()


def test_a_run_killed_mid_write_leaves_a_temporary_that_the_next_run_removes(tmp_path):
    script = textwrap.dedent(
        """
        import os, sys
        from structattn.app.training import checkpoint
        real_fsync = os.fsync
        def die(descriptor):
            os._exit(9)  # killed after the bytes are written, before the rename
        checkpoint.os.fsync = die
        checkpoint.write_checkpoint({"format": "x"}, sys.argv[1] + "/checkpoint.pt")
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPOSITORY))
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, timeout=120)
    assert result.returncode == 9
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".checkpoint.pt.partial-")
    with RunDirectory(tmp_path) as run:
        assert [p.name for p in run.removed] == leftovers
    assert [p.name for p in tmp_path.iterdir()] == [LOCK_NAME]


# ---------------------------------------------------------------------- 18: damaged fields


def rewrite(path: Path, **changes) -> None:
    state = read_checkpoint(path)
    state.update(changes)
    write_checkpoint(state, path)


def test_damaged_random_state_is_one_clear_error(run_dir):
    rewrite(run_dir / CHECKPOINT_NAME, rng=[{}])
    with pytest.raises(CheckpointError, match=r"field 'rng' \(process 0\): missing") as caught:
        read_checkpoint(run_dir / CHECKPOINT_NAME)
    assert one_line(str(caught.value))


def test_extra_config_key_is_one_clear_error(run_dir):
    state = read_checkpoint(run_dir / CHECKPOINT_NAME)
    rewrite(run_dir / CHECKPOINT_NAME, settings={**state["settings"], "config.colour": "blue"})
    with pytest.raises(SettingsMismatchError, match=r"config\.colour: 'blue' -> '\(absent\)'"):
        make_trainer(checkpoint_dir=run_dir, resume=True, max_steps=4,
                     config={"mode": "soft", "hidden": 8}).fit()


def test_changed_model_size_is_one_clear_error(run_dir):
    trainer = make_trainer(Regressor(outputs=2), checkpoint_dir=run_dir, resume=True,
                           max_steps=4, config={"mode": "soft", "hidden": 8})
    expected = "does not match the model: .*size mismatch"
    with pytest.raises(CheckpointError, match=expected) as caught:
        trainer.fit()
    assert one_line(str(caught.value))


def test_directory_as_checkpoint_path_is_one_clear_error(run_dir):
    with pytest.raises(CheckpointError, match=rf"{run_dir} is a directory"):
        read_checkpoint(run_dir)
    with pytest.raises(CheckpointError, match="is a directory"):
        make_trainer(resume=run_dir).fit()


def test_unknown_top_level_field_is_refused(run_dir):
    rewrite(run_dir / CHECKPOINT_NAME, surprise=1)
    with pytest.raises(CheckpointError, match="unknown fields 'surprise'"):
        read_checkpoint(run_dir / CHECKPOINT_NAME)


JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True), st.text(max_size=3),
    st.lists(st.one_of(st.integers(), st.dictionaries(st.text(max_size=2), st.integers()))),
    st.dictionaries(st.text("abcmodelstatepythonnumpytorch", max_size=8),
                    st.one_of(st.integers(), st.text(max_size=2), st.none()), max_size=3),
    st.just(torch.zeros(2)),
)
FIELDS = ["model", "model_class", "optimizer", "scheduler", "step", "epoch", "batch_in_epoch",
          "seed", "world_size", "rng", "extra", "settings", "format", "version"]


@pytest.fixture(scope="module")
def scheduled_checkpoint(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("scheduled")
    make_trainer(checkpoint_dir=directory, scheduler=scheduler_factory).fit()
    return str(directory / CHECKPOINT_NAME)


def scheduler_factory(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, 2, 0.5)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(FIELDS), junk=JUNK, depth=st.booleans())
def test_any_damaged_field_gives_a_value_error_never_another_exception(
    scheduled_checkpoint, field, junk, depth
):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / CHECKPOINT_NAME
        path.write_bytes(Path(scheduled_checkpoint).read_bytes())
        state = read_checkpoint(path)
        if depth and isinstance(state[field], (list, dict)) and state[field]:
            inner = state[field]
            key = 0 if isinstance(inner, list) else next(iter(inner))
            inner[key] = junk  # damage one level down: one process's rng, one tensor, ...
        else:
            state[field] = junk
        write_checkpoint(state, path)
        trainer = make_trainer(max_steps=5, checkpoint_dir=directory, resume=True,
                               scheduler=scheduler_factory)
        try:
            summary = trainer.fit()
        except ValueError as err:
            assert one_line(str(err)), str(err)
            assert directory in str(err)
        else:  # the junk happened to be a valid value
            assert summary.step >= 0 and math.isfinite(summary.loss) or summary.step >= 5


CLI_RUN = ["--max-train", "16", "--eval-size", "2", "--hidden", "4", "--embed-dim", "4",
           "--batch-size", "4", "--no-progress", "--checkpoint-every", "1"]


def test_cli_refuses_a_resume_with_other_settings_unless_allowed(tmp_path, capsys):
    from structattn.app.cli import main

    out = ["--out", str(tmp_path)]
    assert main(["train", "--steps", "1", *CLI_RUN, *out]) == 0
    capsys.readouterr()
    changed = ["--lr", "0.01", "--dropout", "0.3"]
    assert main(["train", "--steps", "2", "--resume", *changed, *CLI_RUN, *out]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "config.lr: 0.002 -> 0.01" in error and "config.dropout: 0.1 -> 0.3" in error
    assert "optimizer.lr: 0.002 -> 0.01" in error
    assert read_checkpoint(tmp_path / CHECKPOINT_NAME)["step"] == 1
    with pytest.warns(UserWarning, match="changed settings"):
        code = main(["train", "--steps", "2", "--resume", "--allow-config-change", *changed,
                     *CLI_RUN, *out])
    assert code == 0
    assert read_checkpoint(tmp_path / CHECKPOINT_NAME)["step"] == 2


# ------------------------------------- an earlier run's results are never replaced silently


def test_a_fresh_run_into_a_directory_with_a_checkpoint_is_refused_unless_told(tmp_path):
    from structattn.app.training import RunExistsError

    make_trainer(checkpoint_dir=tmp_path).fit()
    before = (tmp_path / CHECKPOINT_NAME).read_bytes()
    with pytest.raises(RunExistsError, match=r"resume it \(--resume\), replace it"):
        make_trainer(checkpoint_dir=tmp_path, lr=0.5).fit()
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == before  # the earlier run is intact
    assert make_trainer(checkpoint_dir=tmp_path, max_steps=5, resume=True).fit().step == 5
    assert make_trainer(checkpoint_dir=tmp_path, overwrite=True).fit().step == 3


def test_the_train_command_refuses_to_replace_an_earlier_run(tmp_path, capsys):
    from structattn.app.cli import main

    args = ["train", "--task", "g2p", "--steps", "2", "--batch-size", "4", "--hidden", "8",
            "--embed-dim", "4", "--max-train", "40", "--dev-size", "4", "--dev-every", "2",
            "--beam-size", "1", "--out", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    before = (tmp_path / CHECKPOINT_NAME).read_bytes()
    assert main(args) != 0
    assert "already holds the checkpoint of an earlier run" in capsys.readouterr().err
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == before
    assert main([*args, "--overwrite"]) == 0


def test_a_comparison_refuses_a_folder_with_earlier_results_before_any_work(tmp_path,
                                                                            monkeypatch):
    from structattn.app import compare, tableqa
    from structattn.app.experiment import ExperimentConfig
    from structattn.app.outputs import RESULTS_NAME
    from structattn.app.training import RunExistsError

    (tmp_path / RESULTS_NAME).write_text("{}")

    def no_work(*args, **kwargs):
        raise AssertionError("the comparison started working in a refused folder")

    monkeypatch.setattr(compare, "load_task", no_work)
    monkeypatch.setattr(tableqa, "build_splits", no_work)
    config = ExperimentConfig(task="g2p", steps=2)
    with pytest.raises(RunExistsError, match="--overwrite"):
        compare.compare_modes(config, ["soft"], tmp_path, progress=False)
    with pytest.raises(RunExistsError, match="--overwrite"):
        tableqa.run_tableqa_comparison(["soft"], tmp_path, quick=True, progress=None)
    assert (tmp_path / RESULTS_NAME).read_text() == "{}"
    with pytest.raises(AssertionError, match="started working"):  # allowed: it starts
        compare.compare_modes(config, ["soft"], tmp_path, progress=False, overwrite=True)


def test_a_comparison_refuses_a_folder_another_live_run_holds(tmp_path):
    from structattn.app.compare import compare_modes
    from structattn.app.experiment import ExperimentConfig

    holder = start_holder(tmp_path)
    try:
        with pytest.raises(RunLockedError, match="in use by another run"):
            compare_modes(ExperimentConfig(task="g2p", steps=2), ["soft"], tmp_path,
                          progress=False)
    finally:
        holder.kill()
        holder.wait()


def test_results_are_written_whole_or_not_at_all(tmp_path):
    from structattn.app.outputs import write_json

    path = write_json(tmp_path / "results.json", {"ppl": 1.25})
    with pytest.raises(TypeError):
        write_json(path, {"ppl": object()})  # fails halfway through the dump
    assert path.read_text() == '{\n "ppl": 1.25\n}'
    assert [entry.name for entry in tmp_path.iterdir()] == ["results.json"]
