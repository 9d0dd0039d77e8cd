"""(student, seed) jobs, run in this process or side by side in worker processes.

A job is one student trained with one seed in its own folder; ``result.json`` is written last
(atomically), so a resumed run skips exactly the finished jobs and continues the others from their
checkpoints, whichever process trained them. Jobs are independent and seeded (``run_student``
seeds everything it draws), so where a job runs changes no number.

Worker processes (``spawn``: nothing of this process's state is inherited by accident) get the
task pickled, and then one message at a time from this process. When the run has a teacher to
train, one worker trains it (the same code, seed and thread count as in this process, so the same
weights; it is kept, and the worker sends the prepared task back) while the others train the
students that need no teacher (``train_student``); their test metrics, which compare with the
teacher, follow once it is ready (``evaluate_student``). Then every worker gets the prepared task
(the teacher included: no other worker prepares or trains one) and the remaining jobs: a free worker
takes a student not started yet, else the one whose first seed took (or is taking) longest, so
short jobs fill the end. Workers send progress (throttled) and results back; an error in a worker
is raised here (a :class:`UserError` stays one line), and on any error or Ctrl-C the workers are
terminated (their checkpoints are written atomically: ``--resume`` continues them).
"""

from __future__ import annotations

import math
import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from potstill.config import StudentConfig
from potstill.core.distributed import launched_world
from potstill.core.io import atomic_write_json

OnStep = Callable[[int, dict[str, float]], None]
TEACHER = "teacher"  # the label of the teacher's training, in progress bars and messages


@dataclass(frozen=True)
class Job:
    name: str
    student: StudentConfig
    seed: int
    folder: Path
    steps: int

    @property
    def label(self) -> str:
        return f"{self.name} seed {self.seed}"


def run_job(task, job: Job, on_step: OnStep) -> dict:
    """Train one job and write its ``result.json`` (last, atomically)."""
    job.folder.mkdir(parents=True, exist_ok=True)
    return _write_result(job, task.run_student(job.name, job.student, job.seed, job.folder, on_step))


def _write_result(job: Job, result: dict) -> dict:
    result["seed"] = job.seed
    if "artifact" in result:  # the folder that holds the model, from the run directory
        result["artifact"] = (job.folder.relative_to(job.folder.parents[2]) / result["artifact"]).as_posix()
    if launched_world().is_main:  # under torchrun every rank has the result; rank 0 writes it
        atomic_write_json(job.folder / "result.json", result)
    return result


class RemoteTraceback(Exception):
    """The traceback of an error raised in a worker process (set as the error's cause)."""

    def __str__(self) -> str:
        return "\n" + self.args[0]


# ---------------------------------------------------------------- inside a worker process


