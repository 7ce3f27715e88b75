"""What serving an .onnx file imports: the data readers, the task table, the metrics and the predict command
line load without PyTorch; the tokenised datasets of keydistill.data load it on first use."""

import os
import subprocess
import sys

import pytest

import keydistill.data
from keydistill.data import dataset
from tests.helpers.no_torch import REPO, run_without_torch

TORCH_FREE = [
    "keydistill.data",
    "keydistill.data.examples",
    "keydistill.data.glue",
    "keydistill.data.tsv",
    "keydistill.data.files",
    "keydistill.data.metrics",
    "keydistill.data.recipes",
    "keydistill.devices",
    "keydistill.predict.inputs",
    "keydistill.predict.onnx_predictor",
    "keydistill.predict.cli",
]


def test_importing_the_serving_modules_does_not_import_torch():
    script = (
        "import importlib, sys\n"
        f"for name in {TORCH_FREE!r}:\n"
        "    importlib.import_module(name)\n"
        "    if 'torch' in sys.modules:\n"
        "        print('torch imported by', name)\n"
        "        break\n"
        "from keydistill.data import CustomDataset\n"  # the lazy names still load it
        "print('after CustomDataset:', 'torch' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["after CustomDataset: True"]


def test_the_torch_parts_of_keydistill_data_keep_their_names():
    for name in ("Collator", "CustomDataset", "count_truncated", "eval_batches", "length_bucketed_batches"):
        assert getattr(keydistill.data, name) is getattr(dataset, name)
    assert set(keydistill.data.__all__) <= set(dir(keydistill.data))
    star: dict = {}
    exec("from keydistill.data import *", star)
    assert set(keydistill.data.__all__) <= set(star)
    with pytest.raises(AttributeError, match="no_such_name"):
        keydistill.data.no_such_name  # noqa: B018


def test_predict_help_and_bad_input_without_torch(tmp_path):
    done = run_without_torch(["-m", "keydistill.predict", "--help"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "an exported .onnx file" in done.stdout
    (tmp_path / "texts.txt").write_text("a gripping film\n")
    for flags, error in (
        (["--device", "cuda"], "error: --device cuda: an .onnx file runs on the CPU with onnxruntime"),
        ([], "error: missing.onnx: no such file"),
    ):
        done = run_without_torch(["-m", "keydistill.predict", "missing.onnx", "--input", "texts.txt", *flags], tmp_path)
        assert done.returncode == 2 and done.stderr.startswith(error) and done.stderr.count("\n") == 1, done.stderr
