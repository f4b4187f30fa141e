"""The names a checkpoint's files go by, and the weight formats this tool neither reads nor copies."""

from __future__ import annotations

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Weight formats this tool neither reads nor copies (a Hub download skips them too).
FOREIGN_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.h5", "*.msgpack", "*.onnx", "original/*")
