"""lrdeploy: low-rank plus low-precision compression (W ~ Q + L·R) with GGUF and ONNX export."""

__version__ = "0.1.0"
