"""Int8 ONNX files: onnxruntime's dynamic quantization, with the bottleneck's lookup kept in float32.

quantize_dynamic stores the weights of the encoder's matrix products (MatMul) and its embedding tables
(Gather) in int8, per output channel, and quantizes each activation per call. The lookup's nodes
(LOOKUP_SCOPE: the projection, the key distances, the argmin and the value gather) are excluded, so that
the nearest key of a query is computed exactly as in the float32 file, against the very same keys and
values; so is the classification head after it (head_node_names). check_lookup_kept proves it on the
written file; an int8 file that does not keep it is an error, not a file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from keydistill.export.onnx import HEAD_SCOPE, LOOKUP_SCOPE, read_metadata, write_metadata

QUANTIZED_OPS = ("MatMul", "Gather")


class LookupNotExact(RuntimeError):
    """The int8 file would not run the bottleneck's lookup in float32 as the float32 file does."""


def quantize_int8(fp32_path: str | os.PathLike, int8_path: str | os.PathLike) -> Path:
    """Write the dynamic int8 version of an exported float32 file; returns its path. Raises LookupNotExact
    when the lookup could not be kept in float32 (the int8 file is then not left behind)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    lookup = lookup_node_names(fp32_path)
    meta = read_metadata(fp32_path)
    if meta.get("bottleneck", "null") != "null" and not lookup:
        raise LookupNotExact(f"{fp32_path}: no node named {LOOKUP_SCOPE}... holds the bottleneck's lookup")
    with tempfile.TemporaryDirectory() as scratch, _quiet_root_logger():
        staged = Path(scratch) / "int8.onnx"  # checked before it takes int8_path
        quantize_dynamic(
            fp32_path,
            staged,
            weight_type=QuantType.QInt8,
            # A scale per output channel, on 7 bits: without VNNI (AVX2), u8 x s8 products saturate at 8
            # bits; both keep more of the queries on the float32 file's keys, at the same speed.
            per_channel=True,
            reduce_range=True,
            op_types_to_quantize=list(QUANTIZED_OPS),
            nodes_to_exclude=sorted(lookup | head_node_names(fp32_path)),
        )
        check_lookup_kept(fp32_path, staged)
        write_metadata(staged, {**meta, "quantization": "int8 dynamic (" + ", ".join(QUANTIZED_OPS) + ")"})
        int8_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(staged, int8_path)
    return int8_path


def lookup_node_names(path: str | os.PathLike) -> set[str]:
    import onnx

    return {n.name for n in onnx.load(str(path)).graph.node if n.name.startswith(LOOKUP_SCOPE)}


def head_node_names(path: str | os.PathLike) -> set[str]:
    """The classification head's nodes: kept in float32 too. It is small (no time to gain), and quantizing
    its input per call would make a row's output depend on the other rows of its batch."""
    import onnx

    nodes = [n for n in onnx.load(str(path)).graph.node if HEAD_SCOPE in n.name]
    # The quantizer first rewrites a Gemm as MatMul + Add, the MatMul named after it: exclude that name too.
    return {n.name for n in nodes} | {n.name + "_MatMul" for n in nodes if n.op_type == "Gemm"}


def check_lookup_kept(fp32_path: str | os.PathLike, int8_path: str | os.PathLike) -> None:
    """Raise LookupNotExact unless every lookup node of the float32 file is in the int8 file, unchanged
    (op, inputs, outputs), and every float32 weight it reads there is bit for bit the same."""
    import onnx
    from onnx import numpy_helper

    fp32, int8 = onnx.load(str(fp32_path)).graph, onnx.load(str(int8_path)).graph
    kept = {n.name: n for n in int8.node}
    weights = {t.name: t for t in int8.initializer}
    originals = {t.name: t for t in fp32.initializer}
    for node in fp32.node:
        if not node.name.startswith(LOOKUP_SCOPE):
            continue
        twin = kept.get(node.name)
        if twin is None or (twin.op_type, list(twin.input), list(twin.output)) != (
            node.op_type,
            list(node.input),
            list(node.output),
        ):
            raise LookupNotExact(
                f"{int8_path}: the lookup's node {node.name} ({node.op_type}) was quantized or removed"
            )
        for name in node.input:
            if name in originals and (
                name not in weights
                or not (numpy_helper.to_array(weights[name]) == numpy_helper.to_array(originals[name])).all()
            ):
                raise LookupNotExact(f"{int8_path}: the lookup's weight {name} changed")


@contextlib.contextmanager
def _quiet_root_logger():
    """The quantizer advises shape-inference pre-processing on the root logger at each call; it would
    rename the lookup's nodes, so the advice is not taken, and not printed."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
