"""Benchmark: potstill vs TRL, on-policy distillation (GKD, lambda = 1), generation included.

Every step, the student samples continuations of the step's prompts, the teacher scores them token
by token, and the student takes one optimizer step on the generalized JSD (beta = 0.5) between
the two next-token distributions, summed over the sampled tokens and divided by their count. All
sides get the same:

* teacher: SmolLM2-135M-Instruct (``--tiny``: a random 2-layer Llama, hidden 64, on SmolLM2's
  tokenizer, for a quick debug run); student: ``make_student(teacher, num_layers=1,
  init="teacher_layers")``, the same initial weights on every side;
* prompts: ``potstill.data.text.PROMPTS`` (the project's instruction prompts, in file order, cycled
  if a run needs more), each as one user turn through the tokenizer's chat template with the
  generation prompt (the system turn the template adds included): 34-44 tokens; in
  potstill's ``TokenBatches`` order, which TRL reads sequentially;
* sampling: temperature 1, no top-k / top-p, at most ``--max-new-tokens`` new tokens (a row stops
  after the EOS id, which is kept as a target);
* optimizer: torch AdamW, fused kernel (TRL: ``optim="adamw_torch_fused"``), constant lr, no weight
  decay, grad-norm clipping at 1.0; float32; no gradient checkpointing (see below); batch
  ``--batch``, one micro-batch per step.

Configurations:

* ``trl-gkd``: ``trl.experimental.gkd.GKDTrainer``, ``lmbda=1`` (every step on-policy),
  ``beta=0.5``, ``temperature=1`` (its sampling temperature; its loss runs at T = 1), generation
  through transformers' ``generate`` (KV cache on). The collated batch carries no ``labels``, so
  transformers passes no ``num_items_in_batch`` and GKD's loss is its ``batchmean`` over the
  sampled tokens (with dataset labels, it would divide by the dataset's label count instead).
  Per step: generate, teacher forward with [B, T, V] logits, student forward with [B, T, V]
  logits, dense log-softmaxes and the JSD mixture over [B, T-1, V], backward, clip, AdamW. TRL has
  no memory option for this trainer that helps on CPU: gradient checkpointing also turns off the
  KV cache of its generation (``use_cache=False``), and the one-layer student's activations are
  small next to the [B, T, V] tensors; ``trl-gkd+gc`` runs it on request (``--only``).
* ``trl-distill``: ``trl.DistillationTrainer`` (TRL 1.16's stable trainer, always on-policy) with
  ``beta=0.5``, ``temperature=1`` (sampling and loss), ``max_completion_length`` = the new tokens,
  ``top_k=0``, ``top_p=1``, ``shuffle_dataset=False``, conversational prompts (it applies the same
  chat template), ``bf16=False`` and ``gradient_checkpointing=False`` (its defaults are True: bf16
  would change the arithmetic; ``trl-distill+gc`` keeps its checkpointing default, on request).
  Its loss is the same objective computed chunk by chunk from hidden states (on CPU it projects
  every completion position, padding included, then masks), normalised by the sampled tokens.
* ``potstill``: ``potstill.train.trainer.train`` with method ``gkd`` (``lmbda=1``, ``divergence=jsd``,
  ``beta=0.5``, ``temperature=1``, ``sampling_temperature=1``, ``top_p=1``), its own KV-cache
  sampler (``potstill.models.hf.rollout``) and the chunked loss; ``LMTeacher`` runs the teacher on
  every rollout.

Measured, each configuration in its own process, one at a time, ``--repeats`` interleaved rounds
with the order rotated by one each round: steps/s over the timed steps (end-of-step timestamps of
steps ``warmup+1 .. warmup+steps``, generation included; one more untimed step keeps end-of-training
work out), generated tokens/s (the sampled tokens those steps trained on / the same wall time),
CPU s/step, peak RSS growth (sampled every 5 ms from the baseline: models loaded and paged in),
and where a step's time goes: generation, the teacher's forward, the rest of the loss forward
(student forward, vocabulary projections, divergence), backward + clipping, optimizer, other.
Cells: median [min-max] over rounds; ratios potstill / TRL per round, median [min-max]. The 1-min
load average is sampled before and after every run.

Loss agreement: the sides sample different sequences (different generators), so their losses
cannot be compared step for step. A separate process checks, at the initial weights, potstill's
``gkd`` loss on each TRL trainer's first-step samples against the loss that trainer computed, and
TRL's ``GKDTrainer.generalized_jsd_loss`` on potstill's first-step samples against potstill's.

Usage::

    python benchmarks/vs_trl_onpolicy.py [--tiny] [--steps 10] [--warmup 2] [--batch 4]
        [--max-new-tokens 32] [--repeats 3] [--threads N] [--only NAME ...] [--json PATH]
        [--write-docs]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import DOCS, describe_load, machine, source_digest, spread, write_section  # noqa: E402  benchmarks/ is on sys.path when run as a script
import torch  # noqa: E402

from potstill.eval.metrics import PeakMemory  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("trl-gkd", "trl-distill", "potstill")
EXTRA = ("trl-gkd+gc", "trl-distill+gc")  # run only with --only
TEACHER = "smollm2-135m-instruct"
PHASES = ("generate", "teacher", "loss", "backward", "optimizer", "other")
PHASE_LABELS = {"generate": "generation", "teacher": "teacher forward", "loss": "student forward + loss",
                "backward": "backward + clip", "optimizer": "optimizer", "other": "other"}


class Clock:
    """End-of-step timestamps (wall, process CPU), per-step phase times, and the peak RSS growth
    (potstill's PeakMemory, every 5 ms) from the clock's creation to the end of step ``last``.

    Phases: ``generate`` and ``loss`` (the loss forward, teacher included) are timed by the side's
    own wrappers; ``teacher`` by hooks on the teacher's decoder; the optimizer by torch's global
    optimizer-step hooks; ``backward`` runs from the end of the loss forward to the optimizer step
    (backward and gradient clipping); ``other`` is the rest of the step."""

    def __init__(self, last: int, teacher: torch.nn.Module):
        self.memory, self.last, self.wall, self.cpu, self.peak_mb = PeakMemory(0.005).__enter__(), last, [], [], None
        self.phases, self.current, self.forward_end, self.depth, self.opened = [], {}, None, 0, None
        decoder = teacher.get_decoder() if hasattr(teacher, "get_decoder") else teacher.model
        decoder.register_forward_pre_hook(lambda *_: self.open("teacher"))
        decoder.register_forward_hook(lambda *_: self.close("teacher"))
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
        register_optimizer_step_pre_hook(lambda *_: self.optimizer(True))
        register_optimizer_step_post_hook(lambda *_: self.optimizer(False))

    def add(self, phase: str, seconds: float) -> None:
        self.current[phase] = self.current.get(phase, 0.0) + seconds

    def open(self, phase: str) -> None:
        self.opened = (phase, time.perf_counter())

    def close(self, phase: str) -> None:
        if self.opened and self.opened[0] == phase:
            self.add(phase, time.perf_counter() - self.opened[1])
        self.opened = None

    def loss_done(self, started: float) -> None:
        self.forward_end = time.perf_counter()
        self.add("loss_total", self.forward_end - started)

    def optimizer(self, pre: bool) -> None:  # nested optimizers (a wrapper's step calls torch's) count once
        now = time.perf_counter()
        if pre:
            if self.depth == 0:
                self.optimizer_start = now
                if self.forward_end is not None:
                    self.add("backward", now - self.forward_end)
                    self.forward_end = None
            self.depth += 1
        else:
            self.depth -= 1
            if self.depth == 0:
                self.add("optimizer", now - self.optimizer_start)

    def tick(self, step: int) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.phases.append(self.current)
        self.current = {}
        if step == self.last:
            self.memory.__exit__(None, None, None)
            self.peak_mb = self.memory.peak_mb


def load(args):
    """Teacher, tokenizer, student, the prompts as token ids (the chat template's rendering, checked
    against potstill's ``format_prompt``), and potstill's batches over them."""
    from potstill.data.text import PROMPTS
    from potstill.data.text.chat import encode_chat
    from potstill.data.tokens import TokenBatches, TokenSplit
    from potstill.models.hf import format_prompt, load_builtin, load_tokenizer, make_student, tiny_llama
    from potstill.models.params import count_params
    if args.tiny:
        tokenizer = load_tokenizer(TEACHER)
        teacher = tiny_llama(len(tokenizer), hidden_size=64, intermediate_size=128, num_layers=2, seed=0,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    else:
        teacher, tokenizer = load_builtin(TEACHER)
    student = make_student(teacher, num_layers=args.layers, init="teacher_layers", seed=0)
    total = args.warmup + args.steps + 1
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(total * args.batch)]
    prompt_ids = [list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                     tokenize=True, return_dict=True)["input_ids"]) for text in texts]
    for text, ids in zip(texts, prompt_ids):  # the same ids as potstill's own prompt formatting gives
        assert ids == list(tokenizer(format_prompt(tokenizer, text), add_special_tokens=False)["input_ids"]), text
    width = max(map(len, prompt_ids)) + 8
    # potstill's rows: a chat example with an empty response (its end-of-turn tokens are the targets);
    # gkd prompts with everything before the first target, i.e. exactly ``prompt_ids``
    rows = [encode_chat(tokenizer, text, "", width) for text in texts]
    split = TokenSplit.stack(rows)
    for row, ids in zip(rows, prompt_ids):
        first = int((row["labels"] != -100).float().argmax())
        assert row["input_ids"][:first].tolist() == ids
    batches = TokenBatches(split, args.batch, 1, seed=0)
    order = torch.cat([batches.order.step_indices(step) for step in range(total)]).tolist()
    with torch.no_grad():  # the weights are memory-mapped: page them in before the RSS baseline
        sum(float(p.sum()) for p in [*teacher.parameters(), *student.parameters()])
    info = {"teacher_params": count_params(teacher), "student_params": count_params(student),
            "prompt_tokens": [len(ids) for ids in prompt_ids], "vocab": len(tokenizer)}
    return teacher, tokenizer, student, texts, prompt_ids, order, batches, total, info


def compact(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> list[dict]:
    """Rows as their attended tokens only (left or right padding dropped), with their labels."""
    return [{"ids": i[m.bool()].tolist(), "labels": l[m.bool()].tolist()} for i, m, l in zip(ids, mask, labels)]


def trl_config_common(args, total: int) -> dict:
    gc = args.worker.endswith("+gc")
    return dict(output_dir=args.tmp, max_steps=total, per_device_train_batch_size=args.batch,
                gradient_accumulation_steps=1, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
                weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch_fused", bf16=False, gradient_checkpointing=gc,
                logging_steps=total, save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
                seed=0)


def run_trl_gkd(args, teacher, tokenizer, student, texts, prompt_ids, order, total, clock) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer
    record = {"losses": [], "num_items": [], "generated": []}
    pad = tokenizer.pad_token_id

    class Recorded(GKDTrainer):  # times and records what TRL does; changes nothing
        def generate_on_policy_outputs(self, model, inputs, generation_config):
            started = time.perf_counter()
            ids, mask, labels = GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)
            clock.add("generate", time.perf_counter() - started)
            record["generated"].append(int((labels != -100).sum()))
            if "first" not in record:
                record["first"] = compact(ids, mask, labels)
            return ids, mask, labels

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            started = time.perf_counter()
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            clock.loss_done(started)
            record["losses"].append(float(loss.detach()))
            record["num_items"].append(int((inputs["labels"][:, 1:] != -100).sum()))
            return loss

    class Ticks(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            clock.tick(state.global_step)

    def collate(rows):  # left-padded prompts, as GKD's generate needs; no labels (see the module doc)
        width = max(len(row["ids"]) for row in rows)
        ids = torch.tensor([[pad] * (width - len(row["ids"])) + row["ids"] for row in rows])
        mask = torch.tensor([[0] * (width - len(row["ids"])) + [1] * len(row["ids"]) for row in rows])
        return {"input_ids": ids, "attention_mask": mask, "prompts": ids, "prompt_attention_mask": mask}

    dataset = Dataset.from_dict({"ids": [prompt_ids[i] for i in order]})
    config = GKDConfig(lmbda=1.0, beta=0.5, temperature=1.0, seq_kd=False, max_new_tokens=args.max_new_tokens,
                       train_sampling_strategy="sequential", **trl_config_common(args, total))
    trainer = Recorded(model=student, teacher_model=teacher, args=config, data_collator=collate, train_dataset=dataset,
                       processing_class=tokenizer, callbacks=[Ticks()])
    trainer.train()
    return record


def run_trl_distill(args, teacher, tokenizer, student, texts, prompt_ids, order, total, clock) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer
    record = {"losses": [], "num_items": [], "generated": []}

    class Recorded(DistillationTrainer):  # times and records what TRL does; changes nothing
        def _generate_and_score_completions(self, inputs):
            started = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            clock.add("generate", time.perf_counter() - started)
            record["generated"].append(int(out["completion_mask"].sum()))
            if "first" not in record:
                ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
                mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
                labels = torch.cat([torch.full_like(out["prompt_ids"], -100),
                                    out["completion_ids"].masked_fill(out["completion_mask"] == 0, -100)], dim=1)
                record["first"] = compact(ids, mask, labels)
            return out

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            started = time.perf_counter()
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            clock.loss_done(started)
            record["losses"].append(float(loss.detach()))
            record["num_items"].append(int(inputs["num_items_in_batch"]))
            return loss

    class Ticks(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            clock.tick(state.global_step)

    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": texts[i]}] for i in order]})
    common = trl_config_common(args, total)
    if args.worker.endswith("+gc"):
        common.pop("gradient_checkpointing")  # its own default (True)
    config = DistillationConfig(beta=0.5, temperature=1.0, top_p=1.0, top_k=0, max_completion_length=args.max_new_tokens,
                                shuffle_dataset=False, **common)
    trainer = Recorded(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                       processing_class=tokenizer, callbacks=[Ticks()])
    for ids, text in zip(trainer._tokenize_prompts([[{"role": "user", "content": texts[i]}] for i in order[:4]])[0],
                         [texts[i] for i in order[:4]]):  # its prompt tokens are the other sides'
        assert list(ids) == prompt_ids[texts.index(text)], text
    trainer.train()
    return record


def make_gkd(args, teacher, tokenizer, student, num_train: int, clock=None, record=None):
    from potstill.methods.gkd import GKD
    from potstill.tasks.keep import freeze
    from potstill.teachers.lm import LMTeacher

    class Timed(GKD):  # times and records what potstill does; changes nothing
        def rollout(self, batch, model, origin):
            started = time.perf_counter()
            out = super().rollout(batch, model, origin)
            clock.add("generate", time.perf_counter() - started)
            record["generated"].append(out.count_targets())
            if "first" not in record:
                view = out.student
                record["first"] = compact(view.input_ids, view.attention_mask, view.labels)
            return out

        def forward(self, batch):
            started = time.perf_counter()
            losses = super().forward(batch)
            clock.loss_done(started)
            return losses

    config = GKD.Config(lmbda=1.0, divergence="jsd", beta=0.5, temperature=1.0, sampling_temperature=1.0, top_p=1.0,
                        max_new_tokens=args.max_new_tokens)
    lm_teacher = LMTeacher(freeze(teacher), TEACHER)  # frozen, as the LM task does
    return (Timed if clock is not None else GKD)(student, lm_teacher, config, num_classes=len(tokenizer),
                                                 num_train=num_train)


def run_potstill(args, teacher, tokenizer, student, texts, prompt_ids, order, total, clock, batches) -> dict:
    from potstill.config import TrainConfig
    from potstill.train.trainer import train
    record = {"losses": [], "num_items": [], "generated": []}
    method = make_gkd(args, teacher, tokenizer, student, len(texts), clock, record)
    cfg = TrainConfig(steps=total, batch_size=args.batch, grad_accum=1, lr=args.lr, weight_decay=0.0,
                      warmup_steps=0, min_lr_ratio=1.0, grad_clip=1.0, eval_every=total,
                      checkpoint_every=total, log_every=1)  # every step's loss, read back (one host sync)

    def on_step(step, totals):
        clock.tick(step)
        record["losses"].append(totals["loss"])
        record["num_items"].append(record["generated"][-1])  # one micro-batch per step: its sampled tokens

    train(method, batches=batches, evaluate=lambda: {"val": 0.0}, cfg=cfg, out_dir=Path(args.tmp),
          selection="val", on_step=on_step)
    return record


def worker(args) -> None:
    load_start, code = os.getloadavg()[0], source_digest()
    torch.set_num_threads(args.threads or torch.get_num_threads())
    torch.manual_seed(0)
    teacher, tokenizer, student, texts, prompt_ids, order, batches, total, info = load(args)
    if args.worker == "check":
        return check(args, teacher, tokenizer, student, texts)
    clock = Clock(args.warmup + args.steps, teacher)
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        if args.worker.startswith("trl-gkd"):
            record = run_trl_gkd(args, teacher, tokenizer, student, texts, prompt_ids, order, total, clock)
        elif args.worker.startswith("trl-distill"):
            record = run_trl_distill(args, teacher, tokenizer, student, texts, prompt_ids, order, total, clock)
        else:
            record = run_potstill(args, teacher, tokenizer, student, texts, prompt_ids, order, total, clock, batches)
    w, c, a, b = clock.wall, clock.cpu, args.warmup - 1, args.warmup - 1 + args.steps  # ends: warmup, last steps
    window = w[b] - w[a]
    timed = range(a + 1, b + 1)  # indices of the timed steps (step i + 1 ends at w[i])
    phases = {p: sum(clock.phases[i].get(p, 0.0) for i in timed) / args.steps for p in ("generate", "teacher", "backward",
                                                                                         "optimizer", "loss_total")}
    phases["loss"] = phases.pop("loss_total") - phases["teacher"]
    phases["other"] = window / args.steps - sum(phases.values())
    record.update(info, config=args.worker, batch=args.batch, code=code, load=[load_start, os.getloadavg()[0]],
                  threads=torch.get_num_threads(), peak_mb=clock.peak_mb, steps_per_s=args.steps / window,
                  tokens_per_s=sum(record["generated"][i] for i in timed) / window,
                  tokens_per_step=sum(record["generated"][i] for i in timed) / args.steps,
                  median_step_s=statistics.median(w[i] - w[i - 1] for i in timed),
                  cpu_step_s=(c[b] - c[a]) / args.steps, total_steps=total, phases=phases)
    Path(args.out).write_text(json.dumps(record))


def check(args, teacher, tokenizer, student, texts) -> None:
    """Losses at the initial weights: potstill's gkd on each TRL trainer's first-step samples, and
    TRL's ``generalized_jsd_loss`` (dense logits) on potstill's."""
    from trl.experimental.gkd import GKDTrainer

    from potstill.batches import Origin, TokenBatch, TokenView
    records = json.loads(Path(args.records).read_text())
    pad = tokenizer.pad_token_id

    def right_padded(rows):
        width = max(len(row["ids"]) for row in rows)
        ids = torch.tensor([row["ids"] + [pad] * (width - len(row["ids"])) for row in rows])
        mask = torch.tensor([[1] * len(row["ids"]) + [0] * (width - len(row["ids"])) for row in rows])
        labels = torch.tensor([row["labels"] + [-100] * (width - len(row["ids"])) for row in rows])
        return ids, mask, labels

    method = make_gkd(args, teacher, tokenizer, student, len(texts))
    out = {}
    with torch.no_grad():
        for name, record in records.items():
            ids, mask, labels = right_padded(record["first"])
            targets = int((labels[:, 1:] != -100).sum())
            if name.startswith("trl"):
                batch = TokenBatch(TokenView(ids, mask, labels), origin=Origin.ROLLOUT, num_items=targets)
                value, how = float(method(batch)["objective"]), "potstill gkd on its samples"
            else:
                s = student(input_ids=ids, attention_mask=mask).logits
                t = teacher(input_ids=ids, attention_mask=mask).logits
                value = float(GKDTrainer.generalized_jsd_loss(s[:, :-1], t[:, :-1], labels[:, 1:], beta=0.5))
                how = "TRL's GKDTrainer.generalized_jsd_loss on its samples"
            recorded = record["losses"][0]
            out[name] = {"recorded": recorded, "recomputed": value, "how": how, "targets": targets,
                         "recorded_targets": record["num_items"][0], "rel": abs(value - recorded) / abs(recorded)}
    Path(args.out).write_text(json.dumps(out))


# ----------------------------------------------------------------------------------------------- report


def ratios(runs: dict[str, list[dict]], name: str, ref: str, key) -> list[float]:
    """Per-round key(run) / key(the reference's run of the same round)."""
    return [key(a) / key(b) for a, b in zip(runs[name], runs[ref])]


def references(runs: dict[str, list[dict]]) -> list[str]:
    return [name for name in runs if name.startswith("trl")]


def table(runs: dict[str, list[dict]]) -> str:
    refs = references(runs)
    head = ["configuration", "steps/s", "generated tokens/s", "median s/step", "CPU s/step", "new tokens/step",
            "peak RSS growth (MiB)"]
    if "potstill" in runs:
        head += [f"{kind} vs {ref}" for ref in refs for kind in ("speed", "memory")]
    rows = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, rs in runs.items():
        cells = [spread([r["steps_per_s"] for r in rs]), spread([r["tokens_per_s"] for r in rs], ".1f"),
                 spread([r["median_step_s"] for r in rs], ".2f"), spread([r["cpu_step_s"] for r in rs], ".2f"),
                 spread([r["tokens_per_step"] for r in rs], ".1f"), spread([r["peak_mb"] for r in rs], ",.0f")]
        if "potstill" in runs:
            for ref in refs:
                if name == ref:
                    cells += ["1.00x", "1.00x"]
                elif name == "potstill":
                    cells += [spread(ratios(runs, name, ref, lambda r: r["steps_per_s"]), ".2f", "x"),
                              spread(ratios(runs, name, ref, lambda r: r["peak_mb"]), ".2f", "x")]
                else:
                    cells += ["-", "-"]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def phase_table(runs: dict[str, list[dict]]) -> str:
    rows = ["| configuration | " + " | ".join(PHASE_LABELS[p] for p in PHASES) + " | step |",
            "|---|" + "---:|" * (len(PHASES) + 1)]
    for name, rs in runs.items():
        cells = [spread([r["phases"][p] for r in rs], ".2f") for p in PHASES]
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {spread([1 / r['steps_per_s'] for r in rs], '.2f')} |")
    return "\n".join(rows)


def headline(runs: dict[str, list[dict]]) -> str:
    if "potstill" not in runs:
        return "(no potstill row)"
    lines = []
    for ref in references(runs):
        speed = ratios(runs, "potstill", ref, lambda r: r["steps_per_s"])
        tokens = ratios(runs, "potstill", ref, lambda r: r["tokens_per_s"])
        memory = ratios(runs, "potstill", ref, lambda r: r["peak_mb"])
        met_speed, met_memory = statistics.median(speed) >= 2.0, statistics.median(memory) <= 0.5
        rounds = sum(s >= 2.0 and m <= 0.5 for s, m in zip(speed, memory))
        lines.append(
            f"- Against `{ref}`: potstill runs at {spread(speed, '.2f', 'x')} its steps/s "
            f"({spread(tokens, '.2f', 'x')} its generated tokens/s) at {spread(memory, '.2f', 'x')} its peak memory "
            f"({statistics.median(r['peak_mb'] for r in runs['potstill']):,.0f} vs "
            f"{statistics.median(r['peak_mb'] for r in runs[ref]):,.0f} MiB). Goal >= 2x steps/s at <= 1/2 the peak "
            f"memory: speed **{'met' if met_speed else 'NOT met'}**, memory **{'met' if met_memory else 'NOT met'}** "
            f"(medians); both in {rounds} of {len(speed)} rounds.")
    return "\n".join(lines)


def loss_lines(runs: dict[str, list[dict]], checked: dict | None) -> str:
    lines = []
    for name, rs in runs.items():
        r = rs[0]
        line = (f"- {name}: first-step loss {r['losses'][0]:.6f} over {r['num_items'][0]} sampled target tokens "
                f"(its own samples, round 1)")
        if checked and name in checked:
            c = checked[name]
            line += (f"; {c['how']} (same initial weights): {c['recomputed']:.6f} over {c['targets']} tokens, "
                     f"relative difference {c['rel']:.1e}")
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a random 2-layer Llama teacher (quick debug run)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones (>= 1)")
    parser.add_argument("--batch", type=int, default=4, help="prompts per step")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="most tokens sampled per prompt")
    parser.add_argument("--layers", type=int, default=1, help="student decoder layers")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, help="torch threads per run (default: torch's own)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the configurations (order rotated)")
    parser.add_argument("--only", nargs="+", action="extend", help="run only these configurations (names as in the table)")
    parser.add_argument("--no-check", action="store_true", help="skip the loss-agreement process")
    parser.add_argument("--json", type=Path, help="also write every run's raw record to this file")
    parser.add_argument("--write-docs", action="store_true", help=f"write the results into {DOCS.relative_to(ROOT)}")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--records", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the timed window starts at the end of a step)")
    if args.worker:
        return worker(args)

    names = list(CONFIGS)
    if args.only:
        unknown = set(args.only) - set(CONFIGS) - set(EXTRA)
        if unknown:
            parser.error(f"unknown configuration(s) {sorted(unknown)}; choose from {list(CONFIGS + EXTRA)}")
        names = [n for n in CONFIGS + EXTRA if n in args.only]
    if args.write_docs and (args.tiny or not set(CONFIGS) <= set(names)):
        parser.error(f"--write-docs regenerates the whole section: run SmolLM2 (no --tiny) with every one of {list(CONFIGS)}")
    runs: dict[str, list[dict]] = {name: [] for name in names}
    loads: list[float] = []
    forwarded = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                 if k in ("steps", "warmup", "batch", "max_new_tokens", "layers", "lr", "threads") and v is not None]
    forwarded += ["--tiny"] if args.tiny else []
    started = time.perf_counter()
    for repeat in range(args.repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                before = os.getloadavg()[0]
                print(f"[{time.perf_counter() - started:6.0f} s] round {repeat + 1}/{args.repeats}: {name} "
                      f"(load {before:.2f}) ...", file=sys.stderr, flush=True)
                subprocess.run([sys.executable, __file__, "--worker", name, "--out", out.name, *forwarded],
                               check=True, cwd=ROOT, stdout=sys.stderr)  # TRL prints its logs: keep stdout clean
                loads += [before, os.getloadavg()[0]]
                runs[name].append(json.loads(Path(out.name).read_text()))
    benchmark_min = (time.perf_counter() - started) / 60
    checked = None
    if not args.no_check:
        with tempfile.NamedTemporaryFile(suffix=".json") as records, tempfile.NamedTemporaryFile(suffix=".json") as out:
            Path(records.name).write_text(json.dumps({name: rs[0] for name, rs in runs.items()}))
            print("loss check ...", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, __file__, "--worker", "check", "--records", records.name, "--out", out.name,
                            *forwarded], check=True, cwd=ROOT, stdout=sys.stderr)
            checked = json.loads(Path(out.name).read_text())
    every = [run for rs in runs.values() for run in rs]
    r, codes = every[0], {run["code"] for run in every}
    command = "python benchmarks/vs_trl_onpolicy.py " + " ".join(sys.argv[1:])
    teacher = ("a random 2-layer Llama (hidden 64) on SmolLM2's tokenizer (`--tiny`)" if args.tiny else TEACHER)
    setup = (f"Teacher {teacher} ({r['teacher_params'] / 1e6:.1f} M params, float32, V = {r['vocab']:,}); student "
             f"{args.layers} layer(s), teacher-layer init ({r['student_params'] / 1e6:.1f} M params); "
             f"{args.batch} prompts per step from `potstill.data.text.PROMPTS` through the chat template "
             f"({min(r['prompt_tokens'])}-{max(r['prompt_tokens'])} tokens), lambda = 1 (every step on-policy), "
             f"generalized JSD with beta = 0.5 at T = 1, sampling at temperature 1 (no top-k/top-p), at most "
             f"{args.max_new_tokens} new tokens (EOS ends a row); fused AdamW lr {args.lr} constant, no weight decay, "
             f"clip 1.0; {args.steps} timed steps after {args.warmup} warmup step(s) (+1 untimed final step), generation "
             f"included. Each configuration in its own process, one at a time; {args.repeats} round(s) in an order "
             f"rotated each round. Cells: median [min-max] over rounds; ratios: potstill / TRL per round, median "
             f"[min-max]. Peak RSS growth: from the baseline with the models loaded and paged in to the end of the "
             f"timed steps.")
    sections = ["## On-policy (GKD) vs TRL",
                f"`{command.strip()}` on {_dt.date.today().isoformat()}; {machine('transformers', 'trl')}; sources "
                f"{'/'.join(sorted(codes))}{': CHANGED during the run' if len(codes) > 1 else ''}; {r['threads']} torch "
                f"thread(s); {describe_load(loads, r['threads'], len(every))}. Wall time of the whole benchmark: "
                f"{benchmark_min:.1f} min.",
                setup,
                "Headline (goal: >= 2x TRL's steps/s at <= 1/2 its peak memory):\n\n" + headline(runs),
                table(runs),
                "Where a step's time goes (s/step, mean over the timed steps of a run; median [min-max] over rounds). "
                "Generation: the side's sampling call; teacher forward: the teacher's decoder (hooks); student "
                "forward + loss: the rest of the loss forward (student decoder, vocabulary projections, divergence); "
                "backward + clip: from the end of the loss forward to the optimizer step; other: the rest (batching, "
                "trainer bookkeeping, logging).\n\n" + phase_table(runs),
                "Loss agreement (the sides sample different sequences, so each side's samples are re-scored by the "
                "other's loss at the initial weights):\n\n" + loss_lines(runs, checked)]
    text = "\n\n".join(sections)
    print(text)
    raw = json.dumps({"runs": runs, "check": checked})
    if args.json:
        args.json.write_text(raw)
    if args.write_docs:
        write_section("vs_trl_onpolicy", text)


if __name__ == "__main__":
    main()
