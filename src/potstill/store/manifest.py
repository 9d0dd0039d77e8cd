"""The manifest of an offline teacher store (``manifest.json``) and the checks made against it.

The manifest is rewritten atomically after every shard, so at any instant it lists exactly the
shards that were completely written (with their sha256). ``complete`` turns true only after the
last shard, the held-out targets and the teacher's report entry are in place.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from potstill.core.hashing import file_sha256
from potstill.core.io import atomic_write_json
from potstill.core.errors import UserError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
Format = Literal["dense", "topk", "sampled", "hidden"]
FORMATS = ("dense", "topk", "sampled", "hidden")
DEFAULT_EXACT = 6  # sampled: exact head ids by default (see docs/store.md for the choice of (6, 12))
DEFAULT_K = {"sampled": 12, "topk": 15}  # sampled: the draws that fit 64 bytes/token beside DEFAULT_EXACT
BUDGET = 64  # bytes/token (2-byte ids) that a default sampled store fits in


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ShardInfo(_Model):
    file: str
    first: int  # index of the shard's first example in its split
    count: int  # examples (sequences) in the shard
    sha256: str
    bytes: int


class TeacherIdentity(_Model):
    description: str
    weights_sha256: str
    params: int


class HeldOut(_Model):
    """The test split's teacher targets: dense log-probs at T=1 (LM: only rows that predict a label)."""

    format: Literal["dense"] = "dense"
    temperature: float = 1.0
    dtype: str
    num_examples: int
    dataset_fingerprint: str
    shards: list[ShardInfo] = []


