"""Your own data through the command lines, end to end on a tiny random BERT (--device cpu, one epoch per
stage): keydistill.train, keydistill.ablation and keydistill.predict on TSV, CSV, JSON lines and Parquet files,
the user's label names in the saved models (predict, transformers' pipeline, the ONNX metadata), and bad input
stopped with one line and exit 2 before any model loads."""

import json

import pytest

from keydistill import ablation
from keydistill.train import TrainConfig, main, parse_config
from tests.helpers.own_data import labelled_rows, write_rows
from tests.helpers.train_fixtures import tiny_settings

CLASSES3 = ["neutral", "entailment", "contradiction"]


def own_args(tiny, out, *extra):
    """Tiny settings for a run on your own files (no --data-dir: the files are the data), one epoch a stage."""
    return tiny_settings(tiny, out, *extra, epochs=1)


def train(capsys, tiny, out, *extra) -> tuple[int, str, str]:
    code = main(own_args(tiny, out, *extra))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def saved_labels(folder) -> dict:
    return json.loads((folder / "config.json").read_text())["id2label"]


@pytest.fixture(scope="module")
def pairs_run(tiny, tmp_path_factory):
    """A three-class sentence-pair run from CSV files, with a test file: its folder and the test file."""
    root = tmp_path_factory.mktemp("pairs")
    columns = ["premise", "hypothesis", "label"]
    train_file = write_rows(root / "nli.csv", columns, labelled_rows(36, CLASSES3, pairs=True))
    test_file = write_rows(root / "nli_test.csv", columns, labelled_rows(12, CLASSES3, pairs=True, seed=1))
    out = root / "runs" / "{task}"
    assert main(own_args(tiny, out, "--train-file", train_file, "--test-file", test_file, "--val-size", "8")) == 0
    return root / "runs" / "nli", test_file


def test_a_pair_run_from_csv_saves_the_users_label_names(pairs_run):
    folder, _ = pairs_run  # the folder is named after the training file's stem
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["task"] == "nli" and metrics["rows"] == {"train": 28, "val": 8, "test": 12}
    for model in ("teacher", "student"):
        assert set(metrics[model]) == {"val", "test"}
        assert list(metrics[model]["test"]) == ["accuracy", "macro_f1"]
        assert saved_labels(folder / model) == {"0": "contradiction", "1": "entailment", "2": "neutral"}
    settings = json.loads((folder / "config.json").read_text())
    assert settings["max_length"] == 64 and settings["hidden_weight"] == 0.0  # the defaults: no GLUE recipe


@pytest.mark.parametrize("fmt", ["tsv", "jsonl", "parquet"])
def test_each_format_end_to_end_with_a_validation_file(tiny, tmp_path, capsys, fmt):
    rows = labelled_rows(30, ["pos", "neg"])
    train_file = write_rows(tmp_path / f"reviews.{fmt}", ["text", "label"], rows[:24])
    val_file = write_rows(tmp_path / f"dev.{fmt}", ["text", "label"], rows[24:])
    code, out, err = train(
        capsys,
        tiny,
        tmp_path / "run",
        "--train-file",
        train_file,
        "--validation-file",
        val_file,
        "--test-file",
        val_file,
    )
    assert code == 0, err
    assert f"reviews: 24 train, 6 val, 6 test (val from {val_file}; test from {val_file})" in out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert list(metrics["student"]["test"]) == ["accuracy", "macro_f1", "mcc"]  # two classes: MCC too
    assert saved_labels(tmp_path / "run" / "student") == {"0": "neg", "1": "pos"}


@pytest.mark.parametrize("classes", [2, 12])
def test_string_classes_without_a_test_file_report_validation(tiny, tmp_path, capsys, classes):
    names = [f"topic{i:02d}" for i in range(classes)]
    train_file = write_rows(tmp_path / "topics.jsonl", ["text", "label"], labelled_rows(3 * 12, names))
    code, out, err = train(capsys, tiny, tmp_path / "run", "--train-file", train_file, "--task-name", "news")
    assert code == 0, err
    assert out.count("no test stage") == 1
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["task"] == "news" and set(metrics["student"]) == {"val"}
    assert "student / teacher val accuracy" in out and "test accuracy" not in out
    assert list(saved_labels(tmp_path / "run" / "teacher").values()) == names


