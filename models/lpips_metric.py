"""LPIPS (Zhang et al. 2018, the `lpips` package 0.1.4) for validation — and the
ONE place in Niche that deals with LPIPS and with torchvision.

Why torchvision needs handling here
    `import lpips` imports `torchvision.models` at module import. On CPU machines the
    only torchvision on the registry for torch 2.13 (0.28.0) is a CUDA build whose
    import raises ("operator torchvision::nms does not exist"), and once torchvision is
    installed `transformers` imports it too, which breaks even
    `from transformers import T5EncoderModel`. So Niche never installs torchvision:
    lpips is installed with `--no-deps` (requirements-nodeps.txt, `make venv`).

The stand-in
    If `import torchvision` works (a GPU box where the user installed it), lpips is
    imported normally. If it does not, a minimal stand-in module is put in
    `sys.modules` as `torchvision` / `torchvision.models` ONLY while lpips is being
    imported, then removed, so nothing else ever sees a fake torchvision (lpips keeps
    its own reference to it). The stand-in has `alexnet`, `vgg16` and
    `squeezenet1_1` constructors that build exactly torchvision's `.features` layer
    stacks (same layers, same module indices, so torchvision checkpoints'
    `features.N.*` keys fit) with random weights; they accept `pretrained=` /
    `weights=` but never download: asking for pretrained weights raises.

Weights, and what "comparable" means
    LPIPS = an ImageNet-trained backbone (AlexNet by default) + small linear layers
    calibrated on human judgements. The linear layers ship inside the lpips package.
    The backbone never comes from the network here: the metric is built with a random
    backbone (`pnet_rand=True`) and then torchvision's ImageNet checkpoint is loaded
    into it from a file — `backbone=` (params: `validate.lpips_backbone`), else
    torchvision's hub cache (`$TORCH_HOME/hub/checkpoints/`, by default
    ~/.cache/torch/hub/checkpoints/; alexnet-owt-7be5be79.pth, vgg16-397923af.pth,
    squeezenet1_1-b8a52dc0.pth). With those weights the numbers are the published
    LPIPS and `comparable` is True: comparable with other runs, other machines and
    papers (at the same image size). Without them, construction fails (SetupError)
    unless `allow_random=True` (`validate.lpips_allow_random: true`, for tests only):
    the backbone stays random (seeded: the same in every run), `comparable` is False,
    the label says so and a warning is logged. Such numbers still behave like a
    distance (0 for identical images, larger for larger changes) but are NOT LPIPS
    and must never be compared or reported as such.

Inputs
    Two float tensors (B, 3, H, W) in [-1, 1] (the LPIPS convention; for [0, 1]
    images pass 2*x - 1), of the same shape, H and W ≥ 32. Nothing is resized: LPIPS
    depends on resolution, so the caller picks one size and compares numbers only at
    that size.
"""
from __future__ import annotations

import importlib.util
import logging
import sys
import threading
import types
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from models.hub import SetupError

log = logging.getLogger("niche.models.lpips")

PARAM_BACKBONE = "validate.lpips_backbone"
PARAM_ALLOW_RANDOM = "validate.lpips_allow_random"
MIN_SIZE = 32  # smaller inputs shrink AlexNet's feature maps to nothing

# lpips net name -> the torchvision checkpoint file of its ImageNet backbone.
BACKBONE_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}
_DOWNLOAD_URL = "https://download.pytorch.org/models/"

_import_lock = threading.Lock()
_lpips_module: types.ModuleType | None = None


# --- the torchvision stand-in ------------------------------------------------------

class _Fire(nn.Module):
    """torchvision.models.squeezenet.Fire (same attribute names, so same keys)."""

    def __init__(self, inplanes: int, squeeze: int, expand1x1: int, expand3x3: int) -> None:
        super().__init__()
        self.inplanes = inplanes
        self.squeeze = nn.Conv2d(inplanes, squeeze, kernel_size=1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, kernel_size=1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, kernel_size=3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))], 1)


def _alexnet_features() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
    )


def _vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = 3
    for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"]:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(cin, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            cin = v
    return nn.Sequential(*layers)


def _squeezenet1_1_features() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=3, stride=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
        _Fire(64, 16, 64, 64), _Fire(128, 16, 64, 64),
        nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
        _Fire(128, 32, 128, 128), _Fire(256, 32, 128, 128),
        nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
        _Fire(256, 48, 192, 192), _Fire(384, 48, 192, 192),
        _Fire(384, 64, 256, 256), _Fire(512, 64, 256, 256),
    )


class StandinBackbone(nn.Module):
    """Only the `.features` of a torchvision classifier, random weights; its
    state_dict keys are torchvision's (`features.0.weight`, ...)."""

    def __init__(self, features: nn.Sequential) -> None:
        super().__init__()
        self.features = features


