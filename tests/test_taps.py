import pytest
import torch
from torch import nn

from potstill.models.taps import FeatureTaps, build_connector, probe_shapes, resolve_module
from potstill.core.errors import UserError


def model():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))


def test_probe_shapes_is_a_dry_run_that_leaves_no_hooks():
    net = model().train()
    shapes = probe_shapes(net, ["0", "3"], torch.zeros(2, 1, 8, 8))
    assert shapes == {"0": (2, 4, 8, 8), "3": (2, 10)}
    assert net.training and not net[0]._forward_hooks


def test_taps_record_each_forward():
    net = model()
    taps = FeatureTaps(net, ["1"])
    out = net(torch.randn(3, 1, 8, 8))
    recorded = taps.pop()
    assert recorded["1"].shape == (3, 4, 8, 8) and out.shape == (3, 10)
    assert taps.pop() == {}
    taps.remove()
    net(torch.randn(1, 1, 8, 8))
    assert taps.pop() == {}


def test_wrong_path_names_the_closest():
    with pytest.raises(UserError, match=r"student has no module at path '4'") as error:
        resolve_module(model(), "4", "student")
    assert "closest" in str(error.value) or "available" in str(error.value)


@pytest.mark.parametrize("s, t, kind", [((2, 16), (2, 32), nn.Linear), ((2, 4, 8, 8), (2, 6, 8, 8), nn.Conv2d),
                                         ((2, 4, 10), (2, 6, 10), nn.Conv1d)])
def test_connectors_map_student_to_teacher(s, t, kind):
    connector = build_connector(s, t, "x")
    assert isinstance(connector, kind)
    assert connector(torch.randn(*s)).shape == t


def test_impossible_pairing_shows_both_shapes():
    with pytest.raises(UserError, match=r"\(2, 16\).*\(2, 4, 8, 8\)"):
        build_connector((2, 16), (2, 4, 8, 8), "student 'a' with teacher 'b'")
