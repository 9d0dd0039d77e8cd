"""The language-model task's recipe sections: teacher, student architecture, text data, evaluation."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from potstill.config import RecipeBase, Strict, StudentConfig, TrainConfig, absolute_path
from potstill.tasks.teacher_ensemble import EnsembleRuleConfig
from potstill.teachers.served.config import ServedTeacherKeys


class LMEnsembleMemberConfig(Strict):
    """One LM member: the keys given here replace the recipe's ``teacher`` section's, the rest is inherited."""

    model: str | None = Field(None, description="This member's model (null: teacher.model): a built-in name, a local "
                              "Hugging Face folder or 'tiny'; every member must share the students' tokenizer.")
    tiny_hidden: int | None = Field(None, gt=0, description="For model='tiny': hidden size (null: teacher.tiny_hidden).")
    tiny_layers: int | None = Field(None, gt=0, description="For model='tiny': layers (null: teacher.tiny_layers).")
    seed: int | None = Field(None, description="For model='tiny': seed of its initial weights and batch order "
                             "(null: teacher.seed).")
    train: dict[str, Any] | None = Field(None, description="For model='tiny': keys of teacher.train to change for "
                                         "this member (e.g. {steps: 500}).")


class LMEnsembleConfig(EnsembleRuleConfig):
    members: list[LMEnsembleMemberConfig] = Field(..., min_length=1, description="The teachers of the ensemble; tiny "
                                                  "ones are trained once and kept. The first member answers the chat "
                                                  "prompts, gives the report's teacher generations and, for "
                                                  "student.init='teacher_layers', the students' initial layers.")


class LMTeacherConfig(ServedTeacherKeys):  # teacher.url and its settings: a served teacher (docs/served.md)
    renamed = {"cache": "store"}

    model: str = Field("smollm2-135m-instruct", description="Built-in model name, a local Hugging Face causal-LM directory, or 'tiny' (a small Llama trained in the run).")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Teacher weights dtype.")
    precompute: bool = Field(True, description="Run the teacher once over the training set and keep its final hidden states (exact: text has no augmentation).")
    tiny_hidden: int = Field(64, gt=0, description="For model='tiny': hidden size.")
    tiny_layers: int = Field(2, gt=0, description="For model='tiny': decoder layers.")
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(steps=300, batch_size=16, lr=3e-3, eval_every=100, checkpoint_every=100),
        description="For model='tiny': the teacher's training schedule.",
    )
    seed: int = Field(0, description="For model='tiny': seed of the teacher's initial weights and batch order.")
    reuse: bool = Field(True, description="Reuse a kept tiny teacher trained with the same config and data.")
    store: str | None = Field(None, description="Train from an offline teacher store written by `potstill store` "
                              "(a directory): targets are read from it in step with the data order, no teacher model "
                              "stays in memory (teacher weights are read once if student.init='teacher_layers'); "
                              "tokenizer, vocab size, temperature and data must match (checked before training; "
                              "see docs/store.md).")

    ensemble: LMEnsembleConfig | None = Field(None, description="Teach with an ensemble of LM teachers with one "
                                              "tokenizer, each one this section with a member's keys changed, mixed "
                                              "by the chunked engine (docs/ensembles.md). With teacher.store the store "
                                              "is the teacher, and member 0 gives the students' architecture.")

    _absolute_store = field_validator("store")(absolute_path)


class LMStudentModelConfig(Strict):
    model: str | None = Field(None, description="A pretrained model with its own tokenizer (built-in name or local "
                              "Hugging Face folder): the students start from its weights, layer-pruned to num_layers "
                              "evenly spaced layers, and are distilled across tokenizers (docs/cross-tokenizer.md). "
                              "null: the students are built from the teacher and share its tokenizer.")
    num_layers: int = Field(1, gt=0, description="Decoder layers of the student (with student.model: that model's "
                            "layers kept, at most all of them).")
    hidden_size: int | None = Field(None, description="Student width (null: the teacher's).")
    intermediate_size: int | None = Field(None, description="Student MLP width (null: the teacher's).")
    num_heads: int | None = Field(None, description="Attention heads (null: the teacher's).")
    init: Literal["teacher_layers", "random"] = Field("teacher_layers", description="Copy evenly spaced teacher layers (same width only) or random init. With student.model: that model's own layers (teacher_layers only).")


class LMDataConfig(Strict):
    source: Literal["pydoc", "addition"] = Field("pydoc", description="pydoc: Python's reference text (+ teacher-"
                                                 "answered prompts); addition: synthetic multi-digit addition problems "
                                                 "with an exact verifier (docs/onpolicy.md), answer digits least "
                                                 "significant first.")
    addition_digits: int = Field(3, gt=0, le=9, description="source=addition: digits of each operand.")
    addition_problems: int = Field(6000, gt=10, description="source=addition: distinct problems, shared out as the "
                                   "split fractions.")
    seq_len: int = Field(128, gt=8, description="Tokens per training sequence.")
    max_documents: int | None = Field(None, description="Use at most this many pydoc_data topics (null: all).")
    max_sequences: int | None = Field(None, description="Keep at most this many packed text sequences (null: all).")
    chat_prompts: int = Field(120, ge=0, description="Prompts answered by the teacher (greedy) and added as prompt/response examples (prompt masked).")
    response_tokens: int = Field(64, gt=0, description="Max new tokens of each teacher response.")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="Validation split (checkpoint selection).")
    test_fraction: float = Field(0.1, gt=0, lt=1, description="Held-out test split (reported only).")
    split_seed: int = Field(0, description="Seed of the split.")
    tokenizer_vocab: int = Field(512, gt=16, description="For teacher.model='tiny': vocabulary of the in-run tokenizer "
                                 "(source=addition: one token per character instead).")

    @model_validator(mode="after")
    def _source_fits(self) -> "LMDataConfig":
        if self.source == "addition" and self.chat_prompts:
            raise ValueError("data.source=addition has its own prompts: set data.chat_prompts=0")
        return self


class LMEvalConfig(Strict):
    generations: int = Field(4, ge=0, description="Held-out prompts generated greedily by the teacher and each student for the report.")
    generation_tokens: int = Field(40, gt=0, description="Max new tokens per generation.")
    batch_size: int = Field(8, gt=0, description="Sequences per evaluation batch.")
    max_val_sequences: int | None = Field(64, description="Validation sequences used for checkpoint selection (null: all).")
    answers: bool = Field(False, description="Score greedy answers to the held-out prompts (answer_teacher_nll: the "
                          "teacher's NLL per token of the answer; answer_rouge_l against the teacher's answer; "
                          "answer_perplexity of the teacher's answers; docs/onpolicy.md) for the teacher, every student "
                          "and the untouched student (its initial weights, not trained); the report's generations are then "
                          "these answers (data.response_tokens long, not generation_tokens). Needs a teacher model, chat "
                          "prompts and rouge-score (the [models] extra).")



class LMRecipe(RecipeBase):
    name: str = Field("custom-lm", description="Recipe name (used in the default run directory).")
    task: Literal["lm"] = Field("lm", description="Task family.")
    seeds: int = Field(1, gt=0, description="Seeds per student.")
    teacher: LMTeacherConfig = Field(default_factory=LMTeacherConfig, description="Teacher.")
    student: LMStudentModelConfig = Field(default_factory=LMStudentModelConfig, description="Student architecture.")
    data: LMDataConfig = Field(default_factory=LMDataConfig, description="Text data.")
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(steps=200, batch_size=8, lr=5e-4, warmup_steps=20, eval_every=50,
                                            checkpoint_every=50, log_every=10),
        description="Student training schedule (same budget for every student).",
    )
    students: dict[str, StudentConfig] = Field(
        default_factory=lambda: {"baseline": StudentConfig(method="lm_ce"),
                                 "forward_kl": StudentConfig(method="lm_kd", params={"divergence": "forward_kl"})},
        description="Students by name; 'baseline' should be the CE-only student.",
    )
    eval: LMEvalConfig = Field(default_factory=LMEvalConfig, description="Evaluation settings.")
