"""The flow-matching objective and the sampler: REPA targets, CFG categories, timesteps,
loss terms and their gradients, Euler sampling and every guidance mode (tiny NanoDiT, CPU)."""
from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from torch import nn

from models.flow_matching import (CATEGORIES, GUIDANCE, Objective, cfg_keep, euler_sample, loss_terms, on_device,
                                   predict_x0, repa_targets, sample_t, shift_t)
from models.nanodit import Conditioning, DiTOutput
from tests.dit_kit import DIFFERENT, SIZE, make_cond, make_x, max_diff, perturbed, tiny
from tests.dit_kit import model, one_thread  # noqa: F401 (fixtures)


def test_repa_targets_pooled_grid_by_hand():
    B, D = 2, 3
    # patch (b, r, c) holds the value 100b + 10r + c in every channel
    val = torch.tensor([[[100 * b + 10 * r + c for c in range(2)] for r in range(2)] for b in range(2)],
                       dtype=torch.float32)
    patches = val[..., None].expand(B, 2, 2, D).clone()
    index = torch.tensor([[0, 1, 2, 3, 5, 10, 15], [15, 14, 12, 9, 6, 4, 0]])
    out = repa_targets(patches, (4, 4), index)
    # token j = 4r + c lies in patch (r // 2, c // 2)
    expected = torch.tensor([[0, 0, 1, 1, 0, 11, 11], [111, 111, 110, 110, 101, 100, 100]], dtype=torch.float32)
    assert out.shape == (B, 7, D)
    assert torch.equal(out[..., 0], expected) and torch.equal(out[..., 2], expected)


