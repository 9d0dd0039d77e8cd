"""``potstill serve addition-working``: a rule-based, text-only teacher for the addition task.

No chat LLM can add and show its carries on this CPU offline, so this stands in for one: it answers a
chat message ``"a+b="`` with its working, column by column from the least significant digit
(``x+y+c=ss``: the two digits, the carry in, the two-digit column sum), then ``####`` and the answer
in the task's format (digits least significant first). ``37+85=`` -> ``7+5+0=123+8+1=12####221``.

With ``--error-rate p`` a problem is answered wrongly with probability p: one column's carry is
dropped, so the working and the answer agree with each other and are both wrong (a plausible slip,
which a verifier on the answer catches); a problem without carries gets a units digit off by one. Which problems are wrong is a function of (seed, problem)
alone, so every rerun sees the same answers. It is a program, not a model: it never fails other than
by these planted slips, and it has no log-probs (``/v1/completions`` is refused).
"""

from __future__ import annotations

import random
import re
import time
import uuid

from potstill.app.serve_api import BadRequest, ChatRequest

RULE_MODELS = ("addition-working",)
_PROBLEM = re.compile(r"^\s*(\d+)\+(\d+)=\s*$")


def working(a: int, b: int, slip: int | None = None) -> tuple[str, str]:
    """(working, answer) of ``a + b``; ``slip``: the column whose carry out is dropped."""
    xs, ys = str(a)[::-1], str(b)[::-1]
    carry, columns, digits = 0, [], []
    for i in range(max(len(xs), len(ys))):
        x, y = int(xs[i]) if i < len(xs) else 0, int(ys[i]) if i < len(ys) else 0
        total = x + y + carry
        columns.append(f"{x}+{y}+{carry}={total:02d}")
        digits.append(str(total % 10))
        carry = 0 if i == slip else total // 10
    if carry:
        digits.append("1")
    return "".join(columns), "".join(digits)


class AdditionWorking:
    """The rule-based teacher behind the API (the part of :class:`~potstill.app.serve_api.Scorer` it serves)."""

    max_len = None

    def __init__(self, name: str, error_rate: float, seed: int):
        self.name, self.error_rate, self.seed = name, error_rate, seed
        self.root = f"potstill-rules:addition-working:error_rate={error_rate:g}:seed={seed}"

    def text(self, prompt: str) -> str:
        match = _PROBLEM.match(prompt)
        if not match:
            return "I can only add: send 'a+b='"
        a, b = int(match.group(1)), int(match.group(2))
        draw = random.Random(f"{self.seed}:{a}+{b}")
        rationale, answer = working(a, b)
        if draw.random() < self.error_rate:
            carries = [i for i in range(len(str(max(a, b)))) if working(a, b, i)[1] != answer]
            if carries:
                rationale, answer = working(a, b, draw.choice(carries))
            else:  # no carry to drop: the units digit is off by one
                answer = str((int(answer[0]) + 1) % 10) + answer[1:]
        return f"{rationale}####{answer}"

    def chat(self, request: ChatRequest) -> dict:
        if request.model is not None and request.model != self.name:
            raise BadRequest(f"The model `{request.model}` does not exist.", 404, "NotFoundError", "model")
        if request.logprobs:
            raise BadRequest("addition-working is a text-only teacher: it has no log-probs", param="logprobs")
        prompt = "".join(str(m.get("content", "")) for m in request.messages if m.get("role") == "user")
        text = self.text(prompt)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.name, "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                 "logprobs": None, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(text),
                          "total_tokens": len(prompt) + len(text)}}

    def completion(self, request) -> dict:
        raise BadRequest("addition-working is a text-only teacher: use /v1/chat/completions")

