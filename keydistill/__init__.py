"""keydistill: knowledge distillation through a discrete key bottleneck."""
__version__ = "0.1.0"
