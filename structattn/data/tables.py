"""Real tables and WikiSQL-style questions over them, for table question answering.

**What the data is.**  The tables are real: the offline tables of ``vega_datasets`` (cars,
airports, seattle-weather, ...) and the 757 R data sets inside ``pydataset``'s source archive
(read with :mod:`tarfile`; importing ``pydataset`` would write to ``$HOME``).  The *questions
are not*: :func:`generate_questions` fills paraphrase templates (select one column; zero, one or
two where-conditions with ``=``, ``>``, ``<``; aggregation NONE, COUNT, SUM, AVERAGE, MIN, MAX)
and executes them, so every example carries its answer, gold cells, gold column and gold
operator.  Unlike WikiSQL (crowd-paraphrased questions over 24k Wikipedia tables), the wording
here comes from a few dozen templates, the test split uses *held-out templates* (same words,
different sentence frames), and the split is **by table**: no test table is seen in training.

**Bad input, documented.**  Missing values (``""``, ``NA``, ``nan``, ...) become ``""`` and
are counted (:attr:`Table.missing_cells`); they never match a condition and are skipped by
numeric aggregations (SQL's NULL semantics; COUNT counts rows).  Non-numeric cells in a numeric
column are counted (:attr:`Table.non_numeric_cells`) and treated as missing in aggregations.
Duplicate headers are renamed ``name``, ``name 2``, ... and counted
(:attr:`Table.renamed_headers`).  A table with no rows or no columns raises ``ValueError``;
loaders skip such tables and report how many (:class:`LoadReport`).  Tables larger than a
model's limits are cut by :meth:`Table.limit`, which records the rows and columns it dropped.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import random
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from structattn.data.splits import Splits, stable_fraction

__all__ = [
    "OPERATORS",
    "NUMERIC_OPERATORS",
    "LoadReport",
    "Table",
    "TableExample",
    "answers_match",
    "execute",
    "generate_questions",
    "load_pydataset_tables",
    "load_vega_tables",
    "load_wikisql_jsonl",
    "load_wikitablequestions",
    "make_table",
    "split_by_table",
    "tokenize",
]

#: aggregation operators, in the order the model scores them
OPERATORS: tuple[str, ...] = ("NONE", "COUNT", "SUM", "AVERAGE", "MIN", "MAX")
#: operators that need a numeric column
NUMERIC_OPERATORS: frozenset[str] = frozenset({"SUM", "AVERAGE", "MIN", "MAX"})

_MISSING = frozenset({"", "na", "nan", "null", "none", "n/a", "-"})
_TOKEN = re.compile(r"-?\d+(?:\.\d+)?|[^\W\d_]+|[^\s\w]")


def tokenize(text: str) -> list[str]:
    """Lower-cased word, number and punctuation tokens (``"Miles_per_Gallon"`` -> 3 words)."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    return _TOKEN.findall(text.replace("_", " ").lower())


def parse_number(text: str) -> float | None:
    """The float a cell holds (``"1,234"`` -> 1234.0), or None for text or missing cells."""
    cleaned = text.strip().replace(",", "")
    if cleaned.lower() in _MISSING:
        return None
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class Table:
    """A table of string cells; ``""`` marks a missing value.  Build with :func:`make_table`.

    Attributes:
        name: where it came from (``"vega/cars"``, ``"pydataset/MASS/Cars93"``).
        header: column names, unique.
        rows: ``rows[r][c]`` cell text.
        numeric: per column, True when at least 90% of its present cells parse as numbers.
        missing_cells, non_numeric_cells, renamed_headers: counts of repaired input.
        dropped_rows, dropped_columns: counts removed by :meth:`limit`.
    """

    name: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    numeric: tuple[bool, ...]
    missing_cells: int = 0
    non_numeric_cells: int = 0
    renamed_headers: int = 0
    dropped_rows: int = 0
    dropped_columns: int = 0

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    @property
    def num_columns(self) -> int:
        return len(self.header)

    def number(self, row: int, column: int) -> float | None:
        """The numeric value of a cell of a numeric column, None if missing or non-numeric."""
        if not self.numeric[column]:
            return None
        return parse_number(self.rows[row][column])

    def limit(self, max_rows: int, max_columns: int, seed: int = 0) -> Table:
        """At most ``max_rows`` rows (a seeded sample, order kept) and the first
        ``max_columns`` columns; the counts dropped are recorded on the result."""
        if max_rows < 1 or max_columns < 1:
            raise ValueError(
                f"max_rows and max_columns must be >= 1, got {max_rows}, {max_columns}"
            )
        keep_rows = range(self.num_rows)
        if self.num_rows > max_rows:
            keep_rows = sorted(random.Random(f"{seed}/{self.name}").sample(keep_rows, max_rows))
        width = min(max_columns, self.num_columns)
        return Table(
            name=self.name,
            header=self.header[:width],
            rows=tuple(self.rows[r][:width] for r in keep_rows),
            numeric=self.numeric[:width],
            missing_cells=self.missing_cells,
            non_numeric_cells=self.non_numeric_cells,
            renamed_headers=self.renamed_headers,
            dropped_rows=self.dropped_rows + self.num_rows - len(keep_rows),
            dropped_columns=self.dropped_columns + self.num_columns - width,
        )


