"""Classification: data, the (kept) teacher, one student per (method, seed), and its evaluation.

With ``teacher.store`` the teacher is an offline store of its raw logits (``potstill store``): no
teacher model is built or loaded; the test-split logits for the fidelity metrics and the teacher's
report entry come from the store too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from safetensors.torch import load_file

from potstill.batches import ClassBatch
from potstill.config import RecipeBase, Strict, StudentConfig, TrainConfig, absolute_path
from potstill.core.device import resolve_runtime
from potstill.core.distributed import launched_world
from potstill.core.errors import UserError
from potstill.core.hashing import tensor_digest, weights_sha256
from potstill.data.classification import BatchSource, DataConfig, load_classification
from potstill.eval.metrics import classification_metrics, latency_ms, predict, reliability
from potstill.methods import method_class, method_config
from potstill.methods.ce import CrossEntropy
from potstill.models.classifiers import ClassifierModelConfig, build_classifier, load_classifier, save_classifier
from potstill.models.params import count_params
from potstill.store.manifest import TeacherIdentity, check_setup
from potstill.store.reader import StoreReader
from potstill.store.source import StoreSource
from potstill.tasks.keep import freeze, is_kept, keep_once
from potstill.tasks.registry import OnStep, OnStepFactory, TaskBase, register_task
from potstill.tasks.teacher_ensemble import EnsembleClassifier, EnsembleConfig, member_configs
from potstill.teachers.base import TeacherSpec
from potstill.teachers.ensemble import EnsembleTeacher, ensemble_capabilities
from potstill.teachers.local import LocalTeacher
from potstill.teachers.precomputed import PrecomputedTeacher
from potstill.teachers.store import StoreTeacher
from potstill.train.trainer import best_student, train


class TeacherConfig(Strict):
    renamed = {"cache": "store"}

    model: ClassifierModelConfig = Field(
        default_factory=lambda: ClassifierModelConfig(kind="cnn", channels=[32, 64], hidden=[128]),
        description="Teacher architecture (when the recipe trains its teacher).",
    )
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(steps=2000, lr=2e-3, eval_every=200, checkpoint_every=1000),
        description="Teacher training schedule.",
    )
    seed: int = Field(0, description="Seed of the teacher's training.")
    path: str | None = Field(None, description="Load teacher weights from this safetensors file instead of training one.")
    reuse: bool = Field(True, description="Reuse a kept teacher trained with the same config and data.")
    store: str | None = Field(None, description="Train from an offline teacher store written by `potstill store` "
                              "(a directory of the teacher's stored logits): no teacher model is loaded; the store "
                              "must match this recipe's data (checked before training; see docs/store.md).")

    ensemble: EnsembleConfig | None = Field(None, description="Teach with an ensemble of teachers, each one "
                                            "this section with a member's keys changed (docs/ensembles.md).")

    _absolute_store = field_validator("store")(absolute_path)

    @model_validator(mode="after")
    def _members_resolve(self) -> "TeacherConfig":
        if self.ensemble is not None:
            if self.path or self.store:
                raise ValueError("teacher.ensemble names its teachers as members: give a file as a member "
                                 "({path: ...}) instead of teacher.path; a store cannot be a member yet")
            member_configs(self)  # each member must be a valid teacher section (errors name the member)
        return self

    def members(self) -> list["TeacherConfig"]:
        return member_configs(self) if self.ensemble is not None else [self]


class EvalConfig(Strict):
    ece_bins: int = Field(15, gt=1, description="Bins of the expected calibration error.")
    latency_batches: list[int] = Field([1, 256], description="Batch sizes at which inference latency is timed.")
    latency_repeats: int = Field(20, gt=0, description="Timed repeats per latency measurement (median reported).")


class ClassificationRecipe(RecipeBase):
    task: Literal["classification"] = Field("classification", description="Task family.")
    threads: int | None = Field(1, description="torch intra-op threads (1 is fastest for these small models; null: torch's default).")
    data: DataConfig = Field(default_factory=DataConfig, description="Dataset and splits.")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="Teacher.")
    student: ClassifierModelConfig = Field(default_factory=ClassifierModelConfig, description="Student architecture (shared by all students).")
    students: dict[str, StudentConfig] = Field(
        default_factory=lambda: {"baseline": StudentConfig(method="ce"), "kd": StudentConfig(method="kd")},
        description="Students by name; 'baseline' should be the CE-only student.",
    )
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation settings.")


@register_task
class ClassificationTask(TaskBase):
    name = "classification"
    Recipe = ClassificationRecipe
    parallel_jobs = True
    primary_metric = "accuracy"
    curve_metric = "val/accuracy"
    higher_is_better = {"accuracy": True, "agreement": True, "kl_to_teacher": False, "ece": False,
                        "params": False, "latency_b1_ms": False, "latency_b256_ms": False}
    teacher_targets: str | None = None  # where the students' teacher targets came from, set by prepare_teacher

    def __init__(self, recipe: ClassificationRecipe):
        self.recipe = recipe
        self.runtime = resolve_runtime(recipe.device, recipe.precision)
        self.data = load_classification(recipe.data)
        self.teacher_info: dict = {}
        self.store = StoreReader(recipe.teacher.store) if recipe.teacher.store else None
        if self.store is not None:
            check_setup(self.store.manifest, self.store.folder, task="classification")
            if recipe.data.augment != "none":
                raise UserError(f"data.augment='{recipe.data.augment}' shows the teacher a new view every step, which a "
                                "teacher store cannot follow; set data.augment=none or drop teacher.store")

    # ---------------------------------------------------------------- teacher

    def _new_teacher_model(self) -> torch.nn.Module:
        return build_classifier(self.recipe.teacher.model, self.data.input_shape, self.data.num_classes)

    def teacher_spec(self) -> TeacherSpec:
        if self.store is not None:
            return TeacherSpec(f"store {self.store.folder}", StoreTeacher(self.store).capabilities)
        cfg = self.recipe.teacher
        if cfg.ensemble is not None:
            kinds = ", ".join(m.model.kind for m in cfg.members())
            return TeacherSpec(f"ensemble of {len(cfg.ensemble.members)} ({kinds}; {cfg.ensemble.rule()})",
                               ensemble_capabilities([LocalTeacher.capabilities] * len(cfg.ensemble.members)))
        return TeacherSpec(f"{cfg.model.kind} model", LocalTeacher.capabilities)

    def _keep_spec(self, cfg: TeacherConfig | None = None) -> dict:
        """What decides a trained teacher's weights (a member equal to a single teacher shares its key)."""
        cfg = cfg or self.recipe.teacher
        return {"model": cfg.model.model_dump(), "train": cfg.train.model_dump(), "seed": cfg.seed,
                "data": self.data.fingerprint, "augment": [self.recipe.data.augment, self.recipe.data.max_shift]}

    def _prepare_from_store(self) -> None:
        store, data = self.store, self.data
        check_setup(store.manifest, store.folder, vocab_size=data.num_classes,
                    dataset_fingerprint=tensor_digest(data.train.x, data.train.y), num_examples=len(data.train),
                    heldout_fingerprint=tensor_digest(data.test.x, data.test.y))
        store.verify()
        self.teacher = StoreTeacher(store, f"{store.manifest.teacher.description} via teacher store {store.folder}")
        self.teacher_info = {"description": self.teacher.description, "reused": False}
        self.teacher_targets = f"offline store {store.folder} (format {store.manifest.format})"
        held = store.manifest.held_out
        self.teacher_test_logits = store.heldout(0, held.num_examples).float() if held is not None else None

    def _train_teacher(self, model: torch.nn.Module, work_dir: Path, on_step: OnStep,
                       cfg: TeacherConfig | None = None) -> dict:
        cfg = cfg or self.recipe.teacher
        method = CrossEntropy(model, None, CrossEntropy.Config(), num_classes=self.data.num_classes,
                              num_train=len(self.data.train))
        batches = BatchSource(self.data, self.recipe.data, cfg.train.batch_size, cfg.train.grad_accum,
                              seed=cfg.seed, all_labelled=True)
        result = train(method, batches=batches, evaluate=lambda: self._val_metrics(model), cfg=cfg.train,
                       out_dir=work_dir, selection=self.curve_metric,
                       higher_is_better=self.higher_is_better[self.primary_metric], on_step=on_step,
                       runtime=self.runtime)
        method.load_state_dict(result.best_state)
        return {"best_step": result.best_step, "val_accuracy": result.best_value}

    def _load_or_train(self, cfg: TeacherConfig, label: str, where: str,
                       on_step_factory: OnStepFactory) -> tuple[torch.nn.Module, dict, str]:
        """One teacher model from ``cfg`` (loaded from its path, kept or trained now), its report entry
        and where it came from."""
        if cfg.path:
            model = build_classifier(cfg.model, self.data.input_shape, self.data.num_classes)
            path = Path(cfg.path)
            if not path.exists():
                raise UserError(f"{where} not found: {path}")
            try:
                model.load_state_dict(load_file(str(path)))
            except RuntimeError as error:
                raise UserError(f"{where} {path} does not fit its model: {str(error).splitlines()[0]}") from None
            return model, {"description": f"{cfg.model.kind} loaded from {path}", "reused": True}, f"loaded from {path}"
        torch.manual_seed(cfg.seed)
        model = build_classifier(cfg.model, self.data.input_shape, self.data.num_classes).to(self.runtime.device)
        reused, key = keep_once("classification", self._keep_spec(cfg), model, reuse=cfg.reuse, train=lambda work: (
            self._train_teacher(model, work, on_step_factory(label, cfg.train.steps), cfg)))
        info = {"description": f"{cfg.model.kind} {cfg.model.channels or ''}{cfg.model.hidden} "
                               f"trained by potstill (kept as {key})", "reused": reused}
        return model, info, f"kept teacher reused (key {key})" if reused else f"trained in this run (kept as {key})"

    def _served(self, teacher):
        if self.recipe.data.augment == "none":  # a training example's targets never change: computed once
            return PrecomputedTeacher(teacher, self.data.train.x, device=self.runtime.device,
                                      autocast=self.runtime.autocast)
        return teacher

    def prepare_teacher(self, on_step_factory: OnStepFactory) -> None:
        cfg = self.recipe.teacher
        if self.store is not None:
            return self._prepare_from_store()
        if cfg.ensemble is not None:
            return self._prepare_ensemble(on_step_factory)
        model, self.teacher_info, self.teacher_targets = self._load_or_train(cfg, "teacher", "teacher.path", on_step_factory)
        self.teacher_model = freeze(model.to(self.runtime.device))
        self.teacher = self._served(LocalTeacher(self.teacher_model, self.teacher_info["description"]))
        self.teacher_test_logits = predict(model, self.data.test.x)

    def _prepare_ensemble(self, on_step_factory: OnStepFactory) -> None:
        """Each member loaded or kept like a single teacher. With augment=none the ensemble's targets
        are computed once; with agreement weights, which read each batch's labels, each member's are,
        and the ensemble combines them per batch."""
        ens, models, members, sources = self.recipe.teacher.ensemble, [], [], []
        per_batch_labels = ens.weighting == "agreement"
        self.member_info = []
        for i, member_cfg in enumerate(self.recipe.teacher.members()):
            model, info, source = self._load_or_train(member_cfg, f"teacher {i}", f"teacher.ensemble.members.{i}.path",
                                                       on_step_factory)
            models.append(freeze(model.to(self.runtime.device)))
            member = LocalTeacher(models[-1], info["description"])
            members.append(self._served(member) if per_batch_labels else member)
            self.member_info.append(info)
            sources.append(f"member {i}: {source}")
        ensemble = EnsembleTeacher(members, ens.combine, ens.weighting, ens.weights,
                                   temperature=ens.temperature, tau=ens.tau)
        self.teacher = ensemble if per_batch_labels else self._served(ensemble)
        self.teacher_model = freeze(EnsembleClassifier(models, ens))
        self.teacher_info = {"description": f"ensemble of {len(models)} teachers ({ens.rule()})",
                             "reused": all(info["reused"] for info in self.member_info)}
        self.teacher_targets = f"ensemble of {len(models)} teachers, {ens.rule()}; " + "; ".join(sources)
        self.teacher_test_logits = predict(self.teacher_model, self.data.test.x)

    def teacher_report(self) -> dict:
        if self.store is not None:
            entry = dict(self.store.manifest.teacher_report or {})
            return {**entry, **self.teacher_info, "store": self.store.report_entry()}
        model, ev = self.teacher_model, self.recipe.eval
        metrics = classification_metrics(self.teacher_test_logits, self.data.test.y, None, ev.ece_bins)
        metrics["params"] = count_params(model)
        for b in ev.latency_batches:
            metrics[f"latency_b{b}_ms"] = latency_ms(model, self.data.test.x, b, ev.latency_repeats)
        entry = {**self.teacher_info, "params": metrics["params"],
                 "metrics": {k: {"mean": v, "std": 0.0, "values": [v]} for k, v in metrics.items()},
                 "reliability": reliability(self.teacher_test_logits, self.data.test.y, ev.ece_bins)}
        if self.recipe.teacher.ensemble is not None:
            entry["members"] = [{**info, "params": count_params(member),
                                 "metrics": classification_metrics(predict(member, self.data.test.x), self.data.test.y,
                                                                   self.teacher_test_logits, ev.ece_bins)}
                                for info, member in zip(self.member_info, model.members)]
        return entry

    def store_source(self) -> StoreSource:
        if self.recipe.data.augment != "none":
            raise UserError(f"data.augment='{self.recipe.data.augment}' gives the teacher a different view every step, "
                            "so stored targets would not match training; set data.augment=none")
        ensemble = self.recipe.teacher.ensemble
        if ensemble is not None and ensemble.weighting == "agreement":
            raise UserError("an agreement-weighted ensemble reads each batch's labels, which a store cannot "
                            "keep; store a uniform, fixed or confidence-weighted ensemble")
        model, data = self.teacher_model, self.data
        splits = {"train": data.train, "test": data.test}

        def logits(split: str, start: int, stop: int) -> torch.Tensor:
            return predict(model, splits[split].x[start:stop]).float()

        return StoreSource(
            task="classification", recipe=self.recipe.name, vocab_size=data.num_classes, seq_len=None,
            num_examples=len(data.train), heldout_examples=len(data.test), batch_size=1024, logits=logits,
            heldout_mask=None, dataset_fingerprint=tensor_digest(data.train.x, data.train.y),
            heldout_fingerprint=tensor_digest(data.test.x, data.test.y), tokenizer_sha256=None,
            teacher=TeacherIdentity(description=self.teacher_info["description"], weights_sha256=weights_sha256(model),
                                    params=count_params(model)),
            teacher_report=self.teacher_report)

    # ---------------------------------------------------------------- students

    def selection(self) -> dict:
        """How a student's checkpoint is chosen: what ``run_student`` passes to the trainer, and what the
        protocol reports (one source, so the two cannot drift apart)."""
        return {"metric": self.curve_metric, "higher_is_better": self.higher_is_better[self.primary_metric],
                "every": self.recipe.train.eval_every, "split_size": len(self.data.val)}

    def _val_metrics(self, model: torch.nn.Module) -> dict[str, float]:
        logits = predict(model, self.data.val.x)
        return {"val/accuracy": float((logits.argmax(-1) == self.data.val.y).float().mean()),
                "val/loss": float(F.cross_entropy(logits, self.data.val.y))}

    def check_student(self, name: str, cfg: StudentConfig) -> str | None:
        """Dry run on fresh models: the method's taps and connectors are built before anything trains."""
        method_cls = method_class(cfg.method, where=f"students.{name}.method")
        if method_cls.for_tokens:
            raise UserError(f"students.{name}.method '{cfg.method}' trains language models; use it in a task: lm recipe")
        method_cfg = method_config(cfg.method, cfg.params, where=f"students.{name}")
        student = build_classifier(self.recipe.student, self.data.input_shape, self.data.num_classes)
        teacher = LocalTeacher(self._new_teacher_model(), "dry run") if method_cls.uses_teacher(method_cfg) else None
        method = method_cls(student, teacher, method_cfg, num_classes=self.data.num_classes,
                            num_train=len(self.data.train))
        train = self.data.train
        method.setup(ClassBatch(train.x[:2], train.y[:2], self.data.labelled[:2], index=torch.arange(2)))
        return None

    def teacher_to_train(self) -> bool:
        """Whether ``prepare_teacher`` would train a teacher (none kept yet for this spec)."""
        if self.store is not None:
            return False
        return any(not (cfg.path or (cfg.reuse and is_kept("classification", self._keep_spec(cfg))))
                   for cfg in self.recipe.teacher.members())

    def trains_without_teacher(self, cfg: StudentConfig) -> bool:
        """Whether this student trains without the teacher (only its fidelity metrics read it, at the end)."""
        method_cls = method_class(cfg.method, where="method")
        return not method_cls.uses_teacher(method_config(cfg.method, cfg.params, where="params"))

    def run_student(self, name: str, cfg: StudentConfig, seed: int, out_dir: Path, on_step: OnStep) -> dict:
        student, trained = self._train_student(name, cfg, seed, out_dir, on_step)
        return self._evaluate_student(student, trained)

    # The two halves of run_student, for a worker that trains a teacher-free student while the
    # teacher trains elsewhere: train_student needs no teacher, evaluate_student (later) does.

    def train_student(self, name: str, cfg: StudentConfig, seed: int, out_dir: Path, on_step: OnStep) -> dict:
        return self._train_student(name, cfg, seed, out_dir, on_step)[1]

    def evaluate_student(self, out_dir: Path, trained: dict) -> dict:
        return self._evaluate_student(load_classifier(out_dir).to(self.runtime.device), trained)

    def _train_student(self, name: str, cfg: StudentConfig, seed: int, out_dir: Path,
                       on_step: OnStep) -> tuple[torch.nn.Module, dict]:
        recipe = self.recipe
        method_cls = method_class(cfg.method, where=f"students.{name}.method")
        method_cfg = method_config(cfg.method, cfg.params, where=f"students.{name}")
        torch.manual_seed(seed)
        student = build_classifier(recipe.student, self.data.input_shape, self.data.num_classes)
        teacher = self.teacher if method_cls.uses_teacher(method_cfg) else None
        method = method_cls(student, teacher, method_cfg, num_classes=self.data.num_classes,
                            num_train=len(self.data.train))
        batches = BatchSource(self.data, recipe.data, recipe.train.batch_size, recipe.train.grad_accum, seed)
        method.setup(batches.batch(0))
        selection = self.selection()
        result = train(method, batches=batches, evaluate=lambda: self._val_metrics(student), cfg=recipe.train,
                       out_dir=out_dir, selection=selection["metric"], higher_is_better=selection["higher_is_better"],
                       on_step=on_step, runtime=self.runtime, strategy=recipe.distributed.strategy)
        student = best_student(method, result, lambda: build_classifier(recipe.student, self.data.input_shape,
                                                                         self.data.num_classes).to(self.runtime.device))
        if launched_world().is_main:
            save_classifier(student, recipe.student, self.data.input_shape, self.data.num_classes, out_dir,
                            provenance={"recipe": recipe.name, "task": "classification", "student": name,
                                        "method": cfg.method, "params": cfg.params, "seed": seed,
                                        "selected_step": result.best_step,
                                        "selected_value": {"val/accuracy": result.best_value},
                                        "teacher": teacher.description if teacher is not None else None})
        return student, {"best_step": result.best_step, "best_val": result.best_value,
                         "resumed_from": result.resumed_from, "parallel": result.parallel,
                         "train_seconds": round(result.seconds, 3)}

    def _evaluate_student(self, student: torch.nn.Module, trained: dict) -> dict:
        ev = self.recipe.eval
        logits = predict(student, self.data.test.x)
        metrics = classification_metrics(logits, self.data.test.y, self.teacher_test_logits, ev.ece_bins)
        metrics["params"] = count_params(student)
        for b in ev.latency_batches:
            metrics[f"latency_b{b}_ms"] = latency_ms(student, self.data.test.x, b, ev.latency_repeats)
        return {"metrics": metrics, **trained, "artifact": ".",
                "reliability": reliability(logits, self.data.test.y, ev.ece_bins)}

    def protocol(self) -> dict:
        r, data, sel = self.recipe, self.data, self.selection()
        labelled = int(data.labelled.sum())
        notes = [
            f"teacher and students see the same augmented view (random shifts up to {r.data.max_shift} px)"
            if r.data.augment == "shift" else "no augmentation",
            f"students may use labels of {labelled} of the {len(data.train)} training examples "
            f"({r.data.label_fraction:.0%}); the teacher's targets cover all of them" if labelled < len(data.train) else
            f"all {len(data.train)} training labels are used by every student",
            "every student has the same architecture, steps, batch size and optimizer as the baseline",
            "latency is a timing of this machine: it varies between runs; all other numbers are deterministic",
        ]
        ensemble = r.teacher.ensemble
        if ensemble is not None:
            notes.insert(0, f"the teacher is an ensemble of {len(ensemble.members)} ({ensemble.rule()}; "
                            "docs/ensembles.md); its test numbers and the students' fidelity metrics use label-free "
                            "weights" + (": agreement weights read the labels of the labelled training rows only, "
                                         "every other row gets confidence weights" if ensemble.weighting == "agreement"
                                         else ""))
        if self.store is not None:
            notes.insert(0, f"teacher logits came from the offline store {self.store.folder} (fp32 raw logits, "
                            f"manifest sha256 {self.store.digest[:16]}); no teacher model was loaded; teacher "
                            "latency was measured when the store was built")
        return {"selection": f"best {sel['metric']}, evaluated every {sel['every']} steps on a validation split "
                             f"of {sel['split_size']} examples carved from the training data",
                "test": f"held-out test split of {len(data.test)} examples (data.split_seed={r.data.split_seed}), "
                        "used only for the final numbers",
                "notes": notes,
                "splits": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
                "selection_metric": sel["metric"], "selection_higher_is_better": sel["higher_is_better"],
                "selection_every": sel["every"], "selection_split_size": sel["split_size"],
                "label_fraction": r.data.label_fraction, "labelled_examples": labelled,
                "teacher_targets": self.teacher_targets}
