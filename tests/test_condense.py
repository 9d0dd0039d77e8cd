"""Dataset condensation: the matching losses against written-out formulas, MTT's unrolled student
against an explicit loop, the synthetic-set file, and `potstill condense` end to end (bad settings,
exact resume after SIGKILL, the expert buffer kept and reused, the report)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import kill_then_resume, potstill
from potstill.data import dsa
from potstill.data.selection import herding
from potstill.data.synthetic import SyntheticSet, load_synthetic, save_synthetic
from potstill.losses.matching import gradient_distance, mean_embedding_distance, parameter_distance
from potstill.methods.condense import DM, RealData, Synthetic
from potstill.methods.condense.mtt import as_parameters, flat_parameters, unroll
from potstill.models.convnet import ConvNet, ConvNetConfig

# ---------------------------------------------------------------- the losses, written out


def dc_distance_formula(synthetic, real):
    """DC's distance, one output channel at a time in plain Python floats: for every weight
    tensor of 2+ dims, each row (output channel, all its inputs flattened) adds 1 - cos(row_s, row_r)
    with cos = dot / (|s| |r| + 1e-6); biases and other 1-D tensors add nothing."""
    total = 0.0
    for gs, gr in zip(synthetic, real):
        if gs.dim() == 1:
            continue
        for out in range(gs.shape[0]):
            s, r = gs[out].flatten().tolist(), gr[out].flatten().tolist()
            dot = sum(a * b for a, b in zip(s, r))
            norm_s, norm_r = math.sqrt(sum(a * a for a in s)), math.sqrt(sum(b * b for b in r))
            total += 1 - dot / (norm_s * norm_r + 1e-6)
    return total


def test_gradient_distance_is_dc_per_output_channel_cosine():
    torch.manual_seed(0)
    shapes = [(6, 3, 3, 3), (6,), (5, 4, 2), (10, 24), (10,)]
    syn = [torch.randn(s, dtype=torch.float64) for s in shapes]
    real = [torch.randn(s, dtype=torch.float64) for s in shapes]
    assert float(gradient_distance(syn, real)) == pytest.approx(dc_distance_formula(syn, real), rel=1e-12)
    # parallel rows cost nothing whatever their length; biases never count
    scaled = [3.0 * g for g in real]
    scaled[1] = -scaled[1]
    assert float(gradient_distance(scaled, real)) == pytest.approx(0.0, abs=1e-5)  # only the 1e-6 guard
    # one output channel pointing the other way costs exactly 2
    flipped = [g.clone() for g in real]
    flipped[3][4] = -flipped[3][4]
    assert float(gradient_distance(flipped, real)) == pytest.approx(2.0, abs=1e-5)


def test_dm_loss_is_the_distance_between_mean_embeddings():
    torch.manual_seed(1)
    real, syn = torch.randn(7, 3, 2, 2, dtype=torch.float64), torch.randn(2, 3, 2, 2, dtype=torch.float64)
    d = real.shape[1] * 4
    mean_r = [sum(float(real[i].flatten()[j]) for i in range(7)) / 7 for j in range(d)]
    mean_s = [sum(float(syn[i].flatten()[j]) for i in range(2)) / 2 for j in range(d)]
    expected = sum((a - b) ** 2 for a, b in zip(mean_r, mean_s))
    assert float(mean_embedding_distance(real, syn)) == pytest.approx(expected, rel=1e-12)


def test_dm_iteration_moves_images_by_the_gradient_of_the_summed_class_losses():
    """One DM iteration, no augmentation, every real image used: its loss and the step it takes
    equal an explicit computation with the same network."""
    torch.manual_seed(2)
    by_class = [torch.randn(5, 1, 8, 8) for _ in range(3)]
    images = torch.randn(6, 1, 8, 8)
    cfg = DM.Config(strategy="none", batch_real=100, lr_img=0.5)
    synthetic = Synthetic(images, 3, 2, learn_labels=False)

    def new_net():
        torch.manual_seed(7)
        return ConvNet((1, 8, 8), 3, ConvNetConfig(width=4))

    method = DM(cfg, RealData(by_class), synthetic, new_net)
    optimizer = torch.optim.SGD(method.param_groups(), momentum=0.5)
    logged = method.iteration(0, optimizer, torch.Generator().manual_seed(0))

    x = images.clone().requires_grad_(True)
    embed = new_net().features
    loss = sum(((embed(by_class[c]).mean(0) - embed(x[2 * c:2 * c + 2]).mean(0)) ** 2).sum() for c in range(3))
    loss.backward()
    assert logged["loss"] == pytest.approx(float(loss.detach()) / 3, rel=1e-5)
    torch.testing.assert_close(synthetic.images.detach(), images - 0.5 * x.grad, rtol=1e-5, atol=1e-6)


def test_parameter_distance_is_mtt_normalised_squared_distance():
    student, start, target = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]), torch.tensor([2.0, 2.0])
    assert float(parameter_distance(student, start, target)) == pytest.approx((1 + 0) / (4 + 4))


# ---------------------------------------------------------------- MTT's unrolled student


def _tiny_net():
    torch.manual_seed(3)
    return ConvNet((1, 4, 4), 3, ConvNetConfig(width=2, depth=1)).double()


def test_mtt_unroll_equals_an_explicit_sgd_loop():
    net = _tiny_net()
    torch.manual_seed(4)
    images, targets = torch.randn(6, 1, 4, 4, dtype=torch.float64), torch.rand(6, 3, dtype=torch.float64).softmax(-1)
    batches = [torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5]), torch.tensor([5, 0, 2]), torch.tensor([1, 4])]
    lr = torch.tensor(0.3, dtype=torch.float64)
    start = flat_parameters(net)
    final = unroll(net, start.clone().requires_grad_(True), images, targets, lr, batches)

    explicit = _tiny_net()  # the same initial weights, trained by hand
    for rows in batches:
        logits = explicit(images[rows])
        loss = -(targets[rows] * torch.log_softmax(logits, -1)).sum(-1).mean()
        grads = torch.autograd.grad(loss, list(explicit.parameters()))
        with torch.no_grad():
            for p, g in zip(explicit.parameters(), grads):
                p -= 0.3 * g
    torch.testing.assert_close(final.detach(), flat_parameters(explicit), rtol=1e-12, atol=1e-12)
    # the flat vector's views are the module's parameters, in order
    for (name, p), view in zip(explicit.named_parameters(), as_parameters(explicit, flat_parameters(explicit)).values()):
        torch.testing.assert_close(view, p.detach(), msg=name)


def test_mtt_unroll_differentiates_through_every_step():
    """The end point's gradient in the images and the step size (what MTT learns) against
    finite differences."""
    net = _tiny_net()
    torch.manual_seed(5)
    images = torch.randn(4, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    targets = torch.eye(3, dtype=torch.float64)[[0, 1, 2, 0]]
    lr = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    start, probe = flat_parameters(net), torch.randn(len(flat_parameters(net)), dtype=torch.float64)
    batches = [torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([0, 3])]

    def end_point(x, step):
        return (unroll(net, start.clone().requires_grad_(True), x, targets, step, batches) * probe).sum()

    assert torch.autograd.gradcheck(end_point, (images, lr), eps=1e-6, atol=1e-6)


# ---------------------------------------------------------------- data-free: inverting a batch-norm teacher


def test_batch_norm_statistics_loss_is_the_explicit_sum_over_layers():
    from potstill.methods.condense.inversion import batch_norm_statistics_loss, image_priors

    torch.manual_seed(9)
    teacher = ConvNet((1, 8, 8), 3, ConvNetConfig(width=4, norm="batch")).double().eval()
    for m in teacher.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    logits, loss = batch_norm_statistics_loss(teacher, x)

    expected, h = 0.0, x
    with torch.no_grad():
        for layer in teacher.features:  # conv, bn, relu, pool, conv, bn, relu, pool, flatten
            if isinstance(layer, torch.nn.BatchNorm2d):
                for stat, running in ((h.mean((0, 2, 3)), layer.running_mean),
                                      (((h - h.mean((0, 2, 3), keepdim=True)) ** 2).mean((0, 2, 3)), layer.running_var)):
                    expected += math.sqrt(sum((float(a) - float(b)) ** 2 for a, b in zip(stat, running)))
            h = layer(h)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-10)
    torch.testing.assert_close(logits, teacher(x))
    assert not any(m._forward_hooks for m in teacher.modules())  # the hooks are gone afterwards

    img = torch.tensor([[[[0.0, 1.0], [3.0, 1.0]]]], dtype=torch.float64)
    tv, l2 = image_priors(img)
    assert (float(tv), float(l2)) == pytest.approx(((9 + 0) / 2 + (1 + 4) / 2, (0 + 1 + 9 + 1) / 4))


# ---------------------------------------------------------------- augmentation, herding, the file


def test_dsa_is_siamese_and_differentiable():
    torch.manual_seed(6)
    real, syn = torch.rand(9, 1, 8, 8), torch.rand(3, 1, 8, 8, requires_grad=True)
    for family in ("color", "crop", "cutout", "scale", "rotate", "flip"):
        draw = dsa.sample(family, 9, torch.Generator().manual_seed(1))
        both = dsa.apply(torch.cat([syn.detach(), real]), dsa.Draw(family, torch.cat([draw.values[:3], draw.values])))
        torch.testing.assert_close(dsa.apply(real, draw)[:3], both[3:6], msg=family)  # row i gets transform i
        out = dsa.apply(syn, draw)
        (grad,) = torch.autograd.grad(out.sum(), syn)
        assert grad.abs().sum() > 0, family
    with pytest.raises(ValueError, match="unknown DSA transform 'blur'"):
        dsa.parse("crop_blur")


def test_herding_greedily_matches_the_class_mean():
    features = torch.tensor([[0.0], [10.0], [4.0], [6.0], [100.0], [101.0], [99.0]])
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    # class 0 mean 5: 4 is closest (ties go to the lowest index), then 6 brings the pair's mean to 5
    assert herding(features, labels, 2).tolist() == [2, 3, 4, 5]


def test_synthetic_file_round_trip_and_plain_safetensors(tmp_path):
    images, labels = torch.rand(4, 1, 8, 8), torch.tensor([0, 0, 1, 1])
    soft = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.1, 0.9]])
    path = save_synthetic(tmp_path / "s.safetensors", SyntheticSet(images, labels, 2, "dc", "abc", "crop", soft, {"k": 1}))
    back = load_synthetic(path)
    assert (back.images.equal(images), back.labels.equal(labels), back.soft_labels.equal(soft)) == (True, True, True)
    assert (back.ipc, back.method, back.fingerprint, back.augment, back.info) == (2, "dc", "abc", "crop", {"k": 1})
    with safe_open(str(path), "pt") as handle:  # outside potstill: the header and tensors as they are
        meta = json.loads(handle.metadata()["potstill"])
    assert meta["ipc"] == 2 and meta["data_fingerprint"] == "abc" and set(load_file(str(path))) == {
        "images", "labels", "soft_labels"}
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(Exception, match="not a readable safetensors"):
        load_synthetic(tmp_path / "bad.safetensors")


# ---------------------------------------------------------------- potstill condense


TINY = {
    "name": "tiny-condense", "task": "condense", "ipc": [2], "net": {"width": 8},
    "methods": {"mtt": {"method": "mtt", "params": {
        "iterations": 40, "labels": "learned", "num_experts": 2, "expert_train_epochs": 3, "max_start_epoch": 1,
        "syn_steps": 4, "batch_syn": 10}}},
    "checkpoint_every": 2, "log_every": 2,
    "evaluate": {"seeds": 2, "steps": 10, "baselines": ["random", "herding"], "baseline_augment": ["none"]},
}


def one_error_line(result):
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.mark.parametrize("overrides, expected", [
    (["ipc=[0]"], "ipc: images per class must be >= 1 (got 0)"),
    (["ipc=[1,1]"], "ipc: each value once"),
    (["ipc=[5000]"], "ipc 5000: the smallest class of the digits training split has"),
    (["methods.dc.method=dcc"], "unknown condensation method 'dcc' at methods.dc.method; did you mean 'dc'?"),
    (["methods.dm.params.lr_imgg=1"], "unknown config key 'methods.dm.params.lr_imgg'; did you mean 'lr_img'?"),
    (["methods.dc.ipc_params.10.outer_lop=2"], "did you mean 'outer_loop'?"),
    (["methods.dsa.params.strategy=crop_blur"], "unknown DSA transform 'blur'"),
    (["methods.mtt.params.max_start_epoch=20"], "exceeds expert_train_epochs"),
    (["evaluate.seedz=2"], "unknown config key 'evaluate.seedz'; did you mean 'seeds'?"),
    (["methods.random.method=dc"], "methods.random: that name is taken by a baseline row"),
    (["methods.di.method=deepinversion", "methods.di.params.init=real"], "a data-free set starts from noise"),
])
def test_bad_settings_name_the_problem(overrides, expected):
    from potstill.core.errors import UserError
    from potstill.tasks import load_recipe
    from potstill.tasks.condense import Condensation

    with pytest.raises(UserError) as error:
        Condensation(load_recipe("digits-condense", overrides))
    assert expected in str(error.value)


@pytest.mark.parametrize("args, expected", [
    (["condense", "--set", "ipc=[0]"], "images per class must be >= 1 (got 0)"),
    (["condense", "--set", "methods.dc.method=dcc"], "did you mean 'dc'?"),
    (["condense", "digits"], "is a distillation recipe"),
    (["distill", "digits-condense"], "run it with `potstill condense digits-condense`"),
])
def test_bad_settings_are_one_line_and_exit_2(args, expected, tmp_path):
    assert expected in one_error_line(potstill(*args, cwd=tmp_path))


def _iteration(run):
    state = run / "work" / "mtt-ipc2" / "checkpoint" / "state.json"
    try:
        return json.loads(state.read_text())["iteration"]
    except (OSError, ValueError):
        return 0


@pytest.mark.slow  # a whole run (15-20 s quiet): CI runs every slow test after make test (.ci/run)
def test_condense_resumes_exactly_after_sigkill_and_reuses_the_expert_buffer(tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(TINY))
    straight = potstill("condense", str(recipe), "--out", str(tmp_path / "straight"), cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    first = json.loads((tmp_path / "straight" / "work" / "mtt-ipc2" / "result.json").read_text())
    assert first["experts"]["built_now"] == 2

    run = tmp_path / "killed"
    kill_then_resume(recipe, run, tmp_path, lambda: _iteration(run) >= 6, command="condense")
    record = json.loads((run / "work" / "mtt-ipc2" / "result.json").read_text())
    assert record["resumed_from"] >= 6 and record["experts"] == {**record["experts"], "built_now": 0, "reused": 2}

    for name in ("mtt-ipc2", "random-ipc2", "herding-ipc2"):  # the same bytes: images, labels, header
        a, b = (tmp_path / "straight" / "sets" / f"{name}.safetensors"), (run / "sets" / f"{name}.safetensors")
        assert a.read_bytes() == b.read_bytes(), name
    logs = [(d / "work" / "mtt-ipc2" / "metrics.jsonl").read_text() for d in (tmp_path / "straight", run)]
    assert logs[0] == logs[1] and len(logs[0].splitlines()) == 20

    reports = [json.loads((d / "report.json").read_text()) for d in (tmp_path / "straight", run)]
    for row in ("mtt", "random", "herding"):
        assert reports[0]["rows"][row]["cells"]["2"]["convnet"] == reports[1]["rows"][row]["cells"]["2"]["convnet"]
    synthetic = load_synthetic(run / "sets" / "mtt-ipc2.safetensors")
    assert synthetic.soft_labels is not None and synthetic.soft_labels.sum(-1).allclose(torch.ones(20))
    assert synthetic.augment == dsa.DIGITS_STRATEGY and "learned_lr" in synthetic.info
    page = (run / "report.html").read_text()
    assert page.count("<img") >= 2 and "random real images" in page and "Time and memory" in page


def test_readme_example_trains_a_model_on_a_set_outside_potstill(tmp_path):
    """The README's code, run as written on a set of 10 real digits per class saved as potstill saves sets."""
    import re
    from pathlib import Path

    from potstill.data.classification import DataConfig, load_classification

    train = load_classification(DataConfig(name="digits", augment="none")).train
    rows = torch.cat([(train.y == c).nonzero().flatten()[:10] for c in range(10)])
    path = save_synthetic(tmp_path / "dm-ipc10.safetensors", SyntheticSet(
        train.x[rows], train.y[rows], 10, "random", "f", "none"))
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = next(block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "load_file(" in block)
    code = re.sub(r'load_file\("[^"]*"\)', f'load_file("{path}")', code)
    scope: dict = {}
    exec(code, scope)
    assert (scope["model"](scope["images"]).argmax(-1) == scope["labels"]).float().mean() > 0.9