def make_table(
    name: str,
    header: Sequence[str],
    rows: Iterable[Sequence[object]],
    max_rows: int | None = None,
    max_columns: int | None = None,
    seed: int = 0,
) -> Table:
    """Validate and normalise a table (see the module docstring for what is repaired).

    ``max_rows``/``max_columns`` cut the raw rows (a seeded sample, order kept) and columns
    before any per-cell work, recording the counts dropped.

    Raises:
        ValueError: no columns, no rows, or a row whose length differs from the header's.
    """
    header = [str(h).strip() or f"column {i + 1}" for i, h in enumerate(header)]
    rows = list(rows)
    dropped_rows = dropped_columns = 0
    if max_rows is not None and len(rows) > max_rows:
        keep = sorted(random.Random(f"{seed}/{name}").sample(range(len(rows)), max_rows))
        dropped_rows, rows = len(rows) - max_rows, [rows[r] for r in keep]
    if max_columns is not None and len(header) > max_columns:
        for index, row in enumerate(rows):
            if len(row) != len(header):
                raise ValueError(
                    f"table {name!r}: row {index} has {len(row)} cells, header has {len(header)}"
                )
        dropped_columns = len(header) - max_columns
        header, rows = header[:max_columns], [list(row)[:max_columns] for row in rows]
    if not header:
        raise ValueError(f"table {name!r}: header has no columns")
    seen: Counter[str] = Counter()
    unique, renamed = [], 0
    for column in header:
        seen[column] += 1
        if seen[column] > 1:
            renamed += 1
            column = f"{column} {seen[column]}"
        unique.append(column)
    cells, missing = [], 0
    for index, row in enumerate(rows):
        row = ["" if value is None else str(value).strip() for value in row]
        if len(row) != len(unique):
            raise ValueError(
                f"table {name!r}: row {index} has {len(row)} cells, header has {len(unique)}"
            )
        for c, value in enumerate(row):
            if value.lower() in _MISSING:
                row[c] = ""
                missing += 1
        cells.append(tuple(row))
    if not cells:
        raise ValueError(f"table {name!r} has no rows")
    numeric, non_numeric = [], 0
    for c in range(len(unique)):
        present = [row[c] for row in cells if row[c]]
        parsed = sum(parse_number(value) is not None for value in present)
        is_numeric = bool(present) and parsed >= 0.9 * len(present)
        numeric.append(is_numeric)
        if is_numeric:
            non_numeric += len(present) - parsed
    return Table(
        name,
        tuple(unique),
        tuple(cells),
        tuple(numeric),
        missing,
        non_numeric,
        renamed,
        dropped_rows,
        dropped_columns,
    )


@dataclass
class LoadReport:
    """What a loader kept and skipped, with the reason for each skip."""

    kept: int = 0
    skipped: Counter = field(default_factory=Counter)


# ----------------------------------------------------------------------------- real tables


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates without importing (no side effects)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"package {package!r} is not installed; pip install {package} (the 'data' extra)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _records_to_rows(records: list[dict]) -> tuple[list[str], list[list[object]]]:
    header: list[str] = []
    for record in records:
        header.extend(key for key in record if key not in header)
    return header, [[record.get(key) for key in header] for record in records]


