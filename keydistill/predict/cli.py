"""`python -m keydistill.predict FOLDER --input FILE|-`: predict every line of a file and write a TSV.

Reads one text, or a tab-separated pair, per line (or a GLUE TSV file by its task's columns, or a CSV, JSON
lines or Parquet file by its columns: keydistill.predict.inputs) and writes a TSV of predictions. A bad input
line is an error naming file:line; no line is ever dropped. A labelled GLUE file is scored only when the
model's label names are its task's (a model's class ids mean nothing under another task's labels); a file
read by its columns is scored under the model's own label names. Every mistake a user can make is one line
`error: ...` and exit status 2 (keydistill.cli.run_command).

An .onnx file (written by python -m keydistill.export) is served with onnxruntime and tokenizers alone: this
module and what it imports load PyTorch only for a model folder.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from keydistill.cli import HelpFormatter, Parser, paragraphs, run_command, wrote
from keydistill.data import TASKS, DataError, compute_metrics
from keydistill.data.settings import comma_list
from keydistill.devices import DEVICE_HELP
from keydistill.errors import InputError
from keydistill.predict.base import Prediction
from keydistill.predict.inputs import InputRows, labels_fit, read_inputs

if TYPE_CHECKING:
    from keydistill.predict import OnnxPredictor, Predictor

ONNX_DEVICES = ("auto", "cpu")  # onnxruntime's CPU provider: the only one an exported file is served with


def format_keys(keys: list[list[int]] | None) -> str:
    """Heads joined by ',', kept positions by ' ' (one position with cls pooling)."""
    return "" if keys is None else " ".join(",".join(map(str, heads)) for heads in keys)


def write_predictions(out, rows: InputRows, predictions: list[Prediction], regression: bool, keys: bool) -> None:
    columns = ["line"] + ([] if regression else ["label"]) + ["score"] + (["key_indices"] if keys else [])
    out.write("\t".join(columns) + "\n")
    for line, p in zip(rows.lines, predictions):
        fields = [str(line)] + ([] if regression else [p.label]) + [f"{p.score:.6f}"]
        out.write("\t".join(fields + ([format_keys(p.key_indices)] if keys else [])) + "\n")


DESCRIPTION = (
    "Predict every line of a file (or stdin) with a model folder written by keydistill, or an .onnx file written "
    "by python -m keydistill.export (served with onnxruntime, without PyTorch), and write a TSV of predictions: "
    "one text or tab-separated pair per line, a GLUE TSV file, or a CSV, JSON lines or Parquet file read by its "
    "columns (--text-columns, --label-column)."
)


def add_column_flags(parser: Parser) -> None:
    """--text-columns and --label-column, as predict and export's --check-file read an input file."""
    parser.add_argument(
        "--text-columns",
        default=None,
        help="one or two comma-separated text columns of a CSV, JSON lines, Parquet or TSV file; "
        "none: those besides the label",
    )
    parser.add_argument(
        "--label-column",
        default=None,
        help="the gold label column of such a file, scored when present; none: label",
    )


def build_parser() -> Parser:
    parser = Parser(
        prog="python -m keydistill.predict",
        usage="%(prog)s MODEL [options]",
        description=paragraphs(DESCRIPTION),
        formatter_class=HelpFormatter,
        aliases={"--per-device-eval-batch-size": "--batch-size", "--max-seq-length": "--max-length"},
    )
    parser.add_argument(
        "model", help="a model folder written by keydistill (e.g. runs/sst2/student), or an exported .onnx file"
    )
    parser.add_argument(
        "--input",
        default="-",
        help="plain lines (a text or tab-separated pair each), a GLUE TSV, CSV, JSON lines or Parquet file; - is stdin",
    )
    parser.add_argument("--output", default="-", help="where the TSV of predictions goes; - is stdout")
    parser.add_argument(
        "--format",
        default="auto",
        choices=("auto", "plain", "glue"),
        help="auto: a first line naming a GLUE task's text columns makes a GLUE file, else plain lines",
    )
    parser.add_argument(
        "--task", choices=tuple(TASKS), default=None, help="the GLUE task the input file is of (read by its columns)"
    )
    add_column_flags(parser)
    parser.add_argument("--batch-size", type=int, default=32, help="examples per forward pass")
    parser.add_argument(
        "--max-length", type=int, default=None, help="tokens per example after truncation; none: the model's limit"
    )
    parser.add_argument("--key-indices", action="store_true", help="add the key index each bottleneck head chose")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP + "; an .onnx file runs on the CPU")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_command(lambda: predict_command(argv))


