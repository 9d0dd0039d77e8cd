"""Text-only served teachers: the rule-based addition teacher (its working checked against plain
arithmetic), and the text_seqkd / rationale students' kept answers against an independent reading of
the same problems, through a real `potstill serve addition-working` subprocess."""

import atexit
import random
import re

import pytest
import torch

from potstill.app.serve_rules import AdditionWorking, working
from potstill.batches import TokenBatch
from potstill.data.text.addition import answer_of
from potstill.methods import method_class, method_config
from potstill.tasks import load_recipe
from potstill.tasks.lm import LMTask

from helpers import session_cache, session_cache_dir
from served_helpers import ServeProcess

ERROR_RATE = 0.3
COLUMN = re.compile(r"(\d)\+(\d)\+(\d)=(\d\d)")


def test_the_rule_teachers_working_is_arithmetic():
    teacher, wrong = AdditionWorking("t", ERROR_RATE, seed=3), 0
    for a, b in ((random.Random(i).randrange(1000), random.Random(-i).randrange(1000)) for i in range(400)):
        rationale, answer = teacher.text(f"{a}+{b}=").split("####")
        right = answer == str(a + b)[::-1]
        wrong += not right
        columns = COLUMN.findall(rationale)
        assert "".join(f"{x}+{y}+{c}={s}" for x, y, c, s in columns) == rationale
        assert all(int(x) + int(y) + int(c) == int(s) for x, y, c, s in columns)
        if right:  # the working of a right answer is the schoolbook one: digits, and each carry passed on
            xs, ys = str(a)[::-1], str(b)[::-1]
            assert [int(x) for x, _, _, _ in columns] == [int(xs[i]) if i < len(xs) else 0 for i in range(len(columns))]
            assert [int(y) for _, y, _, _ in columns] == [int(ys[i]) if i < len(ys) else 0 for i in range(len(columns))]
        assert teacher.text(f"{a}+{b}=") == AdditionWorking("t", ERROR_RATE, seed=3).text(f"{a}+{b}=")
    assert abs(wrong / 400 - ERROR_RATE) < 0.08
    assert working(37, 85) == ("7+5+0=123+8+1=12", "221")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    session_cache_dir(tmp_path_factory.getbasetemp())
    server = ServeProcess("addition-working", None, "--error-rate", str(ERROR_RATE)).start()
    atexit.register(server.stop)
    recipe = load_recipe("addition-rationale", [f"teacher.url={server.url}", "data.addition_problems=400"])
    task = LMTask(recipe)
    with session_cache():
        task.prepare_teacher(lambda label, total: (lambda step, losses: None))
    yield task
    server.stop()


def problem(task, row) -> tuple[int, int]:
    text = task.tokenizer.decode(task.train_set.input_ids[row], skip_special_tokens=True)
    a, b = re.match(r"(\d+)\+(\d+)=", text).groups()
    return int(a), int(b)


def student_method(task, name, params):
    cfg = method_config(name, params, where="test")
    return method_class(name)(task._new_student(0), task.teacher, cfg, num_classes=0, num_train=len(task.train_set))


def spelled(task, view, row) -> str:
    return task.tokenizer.decode(view.labels[row][view.labels[row] != -100].tolist(), skip_special_tokens=True)


@pytest.mark.parametrize("verify", [True, False])
def test_text_seqkd_keeps_the_teachers_answers_the_verifier_accepts(task, verify):
    rule = AdditionWorking("check", ERROR_RATE, seed=0)  # the served one's twin, in this process
    method = student_method(task, "text_seqkd", {"verify": verify, "max_new_tokens": 8})
    n = 48
    out = method.prepare_step(0, [TokenBatch(task.train_set.view(slice(0, n)), index=torch.arange(n))])[0]
    kept = 0
    for row in range(n):
        a, b = problem(task, row)
        said = rule.text(f"{a}+{b}=").split("####")[1]
        expected = said if (not verify or said == answer_of(a, b)) else ""
        assert spelled(task, out.student, row) == expected
        kept += bool(expected)
    assert 0 < kept < n or not verify
    assert torch.isfinite(method.forward(out)["ce"])
    # resumed from its table: the same batch without asking the server again
    asked = task.teacher.counts["asked"]
    again = student_method(task, "text_seqkd", {"verify": verify, "max_new_tokens": 8})
    again.setup(out)
    again.answers.load_state_dict(method.answers.state_dict())
    replay = again.prepare_step(0, [TokenBatch(task.train_set.view(slice(0, n)), index=torch.arange(n))])[0]
    assert torch.equal(replay.student.input_ids, out.student.input_ids) and task.teacher.counts["asked"] == asked


def test_rationale_trains_answer_and_working_as_two_tasks(task):
    method = student_method(task, "rationale", {"rationale_weight": 0.5, "max_new_tokens": 40})
    n = 32
    out = method.prepare_step(0, [TokenBatch(task.train_set.view(slice(0, n)), index=torch.arange(n))])[0]
    for row in range(n):
        a, b = problem(task, row)
        rationale, answer = working(a, b)
        said = AdditionWorking("check", ERROR_RATE, seed=0).text(f"{a}+{b}=")
        right = said.split("####")[1] == answer_of(a, b)
        assert spelled(task, out.student, row) == (answer if right else "")
        assert spelled(task, out.teacher_view, row) == (rationale if right else "")
        if right:  # the rationale task's prompt is the problem and its prefix: 'a+b=='
            first = int((out.teacher_view.labels[row] != -100).nonzero()[0])
            assert task.tokenizer.decode(out.teacher_view.input_ids[row, :first]) == f"{a}+{b}=="
    parts = method.forward(out)
    torch.testing.assert_close(parts["objective"], parts["answer_ce"] + parts["rationale_ce"])
    # the trainer sums every entry with a grad: only the objective may have one
    assert [k for k, v in parts.items() if v.requires_grad] == ["objective"]
