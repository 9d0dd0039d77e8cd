"""An LM recipe's ``teacher.ensemble``: its members as full teacher sections, their shared tokenizer,
and what the report says of them. The mixing itself is :mod:`potstill.teachers.lm_ensemble` and
:mod:`potstill.losses.chunked.mixture`."""

from __future__ import annotations

from pydantic import ValidationError

from potstill.config import describe_validation_error
from potstill.core.errors import UserError
from potstill.core.hashing import tokenizer_sha256
from potstill.models.hf import load_tokenizer
from potstill.tasks.lm_config import LMTeacherConfig


def lm_member_configs(teacher: LMTeacherConfig) -> list[LMTeacherConfig]:
    """Each member of ``teacher.ensemble`` as a full teacher section; ``[teacher]`` without an ensemble."""
    if teacher.ensemble is None:
        return [teacher]
    base = teacher.model_dump(exclude={"ensemble", "store"})
    resolved = []
    for i, member in enumerate(teacher.ensemble.members):
        data = {**base, **{k: v for k, v in member.model_dump(exclude={"train"}).items() if v is not None}}
        data["train"] = {**base["train"], **(member.train or {})}
        try:
            resolved.append(LMTeacherConfig.model_validate(data))
        except ValidationError as error:
            raise UserError(describe_validation_error(error, LMTeacherConfig, f"teacher.ensemble.members.{i}.")) from None
    return resolved


def check_one_tokenizer(members: list[LMTeacherConfig], tokenizer) -> None:
    """Every member reads the students' tokens: all tiny (the in-run tokenizer), or all models whose
    tokenizers are the same file by file digest."""
    tiny = [m.model == "tiny" for m in members]
    if any(tiny) and not all(tiny):
        raise UserError("teacher.ensemble mixes 'tiny' members (the in-run tokenizer) with models that have their "
                        "own: every member must share the students' tokenizer")
    if all(tiny):
        return
    expected = tokenizer_sha256(tokenizer)
    for i, member in enumerate(members[1:], start=1):
        if tokenizer_sha256(load_tokenizer(member.model)) != expected:
            raise UserError(f"teacher.ensemble.members.{i} ({member.model}) has another tokenizer than member 0 "
                            f"({members[0].model}); an LM ensemble mixes next-token distributions over one vocabulary")


def member_label(cfg: LMTeacherConfig) -> str:
    if cfg.model != "tiny":
        return cfg.model
    return f"tiny {cfg.tiny_layers}x{cfg.tiny_hidden} seed {cfg.seed}"
