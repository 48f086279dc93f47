"""Per-step training time of each TableQA mode and question encoder, as a ratio to ``soft``
with the ``bigru`` encoder, measured in one run.

One fixed batch of templated questions over the offline ``vega_datasets`` tables (cut to
``--rows`` x 8); each step is forward, loss, backward and an Adam update.  The configurations
are timed round-robin in one loop so that load on a shared machine hits them alike; the ratios
are the numbers to read, the absolute milliseconds move with the load.

    python benchmarks/table_qa.py                                  # 30 rounds
    python benchmarks/table_qa.py --quick                          # 5 rounds
    python benchmarks/table_qa.py --encoders bigru transformer     # both encoders
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from structattn.data.tables import generate_questions, load_vega_tables
from structattn.models.table_qa import (
    QUESTION_ENCODERS,
    TABLE_QA_MODES,
    TableQA,
    build_question_vocab,
    encode_tables,
)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--modes", nargs="+", default=sorted(TABLE_QA_MODES))
    parser.add_argument(
        "--encoders", nargs="+", default=["bigru"], choices=sorted(QUESTION_ENCODERS)
    )
    args = parser.parse_args(argv)
    if "soft" not in args.modes or "bigru" not in args.encoders:
        parser.error("--modes must include soft and --encoders bigru (the ratios' reference)")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tables = load_vega_tables(max_rows=args.rows, max_columns=8)
    examples = [e for t in tables for e in generate_questions(t, 4, seed=0)][: args.batch_size]
    vocab = build_question_vocab(examples)
    batch = encode_tables(examples, vocab, max_rows=args.rows)
    configs = [(mode, encoder) for encoder in args.encoders for mode in args.modes]
    models = {
        (mode, encoder): TableQA(len(vocab), mode=mode, encoder=encoder)
        for mode, encoder in configs
    }
    optimizers = {key: torch.optim.Adam(m.parameters(), lr=1e-3) for key, m in models.items()}
    times: dict[tuple[str, str], list[float]] = {key: [] for key in configs}
    rounds = 5 if args.quick else 30
    for round_index in range(rounds + 2):
        for key, model in models.items():
            start = time.perf_counter()
            loss = model.loss(batch)
            optimizers[key].zero_grad()
            loss.backward()
            optimizers[key].step()
            if round_index >= 2:  # two warm-up rounds
                times[key].append(time.perf_counter() - start)
    soft = statistics.median(times[("soft", "bigru")])
    ratios = {}
    print(f"batch {len(examples)} questions, {batch.row_mask.shape[1]} rows, {rounds} rounds")
    for mode, encoder in configs:
        median = statistics.median(times[(mode, encoder)])
        name = mode if encoder == "bigru" else f"{mode}/{encoder}"
        ratios[name] = median / soft
        print(f"{name:>22}: {1000 * median:7.1f} ms/step  {ratios[name]:5.2f} x soft")
    return ratios


if __name__ == "__main__":
    main()
