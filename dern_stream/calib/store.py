"""The calibration dump: per MoE layer, the MoE block inputs (router inputs) of every calibration token.

Layout (zarr v3), written down in docs/formats.md, "The calibration dump":

    DUMP.zarr/                      group; attrs: format, format_version, model_type, hidden_size,
                                    num_experts, moe_layers, checkpoint_fingerprint (optional),
                                    provenance (optional: tokenizer, seq_len, source...), complete
      moe_inputs/<layer>            array [tokens, hidden_size], float16 by default, chunked along
                                    tokens; attrs: layer, router_sha256, complete
      tokens                        array [sequences, seq_len] int32 (dumps made by `dern-stream dump`)
      resume/residual_{0,1}         the residual stream after the last finished layer, while a
                                    streamed dump is in progress (two slots, so a crash mid-write
                                    leaves the previous one valid); removed when the dump completes

`router_sha256` (the layer's router weight, as stored in the checkpoint) lets the rewrite refuse a
dump made from another model without reading anything but tensors it loads anyway.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import zarr

from ..checkpoint.integrity import all_finite
from ..errors import DernError, NonFinite, arg
from ..runtime.locks import empty_in_place
from .dump_files import FORMAT, check_dump_path, not_a_dump

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
        provenance: dict | None = None,
        dtype: str = "float16",
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        overwrite: bool = False,
    ):
        self.path = Path(path)
        if self.path.exists():
            reason = not_a_dump(self.path)
            if reason is not None:
                raise DernError(f"dump {self.path} {reason}; choose another path")
            if not overwrite and any(self.path.iterdir()):
                raise DernError(f"dump {self.path} already exists; remove it or pass overwrite")
            empty_in_place(self.path)
        self.hidden_size, self.dtype, self.chunk_tokens = hidden_size, np.dtype(dtype), chunk_tokens
        self.group = zarr.open_group(str(self.path), mode="a")  # (zarr's "w" would delete the lock file)
        self.group.attrs.update({
            "format": FORMAT, "format_version": FORMAT_VERSION, "model_type": model_type,
            "hidden_size": hidden_size, "num_experts": num_experts, "moe_layers": list(moe_layers),
            "checkpoint_fingerprint": checkpoint_fingerprint, "provenance": provenance, "complete": False,
            "dtype": self.dtype.name, "chunk_tokens": chunk_tokens,
        })
        self.inputs = self.group.require_group("moe_inputs")

    @classmethod
    def reopen(cls, path: str | Path) -> CalibWriter:
        """Continue an interrupted dump: layers not marked complete are discarded."""
        self = cls.attach(path)
        for key in list(self.inputs.array_keys()):
            if not self.inputs[key].attrs.get("complete", False):
                del self.inputs[key]
        return self

    def _stored(self, layer: int, hidden: torch.Tensor | np.ndarray) -> np.ndarray:
        """[tokens, hidden] in the dump's dtype, checked finite."""
        data = hidden.detach().float().cpu().numpy() if isinstance(hidden, torch.Tensor) else np.asarray(hidden)
        data = data.reshape(-1, self.hidden_size).astype(self.dtype)
        if not all_finite(torch.from_numpy(data)):  # (float16 storage overflows past 65504 too)
            raise NonFinite(f"MoE layer {layer}'s inputs came out NaN or Inf (non-finite weights in the layers "
                            f"before it, or values beyond {self.dtype.name}); nothing of that layer is saved")
        return data

    def append(self, layer: int, hidden: torch.Tensor | np.ndarray, router_sha256: str | None = None) -> None:
        data = self._stored(layer, hidden)
        key = str(layer)
        if key not in self.inputs:
            arr = self.inputs.create_array(
                key, shape=(0, self.hidden_size), chunks=(self.chunk_tokens, self.hidden_size), dtype=self.dtype
            )
            arr.attrs.update({"layer": layer, "router_sha256": router_sha256, "complete": False})
        self.inputs[key].append(data, axis=0)

    def create_layer(self, layer: int, rows: int, router_sha256: str | None) -> None:
        """Layer `layer`'s array at its full size, for workers that each fill a region (write_rows)."""
        arr = self.inputs.create_array(str(layer), shape=(rows, self.hidden_size),
                                       chunks=(self.chunk_tokens, self.hidden_size), dtype=self.dtype, overwrite=True)
        arr.attrs.update({"layer": layer, "router_sha256": router_sha256, "complete": False})

    def write_rows(self, layer: int, start: int, hidden: torch.Tensor) -> None:
        """Rows start.. of a layer made by create_layer (workers write disjoint, chunk-aligned regions)."""
        data = self._stored(layer, hidden)
        self.inputs[str(layer)][start:start + data.shape[0]] = data

    @classmethod
    def attach(cls, path: str | Path) -> CalibWriter:
        """The dump a driver is making, opened by one of its workers (nothing is checked or discarded)."""
        self = cls.__new__(cls)
        self.path = Path(path)
        self.group = zarr.open_group(str(self.path), mode="r+")
        attrs = self.group.attrs.asdict()
        self.hidden_size, self.dtype = attrs["hidden_size"], np.dtype(attrs.get("dtype", "float16"))
        self.chunk_tokens = attrs.get("chunk_tokens", DEFAULT_CHUNK_TOKENS)
        self.inputs = self.group.require_group("moe_inputs")
        return self

    def finish_layer(self, layer: int) -> None:
        self.inputs[str(layer)].attrs["complete"] = True

    # --- streamed dumps: token ids and the resume state ---------------------------------------
    def write_tokens(self, ids: torch.Tensor) -> None:
        arr = self.group.create_array("tokens", shape=tuple(ids.shape), chunks=(max(1, min(64, ids.shape[0])),
                                      ids.shape[1]), dtype="int32", overwrite=True)
        arr[:] = ids.to(torch.int32).numpy()

    def tokens(self) -> torch.Tensor:
        return _tokens(self.group)

    def save_residual(self, after_layer: int, shape: tuple[int, ...], dtype: torch.dtype,
                      batches: Iterable[torch.Tensor]) -> None:
        """Store the residual stream [sequences, seq_len, hidden] after `after_layer` bit for bit, batch by
        batch as `batches` yields them, in the slot the last save did not use."""
        state = self.group.require_group("resume")
        previous = self.group.attrs.get("resume")
        slot = 1 - previous["slot"] if previous else 0
        arr = state.create_array(f"residual_{slot}", shape=shape, chunks=(1, *shape[1:]), dtype=_raw_dtype(dtype),
                                 overwrite=True)
        row = 0
        for b in batches:
            arr[row:row + b.shape[0]] = _raw(b)
            row += b.shape[0]
        self.group.attrs["resume"] = {"after_layer": after_layer, "slot": slot, "dtype": str(dtype)}

    def resume_point(self) -> int | None:
        """The last decoder layer whose output is saved, or None."""
        state = self.group.attrs.get("resume")
        if state is None:
            return None
        if not isinstance(state, dict) or type(state.get("after_layer")) is not int:
            raise DernError(f"dump {self.path}: its saved state for resuming is damaged; pass "
                            f"{arg('overwrite', True)} to start it again")
        return state["after_layer"]

    def load_residual(self, batch_rows: list[int]) -> Iterator[torch.Tensor]:
        """The saved residual stream, one batch of `batch_rows[i]` sequences at a time."""
        try:
            state = self.group.attrs["resume"]
            arr = self.group["resume"][f"residual_{state['slot']}"]
            dtype = getattr(torch, state["dtype"].removeprefix("torch."))
        except (KeyError, TypeError, AttributeError):
            raise DernError(f"dump {self.path}: its saved state for resuming is damaged; "
                            f"pass {arg('overwrite', True)} to start it again") from None
        row = 0
        for rows in batch_rows:
            yield torch.from_numpy(np.asarray(arr[row:row + rows])).view(dtype)
            row += rows

    def finish(self) -> None:
        if "resume" in self.group:
            del self.group["resume"]
        self.group.attrs.update({"resume": None, "complete": True})


