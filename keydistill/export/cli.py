"""ONNX export of a keydistill model: `python -m keydistill.export runs/sst2/student --onnx student.onnx`.

Writes the float32 graph (keydistill.export.onnx) and checks it in onnxruntime against PyTorch. With
--quantize int8 it writes the int8 file instead (keydistill.export.quantize, the lookup kept in float32) and
checks it against the float32 file on real rows of the task (keydistill.export.check): a metric that drops
more than --max-drop points is exit status 1, with the figures. Usage mistakes are one `error:` line and
exit status 2.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from keydistill.cli import HelpFormatter, Parser, paragraphs, run_command, wrote
from keydistill.data import DataError
from keydistill.data.settings import comma_list
from keydistill.export import check as int8_check
from keydistill.export.onnx import (
    DEFAULT_OPSET,
    SAMPLE_TEXTS,
    ExportableClassifier,
    check_onnx,
    export_onnx,
    sample_batch,
)
from keydistill.export.quantize import LookupNotExact, quantize_int8
from keydistill.models import load_model
from keydistill.models.classifiers import has_tokenizer
from keydistill.predict.cli import add_column_flags, fail, load_error
from keydistill.predict.onnx_predictor import OnnxPredictor

DESCRIPTION = (
    "Export a model folder written by keydistill as one ONNX file with dynamic batch and sequence axes, then check "
    "it in onnxruntime against PyTorch (with --quantize int8: the int8 file, checked against float32 on task rows)."
)


def build_parser() -> Parser:
    parser = Parser(
        prog="python -m keydistill.export",
        usage="%(prog)s MODEL --onnx FILE [options]",
        description=paragraphs(DESCRIPTION),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("model", help="a model folder written by keydistill (e.g. runs/sst2/student)")
    parser.add_argument("--onnx", required=True, help="the ONNX file to write")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset version")
    parser.add_argument("--no-check", action="store_true", help="skip running the file in onnxruntime against PyTorch")
    parser.add_argument(
        "--quantize",
        choices=("none", "int8"),
        default="none",
        help="int8: dynamic int8 matrix products and embeddings, the bottleneck's lookup kept in float32",
    )
    parser.add_argument(
        "--check-file",
        default=None,
        help="rows the int8 file is checked on (any input keydistill.predict reads: plain lines, a GLUE TSV, a "
        "CSV, JSON lines or Parquet file, whose labels give metrics); default: the validation rows of the run "
        "that wrote the model",
    )
    add_column_flags(parser)
    parser.add_argument(
        "--max-drop",
        type=float,
        default=1.0,
        help="points (0-100) any metric may lose from float32 to int8; without gold labels, the share of "
        "labels that may change",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_command(lambda: export_command(argv))


def export_command(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if os.path.isdir(args.onnx):
        return fail(f"--onnx {args.onnx}: is a directory (give the file to write)")
    unwritable = _unwritable(args.onnx)
    if unwritable:
        return fail(unwritable)
    if args.max_drop < 0:
        return fail(f"--max-drop must be >= 0, got {args.max_drop}")
    try:
        model = load_model(args.model)
    except (OSError, ValueError) as e:  # no folder, not a keydistill model, unreadable or unfitting weights
        return fail(load_error(args.model, e))
    tokenizer = _tokenizer(args.model)
    int8 = args.quantize == "int8"
    if int8 and tokenizer is None:
        return fail(f"--quantize int8: {args.model} has no tokenizer, which the int8 file is checked and served with")
    rows, source = None, ""
    if int8 and not args.no_check:
        try:
            rows, source = int8_check.check_rows(
                args.model, args.check_file, model.label_names, comma_list(args.text_columns), args.label_column
            )
        except DataError as e:
            return fail(f"--check-file: {e}" if args.check_file else str(e))
    with tempfile.TemporaryDirectory() as scratch:
        fp32_path = Path(scratch) / "fp32.onnx" if int8 else Path(args.onnx)
        try:
            path = export_onnx(model, fp32_path, tokenizer=tokenizer, opset=args.opset)
        except OSError as e:  # a parent that is a file, no permission, a full disk
            return fail(f"--onnx {args.onnx}: {e.strerror or e}")
        if not args.no_check and not _matches_pytorch(model, path, tokenizer):
            return 1
        if int8:
            try:
                path = quantize_int8(fp32_path, args.onnx)
            except LookupNotExact as e:
                print(f"error: int8 export stopped: {e}", file=sys.stderr)
                return 1
            except OSError as e:
                return fail(f"--onnx {args.onnx}: {e.strerror or e}")
        wrapper = ExportableClassifier(model)
        print(
            f"{path}: inputs {', '.join(wrapper.input_names)} [batch, sequence]; outputs "
            f"{', '.join(wrapper.output_names)}; labels {list(model.label_names)}"
        )
        status = (
            _int8_within_max_drop(fp32_path, path, rows, source, args.max_drop) if int8 and not args.no_check else 0
        )
    print(wrote(path, [f"{path.stat().st_size / 2**20:.1f} MiB" + (", int8" if int8 else "")]))
    return status


def _matches_pytorch(model, path: Path, tokenizer) -> bool:
    """Run the float32 file against PyTorch on sample sentences; print the figures; False on a mismatch."""
    texts = SAMPLE_TEXTS
    batches = [
        sample_batch(model, tokenizer, texts),
        sample_batch(model, tokenizer, texts[:1]),
        sample_batch(model, tokenizer, texts[2:5]),
    ]  # other batch sizes and lengths than the trace's
    result = check_onnx(model, path, batches)
    print(
        f"onnxruntime vs PyTorch on {result['examples']} examples: max |logit diff| {result['max_abs_diff']:.2e}, "
        f"labels {'equal' if result['labels_equal'] else 'DIFFER'}, "
        f"keys {'equal' if result['keys_equal'] else 'DIFFER'}"
    )
    wrong = []
    if result["max_abs_diff"] > 1e-4:
        wrong.append(f"max |logit diff| {result['max_abs_diff']:.2e} > 1e-4")
    if not result["labels_equal"]:
        wrong.append("labels differ")
    if not result["keys_equal"]:  # key_indices is one of the file's outputs, and picks the values behind the logits
        wrong.append("key indices differ")
    if wrong:
        print(f"error: {path} does not match PyTorch ({', '.join(wrong)})", file=sys.stderr)
    return not wrong


def _int8_within_max_drop(fp32_path: Path, int8_path: Path, rows, source: str, max_drop: float) -> int:
    """Check the int8 file against the float32 one on the rows; 1 when it loses more than max_drop."""
    if rows is None:
        print(f"note: int8 not checked on task rows ({source}); pass --check-file", file=sys.stderr)
        return 0
    fp32, int8 = (OnnxPredictor.from_file(p) for p in (fp32_path, int8_path))
    result = int8_check.compare(fp32, int8, rows)
    print(f"int8 vs float32 on {source}: {int8_check.describe(result)}")
    drops = int8_check.drops_past(result, max_drop)
    if drops:
        print(f"error: {int8_path} loses too much to int8 ({'; '.join(drops)}; --max-drop {max_drop})", file=sys.stderr)
        return 1
    return 0


def _unwritable(path: str) -> str | None:
    """Why the file cannot be written, known before any work is done (its nearest existing folder)."""
    folder = Path(path).absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        return f"--onnx {path}: {folder} is not a folder"
    if not os.access(folder, os.W_OK):
        return f"--onnx {path}: no permission to write in {folder}"
    return None


def _tokenizer(folder: str):
    """The folder's tokenizer, or None (the export then traces random token ids)."""
    from transformers import AutoTokenizer

    try:
        # transformers 5 loads a folder without tokenizer files as an empty-vocabulary tokenizer instead of
        # raising: its ids (all [UNK]) would trace and check one token.
        if has_tokenizer(folder):
            return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError):
        pass
    print(f"note: no tokenizer in {folder}; tracing and checking with random token ids", file=sys.stderr)
    return None
