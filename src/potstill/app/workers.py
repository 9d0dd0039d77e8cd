"""(student, seed) jobs, run in this process or side by side in worker processes.

A job is one student trained with one seed in its own folder; ``result.json`` is written last
(atomically), so a resumed run skips exactly the finished jobs and continues the others from their
checkpoints, whichever process trained them. Jobs are independent and seeded (``run_student``
seeds everything it draws), so where a job runs changes no number.

Worker processes (``spawn``: nothing of this process's state is inherited by accident) start
before the teacher is prepared, so their imports overlap its training. Once it is ready, each gets
the prepared task (its teacher included, pickled: workers never prepare or train a teacher) and then
one job at a time from this process: a free worker takes a student not started yet, else the one
whose first seed took (or is taking) longest, so short jobs fill the end. Workers send progress (throttled) and results
back; an error in a worker is raised here (a :class:`UserError` stays one line), and on any error
or Ctrl-C the workers are terminated (their checkpoints are written atomically: ``--resume``
continues them).
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
from potstill.core.io import atomic_write_json

OnStep = Callable[[int, dict[str, float]], None]


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
    result = task.run_student(job.name, job.student, job.seed, job.folder, on_step)
    result["seed"] = job.seed
    if "artifact" in result:  # the folder that holds the model, from the run directory
        result["artifact"] = (job.folder.relative_to(job.folder.parents[2]) / result["artifact"]).as_posix()
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

    import potstill.tasks  # noqa: F401  (the built-in tasks, while the teacher trains)

    torch.set_num_threads(threads)
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # the first optimizer imports torch._dynamo (~1 s)
    task = pickle.loads(inbox.get())
    while (job := inbox.get()) is not None:
        try:
            events.put(("started", job.label, None))
            result = run_job(task, job, _throttled(events, job))
        except BaseException as error:  # noqa: BLE001  (sent back and raised in the main process)
            events.put(("error", job.label, (_portable(error), traceback.format_exc())))
            return
        events.put(("done", job.label, result))


def _throttled(events, job: Job, interval: float = 0.2) -> OnStep:
    last = [0.0]

    def on_step(step: int, losses: dict[str, float]) -> None:
        now = time.monotonic()
        if losses or step == job.steps or now - last[0] >= interval:
            last[0] = now
            events.put(("step", job.label, (step, losses)))
    return on_step


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

    def run(self, task, jobs: list[Job], on_step_factory: Callable[[str, int], OnStep]) -> dict[str, dict]:
        """Every job's result, by label."""
        payload = pickle.dumps(task)
        pending, running, results = list(jobs), {}, {}
        timed: dict[str, float] = {}
        started_at: dict[str, float] = {}
        bars: dict[str, OnStep] = {}

        def give(worker: int) -> None:
            if not pending:
                self.inboxes[worker].put(None)
                return
            now = time.monotonic()  # a student still on its first seed has taken at least the time so far
            job = max(pending, key=lambda j: timed.get(j.name, now - started_at.get(j.name, -math.inf)))
            pending.remove(job)
            running[job.label] = (worker, job)
            started_at.setdefault(job.name, time.monotonic())
            self.inboxes[worker].put(job)

        for worker, inbox in enumerate(self.inboxes):
            inbox.put(payload)
            give(worker)
        while running:
            try:
                kind, label, body = self.events.get(timeout=0.5)
            except queue.Empty:
                self._check_alive(running)
                continue
            worker, job = running[label]
            if kind == "started":
                bars[label] = on_step_factory(label, job.steps)
            elif kind == "step":
                bars[label](*body)
            elif kind == "done":
                results[label] = body
                del running[label]
                timed.setdefault(job.name, time.monotonic() - started_at[job.name])
                give(worker)
            else:
                error, remote = body
                error.__cause__ = RemoteTraceback(remote)
                raise error
        return results

    def _check_alive(self, running: dict) -> None:
        for worker, job in running.values():
            code = self.processes[worker].exitcode
            if code is not None:
                raise RuntimeError(f"the worker process training {job.label} stopped (exit code {code}); "
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