class Manifest(_Model):
    format_version: int = FORMAT_VERSION
    task: Literal["lm", "classification"]
    recipe: str
    format: Format
    k: int | None  # sampled: tail draws per position; topk: kept ids; dense, hidden: None
    exact: int = 0  # sampled: exact head ids per position (0: plain sampling; missing in older manifests)
    temperature: float  # LM: targets are softmax(z / temperature); classification: raw logits (1.0)
    seed: int
    dtype: str  # stored values (log-probs, logits)
    ids_dtype: str | None  # int16 holds ids as a bit pattern for V <= 65,536
    vocab_size: int
    hidden_size: int | None = None  # hidden: the width of the stored final hidden states
    head: ShardInfo | None = None  # hidden: the teacher's LM head (weight, optional bias), one file
    seq_len: int | None
    num_examples: int
    shard_size: int
    bytes_per_token: int  # LM: per position; classification: per example
    teacher: TeacherIdentity
    tokenizer_sha256: str | None  # the teacher's tokenizer (the ids the targets are over)
    # cross-tokenizer stores: the student tokenizer the store was built for (None: the teacher's own)
    student_tokenizer_sha256: str | None = None
    dataset_fingerprint: str
    held_out: HeldOut | None
    teacher_responses: list[str] | None = None  # chat data: the teacher answers the store was built from
    teacher_report: dict[str, Any] | None = None  # the teacher's report entry (metrics, params, generations)
    shards: list[ShardInfo] = []
    complete: bool = False
    created: str
    potstill_version: str

    def num_shards(self) -> int:
        return -(-self.num_examples // self.shard_size)

    def num_heldout_shards(self) -> int:
        return -(-self.held_out.num_examples // self.shard_size) if self.held_out else 0


# settings that identify a store: a rerun into the same directory must agree on all of them
SETTINGS = ("format_version", "task", "format", "k", "exact", "temperature", "seed", "dtype", "ids_dtype",
            "vocab_size", "hidden_size", "seq_len", "num_examples", "shard_size", "teacher.weights_sha256", "tokenizer_sha256",
            "student_tokenizer_sha256", "dataset_fingerprint", "held_out.num_examples", "held_out.dataset_fingerprint", "teacher_responses")


def ids_dtype(vocab_size: int) -> str:
    return "int16" if vocab_size <= 65536 else "int32"


def default_k(fmt: str, exact: int = 0) -> int:
    """topk: 15. sampled: the most tail draws that keep ``BUDGET`` bytes/token with 2-byte ids beside
    ``exact`` head ids (at least 1): 20 for plain sampling, 12 beside 6 exact ids."""
    if fmt != "sampled":
        return DEFAULT_K[fmt]
    k = 1
    while k < 255 and bytes_per_token("lm", "sampled", k + 1, 65536, exact) <= BUDGET:
        k += 1
    return k


def bytes_per_token(task: str, fmt: str, k: int | None, vocab_size: int, exact: int = 0,
                    hidden_size: int | None = None) -> int:
    """Stored bytes per position (LM) or per example (classification: fp32 logits)."""
    id_bytes = 2 if vocab_size <= 65536 else 4
    if task == "classification":
        return 4 * vocab_size
    if fmt == "hidden":
        return 2 * hidden_size  # fp16 final hidden states (the head is stored once, not per token)
    if fmt == "dense":
        return 2 * vocab_size  # fp16 log-probs
    if fmt == "topk":
        return k * (id_bytes + 2) + 2 + 2  # ids + fp16 log-probs, fp16 tail, fp16 entropy
    if exact:  # head ids + fp16 log-probs, tail ids + uint8 counts, fp16 tail mass, fp16 entropy
        return exact * (id_bytes + 2) + k * (id_bytes + 1) + 2 + 2
    return k * (id_bytes + 1) + 2  # ids + uint8 counts, fp16 entropy


def _get(manifest: Manifest, dotted: str) -> Any:
    value: Any = manifest
    for part in dotted.split("."):
        value = getattr(value, part, None) if value is not None else None
    return value


def _show(value: Any) -> str:
    if isinstance(value, list):
        return f"{len(value)} entries"
    if isinstance(value, str) and len(value) > 24:
        return value[:12] + "…"
    return repr(value)


def settings_difference(old: Manifest, new: Manifest) -> str | None:
    """The first identifying setting that differs, as 'name: old there, new here', or None."""
    for key in SETTINGS:
        a, b = _get(old, key), _get(new, key)
        if a != b:
            return f"{key} is {_show(a)} there, {_show(b)} here"
    return None


def load_manifest(folder: Path) -> Manifest | None:
    """The manifest in ``folder`` (None when there is none); an unreadable one is a user error."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: not a readable teacher-store manifest ({error})") from None
    if isinstance(data, dict) and data.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: store format version {data.get('format_version')!r}; "
                        f"this potstill reads version {FORMAT_VERSION}")
    try:
        return Manifest.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        raise UserError(f"{path}: invalid manifest at '{'.'.join(map(str, first['loc']))}': {first['msg']}") from None


def save_manifest(folder: Path, manifest: Manifest) -> None:
    atomic_write_json(Path(folder) / MANIFEST, manifest.model_dump(mode="json"))


def manifest_digest(folder: Path) -> str:
    """sha256 of the manifest file (it names every shard's sha256, so it identifies the store)."""
    return file_sha256(Path(folder) / MANIFEST)


def check_setup(manifest: Manifest, folder: Path, **run: Any) -> None:
    """Refuse (one line) when the training setup differs from what the store was built for.

    ``run`` holds this run's values for any of: task, tokenizer_sha256, vocab_size, seq_len,
    dataset_fingerprint (with num_examples for the message), heldout_fingerprint.
    """
    where = f"teacher store {folder}"
    hint = "; rebuild it with `potstill store` for this recipe"
    if "task" in run and run["task"] != manifest.task:
        raise UserError(f"{where} holds {manifest.task} targets; this recipe is a {run['task']} task")
    if "tokenizer_sha256" in run and manifest.student_tokenizer_sha256 is not None:
        raise UserError(f"{where} was built for a cross-tokenizer pair (teacher {_show(manifest.tokenizer_sha256)}, "
                        f"student {_show(manifest.student_tokenizer_sha256)}); this run distils with one tokenizer "
                        f"({_show(run['tokenizer_sha256'])}){hint}")
    if "tokenizer_sha256" in run and run["tokenizer_sha256"] != manifest.tokenizer_sha256:
        raise UserError(f"{where}: tokenizer differs (store {_show(manifest.tokenizer_sha256)}, "
                        f"run {_show(run['tokenizer_sha256'])}){hint}")
    if "vocab_size" in run and run["vocab_size"] != manifest.vocab_size:
        raise UserError(f"{where}: vocab size differs (store {manifest.vocab_size}, run {run['vocab_size']}){hint}")
    if "seq_len" in run and run["seq_len"] != manifest.seq_len:
        raise UserError(f"{where}: sequence length differs (store {manifest.seq_len}, run {run['seq_len']}){hint}")
    if "dataset_fingerprint" in run and run["dataset_fingerprint"] != manifest.dataset_fingerprint:
        raise UserError(f"{where}: dataset fingerprint differs (store {manifest.dataset_fingerprint[:12]}… over "
                        f"{manifest.num_examples} training examples, run {run['dataset_fingerprint'][:12]}… over "
                        f"{run.get('num_examples', '?')}){hint}")
    held = manifest.held_out
    if held is not None and "heldout_fingerprint" in run and run["heldout_fingerprint"] != held.dataset_fingerprint:
        raise UserError(f"{where}: held-out (test) split differs (store {held.dataset_fingerprint[:12]}…, "
                        f"run {run['heldout_fingerprint'][:12]}…){hint}")


def check_tokenizer_pair(manifest: Manifest, folder: Path, *, teacher_sha256: str, student_sha256: str) -> None:
    """Refuse (one line, naming both pairs) a store built for another (teacher, student) tokenizer
    pair. A store built without a student tokenizer recorded is the teacher's own: it serves only a
    student with the teacher's tokenizer."""
    recorded = (manifest.tokenizer_sha256, manifest.student_tokenizer_sha256 or manifest.tokenizer_sha256)
    if (teacher_sha256, student_sha256) != recorded:
        raise UserError(f"teacher store {folder} was built for the tokenizer pair teacher {_show(recorded[0])}, student "
                        f"{_show(recorded[1])}; this run has teacher {_show(teacher_sha256)}, student "
                        f"{_show(student_sha256)}; rebuild it with `potstill store` for this pair")