def predict_command(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        return fail(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_length is not None and args.max_length < 1:  # 0 would otherwise mean "the default"
        return fail(f"--max-length must be >= 1, got {args.max_length}")
    problem = _output_problem(args.output)
    if problem:
        return fail(problem)
    onnx_file = args.model.endswith(".onnx")
    device = _onnx_device(args.device) if onnx_file else _folder_device(args.device)
    # An .onnx file loads at once and its metadata holds the label names that tell GLUE headers apart; a
    # folder's weights load after the input is read, so that a bad input line is found before that wait.
    predictor = _load_predictor(args.model, device) if onnx_file else None
    label_names = predictor.label_names if onnx_file else _saved_label_names(args.model)
    try:
        rows = read_inputs(
            args.input,
            args.task,
            args.format,
            label_names,
            text_columns=comma_list(args.text_columns),
            label_column=args.label_column,
        )
    except DataError as e:
        return fail(str(e))
    if predictor is None:
        predictor = _load_predictor(args.model, device)
    if args.max_length is not None:
        limit = predictor.max_positions
        if args.max_length > limit:
            return fail(
                f"--max-length {args.max_length} is over the {limit} positions of {args.model} "
                "(its max_position_embeddings)"
            )
        predictor.max_length = args.max_length
    regression = predictor.is_regression
    print(
        f"{args.model}: " + ("a regression score" if regression else "labels " + ", ".join(predictor.label_names)),
        file=sys.stderr,
    )
    predictions = predictor.predict(rows.texts, batch_size=args.batch_size, return_key_indices=args.key_indices)
    if args.output == "-":
        try:
            write_predictions(sys.stdout, rows, predictions, regression, args.key_indices)
            sys.stdout.flush()  # inside the try: a reader gone (| head) shows here, not at interpreter exit
        except BrokenPipeError:
            return _closed_stdout()
    else:
        try:
            with open(args.output, "w", encoding="utf-8") as out:
                write_predictions(out, rows, predictions, regression, args.key_indices)
        except OSError as e:
            return fail(f"--output {args.output}: {e.strerror or e}")
    if rows.labels is not None:
        _report_metrics(rows, predictions, predictor)
    if args.output != "-":  # on stdout the predictions themselves are the output
        print(wrote(args.output, [f"{len(predictions)} predictions"]), file=sys.stderr)
    return 0


def load_error(folder: str, error: Exception) -> str:
    """The one-line message for a model folder that does not load (most errors already name it)."""
    return str(error) if str(folder) in str(error) else f"cannot load the model {folder}: {error}"


def _onnx_device(device: str) -> str:
    """--device for an .onnx file: the CPU, where onnxruntime serves it; a GPU asked for is a usage error
    (the model folder runs there)."""
    if device not in ONNX_DEVICES:
        raise InputError(
            f"--device {device}: an .onnx file runs on the CPU with onnxruntime; pass cpu or auto, or the model folder"
        )
    return "cpu"


def _folder_device(device: str):
    """--device for a model folder, as a torch.device (the first import of PyTorch on this path)."""
    from keydistill.devices import check_device, resolve_auto

    try:
        return check_device(resolve_auto(device), "--device")
    except ValueError as e:
        raise InputError(str(e)) from None


def _load_predictor(model: str, device) -> Predictor | OnnxPredictor:
    """A model folder's Predictor, or an exported .onnx file's OnnxPredictor (onnxruntime, on the CPU)."""
    try:
        if model.endswith(".onnx"):
            from keydistill.predict.onnx_predictor import OnnxPredictor

            return OnnxPredictor.from_file(model)
        from keydistill.predict.predictor import Predictor

        return Predictor.from_pretrained(model, device=device)
    except (OSError, ValueError) as e:  # no folder, not a keydistill model, unreadable weights, no tokenizer
        raise InputError(load_error(model, e)) from None


def _report_metrics(rows: InputRows, predictions: list[Prediction], model: Predictor | OnnxPredictor) -> None:
    """The task's metrics on stderr, when the model's classes are the task's; else one line saying why not."""
    task, names = rows.task, model.label_names
    if not labels_fit(task, names):
        theirs = ", ".join(task.label_names) if not task.is_regression else "a regression score"
        ours = "a regression score" if model.is_regression else ", ".join(names)
        print(f"no {task.name} metrics: the model's labels ({ours}) are not {task.name}'s ({theirs})", file=sys.stderr)
        return
    guesses = [p.score if model.is_regression else p.label_id for p in predictions]
    metrics = compute_metrics(task, _array(guesses), _array(rows.labels))
    print(
        f"{task.name} on {len(guesses)} labelled rows: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()),
        file=sys.stderr,
    )


def _saved_label_names(folder: str) -> list[str] | None:
    """The label names in a model folder's config, or None when it has none to read (the model load that
    follows reports why)."""
    from keydistill.models.classifiers import read_checkpoint_config

    try:
        return read_checkpoint_config(folder)["label_names"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _output_problem(path: str) -> str | None:
    """Why --output cannot be written, known before any work is done; None when it looks writable."""
    if path == "-":
        return None
    if os.path.isdir(path):
        return f"--output {path}: is a directory"
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        return f"--output {path}: no folder {parent}"
    return None


def _closed_stdout() -> int:
    """The reader of stdout went away (e.g. `| head`): stop quietly, as command-line tools do. stdout goes to
    devnull so that the interpreter's last flush of the unwritten rest raises nothing."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141  # 128 + SIGPIPE, the status of a tool the signal ended


def _array(values):
    import numpy as np

    return np.asarray(values)


def fail(message: str) -> int:
    """A command-line mistake (predict's, export's): run_command prints it as one `error:` line, exit status 2."""
    raise InputError(message)
