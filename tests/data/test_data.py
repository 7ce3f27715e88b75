"""keydistill.data: the task table, TSV loading (good data and every bad-data case), datasets, batching."""

import os

import numpy as np
import pytest
import torch
from transformers import BertTokenizerFast

from keydistill import data
from keydistill.data import TASKS, DataError, load_task
from tests.helpers.tiny_models import SHARED_GLUE as _SHARED_GLUE

SHARED_GLUE = str(_SHARED_GLUE)


def write_tsv(root, folder, split, lines):
    path = root / folder
    path.mkdir(parents=True, exist_ok=True)
    (path / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path / f"{split}.tsv"


def sst2_rows(n, start=0):
    return ["sentence\tlabel"] + [f"sentence number {i}\t{i % 2}" for i in range(start, start + n)]


@pytest.fixture
def sst2_dir(tmp_path):
    write_tsv(tmp_path, "SST-2", "train", sst2_rows(30))
    write_tsv(tmp_path, "SST-2", "dev", sst2_rows(7, start=100))
    return tmp_path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    words = "sentence number a the one two cat sat on mat".split() + [str(i) for i in range(200)]
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    return BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))


# ---- the task table ------------------------------------------------------------------------------------


def test_table_covers_all_nine_glue_tasks():
    assert set(TASKS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"}
    assert TASKS["stsb"].is_regression and TASKS["stsb"].num_labels == 1
    assert TASKS["stsb"].metrics == ("pearson", "spearman")
    assert TASKS["mnli"].num_labels == 3 and TASKS["mnli"].test_splits == ("test_matched", "test_mismatched")
    assert TASKS["cola"].metrics[0] == "mcc" and "f1" in TASKS["mrpc"].metrics
    for task in TASKS.values():
        assert len(task.text_columns) == len(task.hub_text_columns) in (1, 2)
        assert len(task.test_files) == len(task.hub_test_splits)


def test_metrics_match_their_definitions():
    labels = np.array([0, 1, 1, 0, 1, 0])
    preds = np.array([0, 1, 0, 0, 1, 1])
    tp, fp, fn = 2, 1, 1
    got = data.compute_metrics(TASKS["mrpc"], preds, labels)
    assert got["accuracy"] == pytest.approx(4 / 6)
    assert got["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert data.compute_metrics(TASKS["cola"], preds, labels)["mcc"] == pytest.approx(np.corrcoef(preds, labels)[0, 1])
    scores, gold = np.array([0.1, 2.0, 3.5, 1.0]), np.array([0.0, 2.5, 5.0, 0.5])
    got = data.compute_metrics(TASKS["stsb"], scores, gold)
    assert got["pearson"] == pytest.approx(np.corrcoef(scores, gold)[0, 1])
    assert got["spearman"] == pytest.approx(1.0)


# ---- good data -------------------------------------------------------------------------------------------


def test_sst2_split_is_seeded_held_out_and_capped(sst2_dir):
    a = load_task("sst2", str(sst2_dir), val_size=5, seed=3)
    assert (len(a.train), len(a.val), len(a.test["test"])) == (25, 5, 7)
    assert not set(a.val) & set(a.train)
    assert sorted(a.train + a.val) == sorted(data.Example((f"sentence number {i}",), i % 2) for i in range(30))
    assert load_task("sst2", str(sst2_dir), val_size=5, seed=3).val == a.val
    assert load_task("sst2", str(sst2_dir), val_size=5, seed=4).val != a.val
    capped = load_task("sst2", str(sst2_dir), val_size=5, seed=3, max_train_samples=10, max_eval_samples=4)
    assert capped.val == a.val[:4] and capped.train == a.train[:10] and len(capped.test["test"]) == 4
    assert a.test["test"][0] == data.Example(("sentence number 100",), 0)


def test_pairs_with_bare_quotes_are_not_merged(tmp_path):
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    rows = [header] + [f'{i}\tg\tf\t2012\t{i}\ts\ts\tHe said "hi\t"Bye {i}\t{i % 5}.5' for i in range(12)]
    write_tsv(tmp_path, "STS-B", "train", rows)
    write_tsv(tmp_path, "STS-B", "dev", rows[:4])
    loaded = load_task("stsb", str(tmp_path), val_size=2)
    assert len(loaded.train) + len(loaded.val) == 12 and len(loaded.test["test"]) == 3
    assert loaded.test["test"][0] == data.Example(('He said "hi', '"Bye 0'), 0.5)


def test_mnli_string_labels_and_two_test_splits(tmp_path):
    header = "index\tsentence1\tsentence2\tgold_label"
    rows = [header] + [
        f"{i}\tp {i}\th {i}\t{lab}" for i, lab in enumerate(["neutral", "entailment", "contradiction"] * 3)
    ]
    write_tsv(tmp_path, "MNLI", "train", rows)
    write_tsv(tmp_path, "MNLI", "dev_matched", rows[:3])
    write_tsv(tmp_path, "MNLI", "dev_mismatched", rows[:2])
    loaded = load_task("mnli", str(tmp_path), val_size=1)
    assert list(loaded.test) == ["test_matched", "test_mismatched"]
    assert [e.label for e in loaded.test["test_matched"]] == [1, 0]


def test_headerless_cola(tmp_path):
    rows = [f"src\t{i % 2}\t*\tthe cat sat {i}" for i in range(6)]
    write_tsv(tmp_path, "CoLA", "train", rows)
    write_tsv(tmp_path, "CoLA", "dev", rows[:2])
    loaded = load_task("cola", str(tmp_path), val_size=1)
    assert loaded.test["test"] == [data.Example(("the cat sat 0",), 0), data.Example(("the cat sat 1",), 1)]


# The official GLUE row counts and label balance of ../shared/data/glue (its README): per split, the count of
# each class index (label_values order), or the row count of a regression task.
OFFICIAL = {
    "sst2": {"train": [29780, 37569], "test": [428, 444]},
    "cola": {"train": [2528, 6023], "test": [322, 721]},
    "mrpc": {"train": [1194, 2474], "test": [129, 279]},
    "rte": {"train": [1249, 1241], "test": [146, 131]},  # entailment, not_entailment
    "wnli": {"train": [323, 312], "test": [40, 31]},
    "stsb": {"train": 5749, "test": 1500},
}


@pytest.mark.skipif(not os.path.isdir(SHARED_GLUE), reason="the shared GLUE folder is not next to this checkout")
@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_shared_glue_tasks_load_with_their_official_counts_and_balance(name):
    task = TASKS[name]
    train, test, skipped = data.load_local(task, SHARED_GLUE)
    assert skipped == 0
    for split, rows in (("train", train), ("test", test["test"])):
        want = OFFICIAL[name][split]
        if task.is_regression:
            assert len(rows) == want and all(0.0 <= e.label <= 5.0 for e in rows)
        else:
            assert np.bincount([e.label for e in rows], minlength=task.num_labels).tolist() == want, split
        assert all(len(e.texts) == len(task.text_columns) and all(e.texts) for e in rows)


@pytest.mark.skipif(not os.path.isdir(SHARED_GLUE), reason="the shared GLUE folder is not next to this checkout")
def test_shared_glue_quirks():
    cola_dev = data.load_local(TASKS["cola"], SHARED_GLUE)[1]["test"]
    assert cola_dev[-1].texts[0] and len(cola_dev) == 1043  # no final newline: the last row still counts
    mrpc = load_task("mrpc", SHARED_GLUE)  # the header's byte-order mark is not part of 'Quality'
    assert len(mrpc.val) == 367 and len(mrpc.train) == 3668 - 367
    assert len(load_task("wnli", SHARED_GLUE).val) == 100  # the floor: 10% of 635 would be 64


def test_default_val_size_scales_with_the_task():
    assert [data.default_val_size(n) for n in (67349, 8551, 635, 150)] == [1000, 855, 100, 75]


def test_byte_order_mark_in_a_header_is_dropped(tmp_path):
    path = write_tsv(tmp_path, "MRPC", "train", ["Quality\t#ID\t#ID\t#1 String\t#2 String", "1\t1\t2\ta\tb"])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    write_tsv(tmp_path, "MRPC", "dev", ["Quality\t#ID\t#ID\t#1 String\t#2 String", "0\t1\t2\tc\td"])
    train, test, _ = data.load_local(TASKS["mrpc"], str(tmp_path))
    assert train == [data.Example(("a", "b"), 1)] and test["test"] == [data.Example(("c", "d"), 0)]


# ---- bad data: each case names file, line (and column) ---------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"SST-2.train\.tsv: file not found"):
        load_task("sst2", str(tmp_path))


def test_missing_column(tmp_path):
    write_tsv(tmp_path, "SST-2", "train", ["text\tlabel", "a\t0"])
    with pytest.raises(DataError, match=r"train\.tsv:1: missing column\(s\) \['sentence'\]"):
        load_task("sst2", str(tmp_path))


@pytest.mark.parametrize(
    "row, column, found",
    [
        ("one\ttoo\tmany", len("one\ttoo\t") + 1, 3),  # the extra field starts after the second tab
        ("café\t1\t", len("café\t1\t") + 1, 3),  # an empty extra field: just past the end, in characters
        ("bad film", len("bad film") + 1, 1),  # the missing field: the end of the line, where its tab is not
        ("", 1, 0),  # a blank line
    ],
)
def test_wrong_field_count_names_the_column_of_the_missing_or_extra_field(sst2_dir, row, column, found):
    path = write_tsv(sst2_dir, "SST-2", "train", sst2_rows(5) + [row] + sst2_rows(5)[1:])
    with pytest.raises(DataError, match=rf"{path}:7:{column}: expected 2 tab-separated fields, found {found}"):
        load_task("sst2", str(sst2_dir), val_size=1)


def test_blank_line_is_a_bad_row_in_a_one_column_file(tmp_path):
    path = write_tsv(tmp_path, "SST-2", "test", ["sentence", "fine", "", "good"])  # GLUE-test-like: texts only
    with pytest.raises(DataError, match=rf"{path}:3:1: expected 1 tab-separated fields, found 0"):
        data.read_glue_tsv(TASKS["sst2"], str(path), data._RowErrors(skip=False), labelled=False)


def test_fields_are_split_on_tabs_only(tmp_path):
    # csv.reader raised on both: a field over its 131,072-character limit, and a carriage return inside a field
    long, with_cr = "word " * 40_000, "good\rfilm"
    path = write_tsv(tmp_path, "SST-2", "dev", ["sentence\tlabel", f"{long}\t1", f"{with_cr}\t0", 'a "quoted\t1'])
    assert data.read_glue_tsv(TASKS["sst2"], str(path), data._RowErrors(skip=False)) == [
        data.Example((long,), 1),
        data.Example((with_cr,), 0),
        data.Example(('a "quoted',), 1),
    ]


def test_label_outside_label_set(sst2_dir):
    path = write_tsv(sst2_dir, "SST-2", "dev", sst2_rows(3) + ["fine\t2"])
    with pytest.raises(DataError, match=rf"{path}:5:6 \(column 'label'\): label '2' is not in the label set"):
        load_task("sst2", str(sst2_dir), val_size=1)


def test_regression_label_not_a_number(tmp_path):
    header = "sentence1\tsentence2\tscore"
    path = write_tsv(tmp_path, "STS-B", "train", [header, "a\tb\t1.0", "a\tb\thigh"])
    with pytest.raises(DataError, match=rf"{path}:3:5 \(column 'score'\): label 'high' is not a number"):
        load_task("stsb", str(tmp_path))


@pytest.mark.parametrize("value", ["nan", "inf", "-Infinity", "NaN"])
def test_regression_label_not_finite(tmp_path, value):
    header = "sentence1\tsentence2\tscore"
    path = write_tsv(tmp_path, "STS-B", "train", [header] + ["a\tb\t1.0"] * 4 + [f"a\tb\t{value}"])
    write_tsv(tmp_path, "STS-B", "dev", [header, "c\td\t2.5"])
    with pytest.raises(DataError, match=rf"{path}:6:5 \(column 'score'\): label '{value}' is not a finite number"):
        load_task("stsb", str(tmp_path), val_size=1)
    loaded = load_task("stsb", str(tmp_path), val_size=1, skip_bad_rows=True)  # a bad row like any other
    assert loaded.skipped_rows == 1 and sorted(e.label for e in loaded.train + loaded.val) == [1.0] * 4


def test_empty_split(sst2_dir):
    path = write_tsv(sst2_dir, "SST-2", "dev", ["sentence\tlabel"])
    with pytest.raises(DataError, match=rf"{path}: no usable rows \(empty split\)"):
        load_task("sst2", str(sst2_dir), val_size=1)


def test_undecodable_bytes(sst2_dir):
    path = sst2_dir / "SST-2" / "train.tsv"
    path.write_bytes(b"sentence\tlabel\nok\t1\nbad \xff byte\t0\n")
    with pytest.raises(DataError, match=rf"{path}:3:5: undecodable bytes"):
        load_task("sst2", str(sst2_dir), val_size=1)


def test_undecodable_bytes_column_counts_characters_after_a_byte_order_mark(sst2_dir):
    path = sst2_dir / "SST-2" / "train.tsv"
    path.write_bytes(b"\xef\xbb\xbfsen\xfftence\tlabel\nok\t1\n")
    with pytest.raises(DataError, match=rf"{path}:1:4: undecodable bytes \(not UTF-8\): b'\\xff'"):
        load_task("sst2", str(sst2_dir), val_size=1)
    path.write_bytes("sentence\tlabel\nok\t1\ncafé naïve ".encode() + b"\xe9\xff\t0\n")
    column = len("café naïve ") + 1  # characters, not the 13 bytes before the bad one
    with pytest.raises(DataError, match=rf"{path}:3:{column}: undecodable bytes \(not UTF-8\): b'\\xe9'"):
        load_task("sst2", str(sst2_dir), val_size=1)


def test_val_size_must_leave_training_rows(sst2_dir):
    with pytest.raises(DataError, match="leaves no training rows"):
        load_task("sst2", str(sst2_dir), val_size=30)


def test_skip_bad_rows_only_on_request_and_counted(sst2_dir):
    path = sst2_dir / "SST-2" / "train.tsv"
    path.write_bytes(("\n".join(sst2_rows(10)) + "\nbad\t7\nx\ty\tz\n").encode() + b"\xfe\t1\n")
    with pytest.raises(DataError, match="--skip-bad-rows"):
        load_task("sst2", str(sst2_dir), val_size=1)
    loaded = load_task("sst2", str(sst2_dir), val_size=1, skip_bad_rows=True)
    assert loaded.skipped_rows == 3 and len(loaded.train) + len(loaded.val) == 10


def test_cli_prints_data_errors_without_traceback(tmp_path, capsys):
    from keydistill.train import main

    code = main(["--data-dir", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "error:" in err and "file not found" in err and "Traceback" not in err


def test_hub_failure_says_to_pass_data_dir(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="pass --data-dir"):
        load_task("sst2", None)


def test_unknown_task():
    with pytest.raises(DataError, match="unknown task 'sst3'"):
        data.get_task("sst3")


# ---- dataset, collate, batching -------------------------------------------------------------------------


def test_dataset_tokenises_pairs_truncates_and_collate_pads(tokenizer):
    examples = [
        data.Example(("the cat", "sat on the mat"), 1),
        data.Example(("one two " * 20, "the cat"), 0),
        data.Example(("a", "a"), 1),
    ]
    ds = data.CustomDataset(examples, tokenizer, max_length=12)
    assert ds.lengths()[0] == 9 and ds.lengths()[1] == 12 and ds.lengths()[2] == 5
    assert ds.truncated == 1  # the second pair lost tokens; none of the others did
    assert data.CustomDataset(examples, tokenizer, max_length=9).truncated == 1  # 9 tokens exactly: not truncated
    assert ds[0]["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1, 1, 1]
    batch = data.Collator(tokenizer.pad_token_id)([ds[2], ds[0]])
    assert batch["input_ids"].shape == (2, 9)  # padded to the longest in the batch, not to max_length
    assert batch["attention_mask"].sum(1).tolist() == [5, 9]
    assert (batch["input_ids"][0, 5:] == tokenizer.pad_token_id).all()
    assert batch["labels"].tolist() == [1, 1] and batch["index"].tolist() == [2, 0]
    single = data.CustomDataset([data.Example(("the cat",), 0.5)], tokenizer, 8, regression=True)
    assert single[0]["input_ids"] == tokenizer("the cat")["input_ids"] and single.labels.dtype == torch.float32


def test_length_bucketed_batches_cover_each_example_once_and_replay():
    lengths = [int(x) for x in torch.randint(1, 60, (203,))]
    batches = data.length_bucketed_batches(lengths, 16, seed=1, epoch=0, bucket_batches=4)
    assert sorted(i for b in batches for i in b) == list(range(203))
    assert all(len(b) <= 16 for b in batches)
    assert batches == data.length_bucketed_batches(lengths, 16, seed=1, epoch=0, bucket_batches=4)
    assert batches != data.length_bucketed_batches(lengths, 16, seed=1, epoch=1, bucket_batches=4)

    # Grouping by length: far less padding than a plain shuffle.
    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    shuffled = torch.randperm(203).tolist()
    assert padded(batches) < 0.8 * padded([shuffled[i : i + 16] for i in range(0, 203, 16)])
