"""--augment: perturbed copies of the training rows, labelled by the teacher, join the student's transfer set."""

import random

import pytest
import torch

from keydistill.augment import perturbed_copies
from keydistill.data import Example
from keydistill.models import load_model
from keydistill.train import parse_config
from keydistill.train.context import setup
from keydistill.train.features import encode
from keydistill.train.targets import transfer_set
from tests.helpers.train_fixtures import WORDS, tiny_args


def corpus(rng: random.Random, n: int, pairs: bool) -> list[Example]:
    def text():
        return " ".join(rng.choices(WORDS, k=rng.randint(1, 12)))

    return [Example((text(), text()) if pairs else (text(),), rng.randint(0, 1)) for _ in range(n)]


@pytest.mark.parametrize("pairs", [False, True])
def test_copies_are_seeded_word_edits_of_each_example_in_order(seed, pairs):
    examples = corpus(random.Random(seed), 200, pairs)
    copies = perturbed_copies(examples, 3, seed)
    assert copies == perturbed_copies(examples, 3, seed)  # every rank and every resume draws the same
    assert copies != perturbed_copies(examples, 3, seed + 1)
    assert len(copies) == 3 * len(examples)
    vocabulary = {w for e in examples for t in e.texts for w in t.split()}
    changed = 0
    for i, copy in enumerate(copies):
        original = examples[i // 3].texts
        assert len(copy) == len(original)  # a pair stays a pair, texts in place
        for before, after in zip(original, copy):
            assert set(after.split()) <= vocabulary and after.split()
            assert abs(len(after.split()) - len(before.split())) <= 3  # at most three edits
        changed += copy != original
    assert changed >= 0.8 * len(copies)  # swapping or replacing a word by an equal one is the only no-op


@pytest.fixture(scope="module", params=["sst2", "stsb"])
def task_teacher(tiny, tmp_path_factory, request):
    """(task, a trained tiny teacher of that task): classification and regression."""
    from keydistill.train import run_all

    out = tmp_path_factory.mktemp(f"augment_{request.param}")
    run_all(parse_config(tiny_args(tiny, out, "--task", request.param, "--epochs", "1")))
    return request.param, str(out / "teacher")


def test_the_transfer_set_is_train_then_teacher_labelled_copies(tiny, task_teacher, tmp_path):
    task, teacher_dir = task_teacher
    run = setup(
        parse_config(tiny_args(tiny, tmp_path, "--task", task, "--teacher-checkpoint", teacher_dir, "--augment", "2"))
    )
    teacher = load_model(teacher_dir)
    transfer, logits, features = transfer_set(run, teacher, encode(run, teacher, run.train, "teacher outputs"))
    n = len(run.train)
    assert len(transfer) == len(logits) == len(features) == 3 * n
    assert transfer.input_ids[:n] == run.train.input_ids and torch.equal(transfer.labels[:n], run.train.labels)
    # every row's targets are the teacher's own answers on that row, computed here from its tokens
    teacher.eval()
    for i in (0, n, 2 * n + 1, 3 * n - 1):
        ids = torch.tensor([transfer.input_ids[i]])
        types = torch.tensor([transfer.token_type_ids[i]])
        with torch.no_grad():
            out = teacher(ids, torch.ones_like(ids), types)
        torch.testing.assert_close(logits[i], out.logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(features[i], out.hidden_states[0, 0], atol=1e-5, rtol=1e-5)
    copy_labels = logits[n:].squeeze(-1) if task == "stsb" else logits[n:].argmax(-1)
    assert torch.equal(transfer.labels[n:], copy_labels.to(transfer.labels.dtype))
    assert transfer.input_ids[n:] != run.train.input_ids + run.train.input_ids
