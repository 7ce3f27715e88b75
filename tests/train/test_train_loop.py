"""The shared training loop: accumulation weighted like one large batch, no decay on biases and LayerNorm,
and checkpoints that survive a kill between any two writes."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig

from keydistill import checkpoint
from keydistill.bottleneck import BottleneckConfig
from keydistill.losses import DistillationWeights, distillation_loss, hidden_state_loss, relation_loss
from keydistill.models import BertWithKeyBottleneck
from keydistill.train import distributed, parse_config, run_all
from keydistill.train.checkpointer import Checkpointer, checkpoint_due
from keydistill.train.distributed import Dist
from keydistill.train.loop import accumulation_weights, param_groups, token_scale
from tests.helpers.train_fixtures import tiny_args


def tiny_model() -> BertWithKeyBottleneck:
    config = BertConfig(vocab_size=20, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    return BertWithKeyBottleneck(config, BottleneckConfig(num_heads=4, num_keys=5, soft_temperature=1.0), 3)


def test_accumulation_weights_are_shares_of_the_step():
    batches = [[0, 1, 2], [3, 4, 5], [6], [7, 8, 9], [10]]  # steps of 3 micro-batches: 7 examples, then 4
    assert accumulation_weights(batches, 3) == pytest.approx([3 / 7, 3 / 7, 1 / 7, 3 / 4, 1 / 4])
    assert accumulation_weights(batches, 1) == [1.0] * 5


def test_accumulated_micro_batches_give_the_gradient_of_one_large_batch(seed):
    model = tiny_model().train()
    model.bottleneck.freeze_keys()  # the EMA would change the keys between the two passes
    hidden, labels = torch.randn(11, 1, 16), torch.randint(3, (11,))
    teacher_logits, teacher_features = torch.randn(11, 3), torch.randn(11, 16)
    weights = DistillationWeights(alpha=0.5, temperature=2.0, feature_weight=1.0)

    def loss(rows):
        out = model.forward_hidden(hidden[rows], labels=labels[rows])
        return distillation_loss(out, teacher_logits[rows], teacher_features[rows], hidden[rows, 0], weights)["total"]

    batches = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]  # a short last micro-batch
    for batch, weight in zip(batches, accumulation_weights(batches, 3)):
        (loss(batch) * weight).backward()
    accumulated = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    loss(list(range(11))).backward()
    whole = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(accumulated) == len(whole) > 0
    for a, b in zip(accumulated, whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("term", ["hidden", "attention"])
def test_token_mean_terms_accumulate_to_the_mean_over_the_whole_step(seed, term):
    """The hidden-state MSE and the attention KL are means over tokens, the loop weights micro-batches and
    ranks by examples: with token_scale, length-bucketed micro-batches (few long rows, then many short ones)
    and a global batch cut across ranks both give the token mean of the whole step, value and gradient."""
    lengths = [9, 8, 8, 3, 2, 2, 1]
    student, teacher = torch.randn(7, 9, 6, requires_grad=True), torch.randn(7, 9, 6)
    mask = (torch.arange(9) < torch.tensor(lengths)[:, None]).long()

    def loss(rows, scale=1.0):
        if term == "attention":  # two heads; the student's key is its query, flipped
            return relation_loss(
                [(student[rows], student[rows].flip(-1))],
                [(teacher[rows], teacher[rows].flip(-1))],
                mask[rows],
                2,
                scale,
            )
        return hidden_state_loss([student[rows]], [teacher[rows]], mask[rows], scale)

    def gradient(value):
        student.grad = None
        value.backward()
        return student.grad.clone()

    whole = loss(list(range(7)))
    expected = gradient(whole)
    micro = [[0, 1, 2], [3, 4], [5, 6]]  # three micro-batches of one step
    accumulated = sum(
        loss(b, token_scale(micro, i, 3, b, lengths)) * w
        for i, (b, w) in enumerate(zip(micro, accumulation_weights(micro, 3)))
    )
    step = [list(range(7))]  # one global batch on two ranks: DDP's mean makes each rank's weight its share
    ranks = [distributed.chunk(step[0], Dist(r, 2)) for r in range(2)]
    split = sum(loss(mine, token_scale(step, 0, 1, mine, lengths)) * len(mine) / 7 for mine in ranks)
    for value in (accumulated, split):
        torch.testing.assert_close(value, whole)
        torch.testing.assert_close(gradient(value), expected)
    unscaled = sum(loss(b) * w for b, w in zip(micro, accumulation_weights(micro, 3)))
    assert not torch.allclose(unscaled, whole)  # each micro-batch's own token mean is not the step's
    assert token_scale(step, 0, 1, step[0], lengths) == 1.0  # one process, no accumulation: exactly as before


def test_no_weight_decay_on_biases_and_layer_norms():
    model = tiny_model()
    groups = param_groups(model, list(model.parameters()), 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    exempt = {names[id(p)] for p in groups[1]["params"]}
    assert (groups[0]["weight_decay"], groups[1]["weight_decay"]) == (0.01, 0.0)
    assert exempt == {n for n in names.values() if n.endswith("bias") or "LayerNorm" in n}
    assert "bottleneck.values" in decayed and "head.weight" in decayed and not decayed & exempt
    assert decayed | exempt == set(names.values())


class Killed(BaseException):
    """A kill -9 between two writes (every write is atomic, so a kill at any instant is one of these)."""


@pytest.fixture(scope="module")
def teacher_dir(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("loop_teacher")
    run_all(parse_config(tiny_args(tiny, out, "--epochs", "1")))
    return str(out / "teacher")


@pytest.mark.parametrize("extra", [[], ["--weight-average", "0.7"]], ids=["trained", "averaged"])
def test_a_kill_between_any_two_writes_resumes_to_the_same_result(tiny, teacher_dir, tmp_path, monkeypatch, extra):
    # eval_every puts "best" writes mid-epoch, between "latest" writes: the order the loop must get right;
    # a weight average must survive the kill too (it lives in the latest checkpoint)
    args = [
        "--teacher-checkpoint",
        teacher_dir,
        "--epochs",
        "2",
        "--checkpoint-every",
        "2",
        "--checkpoint-seconds",
        "0",
        "--eval-every",
        "3",
        *extra,
    ]
    real = checkpoint._replace_atomically
    written = []

    def counting(path, write):
        real(path, write)
        written.append(path.name)

    monkeypatch.setattr(checkpoint, "_replace_atomically", counting)
    whole = run_all(parse_config(tiny_args(tiny, tmp_path / "whole", *args)))
    assert {"student.best.safetensors", "student.latest.safetensors", "progress.json"} <= set(written)
    # the finished stage drops its resumable state: a finished run keeps its best weights only
    assert [p.name for p in (tmp_path / "whole" / "checkpoints").iterdir()] == ["student.best.safetensors"]

    for kill_after in range(1, len(written)):
        out = tmp_path / f"killed_after_{kill_after}"
        count = 0

        def killing(path, write, kill_after=kill_after):
            nonlocal count
            real(path, write)
            count += 1
            if count == kill_after:
                raise Killed

        monkeypatch.setattr(checkpoint, "_replace_atomically", killing)
        with pytest.raises(Killed):
            run_all(parse_config(tiny_args(tiny, out, *args)))
        monkeypatch.setattr(checkpoint, "_replace_atomically", real)
        resumed = run_all(parse_config(tiny_args(tiny, out, *args, "--resume")))
        where = f"killed after write {kill_after} ({written[kill_after - 1]})"
        assert resumed["student"] == whole["student"], where
        assert resumed["steps_to_best_val"] == whole["steps_to_best_val"], where
        assert [e["val"] for e in resumed["history"]] == [e["val"] for e in whole["history"]], where


def test_checkpoints_inside_an_epoch_come_by_steps_or_by_time():
    cfg = parse_config(["--checkpoint-every", "4", "--checkpoint-seconds", "60"])
    assert [checkpoint_due(cfg, step, 1.0) for step in range(1, 9)] == [False] * 3 + [True] + [False] * 3 + [True]
    assert checkpoint_due(cfg, 5, 60.0) and not checkpoint_due(cfg, 5, 59.9)
    never = parse_config(["--checkpoint-seconds", "0"])  # --checkpoint-every is 0 by default
    assert not any(checkpoint_due(never, step, 1e9) for step in range(1, 100))


@pytest.mark.parametrize("seconds", ["0", "1e-9"])
def test_a_run_writes_its_checkpoints_as_often_as_the_clock_says(tiny, teacher_dir, tmp_path, monkeypatch, seconds):
    """--checkpoint-seconds 0: the latest checkpoint at epoch ends only; a tiny interval: after every step too."""
    real, latest_writes = checkpoint._replace_atomically, []

    def counting(path, write):
        real(path, write)
        latest_writes.extend([path.name] if path.name == "student.latest.safetensors" else [])

    monkeypatch.setattr(checkpoint, "_replace_atomically", counting)
    result = run_all(
        parse_config(
            tiny_args(
                tiny, tmp_path, "--teacher-checkpoint", teacher_dir, "--epochs", "2", "--checkpoint-seconds", seconds
            )
        )
    )
    steps = len(result["curves"]["student"])
    assert steps > 4
    assert len(latest_writes) == (2 if seconds == "0" else steps)  # the last step of an epoch writes once


def killed_after_the_students_first_checkpoint(args: list[str], monkeypatch) -> Path:
    """Run args until the student's first latest checkpoint is written; its path."""
    real = checkpoint._replace_atomically

    def kill_after_the_students_first_checkpoint(path, write):
        real(path, write)
        if path.name == "student.latest.safetensors":
            raise Killed

    monkeypatch.setattr(checkpoint, "_replace_atomically", kill_after_the_students_first_checkpoint)
    with pytest.raises(Killed):
        run_all(parse_config(args))
    monkeypatch.setattr(checkpoint, "_replace_atomically", real)
    return Path(args[args.index("--output-dir") + 1]) / "checkpoints" / "student.latest.safetensors"


