"""Causal-LM distillation: text data, a (kept or built-in) teacher, students, held-out metrics.

Data (:mod:`potstill.tasks.lm_data`): Python's own ``pydoc_data.topics`` text, packed into
fixed-length sequences (every token a target), plus prompt/response examples whose responses the
teacher generates greedily (prompt tokens masked out of every loss).

With ``teacher.store`` the teacher's targets come from an offline store (``potstill store``): the
data are rebuilt (chat responses from the store), checked against the store's manifest before any
student trains, and no teacher model stays in memory (its weights are read once to build the
students' initial weights when ``student.init='teacher_layers'``).
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import torch

from potstill.core.device import resolve_runtime
from potstill.core.distributed import launched_world
from potstill.core.errors import UserError
from potstill.core.hashing import json_digest, tokenizer_sha256, weights_sha256
from potstill.core.io import save_tensors
from potstill.core.paths import cache_dir
from potstill.data.text import generate_responses, train_tiny_tokenizer
from potstill.data.text.addition import char_tokenizer
from potstill.data.tokens import TokenBatches
from potstill.eval.lm_metrics import evaluate_lm, exact_match
from potstill.eval.metrics import PeakMemory
from potstill.losses.ensemble import mix
from potstill.methods import METHODS, method_class, method_config
from potstill.methods.lm_ce import LMCrossEntropy
from potstill.models.hf import final_logit_softcap, lm_hidden_and_head, load_causal_lm, load_tokenizer, logits_from_hidden
from potstill.models.hf import make_student, save_student_folder, stop_token_ids, tiny_llama
from potstill.models.params import count_params
from potstill.store.manifest import TeacherIdentity, check_setup
from potstill.store.reader import StoreReader
from potstill.store.source import StoreSource, hidden_parts
from potstill.tasks.lm_answers import answer_scores, check_answers_recipe, report_generations, untouched_student
from potstill.tasks.keep import freeze, keep_once, kept_dir, load_kept
from potstill.tasks.lm_config import LMRecipe, LMTeacherConfig
from potstill.tasks.lm_data import build_lm_data, documents
from potstill.tasks.lm_ensemble import check_one_tokenizer, lm_member_configs, member_label
from potstill.tasks.lm_served import (check_served_recipe, prepare_served, served_note, served_spec,
                                      served_store_source, served_teacher_report, teacher_for)
from potstill.tasks.registry import OnStep, OnStepFactory, TaskBase, register_task
from potstill.teachers.base import TeacherSpec
from potstill.teachers.lm import LMTeacher
from potstill.teachers.lm_ensemble import LMEnsembleTeacher, lm_ensemble_capabilities
from potstill.teachers.store import StoreTeacher
from potstill.train.parallel import shard_teacher, teacher_layout
from potstill.train.trainer import best_student, train


@register_task
class LMTask(TaskBase):
    name = "lm"
    Recipe = LMRecipe
    primary_metric = "perplexity"
    curve_metric = "val/perplexity"
    higher_is_better = {"perplexity": False, "kl_to_teacher": False, "agreement": True, "params": False,
                        "tokens_per_s": True, "peak_memory_mb": False, "teacher_perplexity": False,
                        "exact_match": True, "answer_teacher_nll": False, "answer_rouge_l": True,
                        "answer_perplexity": False}
    teacher_targets: str | None = None  # where the students' teacher targets came from, set by prepare_teacher

    #: (predicate, subclass) for recipes another class runs (a student with its own tokenizer:
    #: potstill.tasks.lm_xtok), registered by their own modules
    variants: list = []

    def __new__(cls, recipe: LMRecipe | None = None, *args, **kwargs):
        if cls is LMTask and recipe is not None:
            cls = next((variant for when, variant in LMTask.variants if when(recipe)), cls)
        return super().__new__(cls)

    def __init__(self, recipe: LMRecipe):
        self.recipe = recipe
        self.runtime = resolve_runtime(recipe.device, recipe.precision)
        self.member_cfgs = lm_member_configs(recipe.teacher)  # [teacher] without an ensemble
        if self.member_cfgs[0].model == "tiny" and recipe.data.chat_prompts:
            raise UserError("teacher.model='tiny' cannot answer prompts; set data.chat_prompts=0")
        if recipe.teacher.url:
            check_served_recipe(recipe)
        check_answers_recipe(recipe)
        self.store = StoreReader(recipe.teacher.store) if recipe.teacher.store else None
        if self.store is not None:
            check_setup(self.store.manifest, self.store.folder, task="lm")
        self.teacher_model = None  # the (first) teacher model: students' layers, chat answers, generations
        self.teacher_models: list[torch.nn.Module] = []  # every member's (one without an ensemble)
        self._student_template = None  # store + teacher_layers: the students' initial weights, built once

    # ---------------------------------------------------------------- data and teacher

    def teacher_spec(self) -> TeacherSpec:
        if self.recipe.teacher.url:
            return served_spec(self.recipe.teacher)
        if self.store is not None:
            return TeacherSpec(f"store {self.store.folder} ({self.store.describe()})",
                               StoreTeacher(self.store).capabilities)
        ensemble = self.recipe.teacher.ensemble
        if ensemble is not None:
            return TeacherSpec(f"ensemble of {len(self.member_cfgs)} ({ensemble.rule()})",
                               lm_ensemble_capabilities([LMTeacher.capabilities] * len(self.member_cfgs)))
        return TeacherSpec(self.recipe.teacher.model, LMTeacher.capabilities)

    def _tokenizer(self):
        cfg = self.member_cfgs[0]
        if cfg.model == "tiny" and self.recipe.data.source == "addition":
            return char_tokenizer()
        if cfg.model == "tiny":
            return train_tiny_tokenizer(documents(self.recipe.data), self.recipe.data.tokenizer_vocab)
        return load_tokenizer(cfg.model)

    def _answer(self, model):
        d = self.recipe.data

        def answer(prompts: list[str]) -> list[str]:
            key = json_digest([self.member_cfgs[0].model, d.response_tokens, prompts], 16)
            return generate_responses(model, self.tokenizer, prompts, max_new_tokens=d.response_tokens,
                                      cache_path=cache_dir() / "generations" / f"{key}.json")
        return answer

    def _use_data(self, data) -> None:
        self.train_set, self.val_set, self.test_set = data.train, data.val, data.test
        self.heldout_prompts, self.teacher_responses = data.heldout_prompts, data.teacher_responses
        self.heldout_answers = data.heldout_answers

    def prepare_teacher(self, on_step_factory: OnStepFactory) -> None:
        if self.store is not None:
            return self._prepare_from_store()
        if self.recipe.teacher.url:
            return prepare_served(self, on_step_factory)
        cfgs = self.member_cfgs
        if cfgs[0].model == "tiny":
            self.tokenizer, model = self._tokenizer(), None
        else:
            model, self.tokenizer = load_causal_lm(cfgs[0].model, dtype=getattr(torch, cfgs[0].dtype))
        if len(cfgs) > 1:
            check_one_tokenizer(cfgs, self.tokenizer)
        self._use_data(build_lm_data(self.recipe.data, self.tokenizer, self._answer(model) if model else None))
        teachers, reused, sources = [], [], []
        for i, cfg in enumerate(cfgs):
            name = "teacher" if len(cfgs) == 1 else f"teacher {i}"
            if i > 0 or model is None:
                model = None if cfg.model == "tiny" else load_causal_lm(cfg.model, dtype=getattr(torch, cfg.dtype))[0]
            if model is None:
                model, kept, source = self._tiny_teacher(on_step_factory, cfg, name)
            else:
                kept, source = False, f"loaded from {cfg.model}"
            self.teacher_models.append(freeze(model.to(self.runtime.device)))
            teachers.append(LMTeacher(self.teacher_models[-1], member_label(cfg) + (" (kept, reused)" if kept else "")))
            reused.append(kept)
            sources.append(source if len(cfgs) == 1 else f"member {i}: {source}")
            if cfg.precompute:
                teachers[-1].precompute(self.train_set.input_ids, self.train_set.attention_mask,
                                        on_step=on_step_factory(f"{name} targets", len(self.train_set)))
        self.teacher_model, self.reused = self.teacher_models[0], all(reused)
        ensemble = self.recipe.teacher.ensemble
        if ensemble is None:
            self.teacher, self.teacher_targets = teachers[0], sources[0]
            return
        self.mixture = ensemble.mixture_rule()
        self.teacher = LMEnsembleTeacher(teachers, self.mixture)
        self.teacher_targets = f"ensemble of {len(cfgs)} teachers, {ensemble.rule()}; " + "; ".join(sources)

    def distribute_teacher(self) -> None:
        """Under torchrun, shard the teacher models that the layout rule says to (every rank, together)."""
        d = self.recipe.distributed
        self.teacher_layout = "replicate"
        if self.recipe.student.init == "teacher_layers" and self._student_template is None and any(
                teacher_layout(m, d.teacher, d.shard_teacher_above_mb) == "shard" for m in self.teacher_models):
            self._student_template = self._new_student(self.recipe.seed)  # copied while the teacher is whole
        for model in self.teacher_models:
            if teacher_layout(model, d.teacher, d.shard_teacher_above_mb) == "shard":
                shard_teacher(model, launched_world(), self.runtime.device)
                self.teacher_layout = "shard"

    def _tiny_spec(self, cfg: LMTeacherConfig) -> dict:
        return {"hidden": cfg.tiny_hidden, "layers": cfg.tiny_layers, "train": cfg.train.model_dump(),
                "data": self.train_set.fingerprint(), "vocab": len(self.tokenizer), "seed": cfg.seed}

    def _tiny_model(self, cfg: LMTeacherConfig) -> torch.nn.Module:
        return tiny_llama(len(self.tokenizer), hidden_size=cfg.tiny_hidden, num_layers=cfg.tiny_layers,
                          intermediate_size=2 * cfg.tiny_hidden, num_heads=4, num_kv_heads=2, seed=cfg.seed,
                          max_position_embeddings=max(512, self.recipe.data.seq_len))

    def _tiny_teacher(self, on_step_factory: OnStepFactory, cfg: LMTeacherConfig,
                      name: str) -> tuple[torch.nn.Module, bool, str]:
        """A tiny teacher trained once and kept: (model, reused, where its targets come from)."""
        model = self._tiny_model(cfg)

        def train_it(work_dir: Path) -> dict:
            model.train()
            method = LMCrossEntropy(model, None, LMCrossEntropy.Config(), num_classes=len(self.tokenizer),
                                    num_train=len(self.train_set))
            result = train(method, batches=TokenBatches(self.train_set, cfg.train.batch_size, cfg.train.grad_accum,
                                                        seed=cfg.seed),
                           evaluate=lambda: self._val_metrics(model), cfg=cfg.train, out_dir=work_dir,
                           selection=self.curve_metric, higher_is_better=self.higher_is_better[self.primary_metric],
                           on_step=on_step_factory(name, cfg.train.steps), runtime=self.runtime)
            method.load_state_dict(result.best_state)
            return {"best_step": result.best_step}

        reused, key = keep_once("lm", self._tiny_spec(cfg), model, train_it, reuse=cfg.reuse)
        return model.eval(), reused, f"kept teacher reused (key {key})" if reused else f"trained in this run (kept as {key})"

    def _prepare_from_store(self) -> None:
        """Data rebuilt and checked against the store's manifest; no teacher model kept (see module doc)."""
        cfg, store = self.recipe.teacher, self.store
        m = store.manifest
        self.tokenizer = self._tokenizer()
        check_setup(m, store.folder, tokenizer_sha256=tokenizer_sha256(self.tokenizer))
        stored = m.teacher_responses or []
        self._use_data(build_lm_data(self.recipe.data, self.tokenizer, lambda prompts: stored,
                                     where=f"teacher store {store.folder}"))
        check_setup(m, store.folder, seq_len=self.recipe.data.seq_len, dataset_fingerprint=self.train_set.fingerprint(),
                    num_examples=len(self.train_set), heldout_fingerprint=self.test_set.fingerprint())
        model = self._store_student_source()
        check_setup(m, store.folder, vocab_size=int(model.get_output_embeddings().weight.shape[0]))
        self._keep_student_source(model)
        del model
        store.verify()
        self.reused = False
        self.teacher_targets = f"offline store {store.folder} (format {store.describe()})"
        self.teacher = StoreTeacher(store, f"{cfg.model} via teacher store {store.folder} ({store.describe()})")

    def _keep_student_source(self, model: torch.nn.Module) -> None:
        """Keep what builds the students without a teacher model: their initial weights (teacher_layers) or
        the architecture alone."""
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

    def _store_student_source(self) -> torch.nn.Module:
        """The teacher's architecture (and, for teacher_layers init, its weights), read once."""
        cfg, init = self.member_cfgs[0], self.recipe.student.init
        if cfg.model != "tiny":
            model, _ = load_causal_lm(cfg.model, dtype=getattr(torch, cfg.dtype))
            return model
        model = self._tiny_model(cfg)
        if init == "teacher_layers":
            kept = kept_dir("lm", self._tiny_spec(cfg))
            if not (kept / "teacher.safetensors").exists():
                raise UserError("student.init='teacher_layers' copies the teacher's weights, but the kept tiny teacher "
                                f"is gone ({kept}); set student.init=random or rebuild it with `potstill store`")
            load_kept(model, kept)
        return model

    def _new_student(self, seed: int) -> torch.nn.Module:
        s = self.recipe.student
        if self._student_template is not None:  # teacher_layers copies every tensor: the seed plays no part
            student = copy.deepcopy(self._student_template)
        else:
            source = self.teacher_model if self.teacher_model is not None else self._student_skeleton
            try:
                student = make_student(source, num_layers=s.num_layers, hidden_size=s.hidden_size,
                                       intermediate_size=s.intermediate_size, num_heads=s.num_heads, init=s.init,
                                       seed=seed)
            except ValueError as error:
                raise UserError(f"student: {error}") from None
        # what the exported student stops on, and what on-policy methods stop their rollouts on
        student.generation_config.eos_token_id = stop_token_ids(student, self.tokenizer)
        if self.tokenizer.pad_token_id is not None:
            student.generation_config.pad_token_id = int(self.tokenizer.pad_token_id)
        return student.train()

    def _test_batches(self):
        """Test batches; from a store, each carries the stored teacher log-probs of its label rows."""
        views = [v.as_dict() for v in self.test_set.eval_views(self.recipe.eval.batch_size)]
        if self.store is None or self.store.manifest.held_out is None:
            yield from views
            return
        start = 0
        for batch in views:
            n = len(batch["input_ids"])
            yield {**batch, "teacher_log_probs": self.store.heldout(start, start + n),
                   "teacher_argmax": self.store.heldout(start, start + n, "argmax")}
            start += n

    def _val_views(self):
        ev = self.recipe.eval
        return self.val_set.eval_views(ev.batch_size, ev.max_val_sequences)

    def _val_metrics(self, model: torch.nn.Module) -> dict[str, float]:
        return {"val/perplexity": evaluate_lm(model, None, [v.as_dict() for v in self._val_views()])["perplexity"]}

    def selection(self) -> dict:
        """How a student's checkpoint is chosen: what ``run_student`` passes to the trainer, and what the
        protocol reports (one source, so the two cannot drift apart)."""
        return {"metric": self.curve_metric, "higher_is_better": self.higher_is_better[self.primary_metric],
                "every": self.recipe.train.eval_every,
                "split_size": sum(len(view.input_ids) for view in self._val_views())}

    def teacher_report(self) -> dict:
        ev = self.recipe.eval
        if self.recipe.teacher.url:
            return served_teacher_report(self)
        if self.store is not None:
            entry = dict(self.store.manifest.teacher_report or {})
            self.teacher_generations = list(entry.pop("generations", []))[:ev.generations]
            return {**entry, "description": self.teacher.description, "reused": False,
                    "store": self.store.report_entry()}
        metrics = evaluate_lm(self.teacher_model, None, self._test_batches())
        scores, answers = answer_scores(self, self.teacher_model)
        values = {"perplexity": metrics["perplexity"], "params": sum(map(count_params, self.teacher_models)),
                  **self._verified(self.teacher_model if len(self.teacher_models) == 1 else None), **scores}
        self.teacher_generations = report_generations(self, self.teacher_model, answers)
        entry = {"description": self.teacher.description, "reused": self.reused, "params": values["params"]}
        if len(self.teacher_models) > 1:  # the ensemble's numbers; each member's beside them
            mixed = evaluate_lm(self.teacher_model, self.teacher_models, self._test_batches(), mixture=self.mixture)
            entry["members"] = [{"description": t.description, "params": count_params(m),
                                 "metrics": evaluate_lm(m, self.teacher_models, self._test_batches(), mixture=self.mixture)}
                                for t, m in zip(self.teacher.members, self.teacher_models)]
            values["perplexity"] = mixed["teacher_perplexity"]
            entry["generations_by"] = "member 0 (an ensemble does not generate)"
        return {**entry, "metrics": {k: {"mean": v, "std": 0.0, "values": [v]} for k, v in values.items()}}

    def _verified(self, model: torch.nn.Module | None) -> dict[str, float]:
        """``exact_match`` of greedy answers on the test split, for data with an exact verifier."""
        if model is None or self.recipe.data.source != "addition":
            return {}
        views = self.test_set.eval_views(self.recipe.eval.batch_size)
        stops = stop_token_ids(model, self.tokenizer)
        return {"exact_match": exact_match(model, views, stop_ids=stops, pad_id=int(self.tokenizer.pad_token_id))}

    def _eval_teacher(self) -> dict:
        """evaluate_lm's teacher arguments: the model, or the ensemble's members and rule."""
        if len(self.teacher_models) > 1:
            return {"teacher": self.teacher_models, "mixture": self.mixture}
        return {"teacher": self.teacher_model}

    @classmethod
    def store_recipe(cls, recipe: LMRecipe) -> LMRecipe:
        recipe = recipe.model_copy(deep=True)
        recipe.teacher.precompute = False  # the store is the precomputation
        return recipe

    def store_source(self) -> StoreSource:
        if self.recipe.teacher.url:
            return served_store_source(self)
        ensemble = self.recipe.teacher.ensemble
        if ensemble is not None and ensemble.weighting == "agreement":
            raise UserError("an agreement-weighted ensemble reads each token's label, which a store cannot keep; "
                            "store a uniform, fixed or confidence-weighted ensemble")
        model, members = self.teacher_model, self.teacher_models
        sets = {"train": self.train_set, "test": self.test_set}
        vocab = int(model.get_output_embeddings().weight.shape[0])

        @torch.no_grad()
        def logits(split: str, start: int, stop: int) -> torch.Tensor:
            view = sets[split].view(slice(start, stop))
            out = []
            for member in members:
                hidden, weight, bias = lm_hidden_and_head(member, view.input_ids, view.attention_mask, allow_softcap=True)
                out.append(logits_from_hidden(hidden, weight, bias, final_logit_softcap(member)).float())
            return out[0] if len(out) == 1 else mix(self.mixture, torch.stack(out))

        def report() -> dict:
            return {**self.teacher_report(), "generations": list(self.teacher_generations)}

        seq_len = self.train_set.seq_len
        return StoreSource(
            task="lm", recipe=self.recipe.name, vocab_size=vocab, seq_len=seq_len,
            num_examples=len(self.train_set), heldout_examples=len(self.test_set),
            # about 128 MiB of fp32 logits a forward (each member's, with an ensemble)
            batch_size=max(1, min(16, (1 << 27) // (4 * seq_len * vocab * len(members)))),
            logits=logits, heldout_mask=lambda start, stop: self.test_set.view(slice(start, stop)).target_mask(),
            dataset_fingerprint=self.train_set.fingerprint(), heldout_fingerprint=self.test_set.fingerprint(),
            tokenizer_sha256=tokenizer_sha256(self.tokenizer),
            teacher=self._teacher_identity(),
            teacher_report=report, teacher_responses=list(self.teacher_responses),
            **(hidden_parts(model, self.train_set) if len(members) == 1 else {}))

    def _teacher_identity(self) -> TeacherIdentity:
        if len(self.teacher_models) == 1:
            model = self.teacher_model
            return TeacherIdentity(description=self.recipe.teacher.model, weights_sha256=weights_sha256(model),
                                   params=count_params(model))
        digest = json_digest([self.recipe.teacher.ensemble.model_dump(), *map(weights_sha256, self.teacher_models)], 64)
        return TeacherIdentity(description=self.teacher.description, weights_sha256=digest,
                               params=sum(map(count_params, self.teacher_models)))

    # ---------------------------------------------------------------- students

    def check_student(self, name: str, cfg) -> str | None:
        method_cls = method_class(cfg.method, where=f"students.{name}.method")
        if getattr(method_cls, "cross_tokenizer", False) and not self.recipe.student.model:
            raise UserError(f"students.{name}.method '{cfg.method}' distils across tokenizers: set student.model "
                            "(a pretrained model with its own tokenizer), or use lm_kd")
        if not method_cls.for_tokens:
            lm_methods = ", ".join(n for n, c in METHODS.items() if c.for_tokens)
            raise UserError(f"students.{name}.method '{cfg.method}' is a classifier method; LM recipes use {lm_methods}")
        method_cfg = method_config(cfg.method, cfg.params, where=f"students.{name}")
        m = self.store.manifest if self.store is not None else None
        if m is not None and m.format not in ("dense", "hidden") and method_cls.uses_teacher(method_cfg) \
                and not math.isclose(method_cfg.temperature, m.temperature, rel_tol=1e-9):
            raise UserError(f"students.{name}: temperature {method_cfg.temperature:g} differs from the teacher store's "
                            f"{m.temperature:g} ({m.format} targets are fixed at the temperature they were taken at); "
                            f"rebuild the store with --temperature {method_cfg.temperature:g} or --format dense")
        return None

    def _train_and_keep(self, name: str, cfg, seed: int, student: torch.nn.Module, method, batches, out_dir: Path,
                        on_step: OnStep, tokenizer) -> tuple[torch.nn.Module, object, float, float]:
        """Train ``method`` on ``batches``, select the best state, and (rank 0) write the student's
        weights and its HF folder; returns (student, train result, seconds, peak memory in MB)."""
        recipe = self.recipe
        method.setup(batches.batch(0))
        selection, started = self.selection(), time.perf_counter()
        with PeakMemory() as memory:
            result = train(method, batches=batches, evaluate=lambda: self._val_metrics(student), cfg=recipe.train,
                           out_dir=out_dir, selection=selection["metric"], higher_is_better=selection["higher_is_better"],
                           on_step=on_step, runtime=self.runtime, strategy=recipe.distributed.strategy)
        elapsed = time.perf_counter() - started
        student = best_student(method, result, lambda: self._new_student(seed)).eval()
        if launched_world().is_main:
            save_tensors(out_dir / "student.safetensors", student.state_dict())
            save_student_folder(student, tokenizer, out_dir / "model", max_new_tokens=recipe.eval.generation_tokens,
                                provenance={"recipe": recipe.name, "task": "lm", "student": name,
                                            "method": cfg.method, "params": cfg.params, "seed": seed,
                                            "selected_step": result.best_step,
                                            "selected_value": {"val/perplexity": result.best_value},
                                            "teacher": self.teacher.description})
        return student, result, elapsed, memory.peak_mb

    def run_student(self, name: str, cfg, seed: int, out_dir: Path, on_step: OnStep) -> dict:
        recipe = self.recipe
        method_cls = method_class(cfg.method, where=f"students.{name}.method")
        method_cfg = method_config(cfg.method, cfg.params, where=f"students.{name}")
        student = self._new_student(seed)
        teacher = teacher_for(self.teacher, method_cfg) if method_cls.uses_teacher(method_cfg) else None
        method = method_cls(student, teacher, method_cfg, num_classes=len(self.tokenizer), num_train=len(self.train_set))
        batches = TokenBatches(self.train_set, recipe.train.batch_size, recipe.train.grad_accum, seed)
        student, result, elapsed, peak_mb = self._train_and_keep(name, cfg, seed, student, method, batches, out_dir,
                                                                 on_step, self.tokenizer)
        ev = recipe.eval
        held_out = evaluate_lm(student, batches=self._test_batches(), **self._eval_teacher())
        tokens, (scores, answers) = result.trained_items, answer_scores(self, student)
        metrics = {"perplexity": held_out["perplexity"], **self._verified(student),
                   **{k: held_out[k] for k in ("kl_to_teacher", "agreement") if k in held_out},
                   "params": count_params(student), "tokens_per_s": tokens / elapsed if elapsed > 0 and tokens else 0.0,
                   "peak_memory_mb": peak_mb, **scores}
        out = {"metrics": metrics, "best_step": result.best_step, "best_val": result.best_value,
               "resumed_from": result.resumed_from, "artifact": "model", "parallel": result.parallel,
               "train_seconds": round(result.seconds, 3)}
        if seed == recipe.seed and ev.generations:
            out["generations"] = report_generations(self, student, answers)
        return out

    def report_extras(self, results: dict[str, list[dict]]) -> dict:
        rows, untouched = [], untouched_student(self) if self.recipe.eval.answers else None
        for i, prompt in enumerate(self.heldout_prompts[:self.recipe.eval.generations]):
            students = {name: next((r["generations"][i] for r in per_seed if "generations" in r), "")
                        for name, per_seed in results.items()}
            students.update({"untouched student": untouched["generations"][i]} if untouched else {})
            rows.append({"prompt": prompt, "teacher": self.teacher_generations[i] if i < len(self.teacher_generations) else "",
                         "students": students})
        return {**({"untouched_student": untouched} if untouched else {}), **({"generations": rows} if rows else {})}

    def protocol(self) -> dict:
        r, sel = self.recipe, self.selection()
        return {
            "selection": f"best {sel['metric']}, evaluated every {sel['every']} steps on "
                         f"{sel['split_size']} validation sequences",
            "test": (f"held-out split of {len(self.test_set)} distinct addition problems ({r.data.addition_digits}-digit "
                     "operands, answers least significant digit first); exact_match = greedy answer equal to the "
                     "answer up to and including EOS" if r.data.source == "addition" else
                     f"held-out split of {len(self.test_set)} sequences (pydoc text + teacher-answered prompts)")
                    + ", used only for the final numbers; perplexity and KL are per target token",
            "notes": [
                f"teacher: {self.teacher.description}; student: {r.student.num_layers} layers, init={r.student.init}"
                + (" (from member 0's layers)" if len(self.teacher_models) > 1 and r.student.init == "teacher_layers" else ""),
                self._store_note() if self.store is not None else served_note(self) if r.teacher.url else
                "teacher final hidden states were computed once over the training set (text has no augmentation, "
                "so they equal a per-step teacher forward)" if r.teacher.precompute else "teacher ran every step",
                "every student has the same architecture, steps, batch and optimizer as the baseline",
                "tokens_per_s and peak_memory_mb (peak RSS growth during training, sampled) are measurements of "
                "this machine; all other numbers are deterministic",
            ],
            "splits": {"train": len(self.train_set), "val": len(self.val_set), "test": len(self.test_set)},
            "selection_metric": sel["metric"], "selection_higher_is_better": sel["higher_is_better"],
            "selection_every": sel["every"], "selection_split_size": sel["split_size"],
            # every target token of every training sequence is a label the students train on
            "label_fraction": 1.0, "labelled_examples": len(self.train_set),
            "teacher_targets": self.teacher_targets,
        }

    def _store_note(self) -> str:
        m, store = self.store.manifest, self.store
        held = ("kl_to_teacher and agreement use the store's held-out teacher log-probs (fp16, T=1)"
                if m.held_out is not None else "the store has no held-out targets: no kl_to_teacher or agreement")
        return (f"teacher targets came from the offline store {store.folder} ({store.describe()}, "
                f"{m.bytes_per_token} bytes/token, manifest sha256 {store.digest[:16]}); no teacher model was in "
                f"memory during training; {held}")
