"""Own-data files for the tests: rows written as TSV, CSV, JSON lines or Parquet (keydistill.data.files)."""

import csv
import json
import random

from tests.helpers.train_fixtures import WORDS

FORMATS = ("tsv", "csv", "jsonl", "json", "parquet")


def write_rows(path, columns, rows) -> str:
    """rows (tuples in the order of columns) as a file of the format its extension names."""
    path = str(path)
    if path.endswith((".tsv", ".csv")):
        with open(path, "w", newline="", encoding="utf-8") as f:
            if path.endswith(".tsv"):
                f.write("\n".join("\t".join(map(str, r)) for r in [columns, *rows]) + "\n")
            else:
                csv.writer(f).writerows([columns, *rows])
    elif path.endswith((".jsonl", ".json")):
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(dict(zip(columns, r))) + "\n" for r in rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist([dict(zip(columns, r)) for r in rows]), path)
    return path


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(2, 6)))


def labelled_rows(n: int, labels, *, pairs: bool = False, seed: int = 0) -> list[tuple]:
    """n rows of (text[, second text], label), the labels taken in turn from `labels`."""
    rng = random.Random(seed)
    return [
        (sentence(rng), sentence(rng), labels[i % len(labels)]) if pairs else (sentence(rng), labels[i % len(labels)])
        for i in range(n)
    ]