def rewrite_state(latest: Path, change) -> None:
    """Rewrite the training state a latest checkpoint records (change edits its dict), its tensors kept."""
    record = checkpoint.read_record(latest)
    change(record["state"])
    save_file(load_file(str(latest)), str(latest), metadata={checkpoint._RECORD: json.dumps(record)})


def test_resuming_on_another_number_of_ranks_is_an_error(tiny, teacher_dir, tmp_path, monkeypatch):
    """The epoch's batches are cut from the global batch (--batch-size x ranks): a checkpoint written on another
    number of ranks would replay other examples when resumed, so it stops with a one-line error instead."""
    from keydistill.train import RunError

    args = tiny_args(
        tiny, tmp_path / "run", "--teacher-checkpoint", teacher_dir, "--epochs", "2", "--checkpoint-every", "2"
    )
    latest = killed_after_the_students_first_checkpoint(args, monkeypatch)
    assert checkpoint.read_record(latest)["state"]["global_batch"] == 8
    # as if written by two ranks of 2 examples each (this process cannot be two ranks)
    rewrite_state(latest, lambda state: state.update(global_batch=4))
    with pytest.raises(
        RunError,
        match=r"student.latest.safetensors: written by a run of 4 examples per batch .* "
        r"resumed with 8",
    ):
        run_all(parse_config([*args, "--resume"]))


