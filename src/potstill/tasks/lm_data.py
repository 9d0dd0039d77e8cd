"""The language-model task's data: Python's own pydoc text packed into sequences, plus prompts the
teacher answers (prompt tokens masked).

Held-out text is held out by document: the documents are split train/val/test first (sized by
their text, :func:`potstill.data.text.split_by_size`) and each part is packed on its own, so no
sequence of the validation or test split continues a document the students trained on. Prompts
are split the same way, one prompt per document."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from potstill.core.errors import UserError
from potstill.data.text import PROMPTS, encode_chat, pack_documents, pydoc_documents, split, split_by_size
from potstill.data.text.addition import addition_problems, encode_problem
from potstill.data.tokens import TokenSplit
from potstill.tasks.lm_config import LMDataConfig


@dataclass
class LMData:
    train: TokenSplit
    val: TokenSplit
    test: TokenSplit
    heldout_prompts: list[str]  # the test split's prompts (generations in the report)
    teacher_responses: list[str]  # the teacher's answers to every prompt used
    heldout_answers: TokenSplit | None = None  # the test split's prompt rows alone (eval.answers)


def documents(cfg: LMDataConfig) -> list[str]:
    docs = pydoc_documents()
    return docs[:cfg.max_documents] if cfg.max_documents else docs


def _split(cfg: LMDataConfig, examples: list) -> tuple[list, list, list]:
    parts = split(list(range(len(examples))), cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    return tuple([examples[i] for i in part] for part in parts)


def _caps(cfg: LMDataConfig) -> tuple[int | None, int | None, int | None]:
    """data.max_sequences shared out as the split fractions (None: no cap)."""
    if not cfg.max_sequences:
        return None, None, None
    val = max(1, round(cfg.max_sequences * cfg.val_fraction))
    test = max(1, round(cfg.max_sequences * cfg.test_fraction))
    return max(1, cfg.max_sequences - val - test), val, test


def _packed(tokenizer: Any, docs: list[str], seq_len: int, cap: int | None) -> list[dict]:
    packed = pack_documents(tokenizer, docs, seq_len)[:cap]
    return [{"input_ids": s, "attention_mask": s.new_ones(s.shape), "labels": s.clone()} for s in packed]


def addition_data(cfg: LMDataConfig, tokenizer: Any) -> LMData:
    """Distinct addition problems split train/val/test, each row one problem (answer tokens the targets)."""
    problems = addition_problems(cfg.addition_problems, cfg.addition_digits, cfg.split_seed)
    try:
        rows = [encode_problem(tokenizer, prompt, answer, cfg.seq_len) for prompt, answer in problems]
    except ValueError as error:
        raise UserError(str(error)) from None
    train, val, test = _split(cfg, rows)
    return LMData(TokenSplit.stack(train), TokenSplit.stack(val), TokenSplit.stack(test), heldout_prompts=[],
                  teacher_responses=[])


def build_lm_data(cfg: LMDataConfig, tokenizer: Any,
                  answer: Callable[[list[str]], list[str]] | None, where: str = "the teacher") -> LMData:
    """Packed text, plus ``cfg.chat_prompts`` prompts answered by ``answer`` (None: no chat data);
    or, for ``source=addition``, the addition problems."""
    if cfg.source == "addition":
        return addition_data(cfg, tokenizer)
    docs = documents(cfg)
    parts = split_by_size(docs, [len(d) for d in docs], cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    caps = _caps(cfg)
    text_train, text_val, text_test = (_packed(tokenizer, part, cfg.seq_len, cap) for part, cap in zip(parts, caps))

    prompts = PROMPTS[:cfg.chat_prompts] if answer is not None else []
    responses = answer(prompts) if prompts else []
    if len(responses) != len(prompts):
        raise UserError(f"{where} holds {len(responses)} teacher responses; this recipe asks for "
                        f"data.chat_prompts={len(prompts)}")
    chat = [(p, encode_chat(tokenizer, p, r, cfg.seq_len)) for p, r in zip(prompts, responses)]
    chat_train, chat_val, chat_test = _split(cfg, chat)
    return LMData(TokenSplit.stack(text_train + [e for _, e in chat_train]),
                  TokenSplit.stack(text_val + [e for _, e in chat_val]),
                  TokenSplit.stack(text_test + [e for _, e in chat_test]),
                  heldout_prompts=[p for p, _ in chat_test], teacher_responses=list(responses),
                  heldout_answers=TokenSplit.stack([e for _, e in chat_test]) if chat_test else None)
