"""Folders written by the first save_pretrained format (keydistill_config.json + model.safetensors) still load."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from keydistill.models import BertWithKeyBottleneck, DistilBertWithKeyBottleneck, load_model

FIXTURES = Path(__file__).parents[1] / "fixtures"


@pytest.mark.parametrize("which, cls", [("teacher", BertWithKeyBottleneck), ("student", DistilBertWithKeyBottleneck)])
def test_format_1_folder_loads_and_reproduces_its_logits(which, cls):
    folder = FIXTURES / f"legacy_v1_{which}"
    expected = json.loads((folder / "expected_logits.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(expected["sentences"], padding=True, return_tensors="pt")
    for model in (load_model(folder), cls.from_pretrained(folder)):
        assert type(model) is cls and not model.training
        with torch.no_grad():
            logits = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")).logits
        torch.testing.assert_close(logits, torch.tensor(expected["logits"]), rtol=0, atol=1e-5)
