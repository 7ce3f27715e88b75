"""keydistill.data.files: your own TSV, CSV, JSON lines and Parquet files as a task (columns, labels, splits,
metrics), and every bad input named by file, line and column."""

import dataclasses
import random

import numpy as np
import pytest

from keydistill.data import CustomDataset, DataError, Example, compute_metrics, default_val_size, load_files
from keydistill.data.settings import load_data
from keydistill.train import TrainConfig
from tests.helpers.own_data import FORMATS, labelled_rows, write_rows


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_reads_pairs_and_string_labels(tmp_path, fmt):
    rows = labelled_rows(30, ["neutral", "entailment", "contradiction"], pairs=True)
    train = write_rows(tmp_path / f"train.{fmt}", ["premise", "hypothesis", "label"], rows)
    test = write_rows(tmp_path / f"test.{fmt}", ["premise", "hypothesis", "label"], rows[:6])
    data = load_files(train, test=test, val_size=5)
    task = data.task
    assert task.name == "train" and task.text_columns == ("premise", "hypothesis") and task.label_column == "label"
    assert task.label_names == ("contradiction", "entailment", "neutral")  # sorted
    assert task.num_labels == 3 and not task.is_regression and task.test_splits == ("test",)
    assert task.metrics == ("accuracy", "macro_f1")  # no MCC beyond two classes
    expected = [Example((a, b), task.label_names.index(y)) for a, b, y in rows]
    assert sorted(data.train + data.val) == sorted(expected) and len(data.val) == 5
    assert data.test == {"test": expected[:6]}


def test_single_sentences_beside_a_numeric_id_column(tmp_path):
    rows = labelled_rows(20, ["pos", "neg"])
    train = write_rows(
        tmp_path / "reviews.csv", ["id", "review", "label"], [(i, t, y) for i, (t, y) in enumerate(rows)]
    )
    data = load_files(train, val_size=4)
    assert data.task.text_columns == ("review",)  # the id column holds numbers, not texts
    assert data.task.label_names == ("neg", "pos") and data.task.metrics == ("accuracy", "macro_f1", "mcc")
    assert all(len(e.texts) == 1 for e in data.train)


@pytest.mark.parametrize("classes", [2, 3, 12])
def test_string_labels_of_any_class_count(tmp_path, classes):
    names = [f"class_{chr(ord('a') + i)}" for i in range(classes)]
    train = write_rows(tmp_path / "t.jsonl", ["text", "label"], labelled_rows(4 * classes, names[::-1]))
    data = load_files(train, val_size=classes)
    assert data.task.label_names == tuple(names) and data.task.num_labels == classes
    assert sorted({e.label for e in data.train + data.val}) == list(range(classes))


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_integer_labels_sort_as_numbers(tmp_path, fmt):
    train = write_rows(tmp_path / f"t.{fmt}", ["text", "label"], labelled_rows(36, list(range(12))))
    data = load_files(train, val_size=6)
    assert data.task.label_names == tuple(str(i) for i in range(12))  # 2 before 10
    assert all(e.label == int(data.task.label_names[e.label]) for e in data.train)


def test_label_names_give_the_class_order(tmp_path):
    train = write_rows(tmp_path / "t.csv", ["text", "label"], labelled_rows(20, ["low", "high", "mid"]))
    data = load_files(train, label_names=["low", "mid", "high"], val_size=4)
    assert data.task.label_names == ("low", "mid", "high")
    with pytest.raises(DataError, match=r"t\.csv:3: column 'label': label 'high' is not among --label-names"):
        load_files(train, label_names=["low", "mid"], val_size=4)


def test_booleans_are_classes(tmp_path):
    train = write_rows(tmp_path / "t.jsonl", ["text", "label"], labelled_rows(20, [True, False]))
    assert load_files(train, val_size=4).task.label_names == ("false", "true")


def test_regression_from_floats_or_the_flag(tmp_path):
    rows = labelled_rows(20, [0.5, 3.0, 4.25, 1])
    data = load_files(
        write_rows(tmp_path / "s.csv", ["a", "b", "score"], [(t, t, y) for t, y in rows]),
        label_column="score",
        val_size=4,
    )
    assert data.task.is_regression and data.task.num_labels == 1 and data.task.label_names == ()
    assert data.task.metrics == ("pearson", "spearman") and data.task.text_columns == ("a", "b")
    assert sorted(e.label for e in data.train + data.val) == sorted(float(y) for _, y in rows)
    integers = write_rows(tmp_path / "i.jsonl", ["text", "label"], labelled_rows(20, [1, 2, 5]))
    assert not load_files(integers, val_size=4).task.is_regression
    assert load_files(integers, regression=True, val_size=4).task.is_regression