def _exit_with_parent() -> None:
    """A worker whose main process died (SIGKILL, OOM) exits at once, so a ``--resume`` never races it."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)


def _worker(threads: int, inbox, events) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled by the main process
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    import torch

    import potstill.tasks  # noqa: F401  (the built-in tasks)

    torch.set_num_threads(threads)
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # the first optimizer imports torch._dynamo (~1 s)
    task, bars = None, _bar_factory(events)
    while (message := inbox.get()) is not None:
        kind, *args = message
        if kind == "task":
            task = pickle.loads(args[0])
            continue
        label = TEACHER if kind == "teacher" else args[0].label
        try:
            if kind == "teacher":
                task.prepare_teacher(bars)
                events.put(("teacher_ready", label, pickle.dumps(task)))
            elif kind == "train":  # a student that needs no teacher, trained before it is ready
                job = args[0]
                job.folder.mkdir(parents=True, exist_ok=True)
                trained = task.train_student(job.name, job.student, job.seed, job.folder, bars(label, job.steps))
                events.put(("trained", label, trained))
            elif kind == "finish":  # its test metrics, now that the teacher is ready
                job, trained = args
                events.put(("done", label, _write_result(job, task.evaluate_student(job.folder, trained))))
            else:
                job = args[0]
                events.put(("done", label, run_job(task, job, bars(label, job.steps))))
        except BaseException as error:  # noqa: BLE001  (sent back and raised in the main process)
            events.put(("error", label, (_portable(error), traceback.format_exc())))
            return


def _bar_factory(events, interval: float = 0.2) -> Callable[[str, int], OnStep]:
    """An ``on_step_factory`` whose bars live in the main process (progress throttled to ``interval``)."""
    def factory(label: str, total: int) -> OnStep:
        events.put(("started", label, total))
        last = [0.0]

        def on_step(step: int, losses: dict[str, float]) -> None:
            now = time.monotonic()
            if losses or step == total or now - last[0] >= interval:
                last[0] = now
                events.put(("step", label, (step, losses)))
        return on_step
    return factory


def _portable(error: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(error).__name__}: {error}")


# ---------------------------------------------------------------- in the main process


class Workers:
    """``count`` worker processes; :meth:`run` hands them a prepared task and jobs."""

    def __init__(self, count: int, threads: int):
        context = multiprocessing.get_context("spawn")
        self.events = context.Queue()
        self.inboxes = [context.Queue() for _ in range(count)]
        self.processes = [context.Process(target=_worker, args=(threads, inbox, self.events), daemon=True,
                                          name=f"potstill-worker-{i}") for i, inbox in enumerate(self.inboxes)]
        for process in self.processes:
            process.start()

    def run(self, task, jobs: list[Job], on_step_factory: Callable[[str, int], OnStep]) -> tuple[object, dict[str, dict]]:
        """The prepared task (its teacher trained here or in a worker) and every job's result, by label."""
        teacher_in_worker = task.teacher_to_train()
        if not teacher_in_worker:
            task.prepare_teacher(on_step_factory)  # loaded, reused or opened: quick, and here
        pending, running, results = list(jobs), {}, {}
        trained: list[tuple[Job, dict]] = []  # teacher-free students waiting for their test metrics
        idle: list[int] = []
        timed: dict[str, float] = {}
        started_at: dict[str, float] = {}
        bars: dict[str, OnStep] = {}
        ready = not teacher_in_worker

        def give(worker: int) -> None:
            candidates = pending if ready else [j for j in pending if task.trains_without_teacher(j.student)]
            if ready and trained:
                job, record = trained.pop(0)
                message = ("finish", job, record)
            elif candidates:
                now = time.monotonic()  # a student still on its first seed has taken at least the time so far
                job = max(candidates, key=lambda j: timed.get(j.name, now - started_at.get(j.name, -math.inf)))
                pending.remove(job)
                started_at.setdefault(job.name, time.monotonic())
                message = ("run" if ready else "train", job)
            elif ready:
                self.inboxes[worker].put(None)
                return
            else:
                idle.append(worker)  # until the teacher is ready
                return
            running[job.label] = (worker, job)
            self.inboxes[worker].put(message)

        payload = pickle.dumps(task)
        for inbox in self.inboxes:
            inbox.put(("task", payload))
        if teacher_in_worker:
            running[TEACHER] = (0, None)
            self.inboxes[0].put(("teacher",))
        for worker in range(len(self.inboxes)):
            if all(worker != busy for busy, _ in running.values()):
                give(worker)
        while running:
            try:
                kind, label, body = self.events.get(timeout=0.5)
            except queue.Empty:
                self._check_alive(running)
                continue
            if kind == "started":
                bars[label] = on_step_factory(label, body)
            elif kind == "step":
                bars[label](*body)
            elif kind == "error":
                error, remote = body
                error.__cause__ = RemoteTraceback(remote)
                raise error
            else:
                worker, job = running.pop(label)
                if kind == "teacher_ready":
                    task, ready = pickle.loads(body), True
                    for inbox in self.inboxes:  # a busy worker reads it before its next job
                        inbox.put(("task", body))
                    for waiting in [worker, *idle]:
                        give(waiting)
                    idle.clear()
                    continue
                if kind == "trained":
                    trained.append((job, body))
                else:
                    results[label] = body
                timed.setdefault(job.name, time.monotonic() - started_at[job.name])
                give(worker)
        return task, results

    def _check_alive(self, running: dict[str, tuple[int, Job | None]]) -> None:
        for label, (worker, _) in running.items():
            code = self.processes[worker].exitcode
            if code is not None:
                raise RuntimeError(f"the worker process training {label} stopped (exit code {code}); "
                                   f"continue the run with --resume")

    def close(self, terminate: bool = False) -> None:
        """Wait for the workers to exit (they do once told there is no job left), or terminate them."""
        for channel in (*self.inboxes, self.events):
            channel.cancel_join_thread()  # never wait at exit to flush a message nobody will read
        for process in self.processes:
            if terminate:
                process.terminate()
            process.join()

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, kind, error, trace) -> None:
        self.close(terminate=kind is not None)
