"""A trained LM student as a Hugging Face model folder that loads without potstill.

:func:`save_student_folder` writes ``config.json``, ``model.safetensors``, the tokenizer files
(its chat template included), ``generation_config.json`` and ``potstill.json`` (provenance).
The folder then loads with ``AutoModelForCausalLM.from_pretrained(folder)`` and
``AutoTokenizer.from_pretrained(folder)``, and ``model.generate`` decodes greedily and stops
where potstill's own generation (:func:`potstill.models.hf.generate.generate_greedy`) does.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

import potstill
from potstill.core.io import fresh_temporary_dir, replace_dir
from potstill.models.hf.generate import stop_token_ids

__all__ = ["save_student_folder", "greedy_generation_config"]

#: config.json keys a reload must not see: the GGUF loader's record of a quantization the
#: weights no longer have (a student's config is a copy of its teacher's).
_DROPPED_CONFIG_KEYS = ("quantization_config",)


def greedy_generation_config(model: torch.nn.Module, tokenizer: Any, *, max_new_tokens: int | None = None) -> Any:
    """Greedy decoding with potstill's stop tokens (EOS, end-of-turn tokens) and pad id."""
    from transformers import GenerationConfig

    stops = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    extra = {"max_new_tokens": max_new_tokens} if max_new_tokens else {}
    return GenerationConfig(do_sample=False, num_beams=1, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=(stops[0] if len(stops) == 1 else stops) if stops else None,
                            pad_token_id=pad_id, **extra)


def save_student_folder(model: torch.nn.Module, tokenizer: Any, folder: Path, *, provenance: dict,
                        max_new_tokens: int | None = None) -> Path:
    """Write ``model`` and ``tokenizer`` as a Hugging Face model folder, atomically: built in a
    temporary sibling and swapped into place, so ``folder`` is the old version or the new one.

    Neither the model nor the tokenizer is changed (the generation config is written to the
    folder, not set on the model). ``provenance`` (JSON-able) goes into ``potstill.json`` with
    potstill's version. Returns ``folder``.
    """
    from transformers.utils import logging as hf_logging

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_temporary_dir(folder)
    bars = hf_logging.is_progress_bar_enabled()
    try:
        hf_logging.disable_progress_bar()  # no "Writing model shards" bar between potstill's own
        try:
            model.save_pretrained(str(tmp), safe_serialization=True)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        config_path = tmp / "config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if any(key in config for key in _DROPPED_CONFIG_KEYS):
            for key in _DROPPED_CONFIG_KEYS:
                config.pop(key, None)
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        greedy_generation_config(model, tokenizer, max_new_tokens=max_new_tokens).save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        if getattr(tokenizer, "chat_template", None) and not _has_saved_chat_template(tmp):
            (tmp / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")
        meta = {"format": "huggingface", "potstill_version": potstill.__version__, **provenance}
        (tmp / "potstill.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)
        for path in tmp.iterdir():
            if path.is_file():
                os.chmod(path, 0o644)
        replace_dir(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _has_saved_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").exists() or (folder / "chat_template.json").exists():
        return True
    config = folder / "tokenizer_config.json"
    return config.exists() and bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
