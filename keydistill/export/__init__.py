"""ONNX export: `python -m keydistill.export runs/sst2/student --onnx student.onnx [--quantize int8]`.

- onnx: the float32 graph in plain tensor ops (ExportableClassifier), its serving metadata, and its check
  against PyTorch (check_onnx);
- quantize: the int8 file (onnxruntime's dynamic quantization), the bottleneck's lookup kept in float32;
- check: the int8 file against the float32 file on real rows of the task;
- cli: the command line (main).
"""

from keydistill.export.cli import build_parser, main
from keydistill.export.onnx import (
    DEFAULT_OPSET,
    KEY_TIE,
    LABEL_TIE,
    LOOKUP_SCOPE,
    SAMPLE_TEXTS,
    ExportableClassifier,
    check_onnx,
    export_onnx,
    exportable_lookup,
    read_metadata,
    sample_batch,
)
from keydistill.export.quantize import LookupNotExact, quantize_int8

__all__ = [
    "DEFAULT_OPSET",
    "KEY_TIE",
    "LABEL_TIE",
    "LOOKUP_SCOPE",
    "SAMPLE_TEXTS",
    "ExportableClassifier",
    "LookupNotExact",
    "build_parser",
    "check_onnx",
    "export_onnx",
    "exportable_lookup",
    "main",
    "quantize_int8",
    "read_metadata",
    "sample_batch",
]
