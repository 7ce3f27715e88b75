"""Predictor, the `python -m keydistill.predict` command line, and transformers' Auto classes / pipeline."""

import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, pipeline

import keydistill  # noqa: F401 -- registers the model types with transformers
from keydistill.data import get_task
from keydistill.models import BertWithKeyBottleneck, DistilBertWithKeyBottleneck, load_model
from keydistill.predict import Predictor
from keydistill.predict.cli import main
from keydistill.predict.inputs import detect_task
from tests.helpers.tiny_models import REPO, SENTENCES, WORDS, write_folders

PAIRS = [("good movie", "great film"), ("boring plot", "superb acting , fine plot")]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny SST-2-like teacher and student folders (cls pooling), named labels."""
    return write_folders(tmp_path_factory.mktemp("sst2"))


@pytest.fixture(scope="module")
def regression_folders(tmp_path_factory):
    """An STS-B-like pair (regression, mean pooling)."""
    return write_folders(tmp_path_factory.mktemp("stsb"), num_labels=1, label_names=(), pooling="mean", seed=1)


def relabelled(folder, names, to):
    """A copy of a model folder whose classes have other names (e.g. another task's)."""
    model = load_model(folder)
    model.set_label_names(names)
    model.save_pretrained(to)
    AutoTokenizer.from_pretrained(folder).save_pretrained(to)
    return to


def one_by_one(folder, texts):
    """Logits of each input alone, by hand: the reference for batched, sorted, padded prediction."""
    model, tokenizer = load_model(folder), AutoTokenizer.from_pretrained(folder)
    rows = []
    for text in texts:
        batch = tokenizer(*([text] if isinstance(text, str) else text), return_tensors="pt")
        with torch.no_grad():
            rows.append(model(**batch))
    return rows


@pytest.mark.parametrize("which", [0, 1])
def test_predictions_follow_input_order_with_names_probabilities_and_keys(folders, which):
    folder = folders[which]
    inputs = SENTENCES + PAIRS  # singles and pairs mixed, lengths shuffled
    predictions = Predictor.from_pretrained(folder, device="cpu").predict(inputs, batch_size=3, return_key_indices=True)
    assert len(predictions) == len(inputs)
    for prediction, reference in zip(predictions, one_by_one(folder, inputs)):
        probs = reference.logits.softmax(-1)[0]
        assert prediction.label_id == int(probs.argmax())
        assert prediction.label == ("negative", "positive")[prediction.label_id]
        assert prediction.score == pytest.approx(float(probs.max()), abs=1e-5)
        assert prediction.key_indices == reference.key_indices.tolist()  # [1 position][4 heads]
    assert len({p.label for p in predictions}) == 2  # the tiny models do tell inputs apart
    assert len({tuple(p.key_indices[0]) for p in predictions}) >= 2


def test_regression_returns_the_score_and_mean_pooling_keys_per_token(regression_folders):
    student = regression_folders[1]
    predictor = Predictor.from_pretrained(student, device="cpu")
    assert predictor.model.is_regression and predictor.model.label_names == ("LABEL_0",)
    predictions = predictor.predict(PAIRS + ["fun"], batch_size=2, return_key_indices=True)
    for prediction, reference in zip(predictions, one_by_one(student, PAIRS + ["fun"])):
        assert prediction.label is None and prediction.label_id is None
        assert prediction.score == pytest.approx(float(reference.logits[0, 0]), abs=1e-5)
        assert prediction.key_indices == reference.key_indices.tolist()  # one row of heads per token
        assert len(prediction.key_indices) == int(reference.positions.sum())


def test_predict_rejects_what_is_not_text(folders):
    predictor = Predictor.from_pretrained(folders[1], device="cpu")
    assert [p.label for p in predictor.predict("good movie")] == [predictor.predict(["good movie"])[0].label]
    with pytest.raises(TypeError, match="input 1"):
        predictor.predict(["good", ("a", "b", "c")])
    with pytest.raises(TypeError, match="input 0"):
        predictor.predict([3])


def test_fixture_tokenizer_knows_its_words(folders):
    """The folders' tokenizer maps every test word to its own id: the tests exercise real tokenization."""
    tokenizer = AutoTokenizer.from_pretrained(folders[1])
    ids = tokenizer(" ".join(WORDS), add_special_tokens=False)["input_ids"]
    assert len(ids) == len(WORDS) and len(set(ids)) == len(WORDS) and tokenizer.unk_token_id not in ids


def test_a_folder_without_tokenizer_files_is_an_error(folders, tmp_path, capsys, monkeypatch):
    bare = tmp_path / "bare"  # the model alone: transformers 5 would load an empty-vocabulary tokenizer
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(folders[1] / name, bare / name)
    with pytest.raises(OSError, match=r"bare: no tokenizer \(tokenizer_config.json\)"):
        Predictor.from_pretrained(bare, device="cpu")
    code, out, err = run_cli(capsys, monkeypatch, bare, stdin=b"good movie\n")
    assert code == 2 and out == "" and err == f"error: {bare}: no tokenizer (tokenizer_config.json)\n"


# ---- label names travel with the folders ----------------------------------------------------------------


def test_saved_folders_carry_label_names(folders, regression_folders):
    for folder in folders:
        saved = json.loads((folder / "config.json").read_text())
        assert saved["id2label"] == {"0": "negative", "1": "positive"} and saved["label2id"] == {
            "negative": 0,
            "positive": 1,
        }
        assert saved["problem_type"] == "single_label_classification"
        assert load_model(folder).label_names == ("negative", "positive")
    saved = json.loads((regression_folders[1] / "config.json").read_text())
    assert saved["problem_type"] == "regression" and saved["id2label"] == {"0": "LABEL_0"}
    assert get_task("sst2").label_names == ("negative", "positive") and get_task("stsb").label_names == ()
    assert get_task("mnli").label_names == ("entailment", "neutral", "contradiction")


# ---- transformers: Auto classes and pipeline ------------------------------------------------------------


@pytest.mark.parametrize("which, cls", [(0, BertWithKeyBottleneck), (1, DistilBertWithKeyBottleneck)])
def test_auto_classes_and_pipeline_match_the_python_api(folders, which, cls):
    folder = folders[which]
    assert type(AutoConfig.from_pretrained(folder)) is cls.config_class
    auto = AutoModelForSequenceClassification.from_pretrained(folder)
    assert type(auto) is cls and not auto.training
    model = load_model(folder)
    for (name, a), (_, b) in zip(auto.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name
    classify = pipeline("text-classification", model=str(folder), device="cpu")
    expected = Predictor.from_pretrained(folder, device="cpu").predict(SENTENCES)
    got = classify(SENTENCES)
    assert [g["label"] for g in got] == [e.label for e in expected]
    assert [g["score"] for g in got] == pytest.approx([e.score for e in expected], abs=1e-5)


def test_pipeline_on_a_regression_student_returns_the_raw_score(regression_folders):
    folder = regression_folders[1]
    # The config says problem_type="regression", which transformers 5 pipelines honour; older ones apply a
    # sigmoid to a single output unless told function_to_apply="none".
    classify = pipeline("text-classification", model=str(folder), device="cpu")
    expected = [p.score for p in Predictor.from_pretrained(folder, device="cpu").predict(["fun", "good movie"])]
    got = classify(["fun", "good movie"], function_to_apply="none")
    assert [g["score"] for g in got] == pytest.approx(expected, abs=1e-5)
    if int(transformers.__version__.split(".")[0]) >= 5:
        assert [g["score"] for g in classify(["fun", "good movie"])] == pytest.approx(expected, abs=1e-5)


def test_auto_model_passes_dtype_and_rejects_what_it_cannot_honour(folders):
    model = AutoModelForSequenceClassification.from_pretrained(folders[1], dtype=torch.float64)
    assert model.dtype == torch.float64
    with pytest.raises(TypeError, match="quantization_config"):
        DistilBertWithKeyBottleneck.from_pretrained(folders[1], quantization_config={"bits": 4})
    with pytest.raises(ValueError, match="num_labels=3 was requested"):
        AutoModelForSequenceClassification.from_pretrained(folders[1], num_labels=3)


# ---- command line ---------------------------------------------------------------------------------------


def run_cli(capsys, monkeypatch, *args, stdin: bytes | None = None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_plain_lines_from_stdin(folders, capsys, monkeypatch):
    text = "\n".join(SENTENCES[:3] + ["\t".join(PAIRS[0])]) + "\n"
    code, out, err = run_cli(capsys, monkeypatch, folders[1], "--key-indices", "--batch-size", "2", stdin=text.encode())
    assert code == 0, err
    lines = [line.split("\t") for line in out.splitlines()]
    assert lines[0] == ["line", "label", "score", "key_indices"]
    expected = Predictor.from_pretrained(folders[1], device="cpu").predict(
        SENTENCES[:3] + [PAIRS[0]], return_key_indices=True
    )
    assert [row[0] for row in lines[1:]] == ["1", "2", "3", "4"]
    assert [row[1] for row in lines[1:]] == [p.label for p in expected]
    assert [float(row[2]) for row in lines[1:]] == pytest.approx([p.score for p in expected], abs=1e-6)
    assert [row[3] for row in lines[1:]] == [",".join(map(str, p.key_indices[0])) for p in expected]


def test_cli_reports_every_bad_line_and_writes_nothing(folders, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"good movie\n\nfun\ta\tb\nfine\t \n\xff\xfe bytes\nnice\n")
    out_file = tmp_path / "out.tsv"
    code, out, err = run_cli(capsys, monkeypatch, folders[1], "--input", bad, "--output", out_file)
    assert code == 2 and not out_file.exists() and out == ""
    assert err.startswith("error: ")
    assert (
        f"{bad}:2: empty text" in err
        and f"{bad}:3: expected one text or two tab-separated texts, found 3 fields" in err
    )
    assert f"{bad}:4: empty text" in err and f"{bad}:5:1: undecodable bytes" in err
    assert f"{bad}:1" not in err and f"{bad}:6" not in err
    code, _, err = run_cli(capsys, monkeypatch, folders[1], stdin=b"")
    assert code == 2 and "<stdin>: no input lines" in err
    code, _, err = run_cli(capsys, monkeypatch, tmp_path / "missing", "--input", bad, "--format", "plain")
    assert code == 2 and "error:" in err


def test_undecodable_bytes_name_their_character_column_and_bytes(tmp_path):
    from keydistill.data import DataError
    from keydistill.predict.inputs import read_plain

    bad = tmp_path / "bad.txt"  # a byte-order mark, then a bad byte on line 1; on line 2 after a 2-byte é
    bad.write_bytes(b"\xef\xbb\xbfab\xff\n" + "café ".encode() + b"\xff\n")
    with pytest.raises(DataError) as raised:
        read_plain(str(bad), "in.txt")
    assert str(raised.value).splitlines() == [
        "in.txt:1:3: undecodable bytes (not UTF-8): b'\\xff'",
        f"in.txt:2:{len('café ') + 1}: undecodable bytes (not UTF-8): b'\\xff'",
    ]


def test_cli_reads_a_glue_file_by_its_task_columns(folders, tmp_path, capsys, monkeypatch):
    dev = tmp_path / "dev.tsv"  # SST-2's layout: a header, the sentence, then the label
    dev.write_text("sentence\tlabel\n" + "".join(f"{s}\t{i % 2}\n" for i, s in enumerate(SENTENCES)))
    code, out, err = run_cli(capsys, monkeypatch, folders[1], "--input", dev)
    assert code == 0, err
    assert "as a GLUE sst2 file" in err and f"sst2 on {len(SENTENCES)} labelled rows: accuracy=" in err
    rows = [line.split("\t") for line in out.splitlines()[1:]]
    expected = Predictor.from_pretrained(folders[1], device="cpu").predict(SENTENCES)
    assert [r[0] for r in rows] == [str(i + 2) for i in range(len(SENTENCES))]  # file lines, after the header
    assert [r[1] for r in rows] == [p.label for p in expected]
    # a bad row of a GLUE file names its line; the label is not needed, a missing text column is
    dev.write_text("sentence\tlabel\ngood movie\t1\nfun\n")
    code, _, err = run_cli(capsys, monkeypatch, folders[1], "--input", dev)
    assert code == 2 and f"{dev}:3:4: expected 2 tab-separated fields" in err  # the end of "fun": no tab there
    assert "--skip-bad-rows" not in err  # a training flag; predict has none
    unlabelled = tmp_path / "test.tsv"  # GLUE test files: index and sentence, no label
    unlabelled.write_text("index\tsentence\n0\tgood movie\n1\tboring plot\n")
    code, out, err = run_cli(capsys, monkeypatch, folders[1], "--input", unlabelled)
    assert code == 0 and len(out.splitlines()) == 3 and "labelled rows" not in err
    code, out, _ = run_cli(capsys, monkeypatch, folders[1], "--input", unlabelled, "--format", "plain")
    assert code == 0 and len(out.splitlines()) == 4  # plain: the header line is a pair like any other


def test_cli_headerless_cola_with_task_flag(folders, tmp_path, capsys, monkeypatch):
    cola = tmp_path / "cola.tsv"
    cola.write_text("".join(f"src\t{i % 2}\t*\t{s}\n" for i, s in enumerate(SENTENCES[:4])))
    cola_model = relabelled(folders[1], get_task("cola").label_names, tmp_path / "cola_model")
    code, out, err = run_cli(capsys, monkeypatch, cola_model, "--input", cola, "--task", "cola")
    assert code == 0, err
    assert [line.split("\t")[0] for line in out.splitlines()[1:]] == ["1", "2", "3", "4"]
    assert "cola on 4 labelled rows: mcc=" in err
    code, _, err = run_cli(capsys, monkeypatch, folders[1], "--input", cola)  # without --task: 4 fields a line
    assert code == 2 and f"{cola}:1: expected one text or two tab-separated texts, found 4 fields" in err


def test_cli_regression_output_has_scores_only(regression_folders, capsys, monkeypatch):
    code, out, err = run_cli(capsys, monkeypatch, regression_folders[1], stdin=b"good movie\tgreat film\nfun\n")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "line\tscore" and len(lines) == 3


def test_python_dash_m_entry_point(folders, tmp_path):
    out = tmp_path / "predictions.tsv"
    done = subprocess.run(
        [sys.executable, "-m", "keydistill.predict", str(folders[1]), "--output", str(out)],
        input="good movie\nboring plot\n",
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert out.read_text().splitlines()[0] == "line\tlabel\tscore" and len(out.read_text().splitlines()) == 3


# ---- scoring only under the task's own labels -----------------------------------------------------------

RTE_HEADER = ["index", "sentence1", "sentence2", "label"]  # WNLI's dev file has the same header


def test_rte_and_wnli_headers_are_told_apart_by_the_models_label_names():
    rte, wnli = get_task("rte"), get_task("wnli")
    assert detect_task(RTE_HEADER, rte.label_names) == (rte, True)
    assert detect_task(RTE_HEADER, wnli.label_names) == (wnli, True)
    for names in (None, ("negative", "positive"), ("LABEL_0", "LABEL_1")):  # neither task: no labels read
        task, labelled = detect_task(RTE_HEADER, names)
        assert task.text_columns == rte.text_columns and not labelled


@pytest.fixture
def rte_dev(tmp_path):
    """An RTE-style dev file: pairs labelled entailment / not_entailment."""
    dev = tmp_path / "dev.tsv"
    rows = [f"{i}\t{a}\t{b}\t{('entailment', 'not_entailment')[i % 2]}" for i, (a, b) in enumerate(PAIRS * 3)]
    dev.write_text("\t".join(RTE_HEADER) + "\n" + "\n".join(rows) + "\n")
    return dev


def test_a_glue_file_is_scored_under_its_own_labels_only(folders, rte_dev, tmp_path, capsys, monkeypatch):
    rte_model = relabelled(folders[1], get_task("rte").label_names, tmp_path / "rte_model")
    code, out, err = run_cli(capsys, monkeypatch, rte_model, "--input", rte_dev)
    assert code == 0, err
    assert "as a GLUE rte file" in err  # not STS-B, whose text columns are the same
    predicted = [line.split("\t")[1] for line in out.splitlines()[1:]]
    gold = [line.split("\t")[3] for line in rte_dev.read_text().splitlines()[1:]]
    accuracy = sum(p == g for p, g in zip(predicted, gold)) / len(gold)
    assert f"rte on {len(gold)} labelled rows: accuracy={accuracy:.4f}" in err
    # WNLI's names in the other order: class 0 means not_entailment, so RTE's ids would score it backwards
    wnli_model = relabelled(folders[1], get_task("wnli").label_names, tmp_path / "wnli_model")
    code, _, err = run_cli(capsys, monkeypatch, wnli_model, "--input", rte_dev, "--task", "rte")
    assert code == 0, err
    assert "labelled rows" not in err
    assert (
        "no rte metrics: the model's labels (not_entailment, entailment) are not rte's (entailment, not_entailment)"
        in err
    )
    code, _, err = run_cli(capsys, monkeypatch, folders[1], "--input", rte_dev)  # an SST-2 model: no task fits
    assert code == 0 and "labelled rows" not in err and "--task says which" in err


# ---- command-line mistakes are one line, exit status 2 ----------------------------------------------------


def test_cli_mistakes_are_one_error_line(folders, tmp_path, capsys, monkeypatch):
    folder = folders[1]
    limit = load_model(folder).config.max_position_embeddings
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # as on a machine without a GPU
    cases = {
        ("--device", "foo"): "device 'foo' is not a device name",
        ("--device", "cuda"): "device 'cuda': no CUDA GPU is available here",
        ("--max-length", "0"): "--max-length must be >= 1, got 0",
        ("--max-length", "-5"): "--max-length must be >= 1, got -5",
        ("--max-length", str(limit + 1)): f"--max-length {limit + 1} is over the {limit} positions of",
        ("--output", tmp_path): f"--output {tmp_path}: is a directory",
        ("--output", tmp_path / "nope" / "out.tsv"): f"--output {tmp_path / 'nope' / 'out.tsv'}: no folder",
    }
    for args, message in cases.items():
        code, out, err = run_cli(capsys, monkeypatch, folder, *args, stdin=b"good movie\n")
        assert code == 2 and out == "", (args, err)
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (args, err)
    with pytest.raises(ValueError, match="max_length must be between 1 and"):
        Predictor.from_pretrained(folder, device="cpu", max_length=limit + 1)
    # a valid --max-length truncates: the CLI predicts what the Predictor does at that length
    code, out, err = run_cli(capsys, monkeypatch, folder, "--max-length", "3", stdin=b"boring plot and awful acting\n")
    expected = Predictor.from_pretrained(folder, device="cpu", max_length=3).predict(["boring plot and awful acting"])[
        0
    ]
    assert code == 0 and float(out.splitlines()[1].split("\t")[2]) == pytest.approx(expected.score, abs=1e-6)


def test_cli_damaged_weights_are_one_error_line(folders, tmp_path, capsys, monkeypatch):
    damaged = tmp_path / "damaged"
    shutil.copytree(folders[1], damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, out, err = run_cli(capsys, monkeypatch, damaged, stdin=b"good movie\n")
    assert code == 2 and out == "" and err.startswith(f"error: {weights}: not a readable safetensors file")


def test_a_closed_stdout_ends_quietly(folders):
    """`predict ... | head -1`: the reader leaves; no BrokenPipeError traceback."""
    read, write = os.pipe()
    os.close(read)  # every write to stdout fails with EPIPE
    try:
        done = subprocess.run(
            [sys.executable, "-m", "keydistill.predict", str(folders[1])],
            input=b"good movie\n" * 50,
            stdout=write,
            stderr=subprocess.PIPE,
            cwd=REPO,
            timeout=300,
        )
    finally:
        os.close(write)
    assert done.returncode == 141 and b"Traceback" not in done.stderr and b"BrokenPipe" not in done.stderr, done.stderr
