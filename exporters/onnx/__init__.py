"""ONNX export: a llama-family decoder with a KV cache whose compressed linears stay split as Q + L·R.

Each compressed linear becomes ``MatMulNBits(x, Q) + MatMul(MatMul(x, Rᵀ), Lᵀ)`` (com.microsoft contrib op plus
two plain MatMuls), so onnxruntime runs exactly the artifact's numbers without ever merging L·R into Q. L and R
stored in q4_0/q8_0 become MatMulNBits too (bits 4 or 8, block 32, exact). The embedding and the head keep the
blocks the artifact stores them in where an exact form exists (GatherBlockQuantized for the lookup, MatMulNBits for
the head, one copy when tied), else a float matrix.

The package, one job per module:

* nbits: ggml blocks → MatMulNBits inputs, losslessly (pure functions);
* model: the decoder's shapes from its config, and its weights from an artifact or a plain model;
* graph: the graph builder and the parts both graphs share (RMSNorm, the split linear, embedding, head, MLP, I/O);
* fused: the default graph wherever the model fits it (GroupQueryAttention with a shared KV buffer, fused
  RMSNorms); plain: opset 17 standard ops around the contrib ops, a KV cache that grows by Concat;
* export: what a file is built for (EP, dtype, accuracy level), its checks and kernel notes, genai_config.json,
  and the driver.

An export directory holds model.onnx, model.onnx.data (the weights), the tokenizer, config.json, genai_config.json
(onnxruntime-genai) and lrdeploy_onnx.json.
"""

from lrdeploy.exporters.onnx.export import META_VERSION, EpSettings, ep_settings, export_onnx, graph_problem
from lrdeploy.exporters.onnx.graph import Graph
from lrdeploy.exporters.onnx.model import LinearWeights
from lrdeploy.exporters.onnx.nbits import NBitsWeight, nbits_dequant, nbits_from_blocks, nbits_from_ggml

__all__ = ["META_VERSION", "EpSettings", "Graph", "LinearWeights", "NBitsWeight", "ep_settings", "export_onnx",
           "graph_problem", "nbits_dequant", "nbits_from_blocks", "nbits_from_ggml"]
