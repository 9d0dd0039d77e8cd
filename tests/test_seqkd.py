"""seqkd: the teacher's greedy answers, generated once per training row, kept (and checkpointed),
and trained on with CE on the answer tokens alone."""

import torch

from helpers import ROLLOUT_EOS, ROLLOUT_PAD, ROLLOUT_VOCAB, tiny_rollout_lm

from potstill.batches import IGNORE, Origin, TokenBatch, TokenView, plan_normaliser
from potstill.losses.chunked import linear_cross_entropy
from potstill.methods.lm_common import shifted
from potstill.methods.seqkd import SeqKD
from potstill.models.hf import lm_hidden_and_head
from potstill.models.hf.rollout import sample_continuations
from potstill.teachers.base import Capability
from potstill.teachers.lm import LMTeacher
from potstill.teachers.lm_ensemble import lm_ensemble_capabilities

V, EOS, PAD = ROLLOUT_VOCAB, ROLLOUT_EOS, ROLLOUT_PAD
tiny = tiny_rollout_lm




def count_prompt_rows(model) -> dict:
    """Counts the prompt rows the model's decoder is asked to start from (later passes feed one token)."""
    seen = {"rows": 0}

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:
            seen["rows"] += len(ids)

    model.get_decoder().register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def rows(index, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (40, 12), generator=g)[index]
    labels = ids.clone()
    labels[:, :5] = IGNORE
    return TokenBatch(TokenView(ids, torch.ones_like(ids), labels), index=index)


def test_answers_are_the_teachers_greedy_ones_generated_once_and_kept():
    teacher_model = tiny(1, layers=2).eval()
    counting = count_prompt_rows(teacher_model)
    method = SeqKD(tiny(0), LMTeacher(teacher_model, "t"), SeqKD.Config(max_new_tokens=6), num_classes=V, num_train=40)
    first = method.prepare_step(0, [rows(torch.tensor([0, 3, 7, 9]))])[0]
    assert first.origin is Origin.TEACHER and counting["rows"] == 4
    again = method.prepare_step(1, [rows(torch.tensor([7, 0, 11]))])[0]
    assert counting["rows"] == 5  # only row 11 was new
    ids, mask = rows(torch.tensor([7, 0, 11])).student.prompts(16)
    expected = sample_continuations(teacher_model, ids, mask, max_new_tokens=6, temperature=0.0, stop_ids=[EOS],
                                    pad_id=PAD)
    width = expected.input_ids.shape[1]
    assert torch.equal(again.student.labels[:, :width], expected.labels)
    assert (again.student.labels[:, width:] == IGNORE).all()
    # kept in the checkpoint's components: a new method restored from them never asks again
    state = method.components()["teacher_answers"].state_dict()
    fresh = SeqKD(tiny(0), LMTeacher(teacher_model, "t"), SeqKD.Config(max_new_tokens=6), num_classes=V, num_train=40)
    fresh.setup(first)
    fresh.components()["teacher_answers"].load_state_dict(state)
    counting["rows"] = 0
    restored = fresh.prepare_step(1, [rows(torch.tensor([7, 0, 11]))])[0]
    assert counting["rows"] == 0 and torch.equal(restored.student.input_ids, again.student.input_ids)


def test_the_loss_is_ce_on_the_answer_tokens():
    method = SeqKD(tiny(0), LMTeacher(tiny(1).eval(), "t"), SeqKD.Config(max_new_tokens=5), num_classes=V,
                   num_train=40)
    (batch,) = method.prepare_step(0, [rows(torch.tensor([1, 2, 3]))])
    plan_normaliser([batch])
    view = batch.student
    hidden, head, _ = lm_hidden_and_head(method.student, view.input_ids, view.attention_mask)
    h, labels = shifted(view, hidden)
    assert (view.labels[:, :5] == IGNORE).all()
    torch.testing.assert_close(method(batch)["ce"], linear_cross_entropy(h, head, labels, num_items=batch.num_items))


def test_seqkd_needs_a_teacher_that_generates():
    need = SeqKD.needs(SeqKD.Config())[0]
    assert Capability.GENERATE in need.any_of
    assert not need.any_of & lm_ensemble_capabilities([LMTeacher.capabilities] * 2)