def _usable(table: Table, min_rows: int) -> str | None:
    """Why a table cannot serve for questions (None when it can)."""
    if table.num_rows < min_rows:
        return "too few rows"
    if sum(table.numeric) < 1:
        return "no numeric column"
    if all(table.numeric):
        return "no text column"
    return None


def load_vega_tables(
    min_rows: int = 10,
    max_rows: int | None = None,
    max_columns: int | None = None,
    report: LoadReport | None = None,
) -> list[Table]:
    """The offline tables of ``vega_datasets`` with a text and a numeric column, cut to
    ``max_rows`` x ``max_columns`` (see :func:`make_table`)."""
    root = _package_dir("vega_datasets")
    index = json.loads((root / "local_datasets.json").read_text())
    report = report if report is not None else LoadReport()
    tables = []
    for name, relative in sorted(index.items()):
        path = root / relative
        if path.suffix == ".json":
            header, rows = _records_to_rows(json.loads(path.read_text()))
        else:
            reader = csv.reader(io.StringIO(path.read_text()))
            header, *rows = list(reader)
        _admit(lambda name=name, header=header, rows=rows: make_table(
            f"vega/{name}", header, rows, max_rows, max_columns), tables, report, min_rows)
    return tables


def load_pydataset_tables(
    min_rows: int = 10,
    max_rows: int | None = None,
    max_columns: int | None = None,
    limit: int | None = None,
    report: LoadReport | None = None,
) -> list[Table]:
    """R data sets from ``pydataset``'s ``resources.tar.gz``, read without importing it.

    An unnamed first column holds R's row names: it is called ``name`` when it is text and
    dropped when it only numbers the rows.  ``limit`` keeps the first ``limit`` usable tables
    in archive-name order.
    """
    archive = _package_dir("pydataset") / "resources.tar.gz"
    report = report if report is not None else LoadReport()
    tables = []
    with tarfile.open(archive) as tar:
        members = sorted(
            (
                m
                for m in tar.getmembers()
                if m.isfile()
                and m.name.endswith(".csv")
                and "/csv/" in m.name
                and not Path(m.name).name.startswith("._")
            ),
            key=lambda m: m.name,
        )
        for member in members:
            if limit is not None and len(tables) >= limit:
                break
            handle = tar.extractfile(member)
            text = handle.read().decode("utf-8", errors="replace") if handle else ""
            parts = Path(member.name).parts
            name = "pydataset/" + "/".join(parts[-2:])[: -len(".csv")]
            _admit(lambda text=text, name=name: _r_table(name, text, max_rows, max_columns),
                   tables, report, min_rows)
    return tables


def _r_table(name: str, text: str, max_rows: int | None, max_columns: int | None) -> Table:
    """An R data set's CSV: an unnamed first column of row numbers is dropped, of text is
    called ``name``."""
    header, *rows = list(csv.reader(io.StringIO(text)))
    if header and header[0].strip() == "":
        if all(parse_number(row[0]) is not None for row in rows if row):
            header, rows = header[1:], [row[1:] for row in rows]
        else:
            header[0] = "name"
    return make_table(name, header, rows, max_rows, max_columns)


def _admit(build, tables: list[Table], report: LoadReport, min_rows: int) -> None:
    """Build a table and keep it, or count why not (malformed, empty or unusable)."""
    try:
        table = build()
    except (ValueError, csv.Error):
        report.skipped["malformed or empty"] += 1
        return
    reason = _usable(table, min_rows)
    if reason:
        report.skipped[reason] += 1
        return
    report.kept += 1
    tables.append(table)


# ----------------------------------------------------------------------------- execution


def execute(
    table: Table, column: int, rows: Iterable[int], operator: str
) -> tuple[str, ...] | float:
    """Run ``operator`` over the cells ``(rows, column)``: a tuple of cell texts for NONE, a
    float otherwise; ``nan`` when a numeric operator has no numeric cell to work on."""
    if operator not in OPERATORS:
        raise ValueError(f"operator must be one of {OPERATORS}, got {operator!r}")
    rows = sorted(set(rows))
    if operator == "NONE":
        return tuple(table.rows[r][column] for r in rows)
    if operator == "COUNT":
        return float(len(rows))
    values = [v for v in (table.number(r, column) for r in rows) if v is not None]
    if not values:
        return math.nan
    if operator == "SUM":
        return float(sum(values))
    if operator == "AVERAGE":
        return float(sum(values) / len(values))
    return float(min(values) if operator == "MIN" else max(values))


