"""The LM task with a student that has its own tokenizer (``student.model``): cross-tokenizer distillation.

The students start from a pretrained model of another family (layer-pruned to ``student.num_layers``
evenly spaced layers of its own) and train on pydoc text chunks that both tokenizers hold
(:mod:`potstill.tasks.lm_xtok_data`); every batch carries both tokenizations and their alignments,
and the cross-tokenizer methods (``uld``, ``hybrid``, ``hybrid_onpolicy``) compare the two models'
next-token distributions on the aligned spans. ``lm_ce`` (the baseline) trains on the student's
tokens alone. Checkpoints are chosen by the student's validation perplexity (one tokenizer across
students, so it ranks them); the held-out numbers are bits per byte (comparable across tokenizers,
so the teacher's and the untouched student's sit beside the students') and span agreement
(:mod:`potstill.eval.xtok_metrics`).

Not supported (refused before step one): chat data, a served, ensemble or tiny teacher, and training
from a teacher store (a store built for another tokenizer pair is refused as such first).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from potstill.core.errors import UserError
from potstill.core.hashing import tokenizer_sha256
from potstill.eval.xtok_metrics import span_agreement, span_top_tokens, text_metrics
from potstill.methods import method_class, method_config
from potstill.models.hf import load_causal_lm, load_tokenizer, make_student, stop_token_ids
from potstill.models.params import count_params
from potstill.store.manifest import check_tokenizer_pair
from potstill.tasks.keep import freeze
from potstill.tasks.lm import LMTask
from potstill.tasks.lm_xtok_data import XTokBatches, build_xtok_data
from potstill.tasks.registry import OnStep, OnStepFactory
from potstill.teachers.cross_tokenizer import CrossTokenizerTeacher


class CrossTokenizerLMTask(LMTask):
    primary_metric = "bits_per_byte"
    higher_is_better = {**LMTask.higher_is_better, "bits_per_byte": False, "span_agreement": True}

    def __init__(self, recipe):
        super().__init__(recipe)
        r, cfg = recipe, self.member_cfgs[0]
        if r.teacher.url or r.teacher.ensemble is not None or cfg.model == "tiny":
            raise UserError("a cross-tokenizer run (student.model) needs one local teacher model: drop teacher.url and "
                            "teacher.ensemble, and name a built-in or local model as teacher.model")
        if r.student.init != "teacher_layers":
            raise UserError("with student.model the students start from that model's own layers: set "
                            "student.init=teacher_layers")
        self.student_tokenizer, self.teacher_tokenizer = load_tokenizer(r.student.model), load_tokenizer(cfg.model)
        if self.store is not None:
            check_tokenizer_pair(self.store.manifest, self.store.folder,
                                 teacher_sha256=tokenizer_sha256(self.teacher_tokenizer),
                                 student_sha256=tokenizer_sha256(self.student_tokenizer))
            raise UserError("training a cross-tokenizer student from a teacher store is not supported yet; drop "
                            "teacher.store (the teacher then runs in the process)")

    def prepare_teacher(self, on_step_factory: OnStepFactory) -> None:
        r, cfg = self.recipe, self.member_cfgs[0]
        self.tokenizer = self.student_tokenizer  # what the students are saved and evaluated with
        (self.xtrain, self.xval, self.xtest), self.skipped = build_xtok_data(r.data, self.student_tokenizer,
                                                                             self.teacher_tokenizer)
        self.train_set, self.val_set, self.test_set = self.xtrain.student, self.xval.student, self.xtest.student
        self.heldout_prompts, self.teacher_responses = [], []
        model, _ = load_causal_lm(cfg.model, dtype=getattr(torch, cfg.dtype))
        self.teacher_model = freeze(model.to(self.runtime.device))
        self.teacher_models, self.reused = [self.teacher_model], False
        source, _ = load_causal_lm(r.student.model)
        self.student_source_layers = int(source.config.get_text_config().num_hidden_layers)
        try:
            self._student_template = make_student(source, num_layers=min(r.student.num_layers,
                                                                         self.student_source_layers), init="teacher_layers")
        except ValueError as error:
            raise UserError(f"student: {error}") from None
        del source
        self.student_vocab = int(self._student_template.get_output_embeddings().weight.shape[0])
        self.teacher = CrossTokenizerTeacher(self.teacher_model, f"{cfg.model} (its own tokenizer)",
                                             student_tokenizer=self.student_tokenizer,
                                             teacher_tokenizer=self.teacher_tokenizer, student_vocab=self.student_vocab)
        self.teacher_targets = f"loaded from {cfg.model}"
        if cfg.precompute:
            t = self.xtrain.teacher
            self.teacher.precompute(t.input_ids, t.attention_mask,
                                    on_step=on_step_factory("teacher targets", len(self.xtrain)))

    def _new_student(self, seed: int) -> torch.nn.Module:
        student = copy.deepcopy(self._student_template)  # the pretrained weights: the seed orders the batches only
        student.generation_config.eos_token_id = stop_token_ids(student, self.student_tokenizer)
        if self.student_tokenizer.pad_token_id is not None:
            student.generation_config.pad_token_id = int(self.student_tokenizer.pad_token_id)
        return student.train()

    def check_student(self, name: str, cfg) -> str | None:
        method_cls = method_class(cfg.method, where=f"students.{name}.method")
        if method_cls.uses_teacher(method_config(cfg.method, cfg.params, where=f"students.{name}")) \
                and not getattr(method_cls, "cross_tokenizer", False):
            raise UserError(f"students.{name}.method '{cfg.method}' compares the teacher position by position, which "
                            "needs one tokenizer; across tokenizers use uld, hybrid or hybrid_onpolicy (or lm_ce)")
        return super().check_student(name, cfg)

    # ---------------------------------------------------------------- held-out numbers

    def _held_out(self, model: torch.nn.Module, side: str) -> dict[str, float]:
        split = self.xtest.student if side == "student" else self.xtest.teacher
        batch = self.recipe.eval.batch_size
        out = text_metrics(model, split, self.xtest.num_bytes, batch)
        tokenizer = self.student_tokenizer if side == "student" else self.teacher_tokenizer
        tops = span_top_tokens(model, split, self.xtest.alignments, tokenizer, side=side, batch_size=batch)
        if side == "teacher":
            self._teacher_tops = tops
        else:
            out["span_agreement"] = span_agreement(tops, self._teacher_tops)
        return out

    def _teacher_numbers(self) -> dict[str, float]:
        if not hasattr(self, "_teacher_held"):
            self._teacher_held = self._held_out(self.teacher_model, "teacher")
        return self._teacher_held

    def teacher_report(self) -> dict:
        values = {**self._teacher_numbers(), "params": count_params(self.teacher_model)}
        self.teacher_generations = []
        return {"description": self.teacher.description, "reused": False, "params": values["params"],
                "metrics": {k: {"mean": v, "std": 0.0, "values": [v]} for k, v in values.items()}}

    def untouched_student(self) -> dict:
        """The students' starting point, evaluated as they are (the same for every seed)."""
        if not hasattr(self, "_untouched"):
            self._teacher_numbers()
            student = self._new_student(self.recipe.seed)
            values = {**self._held_out(student, "student"), "params": count_params(student)}
            self._untouched = {"description": f"{self.recipe.student.model}, {self.recipe.student.num_layers} of "
                               f"{self.student_source_layers} layers, not trained",
                               "metrics": {k: {"mean": v, "std": 0.0, "values": [v]} for k, v in values.items()}}
        return self._untouched

    def run_student(self, name: str, cfg, seed: int, out_dir: Path, on_step: OnStep) -> dict:
        recipe = self.recipe
        method_cls = method_class(cfg.method, where=f"students.{name}.method")
        method_cfg = method_config(cfg.method, cfg.params, where=f"students.{name}")
        student = self._new_student(seed)
        teacher = self.teacher if method_cls.uses_teacher(method_cfg) else None
        method = method_cls(student, teacher, method_cfg, num_classes=self.student_vocab, num_train=len(self.xtrain))
        batches = XTokBatches(self.xtrain, recipe.train.batch_size, recipe.train.grad_accum, seed)
        student, result, elapsed, peak_mb = self._train_and_keep(name, cfg, seed, student, method, batches, out_dir,
                                                                 on_step, self.student_tokenizer)
        self._teacher_numbers()
        tokens = result.trained_items
        metrics = {**self._held_out(student, "student"), "params": count_params(student),
                   "tokens_per_s": tokens / elapsed if elapsed > 0 and tokens else 0.0, "peak_memory_mb": peak_mb}
        return {"metrics": metrics, "best_step": result.best_step, "best_val": result.best_value,
                "resumed_from": result.resumed_from, "artifact": "model", "parallel": result.parallel,
                "train_seconds": round(result.seconds, 3)}

    def report_extras(self, results: dict[str, list[dict]]) -> dict:
        return {"untouched_student": self.untouched_student()}

    def protocol(self) -> dict:
        out = super().protocol()
        n_bytes, n_spans = sum(self.xtest.num_bytes), sum(a.num_spans for a in self.xtest.alignments)
        out["test"] = (f"held-out split of {len(self.xtest)} pydoc text chunks ({n_bytes} bytes, {n_spans} aligned "
                       "spans), each tokenized by both sides; bits_per_byte = NLL of the text under the model's own "
                       "tokenization / (ln 2 * bytes); span_agreement = share of aligned spans where the student's and "
                       "the teacher's top-1 tokens spell the same bytes; perplexity is per token of each model's own "
                       "tokenizer (not comparable across tokenizers)")
        out["notes"] = [f"cross-tokenizer: teacher {self.recipe.teacher.model}, student {self.recipe.student.model} "
                        f"({min(self.recipe.student.num_layers, self.student_source_layers)} of "
                        f"{self.student_source_layers} layers, its own tokenizer); {len(self.teacher.vocab_map.student_ids)} "
                        "byte-identical token pairs in the hybrid's vocabulary map"
                        + (f"; {self.skipped} text chunks one tokenizer does not reproduce were left out"
                           if self.skipped else ""), *out["notes"][1:]]
        return out

    def store_source(self):
        raise UserError("`potstill store` for a cross-tokenizer run is not supported yet; drop student.model")


LMTask.variants.append((lambda recipe: bool(recipe.student.model), CrossTokenizerLMTask))