def test_integer_labels_and_label_names_order(tiny, tmp_path, capsys):
    train_file = write_rows(tmp_path / "stars.csv", ["text", "label"], labelled_rows(36, [1, 2, 10]))
    code, _, err = train(capsys, tiny, tmp_path / "ints", "--train-file", train_file)
    assert code == 0, err
    assert list(saved_labels(tmp_path / "ints" / "student").values()) == ["1", "2", "10"]
    words = write_rows(tmp_path / "w.csv", ["text", "label"], labelled_rows(36, ["low", "mid", "high"]))
    code, _, err = train(capsys, tiny, tmp_path / "named", "--train-file", words, "--label-names", "low,mid,high")
    assert code == 0, err
    assert list(saved_labels(tmp_path / "named" / "student").values()) == ["low", "mid", "high"]


def test_a_regression_target(tiny, tmp_path, capsys):
    rows = [(a, b, round(0.25 * (i % 9), 2)) for i, (a, b, _) in enumerate(labelled_rows(36, [0], pairs=True))]
    train_file = write_rows(tmp_path / "sim.parquet", ["s1", "s2", "score"], rows)
    code, out, err = train(capsys, tiny, tmp_path / "run", "--train-file", train_file, "--label-column", "score")
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert list(metrics["student"]["val"]) == ["pearson", "spearman"]
    saved = json.loads((tmp_path / "run" / "student" / "config.json").read_text())
    assert saved["problem_type"] == "regression" and saved["id2label"] == {"0": "LABEL_0"}