def _standin_constructor(name: str, build):
    def construct(pretrained: bool = False, progress: bool = True, *, weights=None,
                  **kwargs) -> StandinBackbone:
        if pretrained or weights is not None:
            raise RuntimeError(
                f"torchvision stand-in (models.lpips_metric): {name}(pretrained/weights=...) "
                "would download ImageNet weights; the stand-in never downloads. LPIPSMetric "
                "loads the backbone weights from a file instead.")
        return StandinBackbone(build())

    construct.__name__ = construct.__qualname__ = name
    return construct


def standin_torchvision() -> types.ModuleType:
    """A fresh stand-in `torchvision` module object (with `.models`); not installed
    anywhere. `import_lpips` puts it in sys.modules only while lpips is imported."""
    tv = types.ModuleType("torchvision", "Niche's stand-in for torchvision while importing "
                                         "lpips (models/lpips_metric.py); not torchvision.")
    models = types.ModuleType("torchvision.models", tv.__doc__)
    models.alexnet = _standin_constructor("alexnet", _alexnet_features)
    models.vgg16 = _standin_constructor("vgg16", _vgg16_features)
    models.squeezenet1_1 = _standin_constructor("squeezenet1_1", _squeezenet1_1_features)
    tv.models = models
    tv.__version__ = "0.0+niche-standin"
    tv.__niche_standin__ = models.__niche_standin__ = True
    return tv


def standin_backbone(net: str = "alex") -> StandinBackbone:
    """The stand-in's random backbone for an lpips net name (its state_dict has
    torchvision's key names): for tests, and to check a checkpoint's layout."""
    _check_net(net)
    tv = standin_torchvision()
    return {"alex": tv.models.alexnet, "vgg": tv.models.vgg16,
            "squeeze": tv.models.squeezenet1_1}[net]()


def _torchvision_problem() -> str | None:
    """None if `import torchvision.models` works, else why not."""
    try:
        if "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is None:
            return "not installed"
        import torchvision.models  # noqa: F401
        return None
    except Exception as e:  # ImportError, or RuntimeError from a CUDA-only build on a CPU box
        return f"{type(e).__name__}: {e}"


def import_lpips() -> types.ModuleType:
    """`import lpips`, with the torchvision stand-in if torchvision does not work.
    Once per process; the stand-in is in sys.modules only during the import."""
    global _lpips_module
    with _import_lock:
        if _lpips_module is not None:
            return _lpips_module
        if importlib.util.find_spec("lpips") is None:
            raise SetupError("LPIPS: the `lpips` package is not installed. Run `make venv`, or "
                             "`pip install --no-deps -c constraints.txt -r requirements-nodeps.txt` "
                             "(--no-deps: it would pull torchvision, which breaks this venv).")
        problem = None if "lpips" in sys.modules else _torchvision_problem()
        if problem is None:
            import lpips
            _lpips_module = lpips
            return lpips

        tv = standin_torchvision()
        saved = {k: sys.modules.get(k) for k in ("torchvision", "torchvision.models")}
        sys.modules["torchvision"], sys.modules["torchvision.models"] = tv, tv.models
        ok = False
        try:
            import lpips
            ok = True
        finally:
            for k, v in saved.items():
                if v is None:
                    sys.modules.pop(k, None)
                else:
                    sys.modules[k] = v
            if not ok:  # a half-imported lpips must not keep the stand-in either
                for k in [k for k in sys.modules if k == "lpips" or k.startswith("lpips.")]:
                    del sys.modules[k]
        log.info("torchvision is not usable here (%s); imported lpips with Niche's torchvision "
                 "stand-in (backbone architectures only, no downloads; models/lpips_metric.py)",
                 problem)
        _lpips_module = lpips
        return lpips


# --- backbone weights ----------------------------------------------------------------

def _check_net(net: str) -> None:
    if net not in BACKBONE_FILES:
        raise ValueError(f"LPIPS net {net!r}: expected one of {sorted(BACKBONE_FILES)}")


def default_backbone_path(net: str = "alex") -> Path:
    """Where torchvision itself caches the ImageNet checkpoint for `net`."""
    _check_net(net)
    return Path(torch.hub.get_dir()) / "checkpoints" / BACKBONE_FILES[net]


def _missing_message(net: str, expected: Path) -> str:
    name = BACKBONE_FILES[net]
    return (f"LPIPS ({net}) needs torchvision's ImageNet backbone weights, {name}, and none was "
            f"found at {expected} (torchvision's hub cache, under $TORCH_HOME). Put the file "
            f"there, or set {PARAM_BACKBONE} to its path (get it once from "
            f"{_DOWNLOAD_URL}{name}). {PARAM_ALLOW_RANDOM}: true runs with a RANDOM backbone; "
            "that is for tests only: its numbers are not LPIPS and not comparable.")


