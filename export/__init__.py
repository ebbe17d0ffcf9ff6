"""Export (ONNX, TensorRT) and inference runtimes for incseg models.

Submodules are imported on use (``from export.runtime import open_runtime``) so that importing the
package stays cheap.
"""
