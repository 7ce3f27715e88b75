"""The five commands' shared conventions, from the command line: one-line usage errors with exit status 2,
transformers' flag names, help that shows the defaults a run really uses, a refused run folder left intact,
the GLUE runner's checks before any task, Ctrl-C as 130, and what a run prints and writes."""

import hashlib
import json
import subprocess
import sys

import pytest

from keydistill import ablation, export, glue
from keydistill.predict import cli as predict_cli
from keydistill.train import ConfigError, RunError, job, main, parse_config, validate
from keydistill.train.config import FIELDS, build_parser, defaults_for, flag_of
from tests.helpers.train_fixtures import REPO, tiny_args

COMMANDS = {
    "train": main,
    "glue": glue.main,
    "ablation": ablation.main,
    "predict": lambda argv: predict_cli.main(["some/model", *argv]),
    "export": lambda argv: export.main(["some/model", "--onnx", "x.onnx", *argv]),
}


@pytest.fixture(autouse=True)
def no_glue_dir(monkeypatch):
    monkeypatch.delenv("GLUE_DIR", raising=False)


def folder_digest(folder) -> dict:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


# ---- usage errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_mistyped_flag_is_one_short_line(command, capsys):
    assert COMMANDS[command](["--otput", "x"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and len(err) < 160, err
    assert err.startswith("error: unrecognized arguments: --otput x") and err.rstrip().endswith("see --help"), err
    assert "usage:" not in err


def test_a_typo_gets_a_suggestion(capsys):
    assert main(["--otput-dir", "x"]) == 2
    assert "(did you mean --output-dir?)" in capsys.readouterr().err


def test_a_bad_value_is_one_line(capsys):
    assert main(["--epochs", "two"]) == 2
    err = capsys.readouterr().err
    assert err == "error: argument --epochs: invalid int value: 'two'; see --help\n"


# ---- flag names --------------------------------------------------------------------------------------------


def test_transformers_names_and_underscores_reach_the_settings(tiny, tmp_path, capsys):
    """The aliases in a run stopped by a bad setting (so no training happens): each reached its setting."""
    out = tmp_path / "out"
    argv = [
        "--model_name_or_path",
        str(tiny / "model"),
        "--task_name",
        "stsb",
        "--data_dir",
        str(tiny / "glue"),
        "--output_dir",
        str(out),
        "--num_train_epochs",
        "0",
        "--learning_rate",
        "-1",
        "--per_device_train_batch_size",
        "0",
        "--max_seq_length",
        "1",
        "--gradient_accumulation_steps",
        "0",
        "--seed",
        "-3",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    for flag in ("--epochs", "--lr", "--batch-size", "--max-length", "--grad-accum", "--seed"):
        assert f"{flag} must" in err, (flag, err)
    assert err.count("\n") == 1 and not out.exists()
    cfg = parse_config([*argv[:8], "--overwrite_output_dir", "--per_device_eval_batch_size=4", "--max_seq_length=32"])
    assert (cfg.teacher, cfg.task, cfg.data_dir, cfg.output_dir) == (
        str(tiny / "model"),
        "stsb",
        str(tiny / "glue"),
        str(out),
    )
    assert cfg.overwrite_output_dir and cfg.eval_batch_size == 4 and cfg.max_length == 32


def test_a_flag_given_at_its_default_value_still_beats_the_recipe():
    """CoLA's recipe sets 6 epochs; --epochs 2 (the setting's own default) is still the user's word."""
    assert parse_config(["--task", "cola"]).epochs == 6
    assert parse_config(["--task", "cola", "--epochs", "2"]).epochs == 2
    assert parse_config(["--task", "cola", "--num_train_epochs=2"]).epochs == 2


def test_a_flag_means_one_thing_in_every_command():
    """--keys is the student's keys (train, glue; the ablation refuses it); predict names its column
    --key-indices. --device takes auto everywhere."""
    assert "--keys" not in predict_cli.build_parser().flags and "--key-indices" in predict_cli.build_parser().flags
    assert predict_cli.build_parser().parse_args(["m"]).device == "auto"
    assert parse_config([]).device == "auto"


def test_glue_dir_is_the_data_folder_unless_the_flag_says_otherwise(monkeypatch):
    assert parse_config([]).data_dir is None  # the hub
    monkeypatch.setenv("GLUE_DIR", "/data/glue")
    assert parse_config([]).data_dir == "/data/glue"
    assert parse_config(["--data-dir", "elsewhere"]).data_dir == "elsewhere"
    assert help_line(build_parser(defaults_for([])).format_help(), "--data-dir").endswith(
        "(default: $GLUE_DIR (/data/glue))"
    )


# ---- help --------------------------------------------------------------------------------------------------


def help_line(text: str, flag: str) -> str:
    """The help of one flag, on one line."""
    block = text.split(f"  {flag} ", 1)[1].split("\n  --", 1)[0]
    return " ".join(block.split())


def test_help_shows_the_defaults_a_run_uses(capsys):
    for argv, epochs, rows in ((["--help"], 1, "none"), (["--task", "qnli", "--help"], 2, "40000")):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 0
        text = capsys.readouterr().out
        task = argv[1] if len(argv) > 1 else "sst2"
        assert help_line(text, "--epochs").endswith(f"(default: {epochs})") and parse_config(argv[:-1]).epochs == epochs
        assert help_line(text, "--max-train-samples").endswith(f"(default: {rows})")
        assert f"--task {task}'s" in text and "--print-config" in text
        teacher = help_line(text, "--teacher")
        assert teacher.count("default") == 1 and "site-packages" not in text and "/" not in teacher.split("default")[1]


@pytest.mark.parametrize("command", ["glue", "ablation", "predict", "export"])
def test_each_command_has_its_own_description(command, capsys):
    main_of = {"glue": glue.main, "ablation": ablation.main, "predict": predict_cli.main, "export": export.main}
    with pytest.raises(SystemExit):
        main_of[command](["--help"])
    text = capsys.readouterr().out
    description = text.split("\n\n")[1]
    assert (
        description.split()[0] in {"Distil", "Predict", "Export"}
        and "Distil one task (a GLUE task, or your own" not in text
    )
    assert "(default:" in text


def test_glue_print_config_resolves_each_task(capsys, tmp_path):
    assert glue.main(["--tasks", "rte,cola", "--output-dir", str(tmp_path), "--epochs", "3", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert list(printed) == ["cola", "rte"]
    assert printed["cola"]["soft_temperature"] == 1.0 and printed["rte"]["hidden_weight"] == 5.0  # their recipes
    assert printed["cola"]["epochs"] == printed["rte"]["epochs"] == 3  # the flag beat both recipes
    assert printed["rte"]["output_dir"] == str(tmp_path / "rte") and not (tmp_path / "rte").exists()


# ---- every setting checked before any work -------------------------------------------------------------------


def test_every_bounded_setting_is_checked_from_its_declaration():
    """The checks come from option(min=, max=, ...): a value just outside each setting's range is named."""
    for name, f in FIELDS.items():
        bounds = f.metadata["bounds"]
        if bounds is None:
            continue
        outside = bounds.min - 1 if bounds.min is not None else bounds.max + 1
        cfg = parse_config([])
        setattr(cfg, name, outside)
        with pytest.raises(ConfigError, match=flag_of(name) + " must"):
            validate(cfg)


def test_the_glue_runner_refuses_a_bad_setting_before_any_task(tiny, tmp_path, capsys, monkeypatch):
    started = []
    monkeypatch.setattr(glue, "run_all", lambda cfg: started.append(cfg.task))
    argv = tiny_args(tiny, tmp_path, "--alpha", "2", "--tasks", "sst2,stsb")
    assert glue.main(argv) == 2
    out, err = capsys.readouterr()
    assert started == [] and "[1/" not in out and "FAILED" not in out
    assert (
        err.startswith("error: 2 problems: sst2: --alpha must lie in [0, 1], got 2.0; stsb: --alpha")
        and err.count("\n") == 1
    )
    assert list(tmp_path.iterdir()) == []  # no task folder, no table


# ---- never lose a run --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tiny, tmp_path_factory):
    """A finished tiny run, made by the command itself in a fresh process (its real output)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    command = [
        sys.executable,
        "-m",
        "keydistill.train",
        *tiny_args(tiny, out, "--epochs", "1", "--report-to", "tensorboard"),
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    return out, done


def test_a_run_prints_no_load_report_and_ends_naming_what_it_wrote(finished_run):
    out, done = finished_run
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LOAD REPORT" not in done.stdout + done.stderr and "UNEXPECTED" not in done.stdout + done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith(f"wrote {out} (student/, teacher/, metrics.json, training_curves.png, tensorboard/")


def test_tensorboard_events_hold_the_curves(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = finished_run
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    metrics = json.loads((out / "metrics.json").read_text())
    assert "student/loss" in events.Tags()["scalars"] and "student/val_accuracy" in events.Tags()["scalars"]
    losses = [e.value for e in events.Scalars("student/loss")]
    assert losses == pytest.approx([loss for _, loss in metrics["curves"]["student"]])


def test_without_tensorboard_the_flag_is_one_line_before_any_work(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # its import now fails
    assert main(tiny_args(tiny, tmp_path / "out", "--report-to", "tensorboard")) == 2
    err = capsys.readouterr().err
    assert "pip install keydistill[tensorboard]" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_new_run_into_a_finished_one_is_refused_and_leaves_it_intact(finished_run, tiny, capsys):
    out, _ = finished_run
    before = folder_digest(out)
    assert main(tiny_args(tiny, out, "--epochs", "1")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --output-dir {out} holds a finished run (") and err.count("\n") == 1
    assert "--overwrite-output-dir" in err and "--resume" in err
    assert folder_digest(out) == before  # byte for byte


def test_an_interrupted_run_is_refused_too(tiny, tmp_path, capsys):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "student.latest.safetensors").write_bytes(b"half a run")
    before = folder_digest(tmp_path)
    assert main(tiny_args(tiny, tmp_path)) == 2
    assert "holds an interrupted run (checkpoints)" in capsys.readouterr().err
    assert folder_digest(tmp_path) == before


def test_resume_continues_and_overwrite_replaces(finished_run, tiny, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run[0], out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "output_dir": str(out)}))  # the run as if made here
    metrics = json.loads((out / "metrics.json").read_text())
    assert main(tiny_args(tiny, out, "--epochs", "1", "--report-to", "tensorboard", "--resume")) == 0
    assert json.loads((out / "metrics.json").read_text())["student"] == metrics["student"]  # finished stages kept
    assert len(list((out / "tensorboard").iterdir())) == 1  # the curves once, not once per resume
    capsys.readouterr()
    assert main(tiny_args(tiny, out, "--epochs", "1", "--seed", "1", "--overwrite-output-dir")) == 0
    printed = capsys.readouterr().out
    assert f"{out}: replacing the previous run's" in printed and printed.strip().splitlines()[-1].startswith(
        f"wrote {out}"
    )
    assert json.loads((out / "config.json").read_text())["seed"] == 1 and not (out / "tensorboard").exists()


# ---- exit statuses -----------------------------------------------------------------------------------------


def test_ctrl_c_is_130_and_a_failure_inside_the_work_is_1(tiny, tmp_path, capsys, monkeypatch):
    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "run_all", interrupted)
    assert main(tiny_args(tiny, tmp_path)) == 130
    assert "--resume" in capsys.readouterr().err

    def collective_fails(cfg):
        raise RunError("rank 0: the collective 'codebook statistics' failed")

    monkeypatch.setattr(job, "run_all", collective_fails)
    assert main(tiny_args(tiny, tmp_path)) == 1
    assert capsys.readouterr().err == "error: rank 0: the collective 'codebook statistics' failed\n"
