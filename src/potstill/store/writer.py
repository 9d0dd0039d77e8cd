"""``potstill store``: run the teacher once over the training set and write its targets in shards.

Shard ``i`` of the training split holds examples ``[i * shard_size, (i + 1) * shard_size)``, all
positions of each sequence. Each shard is written to a temporary file, fsynced and renamed; then
the manifest (also atomic) gains its entry and sha256. A run killed at any point therefore leaves
a manifest listing only whole shards; rerunning the same command verifies them (a corrupt one is
named and recomputed) and computes only the missing ones. Sampling uses a generator keyed by
(seed, shard index), so a recomputed shard has the same bytes.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

import potstill
from potstill.core.distributed import barrier, gather_objects, world
from potstill.core.hashing import file_sha256
from potstill.core.io import atomic_write_json, save_tensors
from potstill.data.order import keyed_generator
from potstill.core.errors import UserError
from potstill.store.manifest import (DEFAULT_EXACT, MANIFEST, HeldOut, Manifest, ShardInfo, bytes_per_token,
                                     default_k, ids_dtype, load_manifest, save_manifest, settings_difference)
from potstill.store.source import StoreSource
from potstill.targets import SparseTargets, sample, stratified_draws, topk

HEAD = "head.safetensors"  # hidden: the teacher's LM head, written once before the shards
LOG_FLOOR = -1e4  # log-probs are clamped here so that 0 * log 0 stays 0 in fp16 (exp(-1e4) == 0)


def encode_ids(ids: Tensor, dtype: str) -> Tensor:
    """Long ids as int32, or as the int16 bit pattern of uint16 (V <= 65,536)."""
    if dtype == "int32":
        return ids.to(torch.int32)
    return torch.where(ids >= 32768, ids - 65536, ids).to(torch.int16)


def encode_targets(logits: Tensor, manifest: Manifest, generator: torch.Generator | None) -> dict[str, Tensor]:
    """One sub-batch of training targets in the store's format (see docs/store.md)."""
    fmt, k, temperature = manifest.format, manifest.k, manifest.temperature
    if manifest.task == "classification":
        return {"logits": logits.float()}
    if fmt == "dense":
        return {"log_probs": torch.log_softmax(logits / temperature, dim=-1).clamp(min=LOG_FLOOR).half()}
    if fmt == "topk":
        return encode_topk(topk(logits, k, temperature=temperature), manifest)
    if manifest.exact:  # stratified: exact head, k draws from the renormalised tail
        lead, m = logits.shape[:-1], manifest.exact
        s = stratified_draws(logits, k, m, temperature=temperature, generator=generator)
        return {"ids": encode_ids(torch.cat([s.head_ids, s.tail_ids], -1), manifest.ids_dtype).reshape(*lead, m + k),
                "head_log_probs": s.head_log_probs.clamp(min=LOG_FLOOR).half().reshape(*lead, m),
                "counts": s.counts.to(torch.uint8).reshape(*lead, k), "tail": s.tail.half().reshape(lead),
                "entropy": s.entropy.half().reshape(lead)}
    t = sample(logits, k, temperature=temperature, generator=generator)
    return {"ids": encode_ids(t.ids, manifest.ids_dtype), "counts": (t.weights * k).round().to(torch.uint8),
            "entropy": t.entropy.half()}


def encode_topk(t: SparseTargets, manifest: Manifest) -> dict[str, Tensor]:
    """Top-k targets as a topk shard holds them; no ``entropy`` when the source does not know it (a server)."""
    out = {"ids": encode_ids(t.ids, manifest.ids_dtype), "log_probs": t.weights.log().clamp(min=LOG_FLOOR).half(),
           "tail": t.tail.half()}
    return out if t.entropy is None else {**out, "entropy": t.entropy.half()}


def _train_targets(source: StoreSource, start: int, stop: int, manifest: Manifest,
                   generator: torch.Generator | None) -> dict[str, Tensor]:
    if manifest.format == "hidden":  # what the teacher's head reads: exact logits at any temperature, later
        return {"hidden": source.hidden_states(start, stop).half()}
    if source.logits is None:  # a served teacher: top-k at T = 1 from the server (settings checked before)
        return encode_topk(source.topk(start, stop, manifest.k, manifest.temperature), manifest)
    return encode_targets(source.logits("train", start, stop), manifest, generator)