def test_predict_pipeline_and_onnx_show_the_users_labels(pairs_run, tmp_path, capsys):
    from transformers import pipeline

    from keydistill.export import main as export_main
    from keydistill.predict import Predictor
    from keydistill.predict.cli import main as predict_main

    folder, test_file = pairs_run
    student = folder / "student"
    code = predict_main([str(student), "--input", test_file, "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"{student}: labels contradiction, entailment, neutral" in err
    assert "nli_test on 12 labelled rows: accuracy=" in err and "macro_f1=" in err
    rows = [line.split("\t") for line in out.splitlines()]
    assert rows[0] == ["line", "label", "score"] and [r[0] for r in rows[1:]] == [str(i) for i in range(2, 14)]
    assert {r[1] for r in rows[1:]} <= set(CLASSES3)
    pair = ("good movie", "fun plot")
    assert Predictor.from_pretrained(student, device="cpu").predict([pair])[0].label in CLASSES3
    classify = pipeline("text-classification", model=str(student), device="cpu")
    assert classify("good movie")[0]["label"] in CLASSES3
    import onnx

    assert export_main([str(student), "--onnx", str(tmp_path / "m.onnx")]) == 0
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(meta["id2label"]) == {"0": "contradiction", "1": "entailment", "2": "neutral"}


def test_predict_reads_an_unlabelled_file_by_its_columns_and_rejects_unknown_labels(pairs_run, tmp_path, capsys):
    from keydistill.predict.cli import main as predict_main

    student = pairs_run[0] / "student"
    texts = write_rows(tmp_path / "x.jsonl", ["id", "first", "second"], [(1, "good movie", "fun"), (2, "dull", "bad")])
    code = predict_main([str(student), "--input", texts, "--text-columns", "first,second", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0 and len(out.splitlines()) == 3 and "labelled rows" not in err, err
    odd = write_rows(tmp_path / "odd.csv", ["a", "b", "gold"], [("good", "fun", "neutral"), ("dull", "bad", "maybe")])
    code = predict_main([str(student), "--input", odd, "--label-column", "gold", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.strip().splitlines()[-1] == (
        f"error: {odd}:3: column 'gold': label 'maybe' is not among the model's labels "
        "['contradiction', 'entailment', 'neutral']"
    )


def test_ablation_on_a_file(tiny, tmp_path, capsys):
    train_file = write_rows(tmp_path / "tiny.csv", ["text", "label"], labelled_rows(24, ["a", "b", "c"]))
    argv = own_args(tiny, tmp_path / "abl", "--train-file", train_file, "--val-size", "6")
    assert ablation.main(argv) == 0
    rows = json.loads((tmp_path / "abl" / "ablation.json").read_text())["cells"]
    assert [r["keys"] for r in rows] == ["carry", "fresh", "none"]
    assert all("val accuracy" in r and "teacher val accuracy" in r for r in rows)  # no test file: val
    assert saved_labels(tmp_path / "abl" / "keys_none" / "student") == {"0": "a", "1": "b", "2": "c"}


@pytest.mark.parametrize(
    "files, extra, message",
    [
        ({}, ["--train-file", "{t}/none.csv"], "{t}/none.csv: file not found"),
        ({"bad.txt": "x"}, ["--train-file", "{t}/bad.txt"], "{t}/bad.txt: unknown extension '.txt'"),
        ({"t.csv": "text,label\ngood,a\n,b\nfun,a\n"}, ["--train-file", "{t}/t.csv"], "{t}/t.csv:3: column 'text':"),
        ({"t.csv": "text,label\ngood,a\nbad,a\n"}, ["--train-file", "{t}/t.csv"], "only one class ('a')"),
        (
            {"t.csv": "text,label\ngood,a\nbad,b\nfun,a\n", "v.csv": "text,label\nok,c\n"},
            ["--train-file", "{t}/t.csv", "--validation-file", "{t}/v.csv"],
            "{t}/v.csv:2: column 'label': label 'c' is not among the labels of the training file ['a', 'b']",
        ),
        ({"t.csv": "text,label\n"}, ["--train-file", "{t}/t.csv"], "{t}/t.csv: no rows"),
        (
            {"t.csv": "text,label\ngood,a\nbad,b\n"},
            ["--train-file", "{t}/t.csv", "--text-columns", "review"],
            "{t}/t.csv:1: no column 'review' (--text-columns); the columns are ['text', 'label']",
        ),
        (
            {"t.csv": "text,label\ngood,a\nbad,b\n"},
            ["--train-file", "{t}/t.csv", "--data-dir", "{t}"],
            "--data-dir holds GLUE tasks and --train-file your own data: give one",
        ),
        ({}, ["--test-file", "{t}/x.csv"], "--test-file: your own data needs --train-file"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_before_any_model_loads(tiny, tmp_path, capsys, files, extra, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    code, out, err = train(capsys, tiny, tmp_path / "run", *[a.format(t=tmp_path) for a in extra])
    assert code == 2 and err.count("\n") == 1 and message.format(t=tmp_path) in err, err
    assert not (tmp_path / "run").exists() and "LOAD REPORT" not in out + err  # stopped before any model loaded


def test_with_own_files_the_task_flag_names_the_task(tiny, tmp_path):
    """--task (--task-name, transformers' --task_name) is the task's name: a GLUE task's, or your data's."""
    train_file = write_rows(tmp_path / "t.csv", ["text", "label"], labelled_rows(8, ["a", "b"]))
    for flags, name in (([], "t"), (["--task", "news"], "news"), (["--task_name", "news"], "news")):
        cfg = parse_config(["--train-file", train_file, "--output-dir", "runs/{task}", *flags])
        assert cfg.task == name and cfg.out.name == name and cfg.epochs == TrainConfig().epochs  # no GLUE recipe


def test_a_glue_folder_and_own_files_exclude_each_other(tiny, tmp_path, capsys, monkeypatch):
    train_file = write_rows(tmp_path / "t.csv", ["text", "label"], labelled_rows(8, ["a", "b"]))
    monkeypatch.setenv("GLUE_DIR", str(tiny / "glue"))  # the GLUE folder of the environment is GLUE's alone
    assert parse_config(["--train-file", train_file]).data_dir is None
    assert main(own_args(tiny, tmp_path / "run", "--train-file", train_file, "--data-dir", str(tiny / "glue"))) == 2
    assert "--data-dir holds GLUE tasks and --train-file your own data" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_readme_custom_dataset_to_a_dataloader_and_the_models(tiny):
    """The README's snippet: a user's own (text, label) rows -> CustomDataset -> DataLoader -> teacher, student."""
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer

    from keydistill.bottleneck import BottleneckConfig
    from keydistill.data import Collator, CustomDataset
    from keydistill.models import BertWithKeyBottleneck, student_from_teacher

    rows = [("good fun film", "positive"), ("dull boring plot", "negative"), ("superb acting", "positive")]
    names = sorted({label for _, label in rows})
    tokenizer = AutoTokenizer.from_pretrained(str(tiny / "model"))
    dataset = CustomDataset([(text, names.index(label)) for text, label in rows], tokenizer, max_length=64)
    loader = DataLoader(dataset, batch_size=2, shuffle=True, collate_fn=Collator(tokenizer.pad_token_id))
    teacher = BertWithKeyBottleneck.from_pretrained(
        str(tiny / "model"), num_labels=len(names), bottleneck=BottleneckConfig(num_heads=4, num_keys=8)
    )
    teacher.set_label_names(names)
    student = student_from_teacher(teacher)
    seen = 0
    for batch in loader:
        batch.pop("index")  # the example's position (keydistill.train keys its caches by it)
        for model in (teacher, student):
            out = model(**batch)
            assert out.logits.shape == (len(batch["labels"]), 2) and out.loss.isfinite()
        seen += len(batch["labels"])
    assert seen == 3 and student.label_names == ("negative", "positive")
