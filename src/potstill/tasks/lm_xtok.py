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

A teacher store for the pair (``potstill store RECIPE``, ``--format hidden``: the teacher's final
hidden states over its own tokens of every training chunk, its LM head, and its held-out top-1 ids
and numbers) replaces the teacher model: a student trains from it exactly as from the live teacher
(up to the fp16 rounding of the states). A store built for another tokenizer pair, or in another
format, is refused before step one.

Not supported (refused before step one): chat data, and a served, ensemble or tiny teacher.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from potstill.core.errors import UserError
from potstill.core.hashing import tokenizer_sha256
from potstill.eval.xtok_metrics import span_agreement, span_top_tokens, text_metrics
from potstill.methods import method_class, method_config
from potstill.data.text.token_bytes import token_bytes
from potstill.models.hf import (final_logit_softcap, lm_hidden_and_head, load_causal_lm, load_tokenizer,
                                logits_from_hidden, make_student, stop_token_ids)
from potstill.models.params import count_params
from potstill.store.manifest import check_setup, check_tokenizer_pair
from potstill.store.source import CROSS_TOKENIZER_FORMATS_WHY, StoreSource, hidden_parts
from potstill.tasks.keep import freeze
from potstill.tasks.lm import LMTask
from potstill.tasks.lm_xtok_data import XTokBatches, build_xtok_data
from potstill.tasks.registry import OnStep, OnStepFactory
from potstill.teachers.cross_tokenizer import CrossTokenizerTeacher, StoredCrossTokenizerTeacher


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
            m, folder = self.store.manifest, self.store.folder
            check_tokenizer_pair(m, folder, teacher_sha256=tokenizer_sha256(self.teacher_tokenizer),
                                 student_sha256=tokenizer_sha256(self.student_tokenizer))
            if m.format != "hidden" or m.held_out is None:
                raise UserError(f"teacher store {folder} is a {m.format} store"
                                f"{'' if m.held_out else ' without held-out targets'}; a cross-tokenizer student "
                                "trains from a hidden-state store with held-out targets: `potstill store RECIPE "
                                "--format hidden` (the default for this recipe)")

    def prepare_teacher(self, on_step_factory: OnStepFactory) -> None:
        r, cfg = self.recipe, self.member_cfgs[0]
        self.tokenizer = self.student_tokenizer  # what the students are saved and evaluated with
        (self.xtrain, self.xval, self.xtest), self.skipped = build_xtok_data(r.data, self.student_tokenizer,
                                                                             self.teacher_tokenizer)
        self.train_set, self.val_set, self.test_set = self.xtrain.student, self.xval.student, self.xtest.student
        self.heldout_prompts, self.teacher_responses = [], []
        self.reused = False
        if self.store is not None:
            store = self.store
            check_setup(store.manifest, store.folder, seq_len=self.xtrain.teacher.seq_len,
                        dataset_fingerprint=self.xtrain.fingerprint(), num_examples=len(self.xtrain),
                        heldout_fingerprint=self.xtest.fingerprint())
            store.verify()
        else:
            model, _ = load_causal_lm(cfg.model, dtype=getattr(torch, cfg.dtype))
            self.teacher_model = freeze(model.to(self.runtime.device))
            self.teacher_models = [self.teacher_model]
        source, _ = load_causal_lm(r.student.model)
        self.student_source_layers = int(source.config.get_text_config().num_hidden_layers)
        try:
            self._student_template = make_student(source, num_layers=min(r.student.num_layers,
                                                                         self.student_source_layers), init="teacher_layers")
        except ValueError as error:
            raise UserError(f"student: {error}") from None
        del source
        self.student_vocab = int(self._student_template.get_output_embeddings().weight.shape[0])
        pair = {"student_tokenizer": self.student_tokenizer, "teacher_tokenizer": self.teacher_tokenizer,
                "student_vocab": self.student_vocab}
        if self.store is not None:
            self.teacher = StoredCrossTokenizerTeacher(self.store, f"{cfg.model} (its own tokenizer) via teacher store "
                                                       f"{self.store.folder} ({self.store.describe()})", **pair)
            self.teacher_targets = f"offline store {self.store.folder} (format {self.store.describe()})"
            return
        self.teacher = CrossTokenizerTeacher(self.teacher_model, f"{cfg.model} (its own tokenizer)", **pair)
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
            if self.store is None:
                self._teacher_held = self._held_out(self.teacher_model, "teacher")
            else:  # measured when the store was built; the top-1 ids of the span rows from its held-out targets
                metrics = (self.store.manifest.teacher_report or {}).get("metrics", {})
                self._teacher_held = {k: v["mean"] for k, v in metrics.items() if k != "params"}
                self._teacher_tops = self._stored_teacher_tops()
        return self._teacher_held

    def _stored_teacher_tops(self) -> list[bytes]:
        """What ``span_top_tokens`` gives for the teacher, from the store's exact held-out argmax (kept per
        row that predicts a label, sequence after sequence)."""
        split, table = self.xtest.teacher, token_bytes(self.teacher_tokenizer).table
        mask = split.view(slice(0, len(split))).target_mask()  # [n, T - 1]: row t predicts token t + 1
        argmax, width = self.store.heldout(0, len(split), "argmax"), mask.shape[1]
        flat_mask = mask.reshape(-1)
        where = flat_mask.long().cumsum(0) - 1  # each kept row's place in argmax
        out: list[bytes] = []
        for b, alignment in enumerate(self.xtest.alignments):
            rows = b * width + alignment.spans[:, 2] - 1
            if not bool(flat_mask[rows].all()):
                raise RuntimeError("a span row of the held-out text has no stored teacher target")
            out.extend(table[i] if i < len(table) else b"" for i in argmax[where[rows]].tolist())
        return out

    def teacher_report(self) -> dict:
        self.teacher_generations = []
        params = self.store.manifest.teacher.params if self.store is not None else count_params(self.teacher_model)
        values = {**self._teacher_numbers(), "params": params}
        return {"description": self.teacher.description, "reused": False, "params": params,
                **({"store": self.store.report_entry()} if self.store is not None else {}),
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

    def _store_note(self) -> str:
        m, store = self.store.manifest, self.store
        return (f"teacher targets came from the offline store {store.folder} ({store.describe()}, {m.bytes_per_token} "
                f"bytes/token and the LM head, manifest sha256 {store.digest[:16]}); no teacher model was in memory; "
                "the teacher's held-out numbers were measured when the store was built, span_agreement reads the "
                "store's exact held-out top-1 ids")

    def store_source(self) -> StoreSource:
        """The teacher over its own tokens of the chunks: final hidden states of the training split
        (``--format hidden``, the one format the cross-tokenizer losses can use) and T=1 log-probs of the
        held-out split; fingerprints over both tokenizations, and both tokenizers' hashes."""
        model, train, test = self.teacher_model, self.xtrain.teacher, self.xtest.teacher
        vocab = int(model.get_output_embeddings().weight.shape[0])

        @torch.no_grad()
        def logits(split: str, start: int, stop: int) -> torch.Tensor:
            view = {"train": train, "test": test}[split].view(slice(start, stop))
            hidden, weight, bias = lm_hidden_and_head(model, view.input_ids, view.attention_mask, allow_softcap=True)
            return logits_from_hidden(hidden, weight, bias, final_logit_softcap(model)).float()

        return StoreSource(
            task="lm", recipe=self.recipe.name, vocab_size=vocab, seq_len=train.seq_len, num_examples=len(train),
            heldout_examples=len(test), batch_size=max(1, min(16, (1 << 27) // (4 * train.seq_len * vocab))),
            logits=logits, heldout_mask=lambda start, stop: test.view(slice(start, stop)).target_mask(),
            dataset_fingerprint=self.xtrain.fingerprint(), heldout_fingerprint=self.xtest.fingerprint(),
            tokenizer_sha256=tokenizer_sha256(self.teacher_tokenizer),
            student_tokenizer_sha256=tokenizer_sha256(self.student_tokenizer),
            teacher=self._teacher_identity(), teacher_report=self.teacher_report,
            formats=("hidden",), formats_why=CROSS_TOKENIZER_FORMATS_WHY, **hidden_parts(model, train))


LMTask.variants.append((lambda recipe: bool(recipe.student.model), CrossTokenizerLMTask))
