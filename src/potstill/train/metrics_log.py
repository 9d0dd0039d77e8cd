"""Training logs: JSON lines in metrics.jsonl (and TensorBoard when installed), truncatable on resume."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    def __init__(self, path: Path, resume_offset: int | None, tensorboard: bool = True, writes: bool = True):
        """``writes=False``: a log that drops every record (the ranks of a distributed run but rank 0)."""
        self.path, self.writes = path, writes
        self.writer = None
        if not writes:
            return
        if resume_offset is None:
            path.write_text("")
        elif path.exists() and path.stat().st_size > resume_offset:
            with open(path, "r+") as handle:
                handle.truncate(resume_offset)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                pass
            else:
                self.writer = SummaryWriter(str(path.parent / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.writes:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step":
                    self.writer.add_scalar(key, value, record["step"])

    def offset(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
