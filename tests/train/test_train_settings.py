"""The training job checks its settings before any work: every impossible setting is one line and exit 2,
a loaded teacher's bottleneck and tokenizer are authoritative, and an old run's outputs are named before
they are replaced."""

import json
import re
import shutil

import pytest
import torch

from keydistill.models import load_model
from keydistill.train import ConfigError, main, parse_config, run_all
from keydistill.train.context import setup
from tests.helpers.train_fixtures import tiny_args

BAD_SETTINGS = [  # (extra flags, words the one-line error must contain)
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--grad-accum", "0"], "--grad-accum must be at least 1"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be at least 1"),
    (["--max-eval-samples", "0"], "--max-eval-samples must be at least 1"),
    (["--max-train-samples", "0"], "--max-train-samples must be at least 1"),
    (["--val-size", "0"], "--val-size must be at least 1"),
    (["--alpha", "1.5"], "--alpha must lie in [0, 1]"),
    (["--alpha", "-0.1"], "--alpha must lie in [0, 1]"),
    (["--temperature", "0"], "--temperature must be a finite number > 0"),
    (["--lr", "0"], "--lr must be a finite number > 0"),
    (["--teacher-lr", "nan"], "--teacher-lr must be a finite number > 0"),
    (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0"),
    (["--warmup-ratio", "1"], "--warmup-ratio must lie in [0, 1)"),
    (["--weight-average", "1"], "--weight-average must lie in [0, 1)"),
    (["--checkpoint-seconds", "-1"], "--checkpoint-seconds must be a finite number >= 0"),
    (["--checkpoint-seconds", "inf"], "--checkpoint-seconds must be a finite number >= 0"),
    (["--weight-average", "nan"], "--weight-average must lie in [0, 1)"),
    (["--max-length", "1"], "--max-length must be at least 2"),
    (["--kmeans-samples", "0"], "--kmeans-samples must be at least 1"),
    (["--num-keys", "0"], "--num-keys must be at least 1"),
    (["--teacher-epochs", "0"], "--teacher-epochs >= 1"),
    (["--student-layers", "a,b"], "--student-layers must be comma-separated layer numbers"),
    (["--student-layers", "1,1"], "--student-layers must name distinct layers"),
    (["--student-layers", "0,9"], "--student-layers 0,9: the teacher"),  # the tiny teacher has 4 layers
    (["--device", "tpu"], "--device 'tpu' is not a device name (cpu, cuda, cuda:1, ...)"),
    (["--device", "meta"], "--device 'meta': training runs on cpu, cuda or auto"),
    (["--device", f"cuda:{torch.cuda.device_count()}"], "--device 'cuda:"),
    (["--soft-temperature", "-1"], "--soft-temperature must be a finite number > 0"),
    (["--straight-through"], "--straight-through takes its backward pass from the soft assignment"),
    (["--feature-weight", "0", "--commitment-weight", "0"], "the student encoder would get no gradient"),
    (["--keys", "none", "--feature-weight", "0"], "the student encoder would get no gradient"),
    (["--num-heads", "5"], "needs num_heads * key_dim == dim"),  # the tiny teacher is 32 wide
    (["--output-dir", "runs/{model}"], "only {task} may be filled in"),
    (["--teacher", "/nowhere/model"], "cannot load the teacher"),
    (["--max-train-samples", "5", "--val-size", "16"], "k-means needs at least num_keys=8 vectors but will see 5"),
    (["--max-train-samples", "20", "--kmeans-samples", "6"], "capped by --kmeans-samples 6"),
]


