"""OnnxPredictor: predictions from a file written by `python -m keydistill.export`, with onnxruntime and
tokenizers alone (no PyTorch, no transformers, no model folder).

    from keydistill.predict import OnnxPredictor
    predictor = OnnxPredictor.from_file("student.onnx")
    predictor.predict(["a gripping film", ("a premise", "a hypothesis")], batch_size=32)

The file's metadata (keydistill.export.onnx.serving_metadata) holds the tokenizer, the truncation length
and the label names; predictions are those of keydistill.predict.Predictor on the model folder (the same
tokens, batching and Prediction records; logits within float rounding, or int8 error for an int8 file).
"""

from __future__ import annotations

import json
import os

import numpy as np

from keydistill.predict.base import LengthOrderedPredictor, Prediction, Row, padded

REQUIRED_METADATA = ("id2label", "max_length", "tokenizer")


class OnnxPredictor(LengthOrderedPredictor):
    """An onnxruntime session of an exported keydistill file, its tokenizer and its labels."""

    def __init__(self, session, tokenizer, metadata: dict[str, str], *, max_length: int | None = None):
        self.session = session
        self.tokenizer = tokenizer
        self.metadata = metadata
        id2label = json.loads(metadata["id2label"])
        self.label_names = tuple(id2label[str(i)] for i in range(len(id2label)))
        self.is_regression = len(self.label_names) == 1
        self.max_positions = int(metadata["max_length"])  # what the export allows (Predictor's default)
        self.max_length = max_length or self.max_positions
        self.pad_id = int(metadata.get("pad_token_id", 0))
        self.input_names = [i.name for i in session.get_inputs()]

    @classmethod
    def from_file(
        cls, path: str | os.PathLike, *, threads: int | None = None, max_length: int | None = None
    ) -> "OnnxPredictor":
        """The predictor of an exported file; threads: onnxruntime's intra-op threads (default: its own).
        ValueError (one line naming the file) for a file that is missing, not ONNX, or not keydistill's."""
        import onnxruntime as ort
        from tokenizers import Tokenizer

        if not os.path.isfile(path):
            raise ValueError(f"{path}: no such file")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for unreadable or invalid files
            raise ValueError(f"{path}: not an ONNX file onnxruntime can load ({str(e).splitlines()[0]})") from None
        metadata = session.get_modelmeta().custom_metadata_map
        missing = [key for key in REQUIRED_METADATA if key not in metadata]
        if missing:
            raise ValueError(
                f"{path}: no {', '.join(missing)} in its metadata (not written by python -m keydistill.export "
                "from a model folder with a tokenizer)"
            )
        return cls(session, Tokenizer.from_str(metadata["tokenizer"]), metadata, max_length=max_length)

    def _encode(self, columns: list[list[str]]) -> list[Row]:
        if not 1 <= self.max_length <= self.max_positions:
            raise ValueError(f"max_length must be between 1 and {self.max_positions}, got {self.max_length}")
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length)  # longest first, as transformers' truncation=True
        encodings = self.tokenizer.encode_batch(columns[0] if len(columns) == 1 else list(zip(*columns)))
        return [(e.ids, e.type_ids) for e in encodings]

    def _predict_batch(self, rows: list[Row], with_keys: bool) -> list[Prediction]:
        batch = padded(rows, self.pad_id)
        outputs = self.session.run(None, {name: np.asarray(batch[name], dtype=np.int64) for name in self.input_names})
        logits = outputs[0].astype(np.float64)
        keys = _keys_per_row(outputs[1]) if with_keys and len(outputs) > 1 else [None] * len(logits)
        if self.is_regression:
            return [Prediction(None, float(row[0]), None, k) for row, k in zip(logits, keys)]
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        ids = probs.argmax(-1)
        return [Prediction(self.label_names[i], float(p[i]), int(i), k) for p, i, k in zip(probs, ids.tolist(), keys)]


def _keys_per_row(key_indices: np.ndarray) -> list[list[list[int]]]:
    """[B, T, H] key indices, -1 at padding -> per row: [kept positions][heads]."""
    return [[heads.tolist() for heads in row if heads[0] >= 0] for row in key_indices]
