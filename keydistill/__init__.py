"""keydistill: knowledge distillation through a discrete key bottleneck."""

import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"


# After `import keydistill`, transformers' AutoConfig, AutoModelForSequenceClassification and
# pipeline("text-classification") load the teacher and student folders that keydistill saves. The
# registration imports the models (and PyTorch), so it waits until transformers itself is imported: then
# `import keydistill` costs nothing, and serving an ONNX file (keydistill.predict.OnnxPredictor, which uses
# tokenizers and onnxruntime) runs where PyTorch is not installed. keydistill.models registers on import.
class _RegisterOnTransformersImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            load = spec.loader.exec_module

            def load_then_register(module):
                load(module)
                _register()

            spec.loader.exec_module = load_then_register
        return spec


def _register() -> None:
    # Importing keydistill.models registers; already importing it (it imports transformers), it will.
    if "keydistill.models" not in sys.modules:
        import keydistill.models  # noqa: F401


if "transformers" in sys.modules:
    _register()
else:
    sys.meta_path.insert(0, _RegisterOnTransformersImport())
