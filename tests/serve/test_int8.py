"""Int8 export: onnxruntime runs the file to the float32 file's labels, the lookup stays float32, and the
command line refuses an int8 file that loses more than --max-drop."""

import csv
import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from transformers import AutoTokenizer

from keydistill.export import LOOKUP_SCOPE, LookupNotExact, export_onnx, main, quantize_int8
from keydistill.export import quantize as quantize_module
from keydistill.models import load_model
from keydistill.predict import OnnxPredictor
from tests.helpers.tiny_models import SENTENCES, random_sentences, write_folders

ROWS = SENTENCES + random_sentences(56, seed=3)  # fixed rows


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny runs: classification with cls pooling, regression with mean pooling."""
    root = tmp_path_factory.mktemp("runs")
    return {
        "cls": write_folders(root / "cls", pooling="cls"),
        "mean": write_folders(root / "mean", pooling="mean", projection="learned", seed=2),
        "regression": write_folders(root / "regression", num_labels=1, label_names=(), pooling="mean", seed=1),
    }


def exported(folder, path):
    model = load_model(folder)
    return export_onnx(model, path, tokenizer=AutoTokenizer.from_pretrained(folder))


@pytest.mark.parametrize("run", ["cls", "mean", "regression"])
@pytest.mark.parametrize("which", [0, 1], ids=["teacher", "student"])
def test_int8_file_runs_to_the_float32_labels(runs, run, which, tmp_path):
    fp32_path = exported(runs[run][which], tmp_path / "fp32.onnx")
    int8_path = quantize_int8(fp32_path, tmp_path / "int8.onnx")
    fp32, int8 = OnnxPredictor.from_file(fp32_path), OnnxPredictor.from_file(int8_path)
    ours, theirs = (p.predict(ROWS, batch_size=8, return_key_indices=True) for p in (fp32, int8))
    quantized = [n.op_type for n in onnx.load(str(int8_path)).graph.node]
    assert "MatMulInteger" in quantized or "DynamicQuantizeMatMul" in quantized  # the encoder is int8
    # Everything from the lookup on is float32: a row whose queries pick the same keys gets the very same
    # output. A tiny random encoder's queries crowd its keys, and int8's rounding moves a few to another.
    same_keys = [p.key_indices == q.key_indices for p, q in zip(ours, theirs)]
    assert sum(same_keys) >= 8  # rows enough for the exactness below to mean something
    assert all(p.score == q.score and p.label == q.label for p, q, s in zip(ours, theirs, same_keys) if s)
    if run == "regression":
        scores = np.array([[p.score for p in ps] for ps in (ours, theirs)])
        assert np.corrcoef(scores)[0, 1] > 0.9
    else:
        agree = np.mean([p.label == q.label for p, q in zip(ours, theirs)])
        assert agree >= 0.9, agree
        assert len({p.label for p in ours}) == 2  # both classes occur: agreement means something


def test_the_lookup_stays_float32_and_a_quantized_lookup_is_refused(runs, tmp_path):
    fp32_path = exported(runs["mean"][1], tmp_path / "fp32.onnx")
    int8_path = quantize_int8(fp32_path, tmp_path / "int8.onnx")
    fp32, int8 = onnx.load(str(fp32_path)).graph, onnx.load(str(int8_path)).graph
    lookup = [n for n in fp32.node if n.name.startswith(LOOKUP_SCOPE)]
    assert {"ArgMin", "Einsum", "Gather"} <= {n.op_type for n in lookup}
    assert {(n.name, n.op_type) for n in lookup} <= {(n.name, n.op_type) for n in int8.node}
    weights = {t.name: numpy_helper.to_array(t) for t in int8.initializer}
    for tensor in fp32.initializer:  # the keys and values the lookup reads, bit for bit
        if any(tensor.name in n.input for n in lookup):
            assert np.array_equal(weights[tensor.name], numpy_helper.to_array(tensor))
            assert weights[tensor.name].dtype == numpy_helper.to_array(tensor).dtype
    # A lookup weight changed, or a lookup node replaced: refused.
    for change in ("weight", "node"):
        model = onnx.load(str(int8_path))
        if change == "weight":
            read = next(t for t in model.graph.initializer if any(t.name in n.input for n in lookup))
            read.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(read) * 1.01, read.name))
        else:
            next(n for n in model.graph.node if n.name.startswith(LOOKUP_SCOPE + "ArgMin")).op_type = "ArgMax"
        onnx.save(model, str(tmp_path / "changed.onnx"))
        with pytest.raises(LookupNotExact, match="the lookup's"):
            quantize_module.check_lookup_kept(fp32_path, tmp_path / "changed.onnx")


def test_int8_cli_checks_on_the_check_file_and_refuses_past_max_drop(runs, tmp_path, capsys, monkeypatch):
    folder = runs["cls"][1]
    check_file = tmp_path / "rows.tsv"
    # Gold labels the float32 model gets all right: accuracy 100, so the check has something to lose.
    gold = OnnxPredictor.from_file(exported(folder, tmp_path / "ref.onnx")).predict(ROWS)
    check_file.write_text("sentence\tlabel\n" + "".join(f"{t}\t{p.label_id}\n" for t, p in zip(ROWS, gold)))
    out = tmp_path / "student.int8.onnx"
    args = [str(folder), "--onnx", str(out), "--quantize", "int8", "--check-file", str(check_file)]
    assert main(args + ["--max-drop", "100"]) == 0
    printed = capsys.readouterr().out
    assert "labels equal, keys equal" in printed  # the float32 graph against PyTorch
    figures = re.search(
        r"labels agree on ([\d.]+)%; keys agree on [\d.]+%; accuracy 100.00 \(float32\) -> ([\d.]+) \(int8\)", printed
    )
    assert figures and figures[1] == figures[2] and f"on {check_file}: {len(ROWS)} rows" in printed
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["quantization"].startswith("int8") and json.loads(meta["id2label"])["1"] == "positive"

    # An int8 file whose head is flipped: every label changes; the check says by how much, and exits 1.
    def flipped(fp32_path, int8_path):
        model = onnx.load(str(fp32_path))
        for tensor in model.graph.initializer:
            if tensor.name.startswith("model.head"):
                tensor.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(tensor), tensor.name))
        onnx.save(model, str(int8_path))
        return Path(int8_path)

    monkeypatch.setattr("keydistill.export.cli.quantize_int8", flipped)
    assert main(args + ["--max-drop", "1"]) == 1
    captured = capsys.readouterr()
    assert "accuracy 100.00 (float32) -> " in captured.out
    error = captured.err.splitlines()[-1]  # after the note of how the check file is read
    assert error == f"error: {out} loses too much to int8 (accuracy drops 100.00 points; --max-drop 1.0)"


def test_int8_cli_checks_on_the_runs_validation_rows(runs, tmp_path, capsys):
    from tests.helpers.tiny_models import glue_dir

    folder = runs["cls"][1]
    run_config = folder.parent / "config.json"  # what keydistill.train writes beside its model folders
    run_config.write_text(json.dumps({"task": "sst2", "data_dir": str(glue_dir()), "val_size": 40, "seed": 0}))
    try:
        assert main([str(folder), "--onnx", str(tmp_path / "s.onnx"), "--quantize", "int8", "--max-drop", "100"]) == 0
    finally:
        run_config.unlink()
    printed = capsys.readouterr().out
    assert "int8 vs float32 on the run's sst2 validation rows: 40 rows; labels agree on " in printed
    assert "accuracy " in printed


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


def test_int8_cli_checks_on_an_own_data_runs_validation_rows(runs, tmp_path, capsys):
    """A run on your own files (--train-file): the check draws its validation slice as training did."""
    folder = runs["cls"][1]
    train = tmp_path / "reviews.csv"
    write_csv(train, ["review", "verdict"], [(t, ("negative", "positive")[i % 2]) for i, t in enumerate(ROWS)])
    run_config = folder.parent / "config.json"
    saved = {"task": "reviews", "train_file": str(train), "text_columns": "review", "label_column": "verdict"}
    run_config.write_text(json.dumps({**saved, "val_size": 24, "seed": 3, "max_train_samples": 5}))
    try:
        assert main([str(folder), "--onnx", str(tmp_path / "s.onnx"), "--quantize", "int8", "--max-drop", "100"]) == 0
    finally:
        run_config.unlink()
    printed = capsys.readouterr().out
    assert "int8 vs float32 on the run's reviews validation rows: 24 rows; labels agree on " in printed
    assert "accuracy " in printed  # the files' labels, scored


def test_int8_cli_check_file_reads_named_columns(runs, tmp_path, capsys):
    folder = runs["cls"][1]
    gold = OnnxPredictor.from_file(exported(folder, tmp_path / "ref.onnx")).predict(ROWS)
    check_file = tmp_path / "rows.csv"
    write_csv(check_file, ["id", "text", "gold"], [(i, t, p.label) for i, (t, p) in enumerate(zip(ROWS, gold))])
    args = [str(folder), "--onnx", str(tmp_path / "s.onnx"), "--quantize", "int8", "--check-file", str(check_file)]
    assert main(args + ["--text-columns", "text", "--label-column", "gold", "--max-drop", "100"]) == 0
    assert re.search(
        r"64 rows; labels agree on [\d.]+%; keys agree on [\d.]+%; accuracy 100.00 \(float32\)", capsys.readouterr().out
    )
    assert main(args + ["--text-columns", "body", "--label-column", "gold"]) == 2  # no such column
    assert "body" in capsys.readouterr().err


def test_int8_cli_mistakes_are_one_error_line(runs, tmp_path, capsys):
    folder = runs["cls"][1]
    assert main([str(tmp_path / "nowhere"), "--onnx", str(tmp_path / "x.onnx"), "--quantize", "int8"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    missing = tmp_path / "missing.tsv"
    assert (
        main([str(folder), "--onnx", str(tmp_path / "x.onnx"), "--quantize", "int8", "--check-file", str(missing)]) == 2
    )
    assert capsys.readouterr().err == f"error: --check-file: {missing}: file not found\n"
    assert main([str(folder), "--onnx", str(tmp_path / "x.onnx"), "--max-drop", "-1"]) == 2
    assert capsys.readouterr().err == "error: --max-drop must be >= 0, got -1.0\n"
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert main([str(folder), "--onnx", str(a_file / "x.onnx"), "--quantize", "int8"]) == 2
    assert capsys.readouterr().err == f"error: --onnx {a_file / 'x.onnx'}: {a_file} is not a folder\n"
    assert not (tmp_path / "x.onnx").exists()
