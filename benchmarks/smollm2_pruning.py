"""How much of SmolLM2-135M-Instruct survives when half its layers go: perplexity of the teacher's
own greedy answers, for the teacher and for 15-layer students built from different teacher layers.

The prompts are 16 of the project's prompts (``PROMPTS[100:116]``), answered greedily by the
teacher (32 new tokens, cached like every teacher answer); the perplexity is over the answer tokens
only (prompt masked), as ``answer_perplexity`` in docs/onpolicy.md. No training: this is where a
layer-pruned student starts. Needs the [models] extra.

Usage::

    python benchmarks/smollm2_pruning.py
"""

from __future__ import annotations

import torch

from potstill.core.paths import cache_dir
from potstill.data.text import PROMPTS, encode_chat, generate_responses
from potstill.data.tokens import TokenSplit
from potstill.eval.lm_metrics import evaluate_lm
from potstill.models.hf import load_causal_lm, make_student, student_layer_indices

# make_student copies the layers student_layer_indices picks; the other choices are built by
# copying the chosen teacher layers into that student's slots
CHOICES = {"evenly spaced (the default)": None, "first 10 + last 5": list(range(10)) + list(range(25, 30)),
           "first 12 + last 3": list(range(12)) + [27, 28, 29], "first 13 + last 2": list(range(13)) + [28, 29],
           "first 15": list(range(15)), "first 14 + last": list(range(14)) + [29]}


def student_from_layers(teacher: torch.nn.Module, layers: list[int] | None) -> torch.nn.Module:
    student = make_student(teacher, num_layers=15).eval()
    if layers is not None:
        for slot, source in enumerate(layers):
            student.model.layers[slot].load_state_dict(teacher.model.layers[source].state_dict())
    return student


@torch.no_grad()
def main() -> None:
    teacher, tokenizer = load_causal_lm("smollm2-135m-instruct", dtype=torch.float32)
    teacher.eval()
    prompts = PROMPTS[100:116]
    answers = generate_responses(teacher, tokenizer, prompts, max_new_tokens=32,
                                 cache_path=cache_dir() / "generations" / "smollm2_pruning.json")
    rows = TokenSplit.stack([encode_chat(tokenizer, p, a, 128) for p, a in zip(prompts, answers)])
    views = [v.as_dict() for v in rows.eval_views(8)]
    print(f"default layers: {student_layer_indices(30, 15)}")
    print("| model | perplexity of the teacher's answers |\n|---|---:|")
    print(f"| teacher (30 layers) | {evaluate_lm(teacher, None, views)['perplexity']:.3g} |")
    for name, layers in CHOICES.items():
        print(f"| 15 layers, {name} | {evaluate_lm(student_from_layers(teacher, layers), None, views)['perplexity']:.3g} |")


if __name__ == "__main__":
    main()
