"""Network ``onet``: MTCNN's ONet convolutions as a recognition trunk, starting from the detector's weights."""
from __future__ import annotations

import pytest
import torch
from facenet_pytorch.models.mtcnn import ONet

from models import get_backbone
from models.onet import ONetTrunk, detector_weights_path, load_detector_weights
from tasks.checkpoint import build_backbone


def _detector() -> ONet:
    return ONet(pretrained=True).eval()


def test_onet_starts_from_the_detector_weights_and_computes_its_features():
    net = get_backbone("onet", emb_size=64, image_size=(48, 48)).eval()
    onet = _detector()
    for name, value in net.trunk.state_dict().items():
        assert torch.equal(value, onet.state_dict()[name]), name
    x = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = onet.prelu3(onet.conv3(onet.pool2(onet.prelu2(onet.conv2(onet.pool1(onet.prelu1(onet.conv1(x))))))))
        assert torch.equal(net.trunk(x), ref)
        assert net(x).shape == (3, 64)


def test_depth_4_reaches_conv4_and_output_shapes():
    trunk = ONetTrunk(depth=4)
    load_detector_weights(trunk)
    assert torch.equal(trunk.conv4.weight, _detector().conv4.weight)
    assert trunk(torch.zeros(2, 3, 48, 48)).shape == (2, 128, 3, 3)
    assert ONetTrunk(depth=3)(torch.zeros(2, 3, 48, 48)).shape == (2, 64, 8, 8)
    net = get_backbone("onet", depth=4, image_size=(56, 56))
    assert net.emb_size == 128 and net(torch.zeros(2, 3, 56, 56)).shape == (2, 128)


def test_bad_depth_and_bad_weights_are_named(tmp_path):
    with pytest.raises(ValueError, match="depth must be 3 or 4"):
        ONetTrunk(depth=5)
    other = tmp_path / "other.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match=rf"{other}: not an MTCNN ONet state dict \(no conv1.bias"):
        load_detector_weights(ONetTrunk(), other)
    with pytest.raises(FileNotFoundError, match="MTCNN's ONet weights are not there"):
        load_detector_weights(ONetTrunk(), tmp_path / "absent.pt")
    assert detector_weights_path().is_file()


def test_checkpoint_rebuild_keeps_trained_weights():
    """A checkpoint's network is rebuilt from its arguments and then loaded: the trained weights win."""
    args = {"network": "onet", "emb_size": 32, "image_size": (48, 48)}
    trained = build_backbone(args)
    with torch.no_grad():
        trained.trunk.conv1.weight.add_(1.0)
    rebuilt = build_backbone(args)
    rebuilt.load_state_dict(trained.state_dict())
    assert torch.equal(rebuilt.trunk.conv1.weight, trained.trunk.conv1.weight)
    assert not torch.equal(rebuilt.trunk.conv1.weight, _detector().conv1.weight)