def test_repa_targets_generic_grids():
    g = torch.Generator().manual_seed(0)
    for (gh, gw), (h, w) in [((4, 6), (2, 3)), ((4, 6), (4, 6)), ((2, 8), (1, 2)), ((6, 4), (3, 1))]:
        patches = torch.randn(2, h, w, 5, generator=g)
        index = torch.stack([torch.randperm(gh * gw, generator=g)[:7] for _ in range(2)])
        out = repa_targets(patches, (gh, gw), index)
        for b in range(2):
            for k, j in enumerate(index[b].tolist()):
                r, c = divmod(j, gw)
                assert torch.equal(out[b, k], patches[b, r * h // gh, c * w // gw]), ((gh, gw), (h, w), j)


# ---------------------------------------------------------------- CFG dropout categories
#                   text cls patches pose, in CATEGORIES' order (from the module docstring)
EXPECTED_PATTERNS = [(0, 0, 0, 0), (1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (1, 1, 1, 0), (0, 0, 0, 1), (1, 1, 1, 1)]


def test_cfg_keep_frequencies():
    probs = Objective().cfg
    assert math.isclose(sum(probs), 1.0)
    n = 20000
    keep = cfg_keep(n, probs, generator=torch.Generator().manual_seed(0))
    assert keep.shape == (n, 4) and keep.dtype == torch.bool
    patterns = torch.tensor(EXPECTED_PATTERNS, dtype=torch.bool)
    match = (keep[:, None, :] == patterns[None]).all(-1)          # (n, 7)
    assert (match.sum(1) == 1).all(), "every row must be exactly one of the seven category patterns"
    freq = match.float().mean(0)
    for name, f, p in zip(CATEGORIES, freq.tolist(), probs):
        assert abs(f - p) < 0.015, f"{name}: frequency {f:.3f}, probability {p}"


def test_cfg_keep_degenerate_and_seeded():
    assert cfg_keep(500, (0, 0, 0, 0, 0, 0, 1)).all()
    assert not cfg_keep(500, (1, 0, 0, 0, 0, 0, 0)).any()
    pose_only = cfg_keep(50, (0, 0, 0, 0, 0, 1, 0))
    assert torch.equal(pose_only, torch.tensor([[False, False, False, True]]).expand(50, -1))
    a = cfg_keep(100, Objective().cfg, generator=torch.Generator().manual_seed(3))
    b = cfg_keep(100, Objective().cfg, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_category_table():
    assert list(CATEGORIES) == ["uncond", "text_only", "dino_cls_only", "dino_patches_only", "drop_pose",
                                "pose_only", "all"]
    assert list(CATEGORIES.values()) == EXPECTED_PATTERNS


# ---------------------------------------------------------------- timesteps
def test_sample_t_range_and_shift():
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    t1 = sample_t(10000, Objective(), g())
    t3 = sample_t(10000, Objective(t_shift=3.0), g())
    for t in (t1, t3):
        assert t.shape == (10000,) and ((t > 0) & (t < 1)).all()
    assert abs(t1.mean().item() - 0.5) < 0.02, "logit-normal(0, 1) is centred on 0.5"
    assert t3.mean() > t1.mean() + 0.1, "shift > 1 must move t toward noise"
    assert sample_t(10000, Objective(t_mean=1.0), g()).mean() > t1.mean() + 0.1
    assert torch.equal(t1, sample_t(10000, Objective(), g()))


def test_shift_t():
    t = torch.linspace(0, 1, 11)
    assert torch.equal(shift_t(t, 1.0), t)
    s = shift_t(t, 3.0)
    assert s[0] == 0 and s[-1] == 1 and (s[1:-1] > t[1:-1]).all() and (s.diff() > 0).all()
    assert math.isclose(shift_t(torch.tensor(0.5), 3.0).item(), 0.75, rel_tol=1e-6)


# ---------------------------------------------------------------- loss
def test_loss_terms_match_a_hand_computation(model):
    obj = Objective(repa_weight=0.5, tread=0.5)
    x0, _ = make_x(size=(64, 64))
    cond = make_cond(dino_hw=(2, 2))
    with torch.no_grad():
        terms = loss_terms(model, x0, cond, obj, generator=torch.Generator().manual_seed(4))
        g = torch.Generator().manual_seed(4)      # the same draws, in the same order
        t = sample_t(2, obj, g)
        eps = torch.randn(x0.shape, generator=g)
        x_t = (1 - t.view(2, 1, 1, 1)) * x0 + t.view(2, 1, 1, 1) * eps
        out = model(x_t, t, cond, route=0.5, generator=g)
        mse = ((out.x0 - x0) ** 2).mean()
        target = repa_targets(cond.dino_patches, (4, 4), out.repa_index)
        repa = 1 - torch.nn.functional.cosine_similarity(out.repa, target, dim=-1).mean()
    assert torch.allclose(terms["mse"], mse) and torch.allclose(terms["repa"], repa)
    assert torch.allclose(terms["loss"], terms["mse"] + obj.repa_weight * terms["repa"])
    assert terms["active_tokens"] == 16 * 4 - 8 * 2
    assert torch.isfinite(terms["velocity_rms"])
    assert loss_terms(model, x0, cond, obj, route=0.0)["active_tokens"] == 64


class Wrapped(nn.Module):
    """Stands in for DistributedDataParallel: forwards calls, the real model is `.module`."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_on_device_keeps_a_generator_already_there():
    g = torch.Generator().manual_seed(3)
    assert on_device(g, torch.device("cpu")) is g and on_device(None, torch.device("cpu")) is None


def test_loss_terms_accept_a_wrapped_model(model):
    x0, _ = make_x(size=(64, 64))
    cond = make_cond(dino_hw=(2, 2))
    with torch.no_grad():
        plain = loss_terms(model, x0, cond, Objective(), generator=torch.Generator().manual_seed(1))
        wrapped = loss_terms(Wrapped(model), x0, cond, Objective(), generator=torch.Generator().manual_seed(1))
    assert torch.equal(plain["loss"], wrapped["loss"]) and torch.equal(plain["repa"], wrapped["repa"])


def test_repa_loss_trains_the_blocks_before_it():
    m = perturbed(tiny(repa_block=2)).train()
    x0, _ = make_x(size=(64, 64))
    terms = loss_terms(m, x0, make_cond(dino_hw=(2, 2)), Objective(), generator=torch.Generator().manual_seed(0))
    terms["repa"].backward()
    for name, mod in [("blocks.0", m.blocks[0]), ("blocks.1", m.blocks[1]), ("patch_in", m.patch_in),
                      ("repa_proj", m.repa_proj)]:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mod.parameters()), \
            f"the REPA loss does not reach {name}"
    assert all(p.grad is None or not p.grad.abs().sum() > 0 for p in m.blocks[3].parameters()), \
        "the REPA loss reached a block after repa_block"


@pytest.mark.parametrize("fresh", [True, False])
@pytest.mark.parametrize("keep", ["all", "mixed", "none"])
def test_every_parameter_gets_a_gradient(fresh, keep):
    """DDP with find_unused_parameters=False needs a gradient for every parameter, whatever
    the batch drops, with TREAD and REPA on."""
    m = tiny() if fresh else perturbed(tiny())
    m.train()
    keeps = {"all": torch.ones(2, 4, dtype=torch.bool), "none": torch.zeros(2, 4, dtype=torch.bool),
             "mixed": torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)}
    cond = make_cond(dino_hw=(2, 2), keep=keeps[keep])
    cond.pose[:, :10, 2] = 0.0                              # some NULL_POSE joints
    x0, _ = make_x(size=(64, 64))
    terms = loss_terms(m, x0, cond, Objective(tread=0.5, repa_weight=0.5),
                       generator=torch.Generator().manual_seed(0))
    assert terms["active_tokens"] < 64 and "repa" in terms
    terms["loss"].backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing, f"parameters without a gradient: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    if not fresh and keep == "all":
        zero = [n for n, p in m.named_parameters() if not p.grad.abs().sum() > 0]
        assert not zero, f"parameters with an all-zero gradient: {zero}"


def sample(model, cond, **kw):
    return euler_sample(model, cond, SIZE, **{"steps": 3, **kw})


def test_euler_sample_seeded_and_in_range(model):
    cond = make_cond()
    a, b, c = sample(model, cond, seed=0), sample(model, cond, seed=0), sample(model, cond, seed=1)
    assert a.shape == (2, 3, *SIZE)
    assert torch.equal(a, b), "the same seed must give the same image"
    assert max_diff(a, c) > DIFFERENT, "another seed must give another image"
    assert a.min() >= -1 and a.max() <= 1


@pytest.mark.parametrize("guidance", GUIDANCE)
def test_every_guidance_mode_runs(model, guidance):
    cond = make_cond()
    a = sample(model, cond, guidance=guidance, seed=5)
    assert a.shape == (2, 3, *SIZE) and torch.isfinite(a).all()
    assert a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, sample(model, cond, guidance=guidance, seed=5)), "seeded sampling must be reproducible"


def test_guidance_reductions(model):
    cond = make_cond()
    keep = lambda *parts: cond.with_keep(  # noqa: E731
        torch.tensor([[i in parts for i in range(4)]] * 2, dtype=torch.bool))
    none = sample(model, cond, guidance="none")
    close = lambda a, b: torch.allclose(a, b, atol=1e-5)  # noqa: E731
    assert close(sample(model, cond, guidance="cfg", scale=1.0), none), "cfg at scale 1 must equal no guidance"
    assert close(sample(model, cond, guidance="cfg", scale=0.0), sample(model, keep(), guidance="none"))
    assert close(sample(model, cond, guidance="self", scale=1.0), none), "self-guidance at scale 1 is the dense model"
    # Every dual pass keeps the pose (cond keeps it here): text + pose, DINO + pose.
    assert close(sample(model, cond, guidance="dual", scale=1.0, scale_dino=0.0),
                 sample(model, keep(0, 3), guidance="none")), "dual(1, 0) is the text(+pose) model"
    assert close(sample(model, cond, guidance="dual", scale=0.0, scale_dino=1.0),
                 sample(model, keep(1, 2, 3), guidance="none")), "dual(0, 1) is the DINO(+pose) model"
    assert max_diff(sample(model, cond, guidance="cfg", scale=3.0), none) > DIFFERENT


def test_dual_guidance_follows_the_pose_where_it_is_kept(model):
    cond = make_cond()
    moved = dataclasses.replace(cond, pose=make_cond(seed=7).pose)  # the same text and DINO, another pose
    a, b = sample(model, cond, guidance="dual"), sample(model, moved, guidance="dual")
    assert max_diff(a, b) > DIFFERENT, "dual guidance must honour the pose"
    no_pose = torch.tensor([[True, True, True, False]] * 2)
    assert torch.equal(sample(model, cond.with_keep(no_pose), guidance="dual"),
                       sample(model, moved.with_keep(no_pose), guidance="dual")), "a dropped pose must not count"


def test_predict_x0_cfg_formula(model):
    x, t = make_x()
    cond = make_cond()
    with torch.no_grad():
        c = model(x, t, cond).x0
        u = model(x, t, cond.with_keep(torch.zeros_like(cond.keep))).x0
        g = predict_x0(model, x, t, cond, "cfg", 2.5, 0.0, 0.5, None)
    assert torch.allclose(g, u + 2.5 * (c - u), atol=1e-5)


def test_unknown_guidance_is_refused(model):
    with pytest.raises(ValueError, match="none, cfg, self, dual"):
        sample(model, make_cond(), guidance="classifier")
    with pytest.raises(ValueError, match="none, cfg, self, dual"):
        x, t = make_x()
        predict_x0(model, x, t, make_cond(), "classifier", 1.0, 1.0, 0.5, None)


class ConstantX0(nn.Module):
    """Predicts the same clean image whatever it is given, and records what it saw."""

    def __init__(self, c: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.c, self.seen = c, []

    def forward(self, x, t, cond, route=0.0, generator=None):
        self.seen.append((x.clone(), t.clone()))
        return DiTOutput(self.c.expand_as(x).clone())


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_follows_the_straight_path_to_a_fixed_x0(shift):
    """If the model always says x0 = c, each Euler step lands on x_t = (1 − t)·c + t·ε exactly."""
    c = torch.full((1, 3, *SIZE), 0.3)
    stub = ConstantX0(c)
    noise = torch.randn(1, 3, *SIZE, generator=torch.Generator().manual_seed(0))
    out = euler_sample(stub, make_cond(B=1), SIZE, steps=4, guidance="none", shift=shift, noise=noise, seed=123)
    ts = shift_t(torch.linspace(1, 0, 5), shift)[:-1]
    assert len(stub.seen) == 4
    for (x, t), want in zip(stub.seen, ts.tolist()):
        assert math.isclose(t.item(), want, rel_tol=1e-6)
        assert torch.allclose(x, (1 - want) * c + want * noise, atol=1e-5)
    assert torch.allclose(out, c)


def test_euler_noise_argument_overrides_the_seed(model):
    noise = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(9))
    a = sample(model, make_cond(), guidance="none", noise=noise, seed=0)
    b = sample(model, make_cond(), guidance="none", noise=noise, seed=1)
    assert torch.equal(a, b)


def test_bfloat16_model_trains_and_samples(model):
    m = copy.deepcopy(model).to(torch.bfloat16)
    x0, t = make_x(size=(64, 64))
    cond = make_cond(dino_hw=(2, 2))
    with torch.no_grad():
        out = m(x0, t, cond, route=0.5)
        dense, ref = m(x0, t, cond).x0.float(), model(x0, t, cond).x0
    assert out.x0.dtype == torch.bfloat16 and out.repa.dtype == torch.bfloat16
    assert torch.allclose(dense, ref, atol=0.1), "bf16 strays far from float32"
    terms = loss_terms(m, x0, cond, Objective(), generator=torch.Generator().manual_seed(0))
    terms["loss"].backward()
    assert torch.isfinite(terms["loss"]) and all(p.grad is not None for p in m.parameters())
    img = euler_sample(m, cond, (64, 64), steps=2, guidance="self")
    assert img.dtype == torch.float32 and torch.isfinite(img).all()


# ---------------------------------------------------------------- CUDA (skipped on a CPU-only machine)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_seeded_routing_works_on_cuda():
    """euler_sample seeds a CPU generator and hands it to TREAD ("self" guidance); loss_terms
    hands the trainer's generator to the model. The routing draw must accept it on CUDA."""
    m = perturbed(tiny()).cuda()
    cond = make_cond()
    cond = Conditioning(*(getattr(cond, f.name).cuda() for f in dataclasses.fields(cond)))
    out = euler_sample(m, cond, SIZE, steps=2, guidance="self")
    assert out.is_cuda and torch.isfinite(out).all()
    x0, _ = make_x()
    terms = loss_terms(m, x0.cuda(), cond, Objective(), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(terms["loss"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_noise_is_drawn_on_the_device_from_the_generators_seed():
    """No image of noise is drawn on the host and copied: on CUDA, loss_terms draws it with a
    CUDA generator seeded with the CPU generator's seed (so still a function of that seed)."""
    x0 = torch.zeros(2, 3, *SIZE, device="cuda")
    stub = ConstantX0(torch.zeros(1, 3, *SIZE, device="cuda"))
    obj = Objective(repa_weight=0.0, tread=0.0, velocity_min_t=0.0)
    loss_terms(stub, x0, make_cond(), obj, generator=torch.Generator().manual_seed(11))
    (x_t, t), = stub.seen
    t_want = sample_t(2, obj, torch.Generator().manual_seed(11))  # t: drawn first, on the host
    assert torch.allclose(t.cpu(), t_want)
    eps = torch.randn(x0.shape, generator=torch.Generator("cuda").manual_seed(11), device="cuda")
    assert torch.allclose(x_t, t.view(2, 1, 1, 1) * eps, atol=1e-6)  # x0 = 0: x_t = t·ε