def check_settings(task: str, fmt: str, k: int | None, temperature: float, shard_size: int,
                   vocab_size: int | None = None, exact: int | None = None) -> tuple[int | None, int]:
    """Validate the format parameters (before the teacher runs); returns the resolved (k, exact)."""
    if exact is not None and (task == "classification" or fmt != "sampled"):
        raise UserError(f"--exact applies to --format sampled (language models), not to --format {fmt}")
    if fmt == "sampled" and task != "classification":
        exact = DEFAULT_EXACT if exact is None else exact
        limit = (vocab_size - 1) if vocab_size else None
        if exact < 0 or (limit is not None and exact > limit):
            upper = limit if limit is not None else "V - 1"
            raise UserError(f"--exact must be in [0, {upper}] (head ids kept exactly; the tail needs at least one id), "
                            f"got {exact}")
    exact = exact or 0
    if task == "classification":
        if fmt != "dense":
            raise UserError(f"--format {fmt}: classification stores keep the teacher's raw logits (--format dense); "
                            "sparse formats are for language models")
        if k is not None:
            raise UserError("--k applies to --format topk or sampled, not to a classification store")
    elif fmt in ("dense", "hidden"):
        if k is not None:
            raise UserError(f"--k applies to --format topk or sampled, not to {fmt}")
        if fmt == "hidden" and temperature != 1.0:
            raise UserError("--temperature: a hidden-state store serves any temperature (the loss applies it to the "
                            "logits its states give); drop --temperature")
    else:
        k = default_k(fmt, exact) if k is None else k
        limit = 255 if fmt == "sampled" else (vocab_size or k)
        if not 1 <= k <= limit:
            raise UserError(f"--k must be in [1, {limit}] for --format {fmt} (got {k})")
    if temperature <= 0:
        raise UserError(f"--temperature must be > 0 (got {temperature:g})")
    if shard_size < 1:
        raise UserError(f"--shard-size must be >= 1 (got {shard_size})")
    return k, exact


def new_manifest(source: StoreSource, *, fmt: str, k: int | None, temperature: float, seed: int,
                 shard_size: int, eval_targets: str, exact: int | None = None) -> Manifest:
    """The manifest a build with these settings starts from (no shards yet); validates the settings.
    ``exact`` (sampled only): head ids kept exactly; None = ``DEFAULT_EXACT``, 0 = plain sampling."""
    k, exact = check_settings(source.task, fmt, k, temperature, shard_size, source.vocab_size, exact)
    if source.formats is not None and fmt not in source.formats:
        raise UserError(f"--format {fmt}: {source.formats_why}")
    if fmt == "hidden" and source.hidden_states is None:
        raise UserError("--format hidden keeps one local teacher model's final hidden states; this teacher (a server "
                        "or an ensemble) has none: use --format topk, sampled or dense")
    if source.logits is None and (fmt != "topk" or eval_targets == "dense"):
        raise UserError(f"a teacher behind a server gives only its top-k log-probs: store it with --format topk "
                        f"--eval-targets none (got --format {fmt} --eval-targets {eval_targets})")
    if source.task == "classification":
        temperature = 1.0  # raw logits serve any KD temperature
    lm = source.task == "lm"
    held = None
    if eval_targets == "dense":
        held = HeldOut(dtype="float16" if lm else "float32", num_examples=source.heldout_examples,
                       dataset_fingerprint=source.heldout_fingerprint)
    return Manifest(
        task=source.task, recipe=source.recipe, format=fmt, k=k, exact=exact, temperature=float(temperature), seed=seed,
        dtype="float16" if lm else "float32",
        ids_dtype=ids_dtype(source.vocab_size) if fmt not in ("dense", "hidden") else None,
        vocab_size=source.vocab_size, hidden_size=source.hidden_size if fmt == "hidden" else None,
        seq_len=source.seq_len, num_examples=source.num_examples, shard_size=shard_size,
        bytes_per_token=bytes_per_token(source.task, fmt, k, source.vocab_size, exact,
                                        source.hidden_size if fmt == "hidden" else None),
        teacher=source.teacher, tokenizer_sha256=source.tokenizer_sha256,
        student_tokenizer_sha256=source.student_tokenizer_sha256,
        dataset_fingerprint=source.dataset_fingerprint, held_out=held, teacher_responses=source.teacher_responses,
        created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), potstill_version=potstill.__version__)


