"""Structured channel pruning on the ONNX graph: dependency analysis, importance, rewrite, re-fitting."""
