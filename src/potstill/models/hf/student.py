"""Students: a smaller model of the teacher's own class, built from a modified copy of its config.

Parameter counts (measured with :func:`potstill.models.params.count_params`; tied embeddings
counted once)::

    SmolLM2-135M-Instruct  134.5 M  (embedding 49152 x 576  =  28.3 M of it, tied with the LM head)
                                    30 layers, hidden 576, 9 heads (3 KV), MLP 1536
      student, 12 layers, hidden 320, 5 heads (5 KV), MLP 864, random init:  30.6 M (22.8 %)
      student,  6 layers, hidden 384, 6 heads (3 KV), MLP 1024, random init: 28.6 M (21.3 %)
      student, 12 layers, hidden 256, 4 heads (2 KV), MLP 768, random init:  22.0 M (16.4 %)
      student,  1 teacher layer (width 576, teacher_layers init):             31.9 M (23.7 %)
    Gemma-3-270M           268.1 M  (embedding 262144 x 640 = 167.8 M of it, tied)
                                    18 layers, hidden 640, 4 heads (1 KV), head_dim 256, MLP 2048
      student, 6 teacher layers (teacher_layers init):                      201.2 M

The embedding dominates small models: with width 576 a quarter of SmolLM2 (33.6 M) leaves room
for one layer only, so a quarter-size student has to be narrower (random init).
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any

import torch

__all__ = ["make_student", "student_layer_indices"]


def student_layer_indices(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced teacher layers for a student: always the first and (for >1) the last.

    ``floor(i * (L - 1) / (n - 1) + 0.5)`` for ``i = 0..n-1`` (halves round up); 30 -> 8 gives
    ``[0, 4, 8, 12, 17, 21, 25, 29]``. A one-layer student takes layer 0.
    """
    if not 1 <= student_layers <= teacher_layers:
        raise ValueError(f"a student needs 1..{teacher_layers} layers, got {student_layers}")
    if student_layers == 1:
        return [0]
    step = (teacher_layers - 1) / (student_layers - 1)
    return [int(math.floor(i * step + 0.5)) for i in range(student_layers)]


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def make_student(
    teacher: torch.nn.Module,
    *,
    num_layers: int,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    init: str = "teacher_layers",
    seed: int = 0,
) -> torch.nn.Module:
    """A smaller model of the teacher's own class, from a modified copy of its config.

    * ``num_layers``: decoder layers of the student (at most the teacher's).
    * ``hidden_size`` / ``intermediate_size`` / ``num_heads``: optional narrower widths. When
      the teacher's ``head_dim`` equals ``hidden_size // num_attention_heads`` (Llama/SmolLM2),
      the student's is recomputed the same way; a decoupled ``head_dim`` (Gemma 3: 256) is kept.
      ``num_kv_heads`` (grouped-query attention) must divide ``num_heads``; by default it is the
      largest divisor of ``num_heads`` not above the teacher's value (unchanged when the head
      count is).
    * Per-layer config lists (e.g. ``layer_types``: sliding vs. full attention) follow the
      chosen layers, so a student keeps each copied layer's attention type.
    * ``init="teacher_layers"``: copies the embeddings, final norm, LM head and the layers
      :func:`student_layer_indices` picks (layer ``i`` of the student = teacher layer
      ``indices[i]``). Only valid when the widths are unchanged; raises ``ValueError`` otherwise.
    * ``init="random"``: the model's own initialisation under ``torch.manual_seed(seed)`` (the
      global RNG state is restored afterwards).

    Tied embeddings stay tied (the config's ``tie_word_embeddings`` is kept). The student has
    the teacher's dtype and is in train mode.
    """
    if init not in ("teacher_layers", "random"):
        raise ValueError(f"init must be 'teacher_layers' or 'random', got {init!r}")
    t_cfg = _text_config(teacher.config)
    n_teacher = int(t_cfg.num_hidden_layers)
    indices = student_layer_indices(n_teacher, num_layers)

    widths = {
        "hidden_size": (hidden_size, t_cfg.hidden_size),
        "intermediate_size": (intermediate_size, t_cfg.intermediate_size),
        "num_attention_heads": (num_heads, t_cfg.num_attention_heads),
        "num_key_value_heads": (num_kv_heads, getattr(t_cfg, "num_key_value_heads", None)),
    }
    changed = [k for k, (new, old) in widths.items() if new is not None and new != old]
    if init == "teacher_layers" and changed:
        raise ValueError(
            "init='teacher_layers' copies teacher weights, so the student must keep the teacher's "
            f"widths; changed: {', '.join(changed)}. Use init='random' for a narrower student."
        )

    config = copy.deepcopy(teacher.config)
    cfg = _text_config(config)
    cfg.num_hidden_layers = num_layers
    new_hidden = hidden_size or t_cfg.hidden_size
    new_heads = num_heads or t_cfg.num_attention_heads
    if new_hidden != t_cfg.hidden_size or new_heads != t_cfg.num_attention_heads:
        t_head_dim = getattr(t_cfg, "head_dim", None)
        coupled = t_head_dim is None or t_head_dim == t_cfg.hidden_size // t_cfg.num_attention_heads
        if coupled:
            if new_hidden % new_heads:
                raise ValueError(f"hidden_size {new_hidden} is not divisible by num_heads {new_heads}")
            if hasattr(cfg, "head_dim"):
                cfg.head_dim = new_hidden // new_heads
    cfg.hidden_size = new_hidden
    cfg.num_attention_heads = new_heads
    if intermediate_size:
        cfg.intermediate_size = intermediate_size
    kv = getattr(t_cfg, "num_key_value_heads", None)
    if num_kv_heads is not None:
        if num_kv_heads < 1 or new_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads {num_kv_heads} must divide num_heads {new_heads}")
        cfg.num_key_value_heads = num_kv_heads
    elif kv is not None:
        kv = min(int(kv), new_heads)
        while new_heads % kv:
            kv -= 1
        cfg.num_key_value_heads = kv
    for attr, value in list(vars(cfg).items()):
        if isinstance(value, list) and len(value) == n_teacher and not attr.startswith("_"):
            setattr(cfg, attr, [value[i] for i in indices])
    if hasattr(cfg, "max_window_layers") and cfg.max_window_layers is not None:
        cfg.max_window_layers = min(cfg.max_window_layers, num_layers)

    dtype = next(teacher.parameters()).dtype
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = type(teacher)(config)
    student = student.to(dtype)

    if init == "teacher_layers":
        t_state = teacher.state_dict()
        pattern = re.compile(r"^(.*\blayers\.)(\d+)(\..*)$")
        with torch.no_grad():
            for key, value in student.state_dict().items():
                m = pattern.match(key)
                src = f"{m.group(1)}{indices[int(m.group(2))]}{m.group(3)}" if m else key
                if src not in t_state:
                    raise RuntimeError(f"teacher has no tensor '{src}' for student tensor '{key}'")
                value.copy_(t_state[src])
    if getattr(_text_config(student.config), "tie_word_embeddings", False) or getattr(student.config, "tie_word_embeddings", False):
        student.tie_weights()
    student.train()
    return student