def answers_match(predicted: Sequence[str] | float, gold: Sequence[str] | float) -> bool:
    """Denotation match: same multiset of cell texts, or numbers equal to 1e-6 relative."""
    if isinstance(gold, (int, float)):
        if not isinstance(predicted, (int, float)) or math.isnan(predicted):
            return False
        return math.isclose(predicted, gold, rel_tol=1e-6, abs_tol=1e-6)
    if isinstance(predicted, (int, float)):
        return False
    return Counter(predicted) == Counter(gold)


# ----------------------------------------------------------------------------- questions


@dataclass(frozen=True)
class TableExample:
    """A question over a table with its answer and gold program.

    ``answer`` is a tuple of cell texts (``kind == "cells"``) or a float (``"scalar"``).
    ``gold_column``/``gold_operator``/``gold_rows`` are None for loaded data sets that do not
    provide them (WikiTableQuestions).
    """

    table: Table
    question: str
    answer: tuple[str, ...] | float
    gold_column: int | None = None
    gold_operator: str | None = None
    gold_rows: tuple[int, ...] | None = None
    template: str = ""

    @property
    def kind(self) -> str:
        return "cells" if isinstance(self.answer, tuple) else "scalar"


# Paraphrase pieces.  Training and test templates share these words; the held-out templates
# differ in sentence frame, so the test measures recombination, not unseen vocabulary.
_AGG_WORDS = {
    "SUM": ("the total {col}", "the sum of {col}"),
    "AVERAGE": ("the average {col}", "the mean {col}"),
    "MIN": ("the lowest {col}", "the minimum {col}", "the smallest {col}"),
    "MAX": ("the highest {col}", "the maximum {col}", "the largest {col}"),
    "NONE": ("the {col}", "each {col}"),
}
_CONDITION_WORDS = {
    "=": ("{col} is {val}", "{col} equals {val}"),
    ">": ("{col} is greater than {val}", "{col} is above {val}", "{col} is more than {val}"),
    "<": ("{col} is less than {val}", "{col} is below {val}", "{col} is under {val}"),
}
_TRAIN_FRAMES = (
    "what is {agg} where {cond} ?",
    "tell me {agg} for rows where {cond} .",
    "find {agg} if {cond} .",
    "what is {agg} in the table ?",
)
_TEST_FRAMES = (
    "where {cond} , what is {agg} ?",
    "give {agg} when {cond} .",
)
# COUNT names its column, as WikiSQL's COUNT(column) does
_COUNT_FRAMES_TRAIN = (
    "how many {col} entries have {cond} ?",
    "what is the number of {col} entries where {cond} ?",
    "find the count of {col} entries if {cond} .",
)
_COUNT_FRAMES_TEST = ("where {cond} , how many {col} entries are there ?",)


def _phrase(header: str) -> str:
    return " ".join(tokenize(header))


def _format_value(text: str) -> str:
    return " ".join(tokenize(text))


def _choose_conditions(table: Table, rng: random.Random, count: int, exclude: int):
    conditions = []
    candidates = [c for c in range(table.num_columns) if c != exclude]
    rng.shuffle(candidates)
    for column in candidates[:count]:
        present = [r for r in range(table.num_rows) if table.rows[r][column]]
        if not present:
            return None
        pivot = rng.choice(present)
        if table.numeric[column]:
            value = table.number(pivot, column)
            if value is None:
                return None
            conditions.append((column, rng.choice(("<", ">")), table.rows[pivot][column], value))
        else:
            text = table.rows[pivot][column]
            if len(tokenize(text)) > 5:
                return None
            conditions.append((column, "=", text, None))
    return conditions


def _satisfies(table: Table, row: int, condition) -> bool:
    column, op, text, value = condition
    if op == "=":
        return tokenize(table.rows[row][column]) == tokenize(text)
    number = table.number(row, column)
    if number is None:
        return False
    return number > value if op == ">" else number < value


