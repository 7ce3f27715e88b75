"""Predictions on raw text: `Predictor` (a model folder, PyTorch) and `OnnxPredictor` (an exported .onnx
file, onnxruntime and tokenizers alone) in Python; `python -m keydistill.predict` on the command line.

    from keydistill.predict import Predictor, OnnxPredictor
    predictor = Predictor.from_pretrained("runs/sst2/student")  # or OnnxPredictor.from_file("student.onnx")
    predictor.predict(["a gripping film", ("a premise", "a hypothesis")], batch_size=32)

Both return one Prediction per input, in input order (keydistill.predict.base). The command line
(keydistill.predict.cli) reads its input files with keydistill.predict.inputs.

The predictors are imported on first use, so that `from keydistill.predict import OnnxPredictor` never
imports PyTorch; nor does `python -m keydistill.predict FILE.onnx` (tests/serve/test_onnx_predictor.py).
"""

from keydistill.predict.base import Prediction, Text

__all__ = ["OnnxPredictor", "Prediction", "Predictor", "Text"]


def __getattr__(name: str):
    if name == "Predictor":
        from keydistill.predict.predictor import Predictor

        return Predictor
    if name == "OnnxPredictor":
        from keydistill.predict.onnx_predictor import OnnxPredictor

        return OnnxPredictor
    raise AttributeError(f"module 'keydistill.predict' has no attribute {name!r}")
