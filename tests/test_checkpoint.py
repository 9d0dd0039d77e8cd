import torch

from potstill.train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint


def _setup():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_round_trip_restores_model_optimizer_and_rng(tmp_path):
    model, optimizer = _setup()
    save_checkpoint(tmp_path / "ckpt", model_state=model.state_dict(), best_state=None, optimizers=[optimizer],
                    components={}, extra={"step": 7})
    expected_next = torch.rand(3)
    fresh_model, fresh_optimizer = torch.nn.Linear(4, 3), None
    fresh_optimizer = torch.optim.AdamW(fresh_model.parameters(), lr=0.1)
    state, best, extra = load_checkpoint(tmp_path / "ckpt", [fresh_optimizer], {})
    assert extra["step"] == 7 and best is None
    assert torch.equal(torch.rand(3), expected_next)  # RNG restored to the save point
    fresh_model.load_state_dict(state)
    for a, b in zip(optimizer.state.values(), fresh_optimizer.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_kill_between_renames_recovers_the_previous_checkpoint(tmp_path):
    model, optimizer = _setup()
    folder = tmp_path / "ckpt"
    save_checkpoint(folder, model_state=model.state_dict(), best_state=None, optimizers=[optimizer], components={},
                    extra={"step": 1})
    # Simulate a SIGKILL after the old checkpoint was moved aside but before the new one was renamed in.
    folder.rename(tmp_path / ".ckpt.old-123")
    (tmp_path / ".ckpt.tmp-123").mkdir()
    assert find_checkpoint(folder) == folder
    _, _, extra = load_checkpoint(folder, [optimizer], {})
    assert extra["step"] == 1


def test_no_checkpoint(tmp_path):
    assert find_checkpoint(tmp_path / "none") is None