@pytest.mark.parametrize("extra, message", BAD_SETTINGS, ids=[" ".join(e) for e, _ in BAD_SETTINGS])
def test_each_bad_setting_is_one_line_before_any_work(tiny, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert main(tiny_args(tiny, out, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (out / "teacher").exists() and not (out / "checkpoints").exists()  # nothing was trained


def test_several_problems_are_reported_together(tiny, tmp_path, capsys):
    assert main(tiny_args(tiny, tmp_path, "--epochs", "0", "--alpha", "2")) == 2
    err = capsys.readouterr().err
    assert "2 settings cannot work" in err and "--epochs" in err and "--alpha" in err


@pytest.fixture(scope="module")
def mean_teacher(tiny, tmp_path_factory):
    """A teacher trained with mean pooling, 2 heads and 6 keys (not the defaults), saved without a run around it."""
    out = tmp_path_factory.mktemp("mean_teacher")
    run_all(
        parse_config(tiny_args(tiny, out, "--pooling", "mean", "--num-heads", "2", "--num-keys", "6", "--epochs", "1"))
    )
    return out / "teacher"


def test_a_loaded_teacher_is_checked_before_any_work(tiny, mean_teacher, tmp_path, capsys):
    """The same checks for a --teacher-checkpoint, from its saved config: its layers, and its positions."""
    out = tmp_path / "out"
    assert main(tiny_args(tiny, out, "--teacher-checkpoint", str(mean_teacher), "--student-layers", "1,4")) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after the note on tiny_args' own --teacher flags
    assert err.startswith("error: ") and f"--student-layers 1,4: the teacher {mean_teacher} has 4 layers" in err, err
    args = tiny_args(tiny, out, "--teacher-checkpoint", str(mean_teacher), "--max-length", "128")
    args.remove("--num-heads"), args.remove("4"), args.remove("--num-keys"), args.remove("8")  # the teacher's
    args[args.index("--data-dir") + 1] = str(glue_with_a_long_row(tiny, tmp_path))
    assert main(args) == 2
    assert f"64 positions of the teacher {mean_teacher}" in capsys.readouterr().err
    assert not (out / "student").exists()


def glue_with_a_long_row(tiny, tmp_path):
    """The tiny SST-2 with one training row of 100 words (102 tokens: longer than the tiny BERT's 64 positions)."""
    data = tmp_path / "long_glue"
    shutil.copytree(tiny / "glue" / "SST-2", data / "SST-2")
    train = data / "SST-2" / "train.tsv"
    train.write_text(train.read_text().rstrip("\n") + "\n" + " ".join(["fun"] * 100) + "\t1\n")
    return data


def test_inputs_past_the_teachers_positions_are_one_line_before_any_work(tiny, tmp_path, capsys):
    """--max-length above the teacher's 64 positions fails where an input reaches past them, and then before
    any work (it failed in the middle of training); on inputs that fit, the same cap is fine."""
    out = tmp_path / "out"
    args = tiny_args(tiny, out, "--max-length", "128")
    args[args.index("--data-dir") + 1] = str(glue_with_a_long_row(tiny, tmp_path))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --max-length 128 keeps inputs longer than the 64 positions of the teacher"), err
    assert re.search(r"\((train|val): 102 tokens\); lower --max-length to 64", err) and err.count("\n") == 1, err
    assert not (out / "teacher").exists()
    setup(parse_config(tiny_args(tiny, tmp_path / "fits", "--max-length", "128")))  # every tiny row fits in 64


def test_optional_choices_take_none(tiny):
    """--pooling none / --projection none: the preset's or the loaded teacher's (as their help says)."""
    cfg = parse_config(tiny_args(tiny, "out", "--pooling", "none", "--projection", "none"))
    assert cfg.pooling is None and cfg.projection is None
    assert parse_config(tiny_args(tiny, "out", "--pooling", "mean")).pooling == "mean"


def test_teacher_training_flags_beside_a_teacher_checkpoint_get_a_note(tiny, capsys):
    parse_config(
        tiny_args(tiny, "out", "--teacher-checkpoint", "t", "--teacher-lr", "1e-4")
    )  # tiny_args: --teacher, --teacher-epochs
    assert (
        "note: --teacher-checkpoint loads a trained teacher, so --teacher, --teacher-epochs, --teacher-lr do nothing"
    ) in capsys.readouterr().err
    parse_config(tiny_args(tiny, "out", "--teacher-lr", "1e-4"))
    assert "note:" not in capsys.readouterr().err


def test_turning_off_a_recipes_soft_assignment_turns_off_its_straight_through(tiny):
    """CoLA's recipe sets a soft assignment with straight-through; --soft-temperature none must not then fail on
    a --straight-through the user never gave. Given explicitly, it still needs the soft assignment."""
    from keydistill.train import validate

    cfg = parse_config(tiny_args(tiny, "out", "--task", "cola", "--soft-temperature", "none"))
    assert cfg.soft_temperature is None and cfg.straight_through is False
    validate(cfg)
    assert parse_config(tiny_args(tiny, "out", "--task", "cola")).straight_through is True  # the recipe's
    with pytest.raises(ConfigError, match="--straight-through takes its backward pass"):
        validate(
            parse_config(tiny_args(tiny, "out", "--task", "cola", "--soft-temperature", "none", "--straight-through"))
        )


def test_a_loaded_teacher_bottleneck_is_used_under_default_flags(tiny, mean_teacher, tmp_path):
    args = tiny_args(tiny, tmp_path, "--teacher-checkpoint", str(mean_teacher), "--epochs", "1")
    args.remove("--num-heads"), args.remove("4"), args.remove("--num-keys"), args.remove("8")  # the defaults now
    run = setup(parse_config(args))
    assert (run.pooling, run.teacher_bottleneck.num_heads, run.teacher_bottleneck.num_keys) == ("mean", 2, 6)
    metrics = run_all(parse_config(args))
    student = load_model(tmp_path / "student")
    assert student.bottleneck.config.pooling == "mean" and student.bottleneck.keys.shape[:2] == (2, 6)
    # Mean pooling keeps every token: the student's test lookups are one per token, not one per sentence.
    assert sum(sum(h) for h in metrics["codebook"]["student"]["key_counts"]) > 2 * metrics["rows"]["test"]


@pytest.mark.parametrize(
    "flag, value, saved",
    [
        ("--pooling", "cls", "mean"),
        ("--num-heads", "4", "2"),
        ("--num-keys", "8", "6"),
        ("--projection", "random", "split"),
    ],
)
def test_a_flag_contradicting_the_teacher_names_both_values(tiny, mean_teacher, tmp_path, capsys, flag, value, saved):
    args = tiny_args(tiny, tmp_path, "--teacher-checkpoint", str(mean_teacher))
    for name in ("--num-heads", "--num-keys"):  # tiny_args sets 4 heads and 8 keys; keep only the flag under test
        i = args.index(name)
        del args[i : i + 2]
    assert main(args + [flag, value]) == 2
    err = capsys.readouterr().err
    assert f"{flag} {value} but the teacher has {saved}" in err and "source of truth" in err


def test_a_teacher_without_tokenizer_needs_tokenizer_flag(tiny, mean_teacher, tmp_path, capsys):
    bare = tmp_path / "bare_teacher"
    shutil.copytree(mean_teacher, bare, ignore=shutil.ignore_patterns("tokenizer*", "vocab*", "special_tokens*"))
    args = tiny_args(tiny, tmp_path / "out", "--teacher-checkpoint", str(bare), "--num-heads", "2", "--num-keys", "6")
    assert main(args) == 2
    assert "has no tokenizer (tokenizer_config.json); say which with --tokenizer" in capsys.readouterr().err
    run = setup(parse_config(args + ["--tokenizer", str(tiny / "model")]))
    assert run.tokenizer.pad_token_id == 0


def test_not_a_teacher_checkpoint_is_a_config_error(tiny, tmp_path):
    with pytest.raises(ConfigError, match="not a keydistill model folder"):
        setup(parse_config(tiny_args(tiny, tmp_path, "--teacher-checkpoint", str(tiny / "model"))))


def test_a_new_run_names_what_it_replaces(tiny, mean_teacher, tmp_path, capsys):
    args = tiny_args(
        tiny,
        tmp_path,
        "--teacher-checkpoint",
        str(mean_teacher),
        "--num-heads",
        "2",
        "--num-keys",
        "6",
        "--epochs",
        "1",
    )
    run_all(parse_config(args))
    capsys.readouterr()
    run_all(parse_config(args + ["--overwrite-output-dir"]))  # without it the folder is refused (tests/cli)
    out = capsys.readouterr().out
    assert "replacing the previous run's checkpoints, student, progress.json, metrics.json, training_curves.png" in out
    assert json.loads((tmp_path / "metrics.json").read_text())["task"] == "sst2"


def test_truncation_is_counted_and_printed(tiny, tmp_path, capsys):
    run = setup(parse_config(tiny_args(tiny, tmp_path, "--max-length", "5")))
    # every sentence has 2 to 7 words plus [CLS] and [SEP]: those with more than 3 words lost tokens
    lengths = [
        len(line.split("\t")[0].split())
        for line in (tiny / "glue" / "SST-2" / "train.tsv").read_text().splitlines()[1:]
    ]
    assert run.train.truncated + run.val.truncated == sum(n > 3 for n in lengths)
    assert f"truncated at --max-length 5: {run.train.truncated} of {len(run.train)} train" in capsys.readouterr().out


def test_the_dkvb_preset_brings_its_training_recipe_unless_a_flag_says_otherwise():
    from keydistill.train.config import PRESET_RECIPES

    cfg = parse_config(["--bottleneck", "dkvb-nlp"])
    assert (cfg.key_passes, cfg.kmeans_samples) == tuple(v for _, v in PRESET_RECIPES["dkvb-nlp"])
    assert parse_config(["--bottleneck", "dkvb-nlp", "--key-passes", "1"]).key_passes == 1
    assert parse_config([]).key_passes == 1  # the default preset brings nothing
    bottleneck = cfg.teacher_bottleneck(384)
    assert (bottleneck.num_heads, bottleneck.key_dim, bottleneck.num_keys, bottleneck.pooling) == (32, 12, 4096, "mean")


def test_the_dkvb_preset_on_a_teacher_it_does_not_fit_is_one_line(tiny, tmp_path, capsys):
    assert main(tiny_args(tiny, tmp_path, "--bottleneck", "dkvb-nlp")) == 2  # 32 wide: not a multiple of 12
    assert "needs num_heads * key_dim == dim" in capsys.readouterr().err
