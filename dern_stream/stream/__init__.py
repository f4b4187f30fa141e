"""Layer-by-layer forward over a checkpoint that is never loaded whole: a meta-device skeleton whose
decoder layers are materialised from the memory-mapped shards one at a time."""

from .executor import StreamedModel
from .hidden_store import HiddenStore

__all__ = ["HiddenStore", "StreamedModel"]
