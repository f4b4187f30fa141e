"""The calibration dump: per MoE layer, the MoE block inputs (router inputs) of every calibration token.

Layout (zarr v3), written down in the README:

    DUMP.zarr/                      group; attrs: format, format_version, model_type, hidden_size,
                                    num_experts, moe_layers, checkpoint_fingerprint (optional)
      moe_inputs/<layer>            array [tokens, hidden_size], float16 by default, chunked along
                                    tokens; attrs: layer, router_sha256, complete

`router_sha256` (the layer's router weight, as stored in the checkpoint) lets the rewrite refuse a
dump made from another model without reading anything but tensors it loads anyway.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import zarr

from ..errors import DernError

FORMAT = "dern-stream-calib"
FORMAT_VERSION = 1
DEFAULT_CHUNK_TOKENS = 4096


def tensor_sha256(t: torch.Tensor) -> str:
    """Hash of a tensor's stored bytes (dtype-exact: the same weights in another dtype differ)."""
    return hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


class CalibWriter:
    """Append MoE-layer inputs chunk by chunk; a layer counts only once `finish_layer` marks it complete."""

    def __init__(
        self,
        path: str | Path,
        *,
        model_type: str,
        hidden_size: int,
        num_experts: int,
        moe_layers: list[int],
        checkpoint_fingerprint: str | None = None,
        dtype: str = "float16",
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        overwrite: bool = False,
    ):
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise DernError(f"dump {self.path} already exists; remove it or pass overwrite")
        self.hidden_size, self.dtype, self.chunk_tokens = hidden_size, np.dtype(dtype), chunk_tokens
        self.group = zarr.open_group(str(self.path), mode="w")
        self.group.attrs.update({
            "format": FORMAT, "format_version": FORMAT_VERSION, "model_type": model_type,
            "hidden_size": hidden_size, "num_experts": num_experts, "moe_layers": list(moe_layers),
            "checkpoint_fingerprint": checkpoint_fingerprint,
        })
        self.inputs = self.group.require_group("moe_inputs")

    def append(self, layer: int, hidden: torch.Tensor | np.ndarray, router_sha256: str | None = None) -> None:
        data = hidden.detach().float().cpu().numpy() if isinstance(hidden, torch.Tensor) else np.asarray(hidden)
        data = data.reshape(-1, self.hidden_size).astype(self.dtype)
        key = str(layer)
        if key not in self.inputs:
            arr = self.inputs.create_array(
                key, shape=(0, self.hidden_size), chunks=(self.chunk_tokens, self.hidden_size), dtype=self.dtype
            )
            arr.attrs.update({"layer": layer, "router_sha256": router_sha256, "complete": False})
        self.inputs[key].append(data, axis=0)

    def finish_layer(self, layer: int) -> None:
        self.inputs[str(layer)].attrs["complete"] = True


class CalibDump:
    """Read side of the dump: per-layer token chunks as float32 tensors."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise DernError(f"calibration dump {self.path} does not exist")
        try:
            self.group = zarr.open_group(str(self.path), mode="r")
            attrs = self.group.attrs.asdict()
        except Exception:  # zarr raises many types for a directory that is not a store
            raise DernError(f"{self.path} is not a zarr v3 calibration dump") from None
        if attrs.get("format") != FORMAT:
            raise DernError(f"{self.path} is not a dern-stream calibration dump (format attribute missing)")
        if attrs.get("format_version") != FORMAT_VERSION:
            raise DernError(f"{self.path} has dump format version {attrs.get('format_version')}; "
                            f"this dern-stream reads version {FORMAT_VERSION}")
        self.attrs = attrs
        self.inputs = self.group.get("moe_inputs")

    def check_matches(self, model_type: str, hidden_size: int, num_experts: int) -> None:
        found = (self.attrs.get("model_type"), self.attrs.get("hidden_size"), self.attrs.get("num_experts"))
        if found != (model_type, hidden_size, num_experts):
            raise DernError(
                f"calibration dump {self.path} was made from another model "
                f"(model_type/hidden/experts {found}, checkpoint has {(model_type, hidden_size, num_experts)})"
            )

    def layer(self, layer: int) -> zarr.Array:
        key = str(layer)
        if self.inputs is None or key not in self.inputs:
            raise DernError(f"calibration dump {self.path} has no inputs for MoE layer {layer}")
        arr = self.inputs[key]
        if not arr.attrs.get("complete", False):
            raise DernError(f"calibration dump {self.path}: layer {layer} is incomplete (interrupted dump?)")
        if arr.shape[0] == 0:
            raise DernError(f"calibration dump {self.path}: layer {layer} holds no tokens")
        return arr

    def check_router(self, layer: int, router: torch.Tensor) -> None:
        expected = self.layer(layer).attrs.get("router_sha256")
        if expected and expected != tensor_sha256(router):
            raise DernError(
                f"calibration dump {self.path} was made from another model (layer {layer} router weights differ)"
            )

    def chunks(self, layer: int, device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
        """The layer's tokens, one stored chunk at a time, as float32 on `device`."""
        arr = self.layer(layer)
        step = arr.chunks[0]
        for i in range(math.ceil(arr.shape[0] / step)):
            chunk = torch.from_numpy(np.asarray(arr[i * step:(i + 1) * step])).to(device=device, dtype=torch.float32)
            if not torch.isfinite(chunk).all():
                raise DernError(f"calibration dump {self.path}: layer {layer} holds NaN or Inf values")
            yield chunk
