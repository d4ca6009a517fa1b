"""Exported ViT graphs (`.onnx`, written by `python -m vit_core export`) run by onnxruntime:
the `onnx` backend of `vit_core.load`, with no torch or jax needed."""

from vit_onnx.backend import OnnxViT, open_graph, run_onnx_file

__all__ = ["OnnxViT", "open_graph", "run_onnx_file"]
