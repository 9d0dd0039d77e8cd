"""Student rollouts: greedy decoding equals transformers' generate, every sampled token was drawn from
the distribution a plain forward of the returned sequence gives (positions right under padding),
draws are reproducible from the generator, rows stop at their stop token, and nucleus filtering
matches its definition."""

import pytest
import torch

from potstill.models.hf import lm_hidden_and_head, tiny_llama
from potstill.models.hf.rollout import sample_continuations, top_p_filter_

V, STOP, PAD = 40, 3, 0


@pytest.fixture(scope="module")
def model():
    # a large init scale: a default-initialised tiny model repeats its last token whatever the
    # context, which would hide a wrong attention mask
    return tiny_llama(V, hidden_size=32, num_layers=2, intermediate_size=64, num_heads=4, num_kv_heads=2, seed=0,
                      initializer_range=0.5).eval()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, V, (4, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    mask[2, 1:] = 0  # a one-token prompt
    return ids * mask, mask


def full_forward_log_probs(model, out):
    hidden, weight, _ = lm_hidden_and_head(model, out.input_ids, out.attention_mask)
    return torch.log_softmax(hidden @ weight.T, dim=-1)


def test_greedy_equals_transformers_generate(model, prompts):
    ids, mask = prompts
    out = sample_continuations(model, ids, mask, max_new_tokens=6, temperature=0.0, pad_id=PAD)
    for row in range(len(ids)):
        n = int(mask[row].sum())
        expected = model.generate(ids[row:row + 1, :n], attention_mask=mask[row:row + 1, :n], max_new_tokens=6,
                                  do_sample=False, pad_token_id=PAD, eos_token_id=None)
        assert torch.equal(out.input_ids[row, :n + 6], expected[0]), row
        assert torch.equal(out.labels[row, n:n + 6], expected[0, n:])
        assert (out.labels[row, :n] == -100).all()


def test_each_sampled_token_comes_from_the_distribution_training_scores(model, prompts):
    # temperature 1, no top-p: a draw from p is likely only if p is the distribution it was drawn
    # from; compare the log-probs the sampler used (recomputed step by step with the same generator)
    # with a plain forward of the result, which is what the loss will see
    ids, mask = prompts
    out = sample_continuations(model, ids, mask, max_new_tokens=8, temperature=1.0, pad_id=PAD,
                               generator=torch.Generator().manual_seed(5))
    log_p = full_forward_log_probs(model, out)
    targets = out.labels[:, 1:] != -100
    # greedy continuation of each sampled prefix must agree with the forward's argmax at every position
    for row in range(len(ids)):
        n = int(mask[row].sum())
        for t in range(n, int(out.attention_mask[row].sum())):
            prefix = out.input_ids[row:row + 1, :t]
            step = sample_continuations(model, prefix, torch.ones_like(prefix), max_new_tokens=1, temperature=0.0)
            assert int(step.input_ids[0, t]) == int(log_p[row, t - 1].argmax()), (row, t)
    assert targets.sum() == out.response_lengths.sum()


def test_draws_are_a_function_of_the_generator(model, prompts):
    ids, mask = prompts
    run = lambda seed: sample_continuations(model, ids, mask, max_new_tokens=6, pad_id=PAD,  # noqa: E731
                                            generator=torch.Generator().manual_seed(seed)).input_ids
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    model.train()
    try:  # the sampler sets eval mode itself and restores train mode
        assert torch.equal(run(1), run(1)) and model.training
    finally:
        model.eval()


def test_a_row_stops_after_its_stop_token_and_keeps_it(model, prompts):
    ids, mask = prompts
    # make the stop token the model's favourite: its head row is scaled up
    biased = tiny_llama(V, hidden_size=32, num_layers=2, intermediate_size=64, num_heads=4, num_kv_heads=2,
                        seed=0, tie_word_embeddings=False).eval()
    with torch.no_grad():
        biased.lm_head.weight[STOP] = biased.lm_head.weight.mean(0) * 0 + biased.model.norm.weight * 5
    out = sample_continuations(biased, ids, mask, max_new_tokens=6, temperature=0.0, stop_ids=[STOP], pad_id=PAD)
    for row in range(len(ids)):
        response = out.labels[row][out.labels[row] != -100]
        assert len(response) == int(out.response_lengths[row])
        if STOP in response.tolist():
            assert response.tolist().index(STOP) == len(response) - 1  # nothing after the stop token
            assert out.attention_mask[row].sum() == mask[row].sum() + len(response)
    assert (out.response_lengths < 6).any(), "the stop token never stopped a row"


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
    kept = torch.isfinite(top_p_filter_(logits.clone(), 0.8))
    assert kept.tolist() == [[True, True, False, False], [False, False, True, True]]
    assert torch.isfinite(top_p_filter_(logits.clone(), 0.01)).sum(dim=1).tolist() == [1, 1]  # the top token stays
    assert torch.equal(top_p_filter_(logits.clone(), 1.0), logits)


def test_bad_settings(model, prompts):
    ids, mask = prompts
    with pytest.raises(ValueError, match="max_new_tokens"):
        sample_continuations(model, ids, mask, max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        sample_continuations(model, ids, mask, max_new_tokens=2, top_p=0)
    with pytest.raises(ValueError, match="at least one token"):
        sample_continuations(model, ids, mask * 0, max_new_tokens=2)
