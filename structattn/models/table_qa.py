"""Table question answering with latent column, cell and operator choices, trained from answers.

A question over a table is answered by a latent program: a column ``c`` (categorical over the
columns), a cell selection inside it (one two-way choice per row, off/on: an independent
Bernoulli per cell, as in TAPAS), and an aggregation operator ``o`` (categorical over
:data:`~structattn.data.tables.OPERATORS`).  All three are alignment distributions of the
library (:class:`~structattn.CategoricalAlignment`, or :class:`~structattn.SparsemaxAlignment`
for the sparse mode), so their ``.attention`` are the soft weights.  Only the answer is
observed; how the latent choice is trained is the *mode*, a class found by name in
:data:`TABLE_QA_MODES` (add one with :func:`register_table_qa_mode`):

- ``soft``: TAPAS's expected result (Herzig et al. 2020): COUNT = sum p, SUM = sum p v,
  AVERAGE = their ratio, MIN/MAX = a selection-weighted soft minimum/maximum, fitted to a
  scalar answer with a Huber loss on the relative error; each (column, operator) keeps its
  own expected result and the losses are averaged under the column and operator
  probabilities, over the programs that can produce the answer (``mix="result"`` is TAPAS's
  single loss on the mixed result); cell answers get the column and cell log-likelihood of
  the cells whose text matches the answer (in the column with most matches) and "no
  aggregation".
- ``enum``: exact marginal likelihood, summing ``p(c) p(o) p(answer | c, o)`` over every
  column and operator.  The cells are marginalised exactly where the operator allows it
  (NONE: per-cell Bernoulli likelihood; COUNT: the Poisson-binomial probability of the count;
  MIN/MAX: no selected value beyond the answer and at least one equal to it); SUM and AVERAGE
  use a Gaussian kernel on the expected result (their exact sum over subsets is exponential).
- ``hard-score``: sampled programs (column, operator, cells), executed; the reward is the
  answer match plus partial credit (cell F1, or relative closeness of a number, times 0.5),
  with the leave-one-out baseline over ``num_samples`` draws.
- ``sparse``: entmax15 (or sparsemax, ``alpha=2``) over columns and operators; the loss is
  the expected per-program negative log-likelihood, summed exactly over the (small) support
  (Correia et al. 2020,
  "Efficient marginalization of discrete and structured latent variables via sparsity"),
  plus TAPAS's dense answer-kind loss on the operator scores (``kind_weight``,
  :func:`answer_kind_loss`).  Sparse training is fragile: the operator's support can lose
  the right operator, where entmax gives it no gradient to return (learning rate 3e-3:
  0.29 and 0.09 accuracy on two seeds without the kind loss, 0.57 and 0.18 with it).

The answer's kind (a list of cells or a number) is observed, as in WikiSQL's answers: cell
answers rule out numeric operators and scalar answers rule out NONE.

Encoder (measured choice, :data:`QUESTION_ENCODERS`): a BiGRU over the question by default,
a small Transformer as the alternative; each column is represented by the encoder's states
at the question tokens that mention its header (exact token match, longest header first, so
unseen headers still work), and each cell by fixed relation features against the question
(its text occurs in the question or not; its number is greater/less than/equal to the number
that follows the column's mention; missing).  Per-cell relation features are what TAPAS's
numeric-relation embeddings carry.  At the default budget the Transformer was no more
accurate (``enum`` 0.783/0.788 against 0.799/0.899 on two seeds, last parameters) and 1.3x
slower per step; a Transformer over the flattened table (~350 tokens a question instead of
~25) was not built for the CPU budget (docs/tutorials/table-qa.md).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from structattn._registry import class_decorator
from structattn.data.tables import (
    NUMERIC_OPERATORS,
    OPERATORS,
    TableExample,
    execute,
    parse_number,
    tokenize,
)
from structattn.data.vocab import Vocab
from structattn.distributions.categorical import CategoricalAlignment, SparsemaxAlignment
from structattn.nn.rnn import BiRNN
from structattn.nn.transformer import SinusoidalPositionalEncoding, TransformerEncoderLayer

__all__ = [
    "CELL_FEATURES",
    "QUESTION_ENCODERS",
    "QuestionEncoder",
    "TABLE_QA_MODES",
    "TableBatch",
    "TableQA",
    "TableQAMode",
    "TablePrediction",
    "answer_kind_loss",
    "build_question_vocab",
    "encode_tables",
    "question_symbols",
    "register_question_encoder",
    "register_table_qa_mode",
]

#: per-cell relation features, in order
CELL_FEATURES = (
    "text_match", "greater", "less", "equal", "has_number", "missing", "text_mismatch"
)
_NUMBER_WINDOW = 5  # tokens after a header mention in which its comparison number is looked for
_NGRAM = 8
_NUMERIC_OPS = torch.tensor([op in NUMERIC_OPERATORS for op in OPERATORS])
_NONE, _COUNT, _SUM, _AVG, _MIN, _MAX = range(6)
# "impossible" as a finite log-probability: -inf would give NaN gradients through logaddexp,
# logsumexp and torch.where's unused branch
IMPOSSIBLE = -1e4


def question_symbols(example: TableExample) -> list[str]:
    """The question's tokens with table-specific words abstracted: tokens of a header mention
    become ``<col>``, tokens of a cell's text ``<val>``, numbers ``<num>``.

    The model reads which column and which cells a word refers to from the mention and match
    features, so it needs the words around them (``greater than``, ``average``), not the table's
    own vocabulary; abstracting them lets it read tables whose headers it never saw.
    """
    tokens = tokenize(example.question)
    symbols = list(tokens)
    table = example.table
    for header in table.header:
        phrase = tokenize(header)
        for start in _find(tokens, phrase):
            symbols[start : start + len(phrase)] = ["<col>"] * len(phrase)
    ngrams = {tuple(tokens[i : i + n]) for n in range(1, _NGRAM + 1) for i in range(len(tokens))}
    matched = {
        cell
        for row in table.rows
        for cell in (tuple(tokenize(text)) for text in row)
        if 0 < len(cell) <= _NGRAM and cell in ngrams
    }
    for cell in matched:
        for start in _find(tokens, list(cell)):
            for i in range(start, start + len(cell)):
                if symbols[i] != "<col>":
                    symbols[i] = "<val>"
    return [
        "<num>" if parse_number(tok) is not None else sym
        for tok, sym in zip(tokens, symbols, strict=True)
    ]


def build_question_vocab(examples: Sequence[TableExample], min_count: int = 1) -> Vocab:
    """Vocabulary of question symbols (:func:`question_symbols`); unknown words map to
    ``<unk>`` and are counted by :func:`encode_tables`."""
    return Vocab.build((question_symbols(e) for e in examples), min_count=min_count)


@dataclass
class TableBatch:
    """Padded tensors for a batch of table questions.

    Shapes: ``question (B, L)``, ``question_mask (B, L)``, ``mentions (B, C, L)``,
    ``column_mask (B, C)``, ``numeric (B, C)``, ``row_mask (B, R)``,
    ``features (B, R, C, F)``, ``values (B, R, C)``, ``value_mask (B, R, C)``,
    ``answer_cells (B, R, C)`` (cells whose text is in a cell answer), ``scalar (B,)``,
    ``is_scalar (B,)``, ``answer_column (B,)`` (column with most answer cells),
    ``answer_size (B,)`` (number of texts in a cell answer).
    ``unknown_words``: question tokens not in the vocabulary, in all.
    """

    question: torch.Tensor
    question_mask: torch.Tensor
    mentions: torch.Tensor
    column_mask: torch.Tensor
    numeric: torch.Tensor
    row_mask: torch.Tensor
    features: torch.Tensor
    values: torch.Tensor
    value_mask: torch.Tensor
    answer_cells: torch.Tensor
    scalar: torch.Tensor
    is_scalar: torch.Tensor
    answer_column: torch.Tensor
    answer_size: torch.Tensor
    unknown_words: int

    def to(self, device: torch.device | str) -> TableBatch:
        """The same batch with every tensor on ``device``."""
        return dataclasses.replace(self, **{
            field.name: getattr(self, field.name).to(device)
            for field in dataclasses.fields(self)
            if isinstance(getattr(self, field.name), torch.Tensor)})


def _find(tokens: list[str], phrase: list[str]) -> list[int]:
    """Start positions of ``phrase`` in ``tokens``."""
    n = len(phrase)
    return [i for i in range(len(tokens) - n + 1) if n and tokens[i : i + n] == phrase]


def header_mentions(tokens: list[str], headers: Sequence[str]) -> list[list[tuple[int, int]]]:
    """Spans ``(start, end)`` of each header's mentions in ``tokens``, longest headers first:
    a token inside a longer header's mention is never a mention of a shorter header it
    contains (``private`` inside ``private service providing``)."""
    phrases = [tokenize(header) for header in headers]
    claimed = [False] * len(tokens)
    spans: list[list[tuple[int, int]]] = [[] for _ in phrases]
    for c in sorted(range(len(phrases)), key=lambda c: -len(phrases[c])):
        n = len(phrases[c])
        for start in _find(tokens, phrases[c]):
            if not any(claimed[start : start + n]):
                spans[c].append((start, start + n))
        for start, end in spans[c]:
            claimed[start:end] = [True] * n
    return spans


def _condition_numbers(tokens: list[str], spans: list[list[tuple[int, int]]]) -> list:
    """Per header, the first number that follows one of its mentions within
    ``_NUMBER_WINDOW`` tokens before any other header's mention (``None`` if there is none):
    the value its condition compares against."""
    owner = [-1] * len(tokens)
    for c, column_spans in enumerate(spans):
        for start, end in column_spans:
            owner[start:end] = [c] * (end - start)
    numbers: list = [None] * len(spans)
    for c, column_spans in enumerate(spans):
        for _, end in column_spans:
            for i in range(end, min(len(tokens), end + _NUMBER_WINDOW)):
                if owner[i] >= 0:
                    break
                numbers[c] = parse_number(tokens[i])
                if numbers[c] is not None:
                    break
            if numbers[c] is not None:
                break
    return numbers


def encode_tables(
    examples: Sequence[TableExample],
    vocab: Vocab,
    max_rows: int = 64,
    max_columns: int = 16,
    max_question_tokens: int = 64,
) -> TableBatch:
    """Encode examples into a :class:`TableBatch`.

    Raises:
        ValueError: ``examples`` empty; a table with more than ``max_rows`` rows or
            ``max_columns`` columns (cut it first with :meth:`Table.limit`, which records what
            it drops); a question longer than ``max_question_tokens`` tokens.
    """
    if not examples:
        raise ValueError("examples must not be empty")
    for example in examples:
        table = example.table
        if table.num_rows > max_rows:
            raise ValueError(
                f"table {table.name!r} has {table.num_rows} rows > max_rows={max_rows}; "
                "cut it with Table.limit"
            )
        if table.num_columns > max_columns:
            raise ValueError(
                f"table {table.name!r} has {table.num_columns} columns > "
                f"max_columns={max_columns}; cut it with Table.limit"
            )
    tokens = [tokenize(e.question) for e in examples]
    for example, toks in zip(examples, tokens, strict=True):
        if len(toks) > max_question_tokens:
            raise ValueError(
                f"question has {len(toks)} tokens > max_question_tokens={max_question_tokens}: "
                f"{example.question[:60]!r}"
            )
    batch = len(examples)
    length = max(1, max(len(t) for t in tokens))
    rows = max(e.table.num_rows for e in examples)
    cols = max(e.table.num_columns for e in examples)
    question = torch.zeros(batch, length, dtype=torch.long)
    question_mask = torch.zeros(batch, length, dtype=torch.bool)
    mentions = torch.zeros(batch, cols, length)
    column_mask = torch.zeros(batch, cols, dtype=torch.bool)
    numeric = torch.zeros(batch, cols, dtype=torch.bool)
    row_mask = torch.zeros(batch, rows, dtype=torch.bool)
    features = torch.zeros(batch, rows, cols, len(CELL_FEATURES))
    values = torch.zeros(batch, rows, cols, dtype=torch.float64)
    value_mask = torch.zeros(batch, rows, cols, dtype=torch.bool)
    answer_cells = torch.zeros(batch, rows, cols, dtype=torch.bool)
    scalar = torch.zeros(batch, dtype=torch.float64)
    is_scalar = torch.zeros(batch, dtype=torch.bool)
    answer_column = torch.zeros(batch, dtype=torch.long)
    answer_size = torch.zeros(batch, dtype=torch.long)
    unknown = 0
    for b, (example, toks) in enumerate(zip(examples, tokens, strict=True)):
        table = example.table
        ids = vocab.encode(question_symbols(example))
        unknown += sum(i == vocab.unk_id for i in ids)
        question[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        question_mask[b, : len(ids)] = True
        ngrams = {
            tuple(toks[i : i + n]) for n in range(1, _NGRAM + 1) for i in range(len(toks) - n + 1)
        }
        column_mask[b, : table.num_columns] = True
        row_mask[b, : table.num_rows] = True
        numeric[b, : table.num_columns] = torch.tensor(table.numeric)
        spans = header_mentions(toks, table.header)
        numbers = _condition_numbers(toks, spans)
        for c in range(table.num_columns):
            number = numbers[c]
            for start, end in spans[c]:
                mentions[b, c, start:end] = 1.0
            for r in range(table.num_rows):
                text = table.rows[r][c]
                cell = features[b, r, c]
                if not text:
                    cell[5] = 1.0
                    continue
                cell_tokens = tuple(tokenize(text))
                if 0 < len(cell_tokens) <= _NGRAM and cell_tokens in ngrams:
                    cell[0] = 1.0
                else:
                    cell[6] = 1.0
                value = table.number(r, c)
                if value is not None:
                    values[b, r, c] = value
                    value_mask[b, r, c] = True
                    if number is not None:
                        cell[1], cell[2], cell[3] = value > number, value < number, value == number
                cell[4] = float(number is not None)
        if isinstance(example.answer, tuple):
            wanted = set(example.answer)
            for r in range(table.num_rows):
                for c in range(table.num_columns):
                    answer_cells[b, r, c] = table.rows[r][c] in wanted
            answer_column[b] = int(answer_cells[b].sum(0).argmax())
            answer_size[b] = len(example.answer)
        else:
            scalar[b] = float(example.answer)
            is_scalar[b] = True
    return TableBatch(
        question,
        question_mask,
        mentions,
        column_mask,
        numeric,
        row_mask,
        features,
        values.float(),
        value_mask,
        answer_cells,
        scalar.float(),
        is_scalar,
        answer_column,
        answer_size,
        unknown,
    )


@dataclass
class Heads:
    """The three latent choices of a batch.

    ``column``: batch ``(B, 1)`` over columns; ``operator``: ``(B, 1)`` over operators;
    ``cells``: ``(B, R)`` over ``{off, on}``; ``cell_log_on``/``cell_log_off``: ``(B, R)``;
    ``operator_scores``: the operator's raw scores ``(B, 6)`` (None when built by hand).
    """

    column: CategoricalAlignment
    operator: CategoricalAlignment
    cells: CategoricalAlignment
    cell_log_on: torch.Tensor
    cell_log_off: torch.Tensor
    operator_scores: torch.Tensor | None = None

    @property
    def column_probs(self) -> torch.Tensor:
        return self.column.attention[:, 0]

    @property
    def operator_probs(self) -> torch.Tensor:
        return self.operator.attention[:, 0]

    @property
    def cell_probs(self) -> torch.Tensor:
        return self.cells.attention[..., 1]


@dataclass
class TablePrediction:
    """An answer with the program behind it and the model's probability of that program."""

    answer: tuple[str, ...] | float
    column: int
    operator: str
    rows: tuple[int, ...]
    confidence: float


