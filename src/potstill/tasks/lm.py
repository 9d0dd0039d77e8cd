"""Causal-LM distillation: text data, a (kept or built-in) teacher, students, held-out metrics.

Data: Python's own ``pydoc_data.topics`` text, packed into fixed-length sequences (every token
a target), plus prompt/response examples whose responses the teacher generates greedily
(prompt tokens masked out of every loss). Both kinds are split train/val/test alike.

With ``teacher.cache`` the teacher's targets come from an offline store (``potstill cache``): the
data are rebuilt (chat responses from the store), checked against the store's manifest before any
student trains, and no teacher model stays in memory (its weights are read once to build the
students' initial weights when ``student.init='teacher_layers'``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from potstill.core.paths import cache_dir
from potstill.config import LMRecipe, StudentConfig
from potstill.data.order import StepOrder
from potstill.data.text import (PROMPTS, encode_chat, generate_responses, pack_documents, pydoc_documents, split,
                                train_tiny_tokenizer)
from potstill.engine.checkpoint import atomic_write_json, save_tensors
from potstill.engine.trainer import train
from potstill.core.errors import UserError
from potstill.eval.lm_metrics import evaluate_lm, greedy_generate
from potstill.eval.metrics import PeakMemory
from potstill.methods import method_class, method_config
from potstill.methods.lm import LMCrossEntropy
from potstill.models.hf import count_params, load_causal_lm, make_student, tiny_llama
from potstill.store.manifest import check_setup
from potstill.store.reader import StoreReader
from potstill.store.source import lm_fingerprint, tokenizer_sha256
from potstill.store.teacher import StoreTeacher
from potstill.teachers.lm import LMTeacher

OnStep = Callable[[int, dict[str, float]], None]


class LMBatches:
    """Deterministic batches of fixed-length sequences; ``num_items`` counts the step's target tokens."""

    def __init__(self, split_tensors: dict[str, torch.Tensor], batch_size: int, grad_accum: int, seed: int):
        self.data = split_tensors
        self.order = StepOrder(len(split_tensors["input_ids"]), batch_size, grad_accum, seed)

    def num_items(self, step: int) -> int:
        labels = self.data["labels"][self.order.step_indices(step)]
        return int((labels[:, 1:] != -100).sum())

    def batch(self, step: int, micro: int = 0) -> dict:
        index = self.order.indices(step, micro)
        return {**{k: v[index] for k, v in self.data.items()}, "index": index, "split": "train",
                "num_items": max(1, self.num_items(step))}


def _stack(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([e[k] for e in examples]) for k in ("input_ids", "attention_mask", "labels")}


def _eval_batches(tensors: dict[str, torch.Tensor], batch_size: int, limit: int | None = None):
    n = len(tensors["input_ids"]) if limit is None else min(limit, len(tensors["input_ids"]))
    return [{k: v[i:i + batch_size] for k, v in tensors.items()} for i in range(0, n, batch_size)]


