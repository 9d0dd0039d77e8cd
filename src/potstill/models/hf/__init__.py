"""Hugging Face causal language models: built-in teachers, students, the LM-head split, generation.

One module per job: :mod:`.builtin` (GGUF teachers and local directories), :mod:`.student`
(smaller models of the teacher's class), :mod:`.tiny` (random models for tests), :mod:`.head`
(hidden states and the LM head), :mod:`.chat` (prompt formatting), :mod:`.generate` (greedy
responses) and :mod:`.export` (a trained student as a model folder that loads without
potstill). Parameters are counted by :func:`potstill.models.params.count_params`. This package
imports nothing of :mod:`potstill.data`.
"""

from potstill.models.hf.builtin import (
    BUILTIN_MODELS,
    BuiltinModel,
    builtin_dir,
    load_builtin,
    load_causal_lm,
    load_tokenizer,
    prepare_tokenizer,
)
from potstill.models.hf.chat import FALLBACK_CHAT_FORMAT, format_prompt, has_chat_template
from potstill.models.hf.export import greedy_generation_config, save_student_folder
from potstill.models.hf.generate import generate_greedy, stop_token_ids
from potstill.models.hf.head import final_logit_softcap, lm_hidden_and_head, logits_from_hidden
from potstill.models.hf.student import make_student, student_layer_indices
from potstill.models.hf.tiny import tiny_gemma3, tiny_llama


__all__ = [
    "BUILTIN_MODELS",
    "BuiltinModel",
    "builtin_dir",
    "load_builtin",
    "load_causal_lm",
    "load_tokenizer",
    "prepare_tokenizer",
    "FALLBACK_CHAT_FORMAT",
    "format_prompt",
    "has_chat_template",
    "greedy_generation_config",
    "save_student_folder",
    "generate_greedy",
    "stop_token_ids",
    "final_logit_softcap",
    "lm_hidden_and_head",
    "logits_from_hidden",
    "make_student",
    "student_layer_indices",
    "tiny_gemma3",
    "tiny_llama",
]