def generate_questions(
    table: Table,
    count: int,
    seed: int,
    held_out: bool = False,
    max_answer_cells: int = 5,
) -> list[TableExample]:
    """``count`` templated questions over ``table`` (deterministic in ``seed`` and the table).

    ``held_out=True`` uses the test-only sentence frames.  Questions whose conditions select
    no row, NONE questions with more than ``max_answer_cells`` answers and numeric questions
    without a numeric answer are redrawn (up to ``20 * count`` draws in all).
    """
    rng = random.Random(f"{seed}/{table.name}/{held_out}")
    frames = _TEST_FRAMES if held_out else _TRAIN_FRAMES
    count_frames = _COUNT_FRAMES_TEST if held_out else _COUNT_FRAMES_TRAIN
    numeric_columns = [c for c in range(table.num_columns) if table.numeric[c]]
    examples: list[TableExample] = []
    seen: set[str] = set()
    for _ in range(20 * count):
        if len(examples) >= count:
            break
        operator = rng.choice(OPERATORS)
        pool = numeric_columns if operator in NUMERIC_OPERATORS else list(range(table.num_columns))
        column = rng.choice(pool)
        frame_pool = count_frames if operator == "COUNT" else frames
        frame = rng.choice(frame_pool)
        needs_condition = "{cond}" in frame
        if not needs_condition and operator in ("NONE", "COUNT"):
            continue
        conditions = _choose_conditions(
            table, rng, rng.choice((1, 2)) if needs_condition else 0, column
        )
        if conditions is None:
            continue
        rows = [
            r
            for r in range(table.num_rows)
            if all(_satisfies(table, r, cond) for cond in conditions)
        ]
        if not rows:
            continue
        answer = execute(table, column, rows, operator)
        if operator == "NONE":
            if len(rows) > max_answer_cells or any(not cell for cell in answer):
                continue
        elif isinstance(answer, float) and math.isnan(answer):
            continue
        col = _phrase(table.header[column])
        agg = "" if operator == "COUNT" else rng.choice(_AGG_WORDS[operator]).format(col=col)
        cond = " and ".join(
            rng.choice(_CONDITION_WORDS[op]).format(
                col=_phrase(table.header[c]), val=_format_value(t)
            )
            for c, op, t, _ in conditions
        )
        question = frame.format(agg=agg, cond=cond, col=col)
        if question in seen:
            continue
        seen.add(question)
        gold_rows = tuple(rows)
        if operator in NUMERIC_OPERATORS:
            gold_rows = tuple(r for r in rows if table.number(r, column) is not None)
        examples.append(
            TableExample(
                table,
                question,
                answer,
                column,
                operator,
                gold_rows,
                template=f"{'test' if held_out else 'train'}:{frame_pool.index(frame)}",
            )
        )
    return examples


def split_by_table(
    tables: Sequence[Table],
    questions_per_table: int,
    seed: int = 0,
    test_fraction: float = 0.2,
    dev_fraction: float = 0.1,
) -> Splits[TableExample]:
    """Questions split **by table** (a stable hash of the table name); the dev and test
    tables get the held-out templates."""
    if not 0 < test_fraction < 1 or not 0 <= dev_fraction < 1 - test_fraction:
        raise ValueError(f"bad fractions test={test_fraction}, dev={dev_fraction}")
    train, dev, test = [], [], []
    for table in tables:
        position = stable_fraction(table.name, salt=f"tables/{seed}")
        if position < test_fraction:
            test.extend(generate_questions(table, questions_per_table, seed, held_out=True))
        elif position < test_fraction + dev_fraction:
            dev.extend(generate_questions(table, questions_per_table, seed, held_out=True))
        else:
            train.extend(generate_questions(table, questions_per_table, seed))
    return Splits(train, dev, test)


# ----------------------------------------------------------------------------- real data sets


def _read_table_file(path: Path) -> Table:
    delimiter = "\t" if path.suffix == ".tsv" else ","
    text = path.read_text(encoding="utf-8")
    if delimiter == "\t":
        # WikiTableQuestions' .tsv escapes: \n newline, \p pipe, \\ backslash
        rows = [
            [
                cell.replace("\\n", " ").replace("\\p", "|").replace("\\\\", "\\")
                for cell in line.split("\t")
            ]
            for line in text.splitlines()
            if line
        ]
    else:
        rows = list(csv.reader(io.StringIO(text), escapechar="\\"))
    header, *body = rows
    return make_table(str(path), header, body)


_SEXPR = re.compile(r"\((id|utterance|context|targetValue)\s+(.*)\)\s*$")