@pytest.mark.slow
def test_dm_and_deepinversion_on_digits_end_to_end(tmp_path):
    """A real (small) run: DM at IPC 1 beats the random real images it started from; a data-free
    set trains a student well above chance; `potstill report` re-renders the page."""
    recipe = tmp_path / "small.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "small", "task": "condense", "ipc": [1], "net": {"width": 16},
        "methods": {"dm": {"method": "dm", "params": {"iterations": 200}},
                    "di": {"method": "deepinversion", "params": {"iterations": 100}}},
        "teacher": {"steps": 300, "net": {"width": 16, "norm": "batch"}},
        "evaluate": {"seeds": 2, "steps": 200, "baselines": ["random", "full-kd"], "cross_arch": False}}))
    result = potstill("condense", str(recipe), "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    verdict = {(v["row"], v["ipc"]): v["verdict"] for v in report["verdicts"]}
    assert verdict[("dm", 1)] == "beats", report["verdicts"]
    assert report["rows"]["di"]["cells"]["1"]["convnet"]["mean"] > 0.3
    assert report["teacher"]["test_accuracy"] > 0.9
    (tmp_path / "run" / "report.html").unlink()
    assert potstill("report", str(tmp_path / "run"), cwd=tmp_path).returncode == 0
    assert (tmp_path / "run" / "report.html").exists()