def check_existing(folder: Path, *, task: str, fmt: str, k: int | None, temperature: float, seed: int,
                   shard_size: int, eval_targets: str, exact: int | None = None) -> None:
    """Refuse at once (before the teacher runs) when ``folder`` holds a store with other basic settings."""
    old = load_manifest(Path(folder))
    if old is None:
        return
    if task == "classification":
        temperature = 1.0
    if fmt == "sampled" and task == "lm" and exact is None:
        exact = DEFAULT_EXACT
    exact = exact or 0
    if fmt not in ("dense", "hidden") and k is None:
        k = default_k(fmt, exact)
    mine = {"task": task, "format": fmt, "k": k, "exact": exact, "temperature": float(temperature), "seed": seed,
            "shard_size": shard_size, "held-out targets": "dense" if eval_targets == "dense" else "none"}
    theirs = {**{key: getattr(old, key) for key in ("task", "format", "k", "exact", "temperature", "seed",
                                                    "shard_size")},
              "held-out targets": "dense" if old.held_out is not None else "none"}
    for key, value in mine.items():
        if theirs[key] != value:
            raise UserError(f"{folder} already holds a teacher store built with other settings ({key} is "
                            f"{theirs[key]!r} there, {value!r} here); a store is never overwritten: choose another --out")


def _verified(folder: Path, shards: list[ShardInfo], warn: Callable[[str], None]) -> list[ShardInfo]:
    good = []
    for shard in shards:
        path = folder / shard.file
        if not path.exists():
            warn(f"shard {shard.file} is missing; recomputing it")
        elif path.stat().st_size != shard.bytes or file_sha256(path) != shard.sha256:
            warn(f"shard {shard.file} is corrupt (sha256 mismatch); recomputing it")
        else:
            good.append(shard)
    return good


def _open_folder(folder: Path, new: Manifest, warn: Callable[[str], None]) -> Manifest:
    old = load_manifest(folder)
    if old is None:
        if folder.exists() and any(not p.name.startswith(".") for p in folder.iterdir()):
            raise UserError(f"{folder} exists and is neither empty nor a teacher store; choose another --out")
        folder.mkdir(parents=True, exist_ok=True)
        return new
    difference = settings_difference(old, new)
    if difference:
        raise UserError(f"{folder} already holds a teacher store built with other settings ({difference}); "
                        "a store is never overwritten: choose another --out")
    for stale in folder.glob(".*.tmp-*"):  # left by a killed run
        stale.unlink(missing_ok=True)
    manifest = old.model_copy(update={"recipe": new.recipe, "teacher": new.teacher})
    manifest.shards = _verified(folder, old.shards, warn)
    if manifest.head is not None and not _verified(folder, [manifest.head], warn):
        manifest.head = None
    if manifest.held_out is not None:
        manifest.held_out.shards = _verified(folder, old.held_out.shards, warn)
    return manifest