def _positive_int(v) -> bool:
    return type(v) is int and v > 0


def _raw_dtype(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "int16"}.get(dtype, str(dtype).removeprefix("torch."))


def _raw(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


_READ_BLOCK = 64 * 2**20


def _tokens(group) -> torch.Tensor:
    """The dump's token ids [sequences, seq_len] as int64 (stored as int32)."""
    return torch.from_numpy(np.asarray(group["tokens"][:])).to(torch.int64)


class CalibDump:
    """Read side of the dump: per-layer token chunks as float32 tensors."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        check_dump_path(self.path)
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
        layers = attrs.get("moe_layers")
        valid = (isinstance(attrs.get("model_type"), str) and _positive_int(attrs.get("hidden_size"))
                 and _positive_int(attrs.get("num_experts")) and isinstance(layers, list)
                 and all(type(i) is int and i >= 0 for i in layers))
        if not valid:
            raise DernError(f"{self.path} is a damaged calibration dump (its attributes are not what dern-stream "
                            "writes: model_type, hidden_size, num_experts, moe_layers)")
        self.attrs = attrs
        try:
            self.inputs = self.group.get("moe_inputs")
        except Exception:  # noqa: BLE001 - zarr raises many types for damaged metadata
            self.inputs = None
        self._layers: dict[int, zarr.Array] = {}  # opened once: each open reads the store's metadata

    def check_matches(self, model_type: str, hidden_size: int, num_experts: int) -> None:
        found = (self.attrs.get("model_type"), self.attrs.get("hidden_size"), self.attrs.get("num_experts"))
        if found != (model_type, hidden_size, num_experts):
            raise DernError(
                f"calibration dump {self.path} was made from another model "
                f"(model_type/hidden/experts {found}, checkpoint has {(model_type, hidden_size, num_experts)})"
            )

    def layer(self, layer: int) -> zarr.Array:
        if layer in self._layers:
            return self._layers[layer]
        key = str(layer)
        try:
            arr = self.inputs[key] if self.inputs is not None and key in self.inputs else None
            complete = arr is not None and arr.attrs.get("complete", False) is True
        except Exception:  # noqa: BLE001 - zarr raises many types for damaged metadata
            raise DernError(f"calibration dump {self.path}: layer {layer}'s metadata is damaged") from None
        if arr is None:
            raise DernError(f"calibration dump {self.path} has no inputs for MoE layer {layer}")
        if not complete:
            raise DernError(f"calibration dump {self.path}: layer {layer} is incomplete (interrupted dump?)")
        if not isinstance(arr, zarr.Array) or arr.ndim != 2 or arr.shape[1] != self.attrs["hidden_size"]:
            raise DernError(f"calibration dump {self.path}: layer {layer} is not a [tokens, "
                            f"{self.attrs['hidden_size']}] array")
        if arr.shape[0] == 0:
            raise DernError(f"calibration dump {self.path}: layer {layer} holds no tokens")
        self._layers[layer] = arr
        return arr

    def check_router(self, layer: int, router: torch.Tensor) -> None:
        expected = self.layer(layer).attrs.get("router_sha256")
        if expected and expected != tensor_sha256(router):
            raise DernError(
                f"calibration dump {self.path} was made from another model (layer {layer} router weights differ)"
            )

    def tokens(self) -> torch.Tensor:
        """The token ids [sequences, seq_len] the dump was made from."""
        try:
            return _tokens(self.group)
        except Exception:  # noqa: BLE001 - missing or damaged: zarr raises many types
            raise DernError(f"calibration dump {self.path} holds no readable token ids (damaged, or made by "
                            "another tool)") from None

    def rows(self, layer: int, indices: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """The layer's cached inputs at the given sorted row `indices`, float32 [len(indices), hidden] on
        `device`, read in one pass over the layer's chunks."""
        parts, start = [], 0
        indices = indices.to(device)
        for chunk in self.chunks(layer, device):
            end = start + chunk.shape[0]
            lo, hi = torch.searchsorted(indices, torch.tensor([start, end], device=device)).tolist()
            if hi > lo:
                parts.append(chunk[indices[lo:hi] - start])
            start = end
        out = torch.cat(parts) if parts else torch.empty(0, self.layer(layer).shape[1], device=device)
        if out.shape[0] != indices.numel():
            raise DernError(f"calibration dump {self.path}: layer {layer} holds {start} rows, fewer than its "
                            "token ids")
        return out

    def chunks(self, layer: int, device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
        """The layer's tokens as float32 on `device`, in whole stored chunks of about 64 MB (as float32)
        at a time: one read per block, whose chunks zarr decodes concurrently."""
        arr = self.layer(layer)
        step = arr.chunks[0] * max(1, _READ_BLOCK // (arr.chunks[0] * arr.shape[1] * 4))
        for i in range(math.ceil(arr.shape[0] / step)):
            try:
                block = np.asarray(arr[i * step:(i + 1) * step])
                chunk = torch.from_numpy(block).to(device=device, dtype=torch.float32)
            except Exception as e:  # noqa: BLE001 - a damaged chunk file: zarr and its codecs raise many types
                raise DernError(f"calibration dump {self.path}: layer {layer} cannot be read "
                                f"({type(e).__name__}; damaged chunk files?)") from None
            # aminmax is one pass without a [T, d] mask (unlike isfinite().all()); NaN propagates.
            if not torch.isfinite(torch.stack(torch.aminmax(chunk))).all():
                raise DernError(f"calibration dump {self.path}: layer {layer} holds NaN or Inf values")
            yield chunk
