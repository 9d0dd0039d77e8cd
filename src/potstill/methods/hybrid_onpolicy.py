"""On-policy hybrid cross-tokenizer distillation: on a fraction ``lmbda`` of the steps the student
continues the first ``prompt_tokens`` tokens of each row with its own sample; the prompt and sample
are detokenized to bytes, re-tokenized for the teacher and aligned
(:func:`potstill.data.text.retokenize_for_teacher`), and the :mod:`~potstill.methods.hybrid` loss
runs on the sample's spans, the teacher scoring its own tokenization of the student's text. The
other steps are the off-policy ``hybrid`` on the dataset's text.

As ``gkd``: a step's draw and its samples are a pure function of (seed, step, student weights), so
a resumed run samples what the uninterrupted one did; ``sampling_temperature`` shapes the samples,
``temperature`` the distributions the loss compares. A sample's bytes that are not valid UTF-8 (cut
inside a character) lie in no span.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from potstill.batches import Origin, TokenBatch, TokenView
from potstill.core.hashing import keyed_seed
from potstill.data.text import retokenize_for_teacher
from potstill.data.text.alignment import needs_start, start_token, with_start
from potstill.methods.gkd import SCORE_NEED, stop_and_pad_ids
from potstill.methods.hybrid import HybridConfig, hybrid_losses
from potstill.methods.base import Method
from potstill.methods.xtok_common import XTOK_NEED
from potstill.models.hf.rollout import sample_continuations


class OnPolicyHybrid(Method):
    name = "hybrid_onpolicy"
    for_tokens = True
    cross_tokenizer = True
    teacher_needs = (XTOK_NEED, SCORE_NEED)

    class Config(HybridConfig):
        lmbda: float = Field(1.0, ge=0, le=1, description="Fraction of steps (drawn per step) that train on the "
                             "student's own samples; 0: off-policy hybrid.")
        sampling_temperature: float = Field(1.0, ge=0, description="Temperature of the samples (0: greedy).")
        top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass of the samples (1: off).")
        max_new_tokens: int = Field(32, gt=0, description="Most tokens sampled per row (EOS ends one earlier).")
        prompt_tokens: int = Field(16, gt=1, description="Tokens of each text row the student continues.")

    def prepare_step(self, step: int, micro_batches: list[TokenBatch]) -> list[TokenBatch]:
        if not micro_batches:
            return micro_batches
        draw = torch.rand((), generator=torch.Generator().manual_seed(keyed_seed(micro_batches[0].seed, 1)))
        if float(draw) >= self.config.lmbda:
            return micro_batches
        return [self.rollout(batch) for batch in micro_batches]

    @torch.no_grad()
    def rollout(self, batch: TokenBatch) -> TokenBatch:
        cfg, view, teacher = self.config, batch.student, self.teacher
        stop_ids, pad_id = stop_and_pad_ids(self.student)
        prompt_ids, prompt_mask = view.prompts(cfg.prompt_tokens)
        generator = torch.Generator(device=prompt_ids.device).manual_seed(keyed_seed(batch.seed, 2))
        out = sample_continuations(self.student, prompt_ids, prompt_mask, max_new_tokens=cfg.max_new_tokens,
                                   temperature=cfg.sampling_temperature, top_p=cfg.top_p, stop_ids=stop_ids,
                                   pad_id=pad_id, generator=generator)
        lengths = out.attention_mask.sum(dim=1).tolist()
        t_tok = teacher.teacher_tokenizer
        aligned = [retokenize_for_teacher(out.input_ids[b, :n].cpu(), teacher.student_tokenizer, t_tok)
                   for b, n in enumerate(lengths)]
        # the teacher reads its side as it read the training text: after its start token
        aligned = [with_start(al, None, start_token(t_tok) if needs_start(t_tok, al.teacher_ids) else None)
                   for al in aligned]
        width = max(len(al.teacher_ids) for al in aligned)
        t_pad = t_tok.pad_token_id or 0
        t_ids = torch.full((len(aligned), width), int(t_pad), dtype=torch.long)
        t_mask = torch.zeros_like(t_ids)
        for b, al in enumerate(aligned):
            t_ids[b, :len(al.teacher_ids)], t_mask[b, :len(al.teacher_ids)] = al.teacher_ids, 1
        device = view.input_ids.device
        t_view = TokenView(t_ids.to(device), t_mask.to(device), t_ids.masked_fill(t_mask == 0, -100).to(device))
        return TokenBatch(TokenView(out.input_ids, out.attention_mask, out.labels), teacher_view=t_view,
                          origin=Origin.ROLLOUT, seed=batch.seed, aligned=aligned)

    def forward(self, batch: TokenBatch) -> dict[str, Tensor]:
        return hybrid_losses(self, batch)
