"""Reading a teacher store: memory-mapped shards, rows gathered in the order a batch asks for them.

:class:`StoreReader` refuses a directory without a manifest and an incomplete store; ``verify()``
checks every shard's size and sha256 (naming the first bad one) and is called before training
uses any of them. Shards are opened with ``safetensors.safe_open`` (memory-mapped): a batch reads
only its own rows, whatever the size of the store.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from potstill.core.errors import UserError
from potstill.core.hashing import file_sha256
from potstill.store.manifest import Manifest, ShardInfo, load_manifest, manifest_digest


def decode_ids(ids: Tensor) -> Tensor:
    """Stored ids (int16 bit pattern or int32) as long."""
    return ids.to(torch.int64) & 0xFFFF if ids.dtype == torch.int16 else ids.to(torch.int64)


class StoreReader:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise UserError(f"teacher store {self.folder} does not exist (build it with `potstill store`)")
        manifest = load_manifest(self.folder)
        if manifest is None:
            raise UserError(f"{self.folder} is not a teacher store (no manifest.json); build one with `potstill store`")
        if not manifest.complete:
            held = f", {len(manifest.held_out.shards)}/{manifest.num_heldout_shards()} held-out" if manifest.held_out else ""
            raise UserError(f"teacher store {self.folder} is incomplete ({len(manifest.shards)}/{manifest.num_shards()} "
                            f"training shards{held}); finish it by rerunning `potstill store` with the same --out")
        self.manifest: Manifest = manifest
        self.digest = manifest_digest(self.folder)
        self._handles: dict[str, object] = {}
        self._verified = False

    def verify(self) -> None:
        """Size and sha256 of every shard; a missing or corrupt one is named (one line)."""
        if self._verified:
            return
        shards = list(self.manifest.shards) + (list(self.manifest.held_out.shards) if self.manifest.held_out else [])
        shards += [self.manifest.head] if self.manifest.head is not None else []
        for shard in shards:
            path = self.folder / shard.file
            if not path.exists():
                raise UserError(f"teacher store {self.folder}: shard {shard.file} is missing; rerun `potstill store` "
                                "with the same --out to recompute it")
            if path.stat().st_size != shard.bytes or file_sha256(path) != shard.sha256:
                raise UserError(f"teacher store {self.folder}: shard {shard.file} is corrupt (sha256 mismatch); rerun "
                                "`potstill store` with the same --out to recompute it")
        self._verified = True

    def __getstate__(self) -> dict:
        # open shard handles stay with their process (a run's worker processes reopen them)
        return {**self.__dict__, "_handles": {}}

    def _open(self, shard: ShardInfo):
        handle = self._handles.get(shard.file)
        if handle is None:
            handle = self._handles[shard.file] = safe_open(str(self.folder / shard.file), framework="pt")
        return handle

    def rows(self, index: Tensor | list[int]) -> dict[str, Tensor]:
        """Training targets of examples ``index`` (in that order), as stored (see docs/store.md)."""
        size, shards = self.manifest.shard_size, self.manifest.shards
        parts: dict[str, list[Tensor]] = {}
        for i in (index.tolist() if isinstance(index, Tensor) else list(index)):
            if not 0 <= i < self.manifest.num_examples:
                raise IndexError(f"example {i} is outside the store's {self.manifest.num_examples} examples")
            shard = shards[i // size]
            handle, local = self._open(shard), i - shard.first
            for name in handle.keys():
                parts.setdefault(name, []).append(handle.get_slice(name)[local:local + 1])
        return {name: torch.cat(values) for name, values in parts.items()}

    def head(self) -> dict[str, Tensor]:
        """A hidden-state store's teacher LM head: ``weight`` [V, H] (and ``bias`` [V] when it has one), fp32."""
        if self.manifest.head is None:
            raise ValueError(f"a {self.manifest.format} store keeps no LM head (only --format hidden does)")
        handle = self._open(self.manifest.head)
        return {name: handle.get_tensor(name) for name in handle.keys()}

    def heldout(self, start: int, stop: int, name: str | None = None) -> Tensor:
        """Held-out targets of test examples [start, stop). LM: ``name="log_probs"`` (default), fp16
        ``[rows, V]`` of the rows that predict a label (row-major over sequences and positions), or
        ``"argmax"`` (the teacher's exact top-1 id per row); classification: fp32 logits ``[n, C]``."""
        held = self.manifest.held_out
        if held is None:
            raise ValueError("this store has no held-out targets (built with --eval-targets none)")
        out = []
        for shard in held.shards:
            lo, hi = max(start, shard.first), min(stop, shard.first + shard.count)
            if lo >= hi:
                continue
            handle = self._open(shard)
            if "offsets" in handle.keys():
                offsets = handle.get_tensor("offsets")
                a, b = int(offsets[lo - shard.first]), int(offsets[hi - shard.first])
                out.append(handle.get_slice(name or "log_probs")[a:b])
            else:
                out.append(handle.get_slice("logits")[lo - shard.first:hi - shard.first])
        return torch.cat(out)

    def describe(self) -> str:
        m = self.manifest
        if m.format == "hidden":
            return f"hidden, H={m.hidden_size}, any T"
        k = (f", exact={m.exact}" if m.exact else "") + (f", k={m.k}" if m.k is not None else "")
        return f"{m.format}{k}, T={m.temperature:g}"

    def report_entry(self) -> dict:
        m = self.manifest
        return {"dir": str(self.folder), "format": m.format, "k": m.k, "exact": m.exact,
                "temperature": m.temperature,
                "bytes_per_token": m.bytes_per_token, "manifest_sha256": self.digest,
                "teacher_weights_sha256": m.teacher.weights_sha256, "created": m.created}