def test_a_checkpoint_from_before_the_global_batch_was_kept_resumes_to_the_same_result(
    tiny, teacher_dir, tmp_path, monkeypatch
):
    """A latest checkpoint whose training state lacks the global batch (an older one) resumes as today's does."""
    args = ["--teacher-checkpoint", teacher_dir, "--epochs", "2", "--checkpoint-every", "2"]
    whole = run_all(parse_config(tiny_args(tiny, tmp_path / "whole", *args)))
    resumed_args = tiny_args(tiny, tmp_path / "older", *args)
    latest = killed_after_the_students_first_checkpoint(resumed_args, monkeypatch)
    rewrite_state(latest, lambda state: state.pop("global_batch"))
    assert "global_batch" not in checkpoint.read_record(latest)["state"]
    resumed = run_all(parse_config([*resumed_args, "--resume"]))
    assert resumed["student"] == whole["student"]
    assert resumed["curves"]["student"] == whole["curves"]["student"]
    assert [e["val"] for e in resumed["history"]] == [e["val"] for e in whole["history"]]


def test_weight_average_follows_the_weights_and_swaps_back(seed):
    """average <- decay * average + (1 - decay) * weights (float64 reference), and swapped_in puts the trained
    weights back bit for bit, also when the block raises."""
    from keydistill.train.averaging import WeightAverage

    params = [torch.nn.Parameter(torch.randn(7, 3)), torch.nn.Parameter(torch.randn(5))]
    average = WeightAverage(params, decay=0.8)
    reference = [p.detach().double().clone() for p in params]
    for _ in range(4):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
        average.update()
        reference = [0.8 * r + 0.2 * p.detach().double() for r, p in zip(reference, params)]
    for a, r in zip(average.average, reference):
        torch.testing.assert_close(a.double(), r, rtol=1e-6, atol=1e-6)
    trained = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError):
        with average.swapped_in():
            assert all(torch.equal(p, a) for p, a in zip(params, average.average))
            raise RuntimeError("validation failed")
    assert all(torch.equal(p, t) for p, t in zip(params, trained))
    again = WeightAverage(params, decay=0.8)
    again.load(average.tensors())  # what a resumed run reads from its checkpoint
    assert all(torch.equal(a, b) for a, b in zip(again.average, average.average))


def test_the_student_kept_is_the_weight_average_and_training_is_unchanged(tiny, teacher_dir, tmp_path, monkeypatch):
    """With --weight-average the validated and saved student is the average of its weights (one validation,
    so the best is the last), while the optimizer trains exactly as without it."""
    from safetensors.torch import load_file

    from keydistill.models import load_model

    args = ["--teacher-checkpoint", teacher_dir, "--epochs", "1"]
    plain = run_all(parse_config(tiny_args(tiny, tmp_path / "plain", *args)))
    last_state, finish = tmp_path / "last_state.safetensors", Checkpointer.finish

    def keeping_the_last_state(self, state):  # the latest checkpoint, which a finished stage deletes
        shutil.copy(self.latest, last_state)
        return finish(self, state)

    monkeypatch.setattr(Checkpointer, "finish", keeping_the_last_state)
    averaged = run_all(parse_config(tiny_args(tiny, tmp_path / "averaged", *args, "--weight-average", "0.5")))
    assert averaged["curves"]["student"] == plain["curves"]["student"]  # training is not touched
    latest = load_file(str(last_state))
    student = load_model(tmp_path / "averaged" / "student")
    # the trained parameters, in order: all but the frozen word embeddings
    names = [n for n, _ in student.named_parameters() if n != "encoder.embeddings.word_embeddings.weight"]
    assert len(names) == sum(k.startswith("average.") for k in latest)
    params = dict(student.named_parameters())
    for i, name in enumerate(names):
        assert torch.equal(params[name].detach(), latest[f"average.{i}"]), name
    assert any(not torch.equal(latest[f"average.{i}"], latest[f"model.{name}"]) for i, name in enumerate(names))
