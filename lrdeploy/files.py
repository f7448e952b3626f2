"""File names of what lrdeploy writes, in one place: the compressor's artifact and the two exports' directories."""

MANIFEST = "lrdeploy.json"  # artifact: the manifest
WEIGHTS = "model.safetensors"  # artifact: every tensor
GGUF_BASE = "model.gguf"  # GGUF export: Q (or the merged weights) and everything else
GGUF_ADAPTER = "adapter.gguf"  # GGUF export: L·R as a LoRA adapter
GGUF_SUMMARY = "export.json"
ONNX_MODEL = "model.onnx"
ONNX_DATA = "model.onnx.data"  # the weights of a graph over 1 GiB
ONNX_META = "lrdeploy_onnx.json"
ONNX_KEEP = "logits_to_keep"  # ONNX export: optional graph input, how many last positions get logits (0 = all)