class LMTask:
    primary_metric = "perplexity"
    curve_metric = "val/perplexity"
    higher_is_better = {"perplexity": False, "kl_to_teacher": False, "agreement": True, "params": False,
                        "tokens_per_s": True, "peak_memory_mb": False, "teacher_perplexity": False}

    def __init__(self, recipe: LMRecipe):
        self.recipe = recipe
        if recipe.teacher.model == "tiny" and recipe.data.chat_prompts:
            raise UserError("teacher.model='tiny' cannot answer prompts; set data.chat_prompts=0")
        self.store = StoreReader(recipe.teacher.cache) if recipe.teacher.cache else None
        if self.store is not None:
            check_setup(self.store.manifest, self.store.folder, task="lm")
        self.teacher_model = None
        self._student_template = None  # store + teacher_layers: the students' initial weights, built once
        self.teacher_responses: list[str] = []

    # ---------------------------------------------------------------- data and teacher

    def _documents(self) -> list[str]:
        docs = pydoc_documents()
        return docs[:self.recipe.data.max_documents] if self.recipe.data.max_documents else docs

    def _text_examples(self) -> list[dict[str, torch.Tensor]]:
        packed = pack_documents(self.tokenizer, self._documents(), self.recipe.data.seq_len)
        if self.recipe.data.max_sequences:
            packed = packed[:self.recipe.data.max_sequences]
        return [{"input_ids": s, "attention_mask": torch.ones_like(s), "labels": s.clone()} for s in packed]

    def _chat_examples(self, model, responses: list[str] | None = None) -> tuple[list[dict], list[str]]:
        d = self.recipe.data
        prompts = PROMPTS[:d.chat_prompts]
        if not prompts:
            return [], []
        if responses is None:
            key = hashlib.sha256(json.dumps([self.recipe.teacher.model, d.response_tokens, prompts]).encode()).hexdigest()[:16]
            responses = generate_responses(model, self.tokenizer, prompts, max_new_tokens=d.response_tokens,
                                           cache_path=cache_dir() / "generations" / f"{key}.json")
        elif len(responses) != len(prompts):
            raise UserError(f"teacher store {self.store.folder} holds {len(responses)} teacher responses; this recipe "
                            f"asks for data.chat_prompts={len(prompts)}")
        self.teacher_responses = list(responses)
        examples = [encode_chat(self.tokenizer, p, r, d.seq_len) for p, r in zip(prompts, responses)]
        return examples, prompts

    def _split(self, examples: list, prompts: list[str] | None = None):
        d = self.recipe.data
        indices = split(list(range(len(examples))), d.val_fraction, d.test_fraction, d.split_seed)
        return [[examples[i] for i in part] for part in indices], ([prompts[i] for i in indices[2]] if prompts else [])

    def _build_data(self, model, responses: list[str] | None = None) -> None:
        (text_train, text_val, text_test), _ = self._split(self._text_examples())
        chat, prompts = self._chat_examples(model, responses) if model is not None or responses is not None else ([], [])
        (chat_train, chat_val, chat_test), self.heldout_prompts = self._split(chat, prompts)
        self.train_set = _stack(text_train + chat_train)
        self.val_set = _stack(text_val + chat_val)
        self.test_set = _stack(text_test + chat_test)

    def _data_digest(self) -> str:
        return hashlib.sha256(self.train_set["input_ids"].numpy().tobytes()).hexdigest()[:16]

    def prepare_teacher(self, on_step_factory: Callable[[str, int], OnStep]) -> None:
        cfg = self.recipe.teacher
        if self.store is not None:
            return self._prepare_from_store()
        if cfg.model == "tiny":
            self.tokenizer = train_tiny_tokenizer(self._documents(), self.recipe.data.tokenizer_vocab)
            model = None
        else:
            model, self.tokenizer = load_causal_lm(cfg.model, dtype=getattr(torch, cfg.dtype))
        self._build_data(model)
        self.reused = False
        if model is None:
            model = self._tiny_teacher(self._data_digest(), on_step_factory)
        self.teacher_model = model
        self.teacher = LMTeacher(model, f"{cfg.model}" + (" (kept, reused)" if self.reused else ""))
        if cfg.precompute:
            n = len(self.train_set["input_ids"])
            self.teacher.precompute(self.train_set["input_ids"], self.train_set["attention_mask"],
                                    on_step=on_step_factory("teacher targets", n))

    def _tiny_spec(self, digest: str) -> tuple[dict, Path]:
        cfg = self.recipe.teacher
        spec = {"hidden": cfg.tiny_hidden, "layers": cfg.tiny_layers, "train": cfg.train.model_dump(),
                "data": digest, "vocab": len(self.tokenizer), "format": 1}
        return spec, cache_dir() / "teachers" / ("lm-" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20])

    def _tiny_model(self) -> torch.nn.Module:
        cfg = self.recipe.teacher
        return tiny_llama(len(self.tokenizer), hidden_size=cfg.tiny_hidden, num_layers=cfg.tiny_layers,
                          intermediate_size=2 * cfg.tiny_hidden, num_heads=4, num_kv_heads=2, seed=0,
                          max_position_embeddings=max(512, self.recipe.data.seq_len))

    def _tiny_teacher(self, digest: str, on_step_factory) -> torch.nn.Module:
        cfg = self.recipe.teacher
        spec, kept = self._tiny_spec(digest)
        model = self._tiny_model()
        if cfg.reuse and (kept / "teacher.safetensors").exists():
            model.load_state_dict(load_file(str(kept / "teacher.safetensors")), strict=False)
            model.tie_weights()
            self.reused = True
            return model.eval()
        partial = kept.with_name(kept.name + ".partial")
        model.train()
        method = LMCrossEntropy(model, None, LMCrossEntropy.Config(), num_classes=len(self.tokenizer),
                                num_train=len(self.train_set["input_ids"]))
        batches = LMBatches(self.train_set, cfg.train.batch_size, cfg.train.grad_accum, seed=0)
        result = train(method, batches=batches, evaluate=lambda: self._val_metrics(model), cfg=cfg.train,
                       out_dir=partial, selection="val/perplexity", higher_is_better=False,
                       on_step=on_step_factory("teacher", cfg.train.steps))
        method.load_state_dict(result.best_state)
        save_tensors(partial / "teacher.safetensors", model.state_dict())
        atomic_write_json(partial / "info.json", {**spec, "best_step": result.best_step})
        shutil.rmtree(partial / "checkpoint", ignore_errors=True)
        shutil.rmtree(kept, ignore_errors=True)
        partial.rename(kept)
        return model.eval()

    def _prepare_from_store(self) -> None:
        """Data rebuilt and checked against the store's manifest; no teacher model kept (see module doc)."""
        cfg, store = self.recipe.teacher, self.store
        m = store.manifest
        if cfg.model == "tiny":
            self.tokenizer = train_tiny_tokenizer(self._documents(), self.recipe.data.tokenizer_vocab)
        else:
            self.tokenizer = _load_tokenizer(cfg.model)
        check_setup(m, store.folder, tokenizer_sha256=tokenizer_sha256(self.tokenizer))
        self._build_data(None, m.teacher_responses or [])  # the answers the store was built from
        check_setup(m, store.folder, seq_len=self.recipe.data.seq_len, dataset_fingerprint=lm_fingerprint(self.train_set),
                    num_examples=len(self.train_set["input_ids"]),
                    heldout_fingerprint=lm_fingerprint(self.test_set))
        model = self._store_student_source()
        check_setup(m, store.folder, vocab_size=int(model.get_output_embeddings().weight.shape[0]))
        s = self.recipe.student
        if s.init == "teacher_layers":
            try:
                self._student_template = make_student(model, num_layers=s.num_layers, hidden_size=s.hidden_size,
                                                      intermediate_size=s.intermediate_size, num_heads=s.num_heads,
                                                      init=s.init, seed=0)
            except ValueError as error:
                raise UserError(f"student: {error}") from None
            self._student_skeleton = None
        else:
            self._student_skeleton = model.to("meta")  # class and config only: the weights are freed
        del model
        store.verify()
        self.reused = False
        self.teacher = StoreTeacher(store, f"{cfg.model} via teacher store {store.folder} ({store.describe()})")

    def _store_student_source(self) -> torch.nn.Module:
        """The teacher's architecture (and, for teacher_layers init, its weights), read once."""
        cfg, init = self.recipe.teacher, self.recipe.student.init
        if cfg.model != "tiny":
            model, _ = load_causal_lm(cfg.model, dtype=getattr(torch, cfg.dtype))
            return model
        model = self._tiny_model()
        _, kept = self._tiny_spec(self._data_digest())
        if init == "teacher_layers":
            if not (kept / "teacher.safetensors").exists():
                raise UserError("student.init='teacher_layers' copies the teacher's weights, but the kept tiny teacher "
                                f"is gone ({kept}); set student.init=random or rebuild it with `potstill cache`")
            model.load_state_dict(load_file(str(kept / "teacher.safetensors")), strict=False)
            model.tie_weights()
        return model

    def _new_student(self, seed: int) -> torch.nn.Module:
        s = self.recipe.student
        if self._student_template is not None:  # teacher_layers copies every tensor: the seed plays no part
            student = copy.deepcopy(self._student_template)
            student.train()
            return student
        source = self.teacher_model if self.store is None else self._student_skeleton
        try:
            return make_student(source, num_layers=s.num_layers, hidden_size=s.hidden_size,
                                intermediate_size=s.intermediate_size, num_heads=s.num_heads, init=s.init, seed=seed)
        except ValueError as error:
            raise UserError(f"student: {error}") from None

    def _test_batches(self):
        """Test batches; from a store, each carries the stored teacher log-probs of its label rows."""
        batches = _eval_batches(self.test_set, self.recipe.eval.batch_size)
        if self.store is None or self.store.manifest.held_out is None:
            yield from batches
            return
        start = 0
        for batch in batches:
            n = len(batch["input_ids"])
            yield {**batch, "teacher_log_probs": self.store.heldout(start, start + n),
                   "teacher_argmax": self.store.heldout(start, start + n, "argmax")}
            start += n

    def _val_metrics(self, model: torch.nn.Module) -> dict[str, float]:
        ev = self.recipe.eval
        metrics = evaluate_lm(model, None, _eval_batches(self.val_set, ev.batch_size, ev.max_val_sequences))
        return {"val/perplexity": metrics["perplexity"]}

    def teacher_report(self) -> dict:
        ev = self.recipe.eval
        if self.store is not None:
            entry = dict(self.store.manifest.teacher_report or {})
            self.teacher_generations = list(entry.pop("generations", []))[:ev.generations]
            return {**entry, "description": self.teacher.description, "reused": False,
                    "store": self.store.report_entry()}
        metrics = evaluate_lm(self.teacher_model, None, _eval_batches(self.test_set, ev.batch_size))
        values = {"perplexity": metrics["perplexity"], "params": count_params(self.teacher_model)}
        self.teacher_generations = greedy_generate(self.teacher_model, self.tokenizer, self.heldout_prompts[:ev.generations],
                                                   ev.generation_tokens) if ev.generations else []
        return {"description": self.teacher.description, "reused": self.reused, "params": values["params"],
                "metrics": {k: {"mean": v, "std": 0.0, "values": [v]} for k, v in values.items()}}

    # ---------------------------------------------------------------- students

    def check_student(self, name: str, cfg: StudentConfig) -> str | None:
        """Refuse a student that cannot work; return a reason to skip one a sampled store cannot serve."""
        method_cls = method_class(cfg.method, where=f"students.{name}.method")
        if not method_cls.name.startswith("lm_"):
            raise UserError(f"students.{name}.method '{cfg.method}' is a classifier method; LM recipes use lm_ce or lm_kd")
        method_cfg = method_config(cfg.method, cfg.params, where=f"students.{name}")
        if self.store is None or not method_cls.uses_teacher or self.store.manifest.format == "dense":
            return None
        m = self.store.manifest
        if not math.isclose(method_cfg.temperature, m.temperature, rel_tol=1e-9):
            raise UserError(f"students.{name}: temperature {method_cfg.temperature:g} differs from the teacher store's "
                            f"{m.temperature:g} ({m.format} targets are fixed at the temperature they were taken at); "
                            f"rebuild the store with --temperature {method_cfg.temperature:g} or --format dense")
        if m.format == "sampled" and method_cfg.divergence != "forward_kl":
            return (f"{method_cfg.divergence} is non-linear in the teacher distribution, so sampled targets would bias "
                    "it; sampled stores serve forward_kl only (use --format topk or dense)")
        return None

    def run_student(self, name: str, cfg: StudentConfig, seed: int, out_dir: Path, on_step: OnStep) -> dict:
        recipe, s = self.recipe, self.recipe.student
        method_cls = method_class(cfg.method, where=f"students.{name}.method")
        method_cfg = method_config(cfg.method, cfg.params, where=f"students.{name}")
        student = self._new_student(seed)
        student.train()
        teacher = self.teacher if method_cls.uses_teacher else None
        method = method_cls(student, teacher, method_cfg, num_classes=len(self.tokenizer),
                            num_train=len(self.train_set["input_ids"]))
        batches = LMBatches(self.train_set, recipe.train.batch_size, recipe.train.grad_accum, seed)
        started = time.perf_counter()
        with PeakMemory() as memory:
            result = train(method, batches=batches, evaluate=lambda: self._val_metrics(student), cfg=recipe.train,
                           out_dir=out_dir, selection="val/perplexity", higher_is_better=False, on_step=on_step)
        elapsed = time.perf_counter() - started
        tokens = sum(batches.num_items(step) for step in range(result.resumed_from, result.steps))
        method.load_state_dict(result.best_state)
        student.eval()
        save_tensors(out_dir / "student.safetensors", student.state_dict())

        ev = recipe.eval
        held_out = evaluate_lm(student, self.teacher_model, self._test_batches())
        metrics = {"perplexity": held_out["perplexity"],
                   **{k: held_out[k] for k in ("kl_to_teacher", "agreement") if k in held_out},
                   "params": count_params(student), "tokens_per_s": tokens / elapsed if elapsed > 0 and tokens else 0.0,
                   "peak_memory_mb": memory.peak_mb}
        out = {"metrics": metrics, "best_step": result.best_step, "best_val": result.best_value,
               "resumed_from": result.resumed_from}
        if seed == recipe.seed and ev.generations:
            out["generations"] = greedy_generate(student, self.tokenizer, self.heldout_prompts[:ev.generations],
                                                 ev.generation_tokens)
        return out

    def extra_report(self, results: dict[str, list[dict]]) -> dict:
        rows = []
        for i, prompt in enumerate(self.heldout_prompts[:self.recipe.eval.generations]):
            students = {name: next((r["generations"][i] for r in per_seed if "generations" in r), "")
                        for name, per_seed in results.items()}
            rows.append({"prompt": prompt, "teacher": self.teacher_generations[i] if i < len(self.teacher_generations) else "",
                         "students": students})
        return {"generations": rows} if rows else {}

    def protocol(self) -> dict:
        r = self.recipe
        return {
            "selection": f"best val/perplexity, evaluated every {r.train.eval_every} steps on "
                         f"{min(r.eval.max_val_sequences or 10**9, len(self.val_set['input_ids']))} validation sequences",
            "test": f"held-out split of {len(self.test_set['input_ids'])} sequences (pydoc text + teacher-answered prompts), "
                    "used only for the final numbers; perplexity and KL are per target token",
            "notes": [
                f"teacher: {r.teacher.model}; student: {r.student.num_layers} layers, init={r.student.init}",
                self._store_note() if self.store is not None else
                "teacher final hidden states were computed once over the training set (text has no augmentation, "
                "so they equal a per-step teacher forward)" if r.teacher.precompute else "teacher ran every step",
                "every student has the same architecture, steps, batch and optimizer as the baseline",
                "tokens_per_s and peak_memory_mb (peak RSS growth during training, sampled) are measurements of "
                "this machine; all other numbers are deterministic",
            ],
        }

    def _store_note(self) -> str:
        m, store = self.store.manifest, self.store
        held = ("kl_to_teacher and agreement use the store's held-out teacher log-probs (fp16, T=1)"
                if m.held_out is not None else "the store has no held-out targets: no kl_to_teacher or agreement")
        return (f"teacher targets came from the offline store {store.folder} ({store.describe()}, "
                f"{m.bytes_per_token} bytes/token, manifest sha256 {store.digest[:16]}); no teacher model was in "
                f"memory during training; {held}")


def _load_tokenizer(name: str):
    """The teacher's tokenizer without its weights when a converted copy or a local directory has one."""
    from potstill.models.hf import BUILTIN_MODELS, _prepare_tokenizer, builtin_dir

    path = builtin_dir(name) if name in BUILTIN_MODELS else Path(name).expanduser()
    if (path / "config.json").exists():
        from transformers import AutoTokenizer

        return _prepare_tokenizer(AutoTokenizer.from_pretrained(str(path), local_files_only=True))
    _, tokenizer = load_causal_lm(name)  # first use of a built-in: converts it once
    return tokenizer
