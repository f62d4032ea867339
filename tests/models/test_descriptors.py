"""The descriptor branch computes the edge's descriptors inside the graph and exports."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import pywt
import torch

from models.descriptors import DescriptorBranch, haar_energies, hog_cells
from models.export import export_onnx
from models.hybrid import HybridConfig, build_model
from models.modality import ModalityConfig, wavelet_descriptor


def test_haar_energies_are_the_edge_wavelet_descriptor():
    rng = np.random.default_rng(0)
    image = rng.random((32, 48)).astype(np.float32)
    ours = haar_energies(torch.from_numpy(image)[None, None], levels=2)[0].numpy()
    edge = wavelet_descriptor(image, ModalityConfig(wavelet="haar", wavelet_levels=2))
    assert ours.shape == edge.shape == (7,)
    np.testing.assert_allclose(ours, edge, rtol=1e-5)
    assert pywt.wavedec2(image, "haar", level=2)[0].shape == (8, 12)


@pytest.mark.parametrize("angle, expected_bin", [(0.0, 0), (np.radians(80), 4), (np.radians(40), 2), (np.radians(140), 7)])
def test_hog_votes_for_the_gradient_orientation(angle, expected_bin):
    # a ramp along direction `angle`: every gradient points that way; 9 bins of 20 degrees
    yy, xx = np.mgrid[0:24, 0:24].astype(np.float32)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy).astype(np.float32)
    hist = hog_cells(torch.from_numpy(ramp)[None, None], cells=2, bins=9).view(9, 4)
    assert (hist.argmax(dim=0) == expected_bin).all()
    np.testing.assert_allclose(hist.norm(dim=0).numpy(), 1.0, rtol=1e-3)  # L2 per cell


def test_branch_changes_the_features_and_exports_at_odd_sizes(tmp_path):
    cfg = HybridConfig(1, 2, (30, 27), descriptors=True, descriptor_dim=16)
    net = build_model(cfg, seed=0).eval()
    x = torch.rand(4, 1, 30, 27)
    x[0] = 0.0  # flat images and regions: zero gradients, where a folded-away epsilon gave NaN
    x[1, :, :15] = 0.5
    assert net.features(x).shape[1] == 128 + 128 + 16
    assert net.descriptors(x).shape == (4, 16)
    DescriptorBranch(1, 16)(x)  # no size constraint
    path = export_onnx(net, (1, 30, 27), tmp_path / "m.onnx", 1.0)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probs = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        expected = torch.softmax(net(x), dim=1).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)


def test_configs_without_the_field_load_as_before():
    d = HybridConfig(1, 2, (28, 28)).to_dict()
    d.pop("descriptors"), d.pop("descriptor_dim")
    assert HybridConfig.from_dict(d).descriptors is False