def test_validation_slice_follows_the_glue_rule_and_no_test_file_means_no_test(tmp_path):
    rows = labelled_rows(300, ["a", "b"])
    train = write_rows(tmp_path / "t.tsv", ["text", "label"], rows)
    data = load_files(train, seed=3)
    assert len(data.val) == default_val_size(300) == 100 and len(data.train) == 200
    assert load_files(train, seed=3).val == data.val and load_files(train, seed=4).val != data.val
    assert data.test == {} and data.task.test_splits == ()
    assert "val held out of" in data.origin and "no test file: no test stage" in data.origin
    capped = load_files(train, seed=3, max_train_samples=50, max_eval_samples=10)
    assert len(capped.train) == 50 and capped.val == data.val[:10]  # the slice does not depend on the cap
    val = write_rows(tmp_path / "v.csv", ["text", "label"], rows[:7])
    given = load_files(train, validation=val, test=val)
    assert len(given.train) == 300 and len(given.val) == 7 and len(given.test["test"]) == 7
    assert given.origin == f"val from {val}; test from {val}"


def test_own_metrics_come_from_scikit_learn_and_scipy():
    from scipy import stats
    from sklearn import metrics as skm

    class Task:
        metrics = ("accuracy", "macro_f1", "mcc")

    labels, preds = np.array([0, 1, 2, 2, 1, 0]), np.array([0, 2, 2, 2, 1, 1])
    got = compute_metrics(Task, preds, labels)
    assert got["macro_f1"] == pytest.approx(skm.f1_score(labels, preds, average="macro"))
    assert got["accuracy"] == pytest.approx(4 / 6) and got["mcc"] == pytest.approx(skm.matthews_corrcoef(labels, preds))
    Task.metrics = ("pearson", "spearman")
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    got = compute_metrics(Task, scores, np.array([0.0, 0.5, 0.3, 1.0]))
    assert got["spearman"] == pytest.approx(stats.spearmanr(scores, [0.0, 0.5, 0.3, 1.0])[0])


# ---- bad input: one line naming the file, the line and the column -------------------------------------


def bad_case(tmp_path, case):
    """(the load_files call's arguments, the message it must raise) for one kind of bad input."""
    good = labelled_rows(10, ["pos", "neg"])
    t = tmp_path

    def csv(name, rows, columns=("text", "label")):
        return write_rows(t / name, list(columns), rows)

    if case == "missing file":
        return {"train": str(t / "nowhere.csv")}, f"{t / 'nowhere.csv'}: file not found"
    if case == "unknown extension":
        (t / "data.xlsx").write_text("x")
        return {"train": str(t / "data.xlsx")}, "data.xlsx: unknown extension '.xlsx'; use one of .tsv, .csv"
    if case == "missing column":
        return (
            {"train": csv("t.csv", good), "text_columns": ["sentence"]},
            "t.csv:1: no column 'sentence' (--text-columns); the columns are ['text', 'label']",
        )
    if case == "missing label column":
        return {"train": csv("t.csv", good), "label_column": "y"}, "t.csv:1: no column 'y' (--label-column)"
    if case == "empty text":
        return {"train": csv("t.csv", good[:3] + [("  ", "pos")] + good)}, "t.csv:5: column 'text': empty text"
    if case == "missing label":
        path = write_rows(t / "t.jsonl", ["text", "label"], good[:6] + [("fine film", None)] + good)
        return {"train": path}, "t.jsonl:7: column 'label': missing label"
    if case == "label train never has":
        test = csv("test.csv", good[:4] + [("odd", "mixed")])
        return {"train": csv("t.csv", good), "test": test}, "test.csv:6: column 'label': label 'mixed' is not among"
    if case == "one class":
        return {"train": csv("t.csv", [(s, "pos") for s, _ in good])}, "t.csv: only one class ('pos') in column 'label'"
    if case == "not finite":
        rows = [(s, 0.5 * i) for i, (s, _) in enumerate(good)]
        rows[4] = (rows[4][0], "inf")
        return {"train": csv("t.csv", rows)}, "t.csv:6: column 'label': label inf is not a finite number"
    if case == "mixed kinds":
        rows = [(s, i % 3) for i, (s, _) in enumerate(good)] + [("great", "positive")]
        return {"train": csv("t.csv", rows)}, "t.csv:12: column 'label': label 'positive' is a name, but the training"
    if case == "no rows":
        return {"train": csv("t.csv", [])}, "t.csv: no rows"
    if case == "empty file":
        (t / "t.jsonl").write_text("")
        return {"train": str(t / "t.jsonl")}, "t.jsonl: no rows"
    if case == "broken json":
        (t / "t.jsonl").write_text('{"text": "a", "label": "pos"}\n{"text": "b", "label": "neg"\n')
        return {"train": str(t / "t.jsonl")}, "t.jsonl: cannot be read as .jsonl (JSON parse error: Missing a comma"
    if case == "extra field":
        (t / "t.csv").write_text("text,label\ngood,pos\nbad,neg,3\n")
        return {"train": str(t / "t.csv")}, "t.csv: cannot be read as .csv (Error tokenizing data. C error: Expected 2"
    if case == "which text columns":
        rows = [(s, s, s, y) for s, y in good]
        path = csv("t.csv", rows, ("a", "b", "c", "label"))
        return {"train": path}, "t.csv:1: found text columns ['a', 'b', 'c'] besides the label column 'label'"
    raise AssertionError(case)


