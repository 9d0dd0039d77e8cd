"""Greedy generation of chat responses, with the stop tokens of every supported chat format."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from potstill.models.hf.chat import format_prompt, has_chat_template

__all__ = ["stop_token_ids", "generate_greedy"]


_FALLBACK_NEXT_TURN = "\nUser:"
_END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>", "</s>")


def stop_token_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """Token ids that end a response: EOS, the model's generation-config EOS, end-of-turn tokens."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, (list, tuple)):
        ids.update(int(i) for i in gen_eos)
    vocab = tokenizer.get_vocab()
    for tok in _END_OF_TURN_TOKENS:
        if tok in vocab:
            ids.add(int(vocab[tok]))
    return sorted(ids)


@torch.no_grad()
def generate_greedy(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
) -> list[str]:
    """Greedy chat responses (prompts formatted by :func:`~potstill.models.hf.chat.format_prompt`).

    Batches are left-padded; decoding stops at any :func:`stop_token_ids` token or after
    ``max_new_tokens``. Special tokens are removed and whitespace stripped from the results.
    For a tokenizer without a chat template (plain ``"User: ...\\nAssistant:"`` format) the
    response is cut where the model starts a new ``"\\nUser:"`` line.
    The model's own generation defaults (sampling, temperature) are ignored.
    """
    from transformers import GenerationConfig

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(model, tokenizer)
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_id,
        eos_token_id=stops or None,
    )
    was_training = model.training
    model.eval()
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    results: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [format_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
            # Chat templates already contain any BOS; the plain fallback format gets the
            # tokenizer's own special tokens.
            add_special = not has_chat_template(tokenizer)
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special)
            out = model.generate(
                input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], generation_config=gen_config
            )
            new = out[:, enc["input_ids"].shape[1] :]
            for text in tokenizer.batch_decode(new, skip_special_tokens=True):
                if add_special:
                    # Plain "User:/Assistant:" format: a base model tends to go on with the next
                    # turn; the response ends where a new "User:" line starts.
                    text = text.split(_FALLBACK_NEXT_TURN, 1)[0]
                results.append(text.strip())
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return results