# ----------------------------------------------------------------------------- likelihoods


def count_log_probs(
    log_on: torch.Tensor, log_off: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """``log P(sum of independent Bernoullis = k)`` for ``k = 0..R``: ``(B, R + 1)``.

    The Poisson-binomial recursion in log space; masked rows are never selected;
    impossible counts get :data:`IMPOSSIBLE` or less.
    """
    batch, rows = log_on.shape
    table = log_on.new_full((batch, rows + 1), IMPOSSIBLE)
    table[:, 0] = 0.0
    for r in range(rows):
        on = torch.where(mask[:, r], log_on[:, r], torch.full_like(log_on[:, r], IMPOSSIBLE))
        off = torch.where(mask[:, r], log_off[:, r], torch.zeros_like(log_off[:, r]))
        shifted = torch.cat([table.new_full((batch, 1), IMPOSSIBLE), table[:, :-1]], dim=1)
        table = torch.logaddexp(table + off[:, None], shifted + on[:, None]).clamp_min(IMPOSSIBLE)
    return table


def _expected_results(heads: Heads, batch: TableBatch, sharpness: float = 5.0) -> torch.Tensor:
    """Expected execution result of each (column, operator) under the cell probabilities,
    ``(B, C, 6)``; NONE's entry is 0 (it has no scalar)."""
    p = heads.cell_probs * batch.row_mask
    vm = batch.value_mask.float() * p[:, :, None]
    count = p.sum(1, keepdim=True).expand(-1, batch.values.shape[2])
    total = (vm * batch.values).sum(1)
    average = total / vm.sum(1).clamp_min(1e-6)
    # a selection-weighted soft minimum/maximum on z-scored values (scale-free sharpness)
    present = batch.value_mask.float()
    n = present.sum(1, keepdim=True).clamp_min(1)
    mean = (batch.values * present).sum(1, keepdim=True) / n
    std = (((batch.values - mean) ** 2 * present).sum(1, keepdim=True) / n).sqrt().clamp_min(1e-6)
    z = (batch.values - mean) / std
    results = [torch.zeros_like(total), count, total, average]
    for sign in (-1.0, 1.0):
        logits = torch.where(
            batch.value_mask,
            sign * sharpness * z + torch.log(p[:, :, None].clamp_min(1e-12)),
            torch.full_like(z, -1e9),
        )
        weights = torch.softmax(logits, dim=1)
        results.append((weights * batch.values).sum(1))
    return torch.stack(results, dim=-1)


def program_log_likelihood(
    heads: Heads, batch: TableBatch, kernel_width: float = 0.05
) -> torch.Tensor:
    """``log p(answer | column, operator)`` with the cells marginalised, ``(B, C, 6)``;
    :data:`IMPOSSIBLE` where the program cannot produce the answer (see the module docstring)."""
    log_on, log_off = heads.cell_log_on, heads.cell_log_off
    rows = batch.row_mask
    b, _, cols = batch.values.shape
    out = log_on.new_full((b, cols, len(OPERATORS)), IMPOSSIBLE)
    # NONE: every valid row's cell is selected exactly when its text is in the answer
    y = batch.answer_cells.float()
    none = (y * log_on[:, :, None] + (1 - y) * log_off[:, :, None]) * rows[:, :, None]
    # a column lacking one of the answer's texts cannot produce it; when a text repeats in the
    # column every copy counts as wanted (a lower bound on the exact multiset probability)
    covers = batch.answer_cells.sum(1) >= batch.answer_size[:, None]
    possible = covers & ~batch.is_scalar[:, None]
    out[:, :, _NONE] = torch.where(possible, none.sum(1), IMPOSSIBLE)
    # COUNT: Poisson-binomial probability of the answer
    counts = count_log_probs(log_on, log_off, rows)
    target = batch.scalar.round().long().clamp(0, counts.shape[1] - 1)
    integral = (
        batch.is_scalar & (batch.scalar == batch.scalar.round()) & (batch.scalar <= rows.sum(1))
    )
    count_ll = torch.where(integral, counts.gather(1, target[:, None])[:, 0], IMPOSSIBLE)
    out[:, :, _COUNT] = count_ll[:, None]
    # SUM / AVERAGE: a Gaussian kernel on the expected result's relative error
    expected = _expected_results(heads, batch)
    scale = batch.scalar.abs()[:, None] + 1.0
    for op in (_SUM, _AVG):
        err = (expected[:, :, op] - batch.scalar[:, None]) / scale
        out[:, :, op] = -0.5 * (err / kernel_width) ** 2
    # MIN / MAX: exact, nothing beyond the answer selected and at least one cell equal to it
    s = batch.scalar[:, None, None]
    close = batch.value_mask & ((batch.values - s).abs() <= 1e-6 * (s.abs() + 1))
    for op, beyond in ((_MIN, batch.values < s), (_MAX, batch.values > s)):
        forbidden = batch.value_mask & beyond & ~close
        none_beyond = (log_off[:, :, None] * forbidden).sum(1)
        all_equal_off = (log_off[:, :, None] * close).sum(1)
        some_equal_on = torch.log(-torch.expm1(all_equal_off).clamp_max(-1e-12))
        out[:, :, op] = torch.where(close.any(1), none_beyond + some_equal_on, IMPOSSIBLE)
    numeric_ok = batch.numeric[:, :, None] | ~_NUMERIC_OPS.to(out.device)
    scalar_ok = batch.is_scalar[:, None, None] | (
        torch.arange(len(OPERATORS), device=out.device) == _NONE)
    valid = numeric_ok & scalar_ok & batch.column_mask[:, :, None]
    return torch.where(valid, out, torch.full_like(out, IMPOSSIBLE))


# ----------------------------------------------------------------------------- modes

#: training modes by name; add with :func:`register_table_qa_mode`
TABLE_QA_MODES: dict[str, type[TableQAMode]] = {}


def register_table_qa_mode(name: str) -> Callable[[type[TableQAMode]], type[TableQAMode]]:
    """Class decorator: make a :class:`TableQAMode` available to ``TableQA(mode=name)``."""
    return class_decorator(TABLE_QA_MODES, name, TableQAMode, set_name=True)


class TableQAMode(abc.ABC):
    """How the latent program is trained.  :meth:`make_choice` builds the column and operator
    distributions (a softmax :class:`~structattn.CategoricalAlignment` unless overridden)."""

    name: str = ""

    def make_choice(self, scores: torch.Tensor, mask: torch.Tensor | None) -> CategoricalAlignment:
        """A distribution over the last axis of ``scores (B, K)``, batch shape ``(B, 1)``."""
        return CategoricalAlignment(
            logits=scores[:, None, :], mask=None if mask is None else mask[:, None, :]
        )

    @abc.abstractmethod
    def loss(self, heads: Heads, batch: TableBatch) -> torch.Tensor:
        """Mean training loss of the batch (a scalar)."""


@register_table_qa_mode("soft")
class SoftMode(TableQAMode):
    """TAPAS: expected results of soft cell selections, Huber loss on scalars; cell
    log-likelihood and "no aggregation" on cell answers.

    Args:
        huber_delta: the Huber loss's threshold on the relative error.
        mix: ``"loss"`` (default): each (column, operator) keeps its own expected result and
            the Huber losses are averaged under ``p(column) p(operator | not NONE)``, so an
            operator's probability rises exactly when its own result fits the answer.
            ``"result"``: TAPAS's form, one Huber loss on the result averaged over columns and
            operators; on our data the mixture can fit the answer with the wrong operator
            (the operator collapsed onto COUNT for every scalar question: 0.16 accuracy at
            the default budget).
    """

    def __init__(self, huber_delta: float = 0.5, mix: str = "loss") -> None:
        if mix not in ("loss", "result"):
            raise ValueError(f"mix must be 'loss' or 'result', got {mix!r}")
        self.huber_delta = huber_delta
        self.mix = mix

    def loss(self, heads, batch):
        p_col, p_op = heads.column_probs, heads.operator_probs
        log_op = torch.log(p_op.clamp_min(1e-12))
        # cell answers: column with most answer cells, its cells, and NONE
        col_ll = torch.log(p_col.gather(1, batch.answer_column[:, None])[:, 0].clamp_min(1e-12))
        y = batch.answer_cells.gather(
            2, batch.answer_column[:, None, None].expand(-1, batch.answer_cells.shape[1], 1)
        )[:, :, 0].float()
        cell_ll = ((y * heads.cell_log_on + (1 - y) * heads.cell_log_off) * batch.row_mask).sum(1)
        cell_ll = cell_ll / batch.row_mask.sum(1).clamp_min(1)
        cells_loss = -(log_op[:, _NONE] + col_ll + cell_ll)
        # scalar answers: expected results over columns and the operators that can produce
        # the answer (a numeric operator needs a numeric column; COUNT an integer no larger
        # than the table), as enum rules them out; without this, fractional COUNTs fitted
        # every scalar and the operator collapsed onto COUNT
        expected = _expected_results(heads, batch)[:, :, 1:]  # (B, C, 5)
        rows = batch.row_mask.sum(1)
        countable = (batch.scalar == batch.scalar.round()) & (batch.scalar <= rows)
        valid = batch.numeric[:, :, None] | ~_NUMERIC_OPS[1:].to(expected.device)
        valid = valid & batch.column_mask[:, :, None]
        valid[:, :, _COUNT - 1] &= countable[:, None]
        weights = p_col[:, :, None] * p_op[:, None, 1:] * valid
        mass = weights.sum((1, 2))
        weights = weights / mass.clamp_min(1e-12)[:, None, None]
        if self.mix == "result":
            expected = (weights * expected).sum((1, 2))[:, None, None]
        err = (expected - batch.scalar[:, None, None]) / (batch.scalar.abs() + 1.0)[:, None, None]
        huber = F.huber_loss(err, torch.zeros_like(err), delta=self.huber_delta, reduction="none")
        if self.mix == "loss":
            huber = (weights * huber).sum((1, 2))
        else:
            huber = huber[:, 0, 0]
        scalar_loss = -torch.log(mass.clamp_min(1e-6)) + huber
        return torch.where(batch.is_scalar, scalar_loss, cells_loss).mean()


@register_table_qa_mode("enum")
class EnumMode(TableQAMode):
    """Exact marginal likelihood over column x operator (cells as in the module docstring)."""

    def loss(self, heads, batch):
        joint = (
            heads.column.logits[:, 0, :, None]
            + heads.operator.logits[:, 0, None, :]
            + program_log_likelihood(heads, batch)
        )
        log_marginal = torch.logsumexp(joint.flatten(1), dim=1)
        explained = log_marginal > IMPOSSIBLE / 2
        # an answer no program explains (e.g. a count beyond the rows) gives no gradient
        return -torch.where(explained, log_marginal, torch.zeros_like(log_marginal)).sum() / max(
            1, int(explained.sum())
        )


@register_table_qa_mode("sparse")
class SparseMode(TableQAMode):
    """Sparse (entmax) column and operator; expected negative log-likelihood over their support.

    ``alpha=1.5`` (entmax15) by default: with sparsemax (``alpha=2``) the operator's support
    shrank to one operator early in training, where its gradient is zero, and stayed there
    (quick budget: 0.21 denotation accuracy with sparsemax, 0.65 with entmax15).
    """

    def __init__(
        self, loss_cap: float = 100.0, alpha: float = 1.5, kind_weight: float = 1.0
    ) -> None:
        if not alpha > 1:
            raise ValueError(f"alpha must be > 1 (2 = sparsemax, 1.5 = entmax15), got {alpha!r}")
        self.loss_cap = loss_cap
        self.alpha = alpha
        self.kind_weight = kind_weight

    def make_choice(self, scores, mask):
        return SparsemaxAlignment(
            scores=scores[:, None, :],
            mask=None if mask is None else mask[:, None, :],
            alpha=self.alpha,
        )

    def loss(self, heads, batch):
        nll = (-program_log_likelihood(heads, batch)).clamp_max(self.loss_cap)
        weights = heads.column_probs[:, :, None] * heads.operator_probs[:, None, :]
        # zero-probability programs contribute exactly nothing (not 0 * inf)
        terms = torch.where(weights > 0, weights * nll, torch.zeros_like(nll))
        loss = terms.sum((1, 2))
        if self.kind_weight and heads.operator_scores is not None:
            loss = loss + self.kind_weight * answer_kind_loss(heads.operator_scores, batch)
        return loss.mean()


def answer_kind_loss(operator_scores: torch.Tensor, batch: TableBatch) -> torch.Tensor:
    """``-log p(NONE)`` for cell answers, ``-log(1 - p(NONE))`` for scalars, under the softmax
    of ``operator_scores (B, 6)``: TAPAS's aggregation loss, ``(B,)``.

    A sparse operator choice has zero gradient outside its support: a cell question whose
    support had lost NONE could never bring it back (0.23 accuracy on NONE questions, mostly
    answered with MIN); this dense term on the same scores always can."""
    log_none = F.log_softmax(operator_scores, dim=-1)[:, _NONE]
    log_other = torch.log(-torch.expm1(log_none).clamp_max(-1e-12))
    return -torch.where(batch.is_scalar, log_other, log_none)


@register_table_qa_mode("hard-score")
class HardScoreMode(TableQAMode):
    """Sampled programs, reward = answer match + partial credit, leave-one-out baseline."""

    def __init__(self, num_samples: int = 4, partial_credit: float = 0.5) -> None:
        if num_samples < 2:
            raise ValueError(
                f"num_samples must be >= 2 for the leave-one-out baseline, got {num_samples}"
            )
        self.num_samples = num_samples
        self.partial_credit = partial_credit

    def loss(self, heads, batch):
        k = self.num_samples
        column = heads.column.sample((k,))[:, :, 0]  # (K, B)
        operator = heads.operator.sample((k,))[:, :, 0]
        cells = heads.cells.sample((k,)).float() * batch.row_mask  # (K, B, R)
        log_q = (
            heads.column.log_prob(column[:, :, None])[:, :, 0]
            + heads.operator.log_prob(operator[:, :, None])[:, :, 0]
            + ((cells * heads.cell_log_on + (1 - cells) * heads.cell_log_off) * batch.row_mask).sum(
                -1
            )
        )
        with torch.no_grad():
            reward = self.reward(batch, column, operator, cells)
            baseline = (reward.sum(0, keepdim=True) - reward) / (k - 1)
        return -((reward - baseline) * log_q).mean()

    def reward(self, batch, column, operator, cells) -> torch.Tensor:
        """``(K, B)`` rewards of sampled programs, executed on tensors."""
        index = column[:, :, None, None].expand(-1, -1, batch.values.shape[1], 1)
        values = batch.values.expand(column.shape[0], -1, -1, -1).gather(3, index)[..., 0]
        present = batch.value_mask.expand(column.shape[0], -1, -1, -1).gather(3, index)[..., 0]
        wanted = (
            batch.answer_cells.expand(column.shape[0], -1, -1, -1).gather(3, index)[..., 0].float()
        )
        chosen = cells * present
        big = torch.finfo(values.dtype).max
        results = torch.stack(
            [
                torch.zeros_like(values[..., 0]),
                cells.sum(-1),
                (chosen * values).sum(-1),
                (chosen * values).sum(-1) / chosen.sum(-1).clamp_min(1),
                torch.where(chosen > 0, values, torch.full_like(values, big)).amin(-1),
                torch.where(chosen > 0, values, torch.full_like(values, -big)).amax(-1),
            ],
            dim=-1,
        ).gather(2, operator[:, :, None])[..., 0]
        target = batch.scalar[None]
        rel = (results - target).abs() / (target.abs() + 1)
        numeric_op = _NUMERIC_OPS.to(operator.device)[operator]
        numeric_ok = batch.numeric.gather(1, column.T).T | ~numeric_op
        has_value = (chosen.sum(-1) > 0) | ~numeric_op | (operator == _COUNT)
        scalar_reward = torch.where(
            rel <= 1e-6, torch.ones_like(rel), self.partial_credit * (1 - rel).clamp_min(0)
        ) * (numeric_ok & has_value & (operator != _NONE))
        overlap = (cells * wanted).sum(-1)
        f1 = 2 * overlap / (cells.sum(-1) + wanted.sum(-1)).clamp_min(1)
        cell_reward = torch.where(f1 >= 1 - 1e-6, torch.ones_like(f1), self.partial_credit * f1)
        cell_reward = cell_reward * (operator == _NONE)
        return torch.where(batch.is_scalar[None], scalar_reward, cell_reward)


# ----------------------------------------------------------------------------- encoders

#: question encoders by name; add with :func:`register_question_encoder`
QUESTION_ENCODERS: dict[str, type[QuestionEncoder]] = {}


def register_question_encoder(
    name: str,
) -> Callable[[type[QuestionEncoder]], type[QuestionEncoder]]:
    """Class decorator: make a :class:`QuestionEncoder` available to ``TableQA(encoder=name)``."""
    return class_decorator(QUESTION_ENCODERS, name, QuestionEncoder, set_name=True)


class QuestionEncoder(nn.Module, abc.ABC):
    """Contextual states of the question's tokens:
    ``forward(words (B, L, embed_dim), mask (B, L)) -> (B, L, hidden)``; states at padded
    positions are unspecified (the model masks them)."""

    name: str = ""

    def __init__(self, embed_dim: int, hidden: int) -> None:
        super().__init__()
        if hidden < 2 or hidden % 2:
            raise ValueError(f"hidden must be a positive even int, got {hidden!r}")
        self.hidden = hidden

    @abc.abstractmethod
    def forward(self, words: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """States ``(B, L, hidden)``."""


@register_question_encoder("bigru")
class BiGRUQuestionEncoder(QuestionEncoder):
    """A bidirectional GRU whose backward direction starts at each question's last real token
    (:class:`~structattn.nn.BiRNN`), so padding never reaches the states."""

    def __init__(self, embed_dim: int, hidden: int) -> None:
        super().__init__(embed_dim, hidden)
        self.rnn = BiRNN(embed_dim, hidden, cell="gru")

    def forward(self, words, mask):
        return self.rnn(words, mask)


@register_question_encoder("transformer")
class TransformerQuestionEncoder(QuestionEncoder):
    """Pre-norm Transformer encoder layers (:class:`~structattn.nn.TransformerEncoderLayer`)
    over the projected word embeddings plus sinusoidal positions, then a final layer norm.

    Args:
        layers: number of layers; heads: attention heads (must divide ``hidden``).
    """

    def __init__(self, embed_dim: int, hidden: int, layers: int = 2, heads: int = 4) -> None:
        super().__init__(embed_dim, hidden)
        if hidden % heads:
            raise ValueError(f"heads={heads} must divide hidden={hidden}")
        self.project = nn.Linear(embed_dim, hidden)
        self.positions = SinusoidalPositionalEncoding(hidden, max_length=256)
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(hidden, heads, dim_feedforward=2 * hidden, dropout=0.1)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(hidden)

    def forward(self, words, mask):
        states = self.positions(self.project(words))
        for layer in self.layers:
            states = layer(states, mask)
        return self.norm(states)


# ----------------------------------------------------------------------------- model


class TableQA(nn.Module):
    """Question encoder, latent column/cells/operator, a mode that trains them from answers.

    Args:
        vocab_size: question vocabulary size (``<unk>`` included).
        mode: a name in :data:`TABLE_QA_MODES` or a :class:`TableQAMode` instance.
        embed_dim: word embedding size.
        hidden: question encoder state size; even.
        dropout: dropout on word embeddings.
        encoder: a name in :data:`QUESTION_ENCODERS` (``"bigru"``, ``"transformer"``).

    ``forward(batch) -> Heads``; ``loss(batch)``; ``predict(examples, batch)``.
    """

    def __init__(
        self,
        vocab_size: int,
        mode: str | TableQAMode = "soft",
        embed_dim: int = 32,
        hidden: int = 64,
        dropout: float = 0.1,
        encoder: str = "bigru",
    ) -> None:
        super().__init__()
        if isinstance(mode, str):
            if mode not in TABLE_QA_MODES:
                raise ValueError(f"mode must be one of {sorted(TABLE_QA_MODES)}, got {mode!r}")
            mode = TABLE_QA_MODES[mode]()
        if not isinstance(mode, TableQAMode):
            raise ValueError(f"mode must be a name or a TableQAMode, got {type(mode).__name__}")
        if not isinstance(vocab_size, int) or vocab_size < 5:
            raise ValueError(f"vocab_size must be an int >= 5, got {vocab_size!r}")
        if hidden < 2 or hidden % 2:
            raise ValueError(f"hidden must be a positive even int, got {hidden!r}")
        if encoder not in QUESTION_ENCODERS:
            raise ValueError(
                f"encoder must be one of {sorted(QUESTION_ENCODERS)}, got {encoder!r}"
            )
        self.mode = mode
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.dropout = nn.Dropout(dropout)
        self.encoder = QUESTION_ENCODERS[encoder](embed_dim, hidden)
        column_in = 2 * hidden + 4
        self.column_scorer = nn.Sequential(
            nn.Linear(column_in, hidden), nn.Tanh(), nn.Linear(hidden, 1)
        )
        # a bag-of-words path too: operator words survive the held-out sentence frames
        self.operator_words = nn.Linear(embed_dim, len(OPERATORS))
        self.operator_scorer = nn.Sequential(
            nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, len(OPERATORS))
        )
        self.condition = nn.Sequential(
            nn.Linear(hidden + 4, hidden), nn.Tanh(), nn.Linear(hidden, len(CELL_FEATURES))
        )
        # one bias for every question: rows are chosen by the conditions alone, so a
        # satisfied row scores the same under every operator.  A bias read from the question
        # let AVERAGE questions (whose expected result is unchanged when every probability
        # shrinks) push their selections below 0.5: 0.29 accuracy on them against 0.94-0.97
        # on the other operators.
        self.row_bias = nn.Parameter(torch.tensor(1.0))

    def forward(self, batch: TableBatch) -> Heads:
        """The latent choices' distributions for ``batch``."""
        words = self.dropout(self.embed(batch.question))
        states = self.encoder(words, batch.question_mask)
        mask = batch.question_mask[:, :, None]
        bag = (words * mask).sum(1) / mask.sum(1).clamp_min(1)
        states = states * batch.question_mask[:, :, None]
        pooled = states.masked_fill(~batch.question_mask[:, :, None], -1e4).amax(1)  # (B, H)
        counts = batch.mentions.sum(-1, keepdim=True)
        column_rep = batch.mentions @ states / counts.clamp_min(1)  # (B, C, H)
        has_number = batch.features[:, :, :, 4].amax(1)[:, :, None]
        has_text = batch.features[:, :, :, 0].amax(1)[:, :, None]
        column_feats = torch.cat(
            [(counts > 0).float(), batch.numeric[:, :, None].float(), has_number, has_text], -1
        )
        column_scores = self.column_scorer(
            torch.cat([column_rep, pooled[:, None].expand_as(column_rep), column_feats], -1)
        )[..., 0]
        # a condition needs its column mentioned and a value to compare with (a number after
        # the mention, or one of its cells' text in the question): this keeps the selected
        # column's own mention from filtering rows in sentence frames never seen in training
        conditional = (counts > 0) & ((has_number > 0) | (has_text > 0))
        weights = self.condition(torch.cat([column_rep, column_feats], -1))  # (B, C, F)
        weights = weights * (conditional & batch.column_mask[:, :, None])
        row_scores = self.row_bias + torch.einsum(
            "brcf,bcf->br", batch.features, weights
        )
        cell_scores = torch.stack([torch.zeros_like(row_scores), row_scores], -1)
        operator_scores = self.operator_scorer(pooled) + self.operator_words(bag)
        return Heads(
            column=self.mode.make_choice(column_scores, batch.column_mask),
            operator=self.mode.make_choice(operator_scores, None),
            cells=CategoricalAlignment(logits=cell_scores),
            cell_log_on=F.logsigmoid(row_scores),
            cell_log_off=F.logsigmoid(-row_scores),
            operator_scores=operator_scores,
        )

    def loss(self, batch: TableBatch) -> torch.Tensor:
        """The mode's training loss."""
        return self.mode.loss(self(batch), batch)

    @torch.no_grad()
    def predict(self, examples: Sequence[TableExample], batch: TableBatch) -> list[TablePrediction]:
        """The most probable column, the most probable operator it allows, the cells with
        probability > 0.5, executed; confidence = the program's probability under the model."""
        heads = self(batch)
        p_col, p_op, p_cell = heads.column_probs, heads.operator_probs, heads.cell_probs
        predictions = []
        for b, example in enumerate(examples):
            table = example.table
            column = int(p_col[b, : table.num_columns].argmax())
            allowed = p_op[b].clone()
            if not table.numeric[column]:
                allowed[_NUMERIC_OPS] = -1.0
            operator = int(allowed.argmax())
            probs = p_cell[b, : table.num_rows]
            rows = tuple(int(r) for r in torch.nonzero(probs > 0.5)[:, 0])
            certainty = torch.where(probs > 0.5, probs, 1 - probs).prod()
            confidence = float(p_col[b, column] * p_op[b, operator] * certainty)
            answer = execute(table, column, rows, OPERATORS[operator])
            predictions.append(
                TablePrediction(answer, column, OPERATORS[operator], rows, confidence)
            )
        return predictions
