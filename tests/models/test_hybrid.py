"""The hybrid network's shapes and configuration, and its ONNX export with parity."""

import numpy as np
import pytest
import torch

from models.errors import InputError, ParityError
from models.export import check_parity, export_onnx, torch_probabilities
from models.hybrid import HybridConfig, HybridNet, Probabilities, build_model

TINY = dict(stem_channels=(8, 16), embed_dim=16, depth=1, heads=2, head_hidden=16)


@pytest.mark.parametrize("channels, size, classes", [(1, (28, 28), 2), (3, (20, 33), 5), (1, (7, 9), 3)])
def test_any_channels_size_and_classes(channels, size, classes):
    net = build_model(HybridConfig(channels, classes, size, **TINY), seed=0).eval()
    x = torch.randn(3, channels, *size)
    assert net(x).shape == (3, classes)
    z = net.features(x)
    assert z.shape == (3, 16 + 16)  # [F_cnn || F_trans]
    probs = Probabilities(net, 2.0)(x)
    assert torch.allclose(probs.sum(1), torch.ones(3))
    assert torch.allclose(probs, torch.softmax(net(x) / 2.0, 1), atol=1e-6)


def test_token_grid_is_capped_and_the_transformer_is_used():
    cfg = HybridConfig(1, 2, (64, 64), stem_channels=(8, 16, 32), max_tokens=64, embed_dim=16, heads=2)
    assert cfg.token_grid == (8, 8)
    assert HybridConfig(1, 2, (128, 96), stem_channels=(8, 16, 32), embed_dim=16, heads=2).token_grid == (8, 6)
    net = build_model(cfg, seed=1).eval()
    x = torch.randn(2, 1, 64, 64)
    before = net.features(x)[:, 32:].clone()
    with torch.no_grad():
        net.pos.add_(torch.randn_like(net.pos))  # positions reach the transformer half of Z, not the CNN half
    after = net.features(x)
    assert not torch.allclose(before, after[:, 32:]) and net.features(x)[:, :32].shape == (2, 32)


def test_seeded_builds_are_identical_and_configs_round_trip():
    cfg = HybridConfig(3, 4, (16, 16), **TINY)
    a, b = build_model(cfg, seed=7), build_model(cfg, seed=7)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(next(iter(build_model(cfg, seed=8).parameters())), next(iter(a.parameters())))
    assert HybridConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError):
        HybridConfig(1, 1, (8, 8))
    with pytest.raises(ValueError):
        HybridConfig(1, 2, (8, 8), embed_dim=10, heads=4)


def test_onnx_export_has_a_dynamic_batch_and_matches_pytorch(tmp_path):
    import onnx

    net = build_model(HybridConfig(3, 4, (20, 24), **TINY), seed=0).eval()
    path = export_onnx(net, (3, 20, 24), tmp_path / "m.onnx", temperature=1.7)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert not list(tmp_path.glob("*.data"))  # one self-contained file
    x = np.random.default_rng(0).normal(size=(301, 3, 20, 24)).astype(np.float32)
    report = check_parity(net, path, x, temperature=1.7)
    assert report.n == 301 and report.max_abs_diff <= 1e-4 and report.labels_identical
    from models.runtime import OnnxModel

    ort_model = OnnxModel.load(path)
    for n in (1, 7):
        assert ort_model.predict_proba(x[:n]).shape == (n, 4)
    with pytest.raises(InputError, match="does not fit"):
        ort_model.predict_proba(x[:, :1])


def test_parity_catches_a_model_that_differs(tmp_path):
    net = build_model(HybridConfig(1, 2, (12, 12), **TINY), seed=0).eval()
    path = export_onnx(net, (1, 12, 12), tmp_path / "m.onnx")
    with torch.no_grad():
        net.head[-1].bias.add_(torch.tensor([2.0, -2.0]))
    x = np.random.default_rng(1).normal(size=(50, 1, 12, 12)).astype(np.float32)
    with pytest.raises(ParityError, match="differs from PyTorch"):
        check_parity(net, path, x)
    assert torch_probabilities(net, x).shape == (50, 2)


def test_network_is_hybrid_in_structure():
    net = HybridNet(HybridConfig(1, 2, (28, 28)))
    kinds = {type(m).__name__ for m in net.modules()}
    assert {"Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "LayerNorm", "_Attention", "Linear"} <= kinds
