"""One MoE layer's experts as tensors, the math every method shares: segments and their reassignment,
spherical k-means, importance, whole-expert merging, and the routed forward on cached inputs. No I/O."""