BAD_CASES = [
    "missing file",
    "unknown extension",
    "missing column",
    "missing label column",
    "empty text",
    "missing label",
    "label train never has",
    "one class",
    "not finite",
    "mixed kinds",
    "no rows",
    "empty file",
    "broken json",
    "extra field",
    "which text columns",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_naming_file_line_and_column(tmp_path, case):
    kwargs, message = bad_case(tmp_path, case)
    train = kwargs.pop("train")
    with pytest.raises(DataError) as raised:
        load_files(train, val_size=2, **kwargs)
    text = str(raised.value)
    assert message in text and "\n" not in text, text


def test_skip_bad_rows_drops_and_counts_them(tmp_path):
    rows = labelled_rows(12, ["pos", "neg"])
    rows[2] = ("", "pos")  # an empty text
    rows[5] = (rows[5][0], "")  # a missing label
    train = write_rows(tmp_path / "t.csv", ["text", "label"], rows)
    test = write_rows(tmp_path / "test.csv", ["text", "label"], rows[6:] + [("odd", "other")])
    with pytest.raises(DataError, match="--skip-bad-rows"):
        load_files(train, val_size=2)
    data = load_files(train, test=test, val_size=2, skip_bad_rows=True)
    assert data.skipped_rows == 3 and len(data.train) + len(data.val) == 10 and len(data.test["test"]) == 6


def test_custom_dataset_takes_plain_rows(tmp_path):
    from transformers import BertTokenizerFast

    from tests.helpers.train_fixtures import WORDS

    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(str(tmp_path / "vocab.txt"))
    rng = random.Random(0)
    rows = [(" ".join(rng.choices(WORDS, k=3)), i % 2) for i in range(5)]
    plain = CustomDataset(rows, tokenizer, max_length=16)
    examples = CustomDataset([Example((t,), y) for t, y in rows], tokenizer, max_length=16)
    assert plain.input_ids == examples.input_ids and plain.labels.tolist() == [0, 1, 0, 1, 0]
    pairs = CustomDataset([(("good film", "fun plot"), 2.5)], tokenizer, max_length=16, regression=True)
    assert 1 in pairs.token_type_ids[0] and pairs.labels.tolist() == [2.5]
    with pytest.raises(TypeError, match="example 1"):
        CustomDataset([("good", 1), ("a", "b", 3)], tokenizer, max_length=16)
    with pytest.raises(ValueError, match="example 1 has 2 text"):  # zip would drop the pair's second sentence
        CustomDataset([("good", 1), (("good film", "fun plot"), 0)], tokenizer, max_length=16)


def test_no_test_leaves_the_test_split_out_and_says_why(tmp_path):
    rows = labelled_rows(300, ["a", "b"])
    train = write_rows(tmp_path / "t.tsv", ["text", "label"], rows)
    test = write_rows(tmp_path / "test.csv", ["text", "label"], rows[:9])
    settings = TrainConfig(train_file=str(train), test_file=str(test))
    data = load_data(settings)
    assert len(data.test["test"]) == 9 and data.origin.endswith(f"; test from {test}")
    held_out = load_data(dataclasses.replace(settings, test=False))
    assert held_out.test == {} and held_out.val == data.val and held_out.train == data.train
    assert held_out.origin == f"{data.val_origin}; --no-test: no test stage, validation is reported"
    no_file = load_data(dataclasses.replace(settings, test=False, test_file=None))
    assert no_file.origin.endswith("; no test file: no test stage, validation is reported")
