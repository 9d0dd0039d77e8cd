"""potstill: knowledge distillation for PyTorch, with honest reports."""

__version__ = "0.1.0"