def _wtq_fields(line: str) -> dict[str, str]:
    """Fields of one ``(example (id ..) (utterance "..") (context (graph tables.TableKnowledgeGraph
    csv/...)) (targetValue (list (description "..") ...)))`` line."""
    fields: dict[str, str] = {}
    match = re.search(r"\(id\s+([^\s)]+)\)", line)
    if match:
        fields["id"] = match.group(1)
    match = re.search(r'\(utterance\s+"((?:[^"\\]|\\.)*)"\)', line)
    if match:
        fields["utterance"] = match.group(1).replace('\\"', '"')
    match = re.search(r"TableKnowledgeGraph\s+([^\s)]+)\)", line)
    if match:
        fields["table"] = match.group(1)
    fields["answers"] = "\x1f".join(
        value.replace('\\"', '"')
        for value in re.findall(r'\(description\s+"((?:[^"\\]|\\.)*)"\)', line)
    )
    return fields


def load_wikitablequestions(
    examples_path: str | Path, root: str | Path, report: LoadReport | None = None
) -> list[TableExample]:
    """WikiTableQuestions' ``.examples`` file (one s-expression per line) with its tables
    under ``root`` (``csv/204-csv/590.csv``; the ``.tsv`` beside it is preferred).

    A single numeric answer becomes a scalar, anything else a tuple of texts; lines without
    an utterance or table, and tables that fail to load, are skipped and counted.
    """
    report = report if report is not None else LoadReport()
    root = Path(root)
    cache: dict[str, Table | None] = {}
    examples = []
    for line in Path(examples_path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        fields = _wtq_fields(line)
        if "utterance" not in fields or "table" not in fields:
            report.skipped["unparsable line"] += 1
            continue
        key = fields["table"]
        if key not in cache:
            csv_path = root / key
            tsv_path = csv_path.with_suffix(".tsv")
            try:
                cache[key] = _read_table_file(tsv_path if tsv_path.exists() else csv_path)
            except (OSError, ValueError):
                cache[key] = None
        table = cache[key]
        if table is None:
            report.skipped["missing or bad table"] += 1
            continue
        values = tuple(v for v in fields["answers"].split("\x1f") if v)
        number = parse_number(values[0]) if len(values) == 1 else None
        answer: tuple[str, ...] | float = number if number is not None else values
        examples.append(
            TableExample(table, fields["utterance"], answer, template=fields.get("id", ""))
        )
        report.kept += 1
    return examples


_WIKISQL_OPS = ("NONE", "MAX", "MIN", "COUNT", "SUM", "AVERAGE")  # WikiSQL's agg_ops order
_WIKISQL_CONDS = ("=", ">", "<")


def load_wikisql_jsonl(
    questions_path: str | Path, tables_path: str | Path, report: LoadReport | None = None
) -> list[TableExample]:
    """WikiSQL's ``*.jsonl`` questions with ``*.tables.jsonl``; answers are computed by
    executing the logged SQL here (a condition on a column it cannot compare is skipped and
    counted)."""
    report = report if report is not None else LoadReport()
    tables: dict[str, Table] = {}
    for line in Path(tables_path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        try:
            tables[record["id"]] = make_table(record["id"], record["header"], record["rows"])
        except (KeyError, ValueError):
            report.skipped["bad table"] += 1
    examples = []
    for line in Path(questions_path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        table = tables.get(record.get("table_id"))
        if table is None:
            report.skipped["missing table"] += 1
            continue
        sql = record["sql"]
        conditions = []
        for column, op_index, value in sql.get("conds", []):
            op = _WIKISQL_CONDS[op_index]
            number = parse_number(str(value)) if op != "=" else None
            if op != "=" and number is None:
                report.skipped["uncomparable condition"] += 1
                conditions = None
                break
            conditions.append((column, op, str(value), number))
        if conditions is None:
            continue
        rows = [
            r for r in range(table.num_rows) if all(_satisfies(table, r, c) for c in conditions)
        ]
        operator = _WIKISQL_OPS[sql["agg"]]
        answer = execute(table, sql["sel"], rows, operator)
        if isinstance(answer, float) and math.isnan(answer):
            report.skipped["numeric operator over no number"] += 1
            continue
        examples.append(
            TableExample(
                table,
                record["question"],
                answer,
                sql["sel"],
                operator,
                tuple(rows),
                template="wikisql",
            )
        )
        report.kept += 1
    return examples
