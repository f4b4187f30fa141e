"""The journal of a partial output: which run wrote it and which MoE layers are on disk.

A layer enters the journal only after its bytes were flushed (fdatasync), and the journal is
replaced atomically (write, fsync, rename), so after a kill or a power cut it never claims a layer
that is not on disk. A layer missing from it is simply computed and written again, to the same
offsets: the output is deterministic, so a resumed run ends byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import writing

PROGRESS_NAME = ".dern-progress.json"


class Progress:
    def __init__(self, directory: Path, run: dict, layers: dict[str, dict] | None = None):
        self.path = Path(directory) / PROGRESS_NAME
        self.run = run
        self.layers: dict[str, dict] = dict(layers or {})  # MoE layer index -> its audit record

    @classmethod
    def read(cls, directory: Path) -> Progress | None:
        """The journal in `directory`, or None if there is none or it is unreadable."""
        path = Path(directory) / PROGRESS_NAME
        try:
            data = json.loads(path.read_text())
            run, layers = data["run"], data["layers"]
            if not isinstance(run, dict) or not isinstance(layers, dict):
                return None
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
            return None
        return cls(directory, run, layers)

    def add(self, layer: int, record: dict) -> None:
        """Journal `layer`: it counts as done only once the journal holding it is on disk."""
        self._save({**self.layers, str(layer): record})
        self.layers[str(layer)] = record

    def save(self) -> None:
        self._save(self.layers)

    def _save(self, layers: dict[str, dict]) -> None:
        tmp = self.path.with_suffix(".tmp")
        try:
            with writing(self.path):
                with open(tmp, "w") as f:
                    json.dump({"run": self.run, "layers": layers}, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)  # (after the rename there is none: a failed write leaves none either)
