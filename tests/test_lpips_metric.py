"""models.lpips_metric: LPIPS without torchvision, real backbone weights or a loudly
labelled random one, and no fake torchvision left behind for transformers to find."""
from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from models.hub import SetupError
from models.lpips_metric import (BACKBONE_FILES, LPIPSMetric, default_backbone_path,
                                 standin_backbone, standin_torchvision)

ROOT = Path(__file__).resolve().parents[1]
TORCHVISION_INSTALLED = importlib.util.find_spec("torchvision") is not None


@pytest.fixture(autouse=True)
def no_real_cache(tmp_path, monkeypatch):
    """Keep the user's torchvision hub cache out of the tests."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


@pytest.fixture(scope="module")
def metric():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", "/nonexistent/niche-test-torch-home")
        return LPIPSMetric(allow_random=True)


def image(batch: int = 2, size: int = 64) -> torch.Tensor:
    """Smooth structured images in [-1, 1]."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    base = torch.stack([xx, yy, torch.sin(3 * xx) * torch.cos(2 * yy)]) * 0.8
    return torch.stack([base.roll(i * 5, dims=2) for i in range(batch)])


def noisy(img: torch.Tensor, level: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (img + level * torch.randn(img.shape, generator=g)).clamp(-1, 1)


def backbone_file(path: Path, net: str = "alex", **override: torch.Tensor) -> dict[str, torch.Tensor]:
    """A checkpoint laid out like torchvision's (features.N.*, classifier.*)."""
    torch.manual_seed(1)
    sd = {k: v.clone() for k, v in standin_backbone(net).state_dict().items()}
    sd["classifier.1.weight"] = torch.randn(10, 4)  # real checkpoints carry the classifier too
    sd.update(override)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return sd


# --- the distance --------------------------------------------------------------------------

def test_identical_images_are_zero(metric):
    img = image()
    assert torch.allclose(metric(img, img), torch.zeros(2), atol=1e-6)


def test_distance_grows_with_noise(metric):
    img = image()
    d = [metric(img, noisy(img, level)) for level in (0.05, 0.2, 0.5)]
    assert (d[0] > 1e-4).all()
    assert (d[0] < d[1]).all() and (d[1] < d[2]).all(), d


def test_symmetric(metric):
    a, b = image(), noisy(image(), 0.3)
    assert torch.allclose(metric(a, b), metric(b, a), atol=1e-6)


def test_batch_shape_no_grad(metric):
    a = image(batch=3, size=40).requires_grad_(True)
    d = metric(a, noisy(a.detach(), 0.1))
    assert d.shape == (3,) and d.dtype == torch.float32 and not d.requires_grad
    assert metric(image(1, 32), noisy(image(1, 32), 0.1)).shape == (1,)  # the smallest size


def test_inputs_are_checked(metric):
    a = image()
    with pytest.raises(ValueError, match="same shape"):
        metric(a, image(size=48))
    with pytest.raises(ValueError, match="at least 32"):
        metric(image(size=16), image(size=16))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        metric(a * 127.5 + 127.5, a)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        metric(a[:, :1], a[:, :1])


def test_random_backbone_is_labelled_seeded_and_leaves_rng_alone(metric, caplog):
    assert metric.comparable is False and metric.backbone_path is None
    assert "RANDOM" in metric.label and "not comparable" in metric.label
    state = torch.get_rng_state()
    with caplog.at_level(logging.WARNING, logger="niche.models.lpips"):
        again = LPIPSMetric(allow_random=True)
    assert torch.equal(torch.get_rng_state(), state)
    assert "not comparable" in caplog.text
    a, b = image(), noisy(image(), 0.2)
    assert torch.equal(again(a, b), metric(a, b))  # same random backbone in every run


# --- backbone weights ---------------------------------------------------------------------

def test_missing_backbone_is_a_setup_error():
    with pytest.raises(SetupError) as e:
        LPIPSMetric()
    msg = str(e.value)
    assert "alexnet-owt-7be5be79.pth" in msg and "validate.lpips_backbone" in msg
    assert str(default_backbone_path("alex")) in msg and "validate.lpips_allow_random" in msg


def test_explicit_backbone_must_exist_even_with_allow_random(tmp_path):
    with pytest.raises(SetupError, match="no such file"):
        LPIPSMetric(backbone=tmp_path / "nope.pth", allow_random=True)


@pytest.mark.parametrize("net", ["alex", "squeeze"])
def test_backbone_file_is_loaded_into_the_slices(tmp_path, net):
    path = tmp_path / BACKBONE_FILES[net]
    sd = backbone_file(path, net)
    m = LPIPSMetric(net=net, backbone=path)
    assert m.comparable is True and m.label == f"LPIPS {net}" and m.backbone_path == path
    loaded = {k.split(".", 1)[1]: v for k, v in m.model.net.state_dict().items()}  # "N.rest"
    features = {k.split(".", 1)[1]: v for k, v in sd.items() if k.startswith("features.")}
    assert loaded.keys() == features.keys()
    for k, v in features.items():
        assert torch.equal(loaded[k], v), k
    a = image()
    assert torch.allclose(m(a, a), torch.zeros(2), atol=1e-6)


def test_backbone_from_torch_hub_cache(tmp_path):
    backbone_file(Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints" / BACKBONE_FILES["alex"])
    m = LPIPSMetric()
    assert m.comparable and m.backbone_path == default_backbone_path("alex")


def test_backbone_with_wrong_shapes_is_a_setup_error(tmp_path):
    path = tmp_path / "wrong.pth"
    backbone_file(path, **{"features.3.weight": torch.zeros(10, 64, 5, 5)})
    with pytest.raises(SetupError, match="wrong.pth") as e:
        LPIPSMetric(backbone=path)
    assert "features.3.weight" in str(e.value) and "shape" in str(e.value)


def test_backbone_with_wrong_keys_or_garbage_is_a_setup_error(tmp_path):
    vgg = tmp_path / "vgg-not-alex.pth"
    backbone_file(vgg, "vgg")
    with pytest.raises(SetupError, match="vgg-not-alex.pth"):
        LPIPSMetric(net="alex", backbone=vgg)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(SetupError, match="junk.pth"):
        LPIPSMetric(backbone=junk)


# --- the torchvision stand-in -------------------------------------------------------------

def test_standin_never_downloads():
    tv = standin_torchvision()
    for build in (tv.models.alexnet, tv.models.vgg16, tv.models.squeezenet1_1):
        with pytest.raises(RuntimeError, match="never downloads"):
            build(pretrained=True)
        with pytest.raises(RuntimeError, match="never downloads"):
            build(weights="IMAGENET1K_V1")
        assert build(pretrained=False).features is not None and build(weights=None)


@pytest.mark.skipif(TORCHVISION_INSTALLED, reason="torchvision is installed here")
def test_standin_does_not_leak(metric):
    assert "torchvision" not in sys.modules and "torchvision.models" not in sys.modules


def _python(code: str, env: dict | None = None) -> str:
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, text=True,
                       capture_output=True, env={**os.environ, **(env or {})}, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout + p.stderr


@pytest.mark.slow
@pytest.mark.skipif(TORCHVISION_INSTALLED, reason="torchvision is installed here")
def test_transformers_still_works_after_the_metric():
    out = _python("""
        import sys, torch
        from models.lpips_metric import LPIPSMetric
        m = LPIPSMetric(allow_random=True)
        m(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32))
        assert "torchvision" not in sys.modules, "stand-in leaked"
        import transformers
        from transformers import T5EncoderModel
        from transformers.utils import is_torchvision_available
        assert not is_torchvision_available()
        print("OK")
    """)
    assert "OK" in out


@pytest.mark.slow
def test_broken_torchvision_gets_the_standin(tmp_path):
    """A torchvision whose import raises (the CUDA build on a CPU box)."""
    fake = tmp_path / "site" / "torchvision"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        'raise RuntimeError("operator torchvision::nms does not exist")\n')
    out = _python("""
        import logging, sys
        logging.basicConfig(level=logging.INFO)
        from models.lpips_metric import LPIPSMetric
        m = LPIPSMetric(allow_random=True)
        import lpips
        assert lpips.pretrained_networks.tv.__niche_standin__
        assert "torchvision" not in sys.modules, "stand-in leaked"
        print("OK")
    """, env={"PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT)])})
    assert "OK" in out and "torchvision stand-in" in out