def build_store(source: StoreSource, folder: Path, *, fmt: str, k: int | None, temperature: float, seed: int,
                shard_size: int, eval_targets: str = "dense", warn: Callable[[str], None] = print,
                on_shard: Callable[[int, int], None] | None = None,
                exact: int | None = None) -> tuple[Manifest, int]:
    """Write (or finish) the store in ``folder``; returns (manifest, shards computed by this call).

    Under torchrun every rank computes the missing shards whose index is its rank modulo the world
    size and writes them itself; rank 0 alone writes the one manifest. Each rank also keeps the
    list of shards it finished in ``.progress-rank<r>.json``, so a run killed before the manifest
    caught up loses no finished shard (whatever world size finishes it).
    """
    folder, here = Path(folder), world()
    new = new_manifest(source, fmt=fmt, k=k, temperature=temperature, seed=seed, shard_size=shard_size,
                       eval_targets=eval_targets, exact=exact)
    if here.is_main:
        manifest = _open_folder(folder, new, warn)
        _adopt_progress(folder, manifest, warn)
        if not (manifest.complete and _all_shards(manifest)):  # a finished store is left as it is
            manifest.complete = False
            if manifest.format == "hidden" and manifest.head is None:
                manifest.head = _shard(folder, HEAD, 0, 0, {k: v.float() for k, v in source.head().items()}, manifest)
            save_manifest(folder, manifest)
    barrier()
    manifest = load_manifest(folder)
    if manifest.complete and _all_shards(manifest):
        return manifest, 0
    total = manifest.num_shards() + manifest.num_heldout_shards()
    done_train = {s.first // shard_size for s in manifest.shards}
    done_held = {s.first // shard_size for s in manifest.held_out.shards} if manifest.held_out else set()
    mine: list[tuple[str, ShardInfo]] = []
    progress = {"done": len(done_train) + len(done_held)}

    def finished(split: str, info: ShardInfo) -> None:
        mine.append((split, info))
        if here.parallel:
            atomic_write_json(folder / f".progress-rank{here.rank}.json", [[p, i.model_dump()] for p, i in mine])
        else:  # one process: the manifest itself keeps up, as before
            (manifest.shards if split == "train" else manifest.held_out.shards).append(info)
            manifest.shards.sort(key=lambda s: s.first)
            if manifest.held_out is not None:
                manifest.held_out.shards.sort(key=lambda s: s.first)
            save_manifest(folder, manifest)
        progress["done"] += 1
        if on_shard:
            on_shard(progress["done"] if not here.parallel else progress["done"] * here.size, total)

    if on_shard:
        on_shard(progress["done"], total)
    for index in range(manifest.num_shards()):
        if index in done_train or index % here.size != here.rank:
            continue
        first, stop = index * shard_size, min((index + 1) * shard_size, manifest.num_examples)
        generator = keyed_generator(seed, index, 7) if fmt == "sampled" else None
        parts = [_train_targets(source, s, min(s + source.batch_size, stop), manifest, generator)
                 for s in range(first, stop, source.batch_size)]
        tensors = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
        finished("train", _shard(folder, f"train-{index:05d}.safetensors", first, stop, tensors, manifest))
    for index in range(manifest.num_heldout_shards()):
        if index in done_held or index % here.size != here.rank:
            continue
        first, stop = index * shard_size, min((index + 1) * shard_size, manifest.held_out.num_examples)
        tensors = _heldout_tensors(source, first, stop)
        finished("heldout", _shard(folder, f"heldout-{index:05d}.safetensors", first, stop, tensors, manifest))
    everyone = gather_objects(mine)
    computed = sum(len(part) for part in everyone)
    if here.is_main:
        if here.parallel:
            for split, info in (item for part in everyone for item in part):
                (manifest.shards if split == "train" else manifest.held_out.shards).append(info)
            manifest.shards.sort(key=lambda s: s.first)
            if manifest.held_out is not None:
                manifest.held_out.shards.sort(key=lambda s: s.first)
        if manifest.teacher_report is None or computed:
            manifest.teacher_report = source.teacher_report()
        manifest.complete = True
        save_manifest(folder, manifest)
        for stale in folder.glob(".progress-rank*.json"):
            stale.unlink()
    barrier()
    return load_manifest(folder), computed


def _all_shards(manifest: Manifest) -> bool:
    return ((manifest.format != "hidden" or manifest.head is not None)
            and len(manifest.shards) == manifest.num_shards()
            and (manifest.held_out is None or len(manifest.held_out.shards) == manifest.num_heldout_shards()))


def _adopt_progress(folder: Path, manifest: Manifest, warn: Callable[[str], None]) -> None:
    """Shards that the ranks of a killed run finished but the manifest does not list yet (verified)."""
    listed = {s.file for s in manifest.shards} | ({s.file for s in manifest.held_out.shards} if manifest.held_out else set())
    for record in sorted(folder.glob(".progress-rank*.json")):
        for split, raw in json.loads(record.read_text()):
            info = ShardInfo.model_validate(raw)
            if info.file in listed or not _verified(folder, [info], warn):
                continue
            (manifest.shards if split == "train" else manifest.held_out.shards).append(info)
            listed.add(info.file)
        record.unlink()
    manifest.shards.sort(key=lambda s: s.first)
    if manifest.held_out is not None:
        manifest.held_out.shards.sort(key=lambda s: s.first)


def _shard(folder: Path, name: str, first: int, stop: int, tensors: dict[str, Tensor], manifest: Manifest) -> ShardInfo:
    size = save_tensors(folder / name, tensors, fsync=True, untie=False)
    return ShardInfo(file=name, first=first, count=stop - first, sha256=file_sha256(folder / name), bytes=size)


def _heldout_tensors(source: StoreSource, first: int, stop: int) -> dict[str, Tensor]:
    """Test-split targets at T=1: LM fp16 log-probs and the exact argmax of the rows that predict a
    label (with per-sequence row offsets); classification fp32 logits."""
    if source.task == "classification":
        return {"logits": torch.cat([source.logits("test", s, min(s + source.batch_size, stop))
                                     for s in range(first, stop, source.batch_size)])}
    rows, argmax, counts = [], [], []
    for s in range(first, stop, source.batch_size):
        e = min(s + source.batch_size, stop)
        mask = source.heldout_mask(s, e)
        logits = source.logits("test", s, e)[:, :-1][mask]
        rows.append(torch.log_softmax(logits, dim=-1).clamp(min=LOG_FLOOR).half())
        argmax.append(logits.argmax(dim=-1))  # exact, where fp16 rounding could tie the top two
        counts.append(mask.sum(dim=1))
    counts = torch.cat(counts)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    return {"log_probs": torch.cat(rows), "argmax": torch.cat(argmax), "offsets": offsets}


__all__ = ["build_store", "check_existing", "check_settings", "encode_targets", "encode_ids", "new_manifest", "MANIFEST"]