def _load_backbone(net_module: nn.Module, path: Path, net: str) -> None:
    """Load torchvision's `features.N.*` tensors into lpips' `sliceK.N.*` modules."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SetupError(f"LPIPS backbone {path}: cannot be read as a torch state dict "
                         f"({type(e).__name__}: {e})") from None
    if not isinstance(sd, Mapping):
        raise SetupError(f"LPIPS backbone {path}: holds a {type(sd).__name__}, not a state dict")

    slice_of = {child: name for name, sl in net_module.named_children() if name.startswith("slice")
                for child, _ in sl.named_children()}
    mapped: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in sd.items():
        if not key.startswith("features."):
            continue  # classifier.*: not part of LPIPS
        _, idx, rest = (key.split(".", 2) + ["", ""])[:3]
        if idx not in slice_of or not rest or not isinstance(value, torch.Tensor):
            unexpected.append(key)
            continue
        mapped[f"{slice_of[idx]}.{idx}.{rest}"] = value

    want = net_module.state_dict()
    problems: list[str] = []
    missing = [k for k in want if k not in mapped]
    unexpected += [k for k in mapped if k not in want]
    if missing:
        problems.append(f"missing {len(missing)} tensors (e.g. features.{missing[0].split('.', 1)[1]})")
    if unexpected:
        problems.append(f"unexpected keys (e.g. {unexpected[0]})")
    for k, v in mapped.items():
        if k in want and tuple(v.shape) != tuple(want[k].shape):
            problems.append(f"features.{k.split('.', 1)[1]} has shape {tuple(v.shape)}, "
                            f"expected {tuple(want[k].shape)}")
            break
    if problems:
        raise SetupError(f"LPIPS backbone {path}: does not match the features of torchvision's "
                         f"ImageNet {net} checkpoint: {'; '.join(problems)}. Expected "
                         f"{BACKBONE_FILES[net]} ({_DOWNLOAD_URL}{BACKBONE_FILES[net]}), "
                         f"pointed at by {PARAM_BACKBONE}.")
    net_module.load_state_dict(mapped, strict=True)


# --- the metric ------------------------------------------------------------------------

class LPIPSMetric:
    """LPIPS distance between image batches; see the module docstring.

    `comparable` is True only with real ImageNet backbone weights; `label` says which
    metric the numbers are (put it next to them wherever they are reported).
    """

    def __init__(self, net: str = "alex", backbone: str | Path | None = None,
                 allow_random: bool = False, device: str | torch.device = "cpu") -> None:
        _check_net(net)
        self.net = net
        self.device = torch.device(device)
        if backbone is not None:
            path: Path | None = Path(backbone).expanduser()
            if not path.is_file():
                raise SetupError(f"{PARAM_BACKBONE} = {backbone}: no such file. "
                                 + _missing_message(net, path))
        else:
            path = default_backbone_path(net)
            if not path.is_file():
                if not allow_random:
                    raise SetupError(_missing_message(net, path))
                path = None

        lpips = import_lpips()
        # A fixed seed in a forked RNG: the random backbone (allow_random) is the same in
        # every run, and the caller's random stream (training!) is left untouched.
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            torch.manual_seed(0)
            warnings.simplefilter("ignore", UserWarning)  # real torchvision: 'pretrained' is deprecated
            model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
        if path is not None:
            _load_backbone(model.net, path, net)
        self.backbone_path = path
        self.comparable = path is not None
        if self.comparable:
            self.label = f"LPIPS {net}"
        else:
            self.label = f"LPIPS {net} — RANDOM backbone, not comparable"
            log.warning("%s: no ImageNet backbone (%s), %s: the numbers are NOT LPIPS and "
                        "are not comparable with anything; for tests only",
                        self.label, BACKBONE_FILES[net], f"{PARAM_ALLOW_RANDOM}=true")
        model.eval().requires_grad_(False)
        self.model = model.to(self.device)

    def __repr__(self) -> str:
        return f"LPIPSMetric({self.label!r}, backbone={self.backbone_path}, device={self.device})"

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Distances (B,) between a[i] and b[i]: float (B, 3, H, W) in [-1, 1], same
        shape, H, W ≥ 32; float32, on a's device; no gradient."""
        for name, t in (("a", a), ("b", b)):
            if not isinstance(t, torch.Tensor) or t.ndim != 4 or t.shape[1] != 3:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"LPIPS: {name} must be a (B, 3, H, W) tensor, got {shape}")
            if not t.is_floating_point():
                raise ValueError(f"LPIPS: {name} must be float in [-1, 1], got {t.dtype}")
        if a.shape != b.shape:
            raise ValueError(f"LPIPS: a and b must have the same shape (nothing is resized), "
                             f"got {tuple(a.shape)} and {tuple(b.shape)}")
        if min(a.shape[2:]) < MIN_SIZE:
            raise ValueError(f"LPIPS: images must be at least {MIN_SIZE} px on each side, "
                             f"got {tuple(a.shape[2:])}")
        with torch.no_grad():
            x, y = (t.to(self.device, torch.float32) for t in (a, b))
            lo, hi = min(x.min(), y.min()).item(), max(x.max(), y.max()).item()
            if lo < -1.001 or hi > 1.001:
                raise ValueError(f"LPIPS: images must be in [-1, 1] (for [0, 1] pass 2*x - 1), "
                                 f"got values in [{lo:.3g}, {hi:.3g}]")
            d = self.model(x, y)
        return d.reshape(a.shape[0]).to(a.device)
