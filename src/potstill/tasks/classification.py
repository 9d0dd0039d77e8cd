"""Classification: data, the (kept) teacher, one student per (method, seed), and its evaluation.

With ``teacher.cache`` the teacher is an offline store of its raw logits (``potstill cache``): no
teacher model is built or loaded; the test-split logits for the fidelity metrics and the teacher's
report entry come from the store too.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from potstill.core.paths import cache_dir
from potstill.config import ClassificationRecipe, StudentConfig
from potstill.data.classification import BatchSource, load_classification
from potstill.engine.checkpoint import atomic_write_json, save_tensors
from potstill.engine.trainer import train
from potstill.core.errors import UserError
from potstill.eval.metrics import classification_metrics, latency_ms, predict, reliability
from potstill.methods import method_class, method_config
from potstill.methods.ce import CrossEntropy
from potstill.methods.feature_base import FeatureMethod
from potstill.models.classifiers import build_classifier, count_parameters
from potstill.store.manifest import check_setup
from potstill.store.reader import StoreReader
from potstill.store.source import tensor_digest
from potstill.store.teacher import StoreTeacher
from potstill.teachers.local import LocalTeacher

OnStep = Callable[[int, dict[str, float]], None]


class ClassificationTask:
    primary_metric = "accuracy"
    curve_metric = "val/accuracy"
    higher_is_better = {"accuracy": True, "agreement": True, "kl_to_teacher": False, "ece": False,
                        "params": False, "latency_b1_ms": False, "latency_b256_ms": False}

    def __init__(self, recipe: ClassificationRecipe):
        self.recipe = recipe
        self.data = load_classification(recipe.data)
        self.teacher_info: dict = {}
        self.store = StoreReader(recipe.teacher.cache) if recipe.teacher.cache else None
        if self.store is not None:
            check_setup(self.store.manifest, self.store.folder, task="classification")
            if recipe.data.augment != "none":
                raise UserError(f"data.augment='{recipe.data.augment}' shows the teacher a new view every step, which a "
                                "teacher store cannot follow; set data.augment=none or drop teacher.cache")

    # ---------------------------------------------------------------- teacher

    def teacher_key(self) -> str:
        spec = {"model": self.recipe.teacher.model.model_dump(), "train": self.recipe.teacher.train.model_dump(),
                "seed": self.recipe.teacher.seed, "data": self.data.fingerprint,
                "augment": [self.recipe.data.augment, self.recipe.data.max_shift], "format": 1}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]

    def _new_teacher_model(self) -> torch.nn.Module:
        return build_classifier(self.recipe.teacher.model, self.data.input_shape, self.data.num_classes)

    def _prepare_from_store(self) -> None:
        store, data = self.store, self.data
        check_setup(store.manifest, store.folder, vocab_size=data.num_classes,
                    dataset_fingerprint=tensor_digest(data.train.x, data.train.y), num_examples=len(data.train),
                    heldout_fingerprint=tensor_digest(data.test.x, data.test.y))
        store.verify()
        self.teacher = StoreTeacher(store, f"{store.manifest.teacher.description} via teacher store {store.folder}")
        self.teacher_info = {"description": self.teacher.description, "reused": False}
        held = store.manifest.held_out
        self.teacher_test_logits = store.heldout(0, held.num_examples).float() if held is not None else None

    def prepare_teacher(self, on_step_factory: Callable[[str, int], OnStep]) -> None:
        cfg = self.recipe.teacher
        if self.store is not None:
            return self._prepare_from_store()
        model = self._new_teacher_model()
        if cfg.path:
            path = Path(cfg.path)
            if not path.exists():
                raise UserError(f"teacher.path not found: {path}")
            try:
                model.load_state_dict(load_file(str(path)))
            except RuntimeError as error:
                raise UserError(f"teacher.path {path} does not fit teacher.model: {str(error).splitlines()[0]}") from None
            self.teacher_info = {"description": f"{cfg.model.kind} loaded from {path}", "reused": True}
        else:
            kept = cache_dir() / "teachers" / self.teacher_key()
            if cfg.reuse and (kept / "teacher.safetensors").exists():
                model.load_state_dict(load_file(str(kept / "teacher.safetensors")))
                reused = True
            else:
                reused = False
                partial = kept.with_name(kept.name + ".partial")  # resumable: checkpoints live here
                torch.manual_seed(cfg.seed)
                model = self._new_teacher_model()
                method = CrossEntropy(model, None, CrossEntropy.Config(), num_classes=self.data.num_classes,
                                      num_train=len(self.data.train))
                batches = BatchSource(self.data, self.recipe.data, cfg.train.batch_size, cfg.train.grad_accum,
                                      seed=cfg.seed, all_labelled=True)
                result = train(method, batches=batches, evaluate=lambda: self._val_metrics(model), cfg=cfg.train,
                               out_dir=partial, selection="val/accuracy",
                               on_step=on_step_factory("teacher", cfg.train.steps))
                method.load_state_dict(result.best_state)
                partial.mkdir(parents=True, exist_ok=True)
                save_tensors(partial / "teacher.safetensors", model.state_dict())
                atomic_write_json(partial / "info.json", {"key": self.teacher_key(), "best_step": result.best_step,
                                                          "val_accuracy": result.best_value})
                shutil.rmtree(partial / "checkpoint", ignore_errors=True)
                shutil.rmtree(kept, ignore_errors=True)
                partial.rename(kept)
            self.teacher_info = {"description": f"{cfg.model.kind} {cfg.model.channels or ''}{cfg.model.hidden} "
                                                f"trained by potstill (kept as {self.teacher_key()})",
                                 "reused": reused}
        self.teacher = LocalTeacher(model, self.teacher_info["description"])
        self.teacher_test_logits = predict(model, self.data.test.x)
        self.teacher_val_logits = predict(model, self.data.val.x)

    def teacher_report(self) -> dict:
        if self.store is not None:
            entry = dict(self.store.manifest.teacher_report or {})
            return {**entry, **self.teacher_info, "store": self.store.report_entry()}
        model, ev = self.teacher.model, self.recipe.eval
        metrics = classification_metrics(self.teacher_test_logits, self.data.test.y, None, ev.ece_bins)
        metrics["params"] = count_parameters(model)
        for b in ev.latency_batches:
            metrics[f"latency_b{b}_ms"] = latency_ms(model, self.data.test.x, b, ev.latency_repeats)
        return {**self.teacher_info, "params": metrics["params"],
                "metrics": {k: {"mean": v, "std": 0.0, "values": [v]} for k, v in metrics.items()},
                "reliability": reliability(self.teacher_test_logits, self.data.test.y, ev.ece_bins)}

    # ---------------------------------------------------------------- students

    def _val_metrics(self, model: torch.nn.Module) -> dict[str, float]:
        logits = predict(model, self.data.val.x)
        return {"val/accuracy": float((logits.argmax(-1) == self.data.val.y).float().mean()),
                "val/loss": float(F.cross_entropy(logits, self.data.val.y))}

    def check_student(self, name: str, cfg: StudentConfig) -> None:
        """Validate a student's method, params and feature taps (dry run on fresh models) before anything trains."""
        method_cls = method_class(cfg.method, where=f"students.{name}.method")
        method_cfg = method_config(cfg.method, cfg.params, where=f"students.{name}")
        if self.store is not None and issubclass(method_cls, FeatureMethod):
            raise UserError(f"students.{name}: method '{cfg.method}' taps teacher features "
                            f"('{method_cfg.teacher_layer}'), but teacher.cache holds only the teacher's logits; "
                            "drop this student or train with the teacher model")
        student = build_classifier(self.recipe.student, self.data.input_shape, self.data.num_classes)
        teacher = LocalTeacher(self._new_teacher_model(), "dry run") if method_cls.uses_teacher else None
        method = method_cls(student, teacher, method_cfg, num_classes=self.data.num_classes,
                            num_train=len(self.data.train))
        method.setup({"x": self.data.train.x[:2], "y": self.data.train.y[:2],
                      "labelled": self.data.labelled[:2], "index": torch.arange(2)})

    def run_student(self, name: str, cfg: StudentConfig, seed: int, out_dir: Path, on_step: OnStep) -> dict:
        recipe = self.recipe
        method_cls = method_class(cfg.method, where=f"students.{name}.method")
        method_cfg = method_config(cfg.method, cfg.params, where=f"students.{name}")
        torch.manual_seed(seed)
        student = build_classifier(recipe.student, self.data.input_shape, self.data.num_classes)
        teacher = self.teacher if method_cls.uses_teacher else None
        method = method_cls(student, teacher, method_cfg, num_classes=self.data.num_classes,
                            num_train=len(self.data.train))
        batches = BatchSource(self.data, recipe.data, recipe.train.batch_size, recipe.train.grad_accum, seed)
        method.setup(batches.batch(0))
        result = train(method, batches=batches, evaluate=lambda: self._val_metrics(student), cfg=recipe.train,
                       out_dir=out_dir, selection="val/accuracy", on_step=on_step)
        method.load_state_dict(result.best_state)
        save_tensors(out_dir / "student.safetensors", student.state_dict())

        ev = recipe.eval
        logits = predict(student, self.data.test.x)
        metrics = classification_metrics(logits, self.data.test.y, self.teacher_test_logits, ev.ece_bins)
        metrics["params"] = count_parameters(student)
        for b in ev.latency_batches:
            metrics[f"latency_b{b}_ms"] = latency_ms(student, self.data.test.x, b, ev.latency_repeats)
        return {"metrics": metrics, "best_step": result.best_step, "best_val": result.best_value,
                "resumed_from": result.resumed_from,
                "reliability": reliability(logits, self.data.test.y, ev.ece_bins)}

    def protocol(self) -> dict:
        r = self.recipe
        notes = [
            f"teacher and students see the same augmented view (random shifts up to {r.data.max_shift} px)"
            if r.data.augment == "shift" else "no augmentation",
            f"students may use labels of {r.data.label_fraction:.0%} of the {len(self.data.train)} training examples; "
            "the teacher's targets cover all of them" if r.data.label_fraction < 1 else
            f"all {len(self.data.train)} training labels are used by every student",
            "every student has the same architecture, steps, batch size and optimizer as the baseline",
            "latency is a timing of this machine: it varies between runs; all other numbers are deterministic",
        ]
        if self.store is not None:
            notes.insert(0, f"teacher logits came from the offline store {self.store.folder} (fp32 raw logits, "
                            f"manifest sha256 {self.store.digest[:16]}); no teacher model was loaded; teacher "
                            "latency was measured when the store was built")
        return {"selection": f"best val/accuracy, evaluated every {r.train.eval_every} steps on a validation split "
                             f"of {len(self.data.val)} examples carved from the training data",
                "test": f"held-out test split of {len(self.data.test)} examples (data.split_seed={r.data.split_seed}), "
                        "used only for the final numbers",
                "notes": notes}
