"""NanoDiT: presets, patchify, conditioning masks, TREAD, REPA shapes, saving and loading.

Everything runs on the CPU with the "tiny" preset (hidden 64, depth 4) and 32×48 or 64×64
images at patch 16 (helpers in tests/dit_kit.py). The objective and the sampler are in
test_flow_matching.py.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from models.flow_matching import Objective, loss_terms
from models.nanodit import PRESETS, Conditioning, NanoDiT, timestep_embedding
from tests.dit_kit import DIFFERENT, DINO_DIM, JOINTS, SAME, TEXT_DIM, make_cond, make_x, max_diff, perturbed, tiny
from tests.dit_kit import model, one_thread  # noqa: F401 (fixtures)

# ---------------------------------------------------------------- presets and construction
def n_params(name: str, **kw) -> int:
    with torch.device("meta"):
        m = NanoDiT.preset(name, text_dim=1024, dino_dim=1024, **kw)
    return sum(p.numel() for p in m.parameters())


def test_preset_parameter_counts():
    prod, base = n_params("production"), n_params("baseline")
    assert 250e6 <= prod <= 320e6, f"production has {prod / 1e6:.1f}M parameters, expected ~280M"
    assert 40e6 <= base <= 70e6, f"baseline has {base / 1e6:.1f}M parameters, expected 40-70M"
    # the REPA projector is part of the count, and goes away with repa_block=None
    assert n_params("baseline", repa_block=None) < base


def test_preset_values_and_overrides():
    m = tiny(depth=3)
    assert m.config.hidden_size == PRESETS["tiny"]["hidden_size"] and m.config.depth == 3
    assert len(m.blocks) == 3
    with pytest.raises(ValueError, match="unknown NanoDiT preset 'huge'.*tiny, small, baseline, production"):
        NanoDiT.preset("huge")


def test_bad_shapes_and_block_indices_are_refused():
    with pytest.raises(ValueError, match="even width"):
        tiny(hidden_size=60, num_heads=4)   # 15-wide heads: QK RMSNorm/sincos need even widths
    with pytest.raises(ValueError, match="at least 1"):
        tiny(repa_block=0)
    with pytest.raises(ValueError, match="outside 0..4"):
        tiny(repa_block=5)
    with pytest.raises(ValueError, match="outside 0..4"):
        tiny(tread_end=7)


def test_default_block_indices():
    m = tiny()
    assert m.repa_at == 2, "repa_block=-1 reads the output of depth//2 blocks"
    assert m.tread == (1, 3), "TREAD defaults to blocks [1, depth-1)"
    assert tiny(repa_block=None).repa_proj is None


# ---------------------------------------------------------------- patchify and shapes
def test_patchify_round_trip_and_token_order():
    m = tiny()
    x = torch.randn(2, 3, 32, 48)
    tok = m.patchify(x)
    assert tok.shape == (2, 6, 3 * 16 * 16)
    # row-major tokens: token 1 is the patch at row 0, column 1; token 4 at row 1, column 1
    assert torch.equal(tok[:, 1], x[:, :, 0:16, 16:32].reshape(2, -1))
    assert torch.equal(tok[:, 4], x[:, :, 16:32, 16:32].reshape(2, -1))
    assert torch.equal(m.unpatchify(tok, 2, 3), x)


def test_patchify_accepts_non_contiguous_input():
    m = tiny()
    x = torch.randn(2, 32, 48, 3).permute(0, 3, 1, 2)   # HWC → CHW, as a loader would
    assert torch.equal(m.unpatchify(m.patchify(x), 2, 3), x)


@pytest.mark.parametrize("size", [(33, 48), (32, 40)])
def test_sizes_not_a_multiple_of_the_patch_are_refused(model, size):
    x = torch.zeros(1, 3, *size)
    with pytest.raises(ValueError, match="patch_size 16"):
        model.patchify(x)
    with pytest.raises(ValueError, match="patch_size 16"):
        model(x, torch.tensor([0.5]), make_cond(B=1))


@pytest.mark.parametrize("size,dino_hw", [((32, 64), (2, 4)), ((64, 32), (4, 2)), ((64, 32), (2, 1))])
def test_any_aspect_ratio_gives_an_output_of_the_input_shape(model, size, dino_hw):
    x, t = make_x(size=size)
    with torch.no_grad():
        out = model(x, t, make_cond(dino_hw=dino_hw))
    assert out.x0.shape == x.shape
    assert torch.isfinite(out.x0).all()
    assert out.repa.shape == (2, size[0] // 16 * size[1] // 16, DINO_DIM)


def test_fresh_model_predicts_mid_grey():
    m = tiny()
    x, t = make_x()
    with torch.no_grad():
        for route in (0.0, 0.5):
            out = m(x, t, make_cond(), route=route, generator=torch.Generator().manual_seed(0))
            assert torch.equal(out.x0, torch.zeros_like(x)), "adaLN-zero + zero output layer must give x0 = 0"


def test_output_depends_on_image_and_timestep(model):
    x, t = make_x()
    cond = make_cond()
    with torch.no_grad():
        base = model(x, t, cond).x0
        assert max_diff(base, model(x.flip(-1), t, cond).x0) > DIFFERENT
        assert max_diff(base, model(x, t * 0.5, cond).x0) > DIFFERENT


def test_timestep_embedding_is_sinusoids_of_1000_t():
    """t in [0, 1] is scaled by 1000 first: at scale 1 the fastest frequency would turn less than
    a sixth of a period over the whole range and the embedding would hardly vary."""
    t = torch.tensor([0.0, 0.25, 0.7, 1.0])
    emb = timestep_embedding(t, 256)
    k = torch.arange(128, dtype=torch.float64)
    args = 1000 * t.double()[:, None] * 10000.0 ** (-k / 128)[None]
    assert torch.allclose(emb.double(), torch.cat([args.cos(), args.sin()], dim=-1), atol=1e-4)
    assert torch.allclose(emb, timestep_embedding(1000 * t, 256, scale=1.0))


def test_samples_in_a_batch_are_independent(model):
    x, t = make_x(B=3)
    keep = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    cond = make_cond(B=3, keep=keep)
    with torch.no_grad():
        batch = model(x, t, cond).x0
        for i in range(3):
            one = Conditioning(*(getattr(cond, f.name)[i:i + 1] for f in dataclasses.fields(cond)))
            assert torch.allclose(batch[i:i + 1], model(x[i:i + 1], t[i:i + 1], one).x0, atol=1e-5), i


# ---------------------------------------------------------------- conditioning and its keep mask
def _changed(cond: Conditioning, field: str, seed: int = 99) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    if field == "pose":   # move every joint, keep the confidences
        new = cond.pose.clone()
        new[..., :2] = torch.rand(new[..., :2].shape, generator=g)
    else:
        new = torch.randn(getattr(cond, field).shape, generator=g)
    return dataclasses.replace(cond, **{field: new})


@pytest.mark.parametrize("part,field", [(0, "t5"), (1, "dino_cls"), (2, "dino_patches"), (3, "pose")])
def test_a_dropped_part_is_ignored_and_a_kept_part_is_not(model, part, field):
    x, t = make_x()
    keep = torch.ones(2, 4, dtype=torch.bool)
    keep[0, part] = False                                        # sample 0 drops the part, sample 1 keeps it
    cond = make_cond(keep=keep)
    with torch.no_grad():
        before = model(x, t, cond).x0
        after = model(x, t, _changed(cond, field)).x0
    assert max_diff(before[0], after[0]) < SAME, f"{field} of a sample with keep[{part}]=False changed its output"
    assert max_diff(before[1], after[1]) > DIFFERENT, f"{field} of a sample that keeps it had no effect"


def test_padded_t5_tokens_are_ignored(model):
    x, t = make_x()
    cond = make_cond(L=6, pad=3)
    g = torch.Generator().manual_seed(5)
    t5 = cond.t5.clone()
    t5[:, 3:] = torch.randn(2, 3, TEXT_DIM, generator=g) * 10
    with torch.no_grad():
        before = model(x, t, cond).x0
        after = model(x, t, dataclasses.replace(cond, t5=t5)).x0
    assert max_diff(before, after) < SAME, "T5 tokens with t5_mask=False changed the output"


def test_fully_unconditional_sample_attends_to_the_register_only(model):
    x, t = make_x()
    off = torch.zeros(2, 4, dtype=torch.bool)
    cond = make_cond(keep=off)
    other = make_cond(seed=7, keep=off)
    with torch.no_grad():
        u = model(x, t, cond).x0
        u2 = model(x, t, other).x0
        c = model(x, t, cond.with_keep(~off)).x0
        r = model(x, t, dataclasses.replace(cond, t5_mask=torch.zeros_like(cond.t5_mask))).x0
    assert torch.isfinite(u).all()
    assert max_diff(u, u2) < SAME, "an unconditional sample depends on the conditioning contents"
    assert max_diff(u, c) > DIFFERENT
    assert torch.isfinite(r).all(), "a sample whose text is all padding must still be finite"


def test_low_confidence_joints_become_null_pose(model):
    x, t = make_x()
    cond = make_cond()
    pose = cond.pose.clone()
    thr = model.config.pose_null_threshold
    pose[:, :60, 2] = thr * 0.5                                    # joints 0..59 unsure, the rest confident
    cond = dataclasses.replace(cond, pose=pose)
    g = torch.Generator().manual_seed(3)
    low = pose.clone()
    low[:, :60, :2] = torch.rand(2, 60, 2, generator=g)            # move the unsure joints...
    low[:, :60, 2] = torch.rand(2, 60, generator=g) * thr * 0.99   # ...and vary their (sub-threshold) confidence
    high = pose.clone()
    high[:, 60:, :2] = torch.rand(2, JOINTS - 60, 2, generator=g)  # move the confident joints
    with torch.no_grad():
        base = model(x, t, cond).x0
        moved_low = model(x, t, dataclasses.replace(cond, pose=low)).x0
        moved_high = model(x, t, dataclasses.replace(cond, pose=high)).x0
    assert max_diff(base, moved_low) < SAME, "joints under pose_null_threshold must read NULL_POSE"
    assert max_diff(base, moved_high) > DIFFERENT, "confident joints' positions had no effect"


def test_null_pose_keeps_joint_identity(model):
    """A missing joint reads NULL_POSE plus its own joint embedding: which joint is missing shows."""
    cond = make_cond(B=1, dino_hw=(2, 3), L=5)
    pose = cond.pose.clone()
    pose[0, [0, 5], 2] = 0.0
    with torch.no_grad():
        ctx, mask = model.context(dataclasses.replace(cond, pose=pose), (2, 3))
        pose[0, [0, 5], :2] = torch.tensor([[0.9, 0.1], [0.2, 0.7]])  # a missing joint's x, y are moot
        ctx2, _ = model.context(dataclasses.replace(cond, pose=pose), (2, 3))
    off = 5 + 1 + 6                                          # T5 tokens | CLS | 2x3 DINO patches | pose
    assert ctx.shape == (1, off + JOINTS + 1, model.config.hidden_size) and mask.shape == (1, off + JOINTS + 1)
    assert torch.equal(ctx[0, off:off + JOINTS], ctx2[0, off:off + JOINTS])
    assert max_diff(ctx[0, off], ctx[0, off + 5]) > DIFFERENT, "two missing joints got the same token"


def test_dino_patch_positions_matter(model):
    """DINO patches carry a 2-D position: the same patches in another order give another output."""
    x, t = make_x(size=(64, 64))
    cond = make_cond(dino_hw=(2, 2))
    flipped = dataclasses.replace(cond, dino_patches=cond.dino_patches.flip(1))
    with torch.no_grad():
        assert max_diff(model(x, t, cond).x0, model(x, t, flipped).x0) > DIFFERENT


def test_conditioning_repeat_and_with_keep():
    cond = make_cond(B=2)
    r = cond.repeat(3)
    assert r.t5.shape == (6, 5, TEXT_DIM) and r.pose.shape == (6, JOINTS, 3) and r.keep.shape == (6, 4)
    assert torch.equal(r.dino_patches[4], cond.dino_patches[0]) and torch.equal(r.t5[5], cond.t5[1])
    k = torch.zeros(2, 4, dtype=torch.bool)
    w = cond.with_keep(k)
    assert w.keep is k and w.t5 is cond.t5 and cond.keep.all()


# ---------------------------------------------------------------- TREAD
def _run(model, x, t, cond, route=0.5, seed=0):
    with torch.no_grad():
        return model(x, t, cond, route=route, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("start,end", [(1, -1), (0, 4), (2, 3), (1, 2)])
def test_tread_active_tokens(start, end):
    m = perturbed(tiny(tread_start=start, tread_end=end))
    x, t = make_x(size=(64, 64))
    N, depth = 16, 4
    s, e = m.tread
    keep_n = N - int(N * 0.5)
    out = _run(m, x, t, make_cond(dino_hw=(4, 4)))
    assert out.active_tokens == N * depth - (N - keep_n) * (e - s)
    assert _run(m, x, t, make_cond(dino_hw=(4, 4)), route=0.0).active_tokens == N * depth


def test_tread_hand_counted():
    m = tiny()
    x, t = make_x(size=(64, 64))
    # 16 tokens, 4 blocks, blocks 1 and 2 see 8 of them: 16 + 8 + 8 + 16
    assert _run(m, x, t, make_cond(dino_hw=(4, 4))).active_tokens == 48
    # 0.3 of 16 tokens is 4 (rounded down): blocks 1 and 2 see 12
    assert _run(m, x, t, make_cond(dino_hw=(4, 4)), route=0.3).active_tokens == 16 + 12 + 12 + 16


def test_tread_route_zero_or_empty_range_is_the_dense_path(model):
    x, t = make_x(size=(64, 64))
    cond = make_cond(dino_hw=(4, 4))
    dense = _run(model, x, t, cond, route=0.0)
    assert torch.equal(model(x, t, cond).x0, dense.x0)
    assert dense.active_tokens == 16 * 4
    empty = copy.deepcopy(model)
    empty.tread = (2, 2)                                  # no block to route past
    out = _run(empty, x, t, cond, route=0.5)
    assert torch.equal(out.x0, dense.x0) and out.active_tokens == 64
    assert max_diff(_run(model, x, t, cond).x0, dense.x0) > DIFFERENT, "route=0.5 had no effect"


def test_tread_is_deterministic_for_a_generator(model):
    x, t = make_x(size=(64, 64))
    cond = make_cond(dino_hw=(4, 4))
    a, b, c = (_run(model, x, t, cond, seed=s) for s in (0, 0, 1))
    assert torch.equal(a.x0, b.x0) and torch.equal(a.repa_index, b.repa_index)
    assert not torch.equal(a.repa_index, c.repa_index)
    assert max_diff(a.x0, c.x0) > DIFFERENT


def test_tread_routes_tokens_back_to_their_own_place(model):
    """With the routed blocks made identities, routing changes nothing: every token comes back
    where it was taken from."""
    m = copy.deepcopy(model)
    s, e = m.tread
    with torch.no_grad():
        for b in m.blocks[s:e]:
            b.ada[-1].weight.zero_()
            b.ada[-1].bias.zero_()
    x, t = make_x(size=(64, 64))
    cond = make_cond(dino_hw=(4, 4))
    dense, routed = _run(m, x, t, cond, route=0.0), _run(m, x, t, cond, route=0.5)
    assert routed.repa_index.shape == (2, 8)
    assert torch.allclose(dense.x0, routed.x0, atol=1e-6), "TREAD scattered tokens back to the wrong place"


def test_tread_skipped_tokens_rejoin_unchanged(model):
    """Kept tokens go through blocks [start, end); the others reach block `end` as they left block start-1."""
    s, e = model.tread
    seen = {}
    hooks = [model.blocks[s].register_forward_pre_hook(lambda mod, a: seen.__setitem__("in_start", a[0])),
             model.blocks[e - 1].register_forward_hook(lambda mod, a, o: seen.__setitem__("out_last", o)),
             model.blocks[e].register_forward_pre_hook(lambda mod, a: seen.__setitem__("in_end", a[0]))]
    try:
        x, t = make_x(size=(64, 64))
        cond = make_cond(dino_hw=(4, 4))
        _run(model, x, t, cond, route=0.0)
        dense_in = seen["in_start"]
        out = _run(model, x, t, cond, route=0.5)
    finally:
        for h in hooks:
            h.remove()
    idx = out.repa_index                                   # REPA sits in the routed range: these are the kept tokens
    assert idx.shape == (2, 8)
    assert torch.equal(idx, idx.sort(dim=1).values) and all(len(set(r.tolist())) == 8 for r in idx)
    H = model.config.hidden_size
    gather = lambda a, i: a.gather(1, i[..., None].expand(-1, -1, H))  # noqa: E731
    assert seen["in_start"].shape == (2, 8, H)
    assert torch.allclose(seen["in_start"], gather(dense_in, idx), atol=1e-6)
    assert seen["in_end"].shape == (2, 16, H)
    skipped = torch.stack([torch.tensor([j for j in range(16) if j not in set(r.tolist())]) for r in idx])
    assert torch.equal(gather(seen["in_end"], skipped), gather(dense_in, skipped)), "skipped tokens were changed"
    assert torch.equal(gather(seen["in_end"], idx), seen["out_last"])


# ---------------------------------------------------------------- REPA
@pytest.mark.parametrize("repa_block,routed", [(1, False), (2, True), (-1, True), (3, False), (4, False)])
def test_repa_shape_follows_routing(repa_block, routed):
    m = perturbed(tiny(repa_block=repa_block))          # TREAD routes blocks [1, 3)
    x, t = make_x(size=(64, 64))
    cond = make_cond(dino_hw=(4, 4))
    out = _run(m, x, t, cond, route=0.5)
    n = 8 if routed else 16
    assert out.repa.shape == (2, n, DINO_DIM) and out.repa_index.shape == (2, n)
    if not routed:
        assert torch.equal(out.repa_index, torch.arange(16).expand(2, -1))
    dense = _run(m, x, t, cond, route=0.0)
    assert dense.repa.shape == (2, 16, DINO_DIM)


@pytest.mark.parametrize("repa_block", [1, 2])
def test_repa_projects_the_hidden_states_of_its_block(repa_block):
    m = perturbed(tiny(repa_block=repa_block))
    seen = {}
    h = m.blocks[repa_block - 1].register_forward_hook(lambda mod, a, o: seen.__setitem__("out", o))
    try:
        x, t = make_x(size=(64, 64))
        out = _run(m, x, t, make_cond(dino_hw=(4, 4)), route=0.5)
    finally:
        h.remove()
    with torch.no_grad():
        assert torch.allclose(out.repa, m.repa_proj(seen["out"]), atol=1e-6)


def test_repa_off():
    m = perturbed(tiny(repa_block=None))
    assert m.repa_proj is None and m.repa_at is None
    x, t = make_x()
    out = _run(m, x, t, make_cond())
    assert out.repa is None and out.repa_index is None
    terms = loss_terms(m, x, make_cond(), Objective(), generator=torch.Generator().manual_seed(0))
    assert "repa" not in terms
    assert torch.allclose(terms["loss"], terms["mse"])


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    a = perturbed(tiny()).train()
    b = copy.deepcopy(a)
    b.enable_gradient_checkpointing()
    assert b.gradient_checkpointing and not a.gradient_checkpointing
    x0, _ = make_x(size=(64, 64))
    cond = make_cond(dino_hw=(2, 2))
    obj = Objective(tread=0.5, repa_weight=0.5)
    la = loss_terms(a, x0, cond, obj, generator=torch.Generator().manual_seed(2))["loss"]
    lb = loss_terms(b, x0, cond, obj, generator=torch.Generator().manual_seed(2))["loss"]
    la.backward()
    lb.backward()
    assert torch.allclose(la, lb, atol=1e-6)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6, rtol=1e-4), n


# ---------------------------------------------------------------- save / load
def test_save_and_load_round_trip(tmp_path):
    m = perturbed(tiny(repa_block=3, tread_start=0, tread_end=2, pose_null_threshold=0.1))
    m.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").exists() and (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    back = NanoDiT.from_pretrained(tmp_path).eval()
    keys = [k for k in m.config if not k.startswith("_")]
    assert {k: back.config[k] for k in keys} == {k: m.config[k] for k in keys}
    assert back.repa_at == 3 and back.tread == (0, 2)
    sa, sb = m.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    x, t = make_x()
    assert torch.equal(_run(m, x, t, make_cond()).x0, _run(back, x, t, make_cond()).x0)
    assert torch.equal(_run(m, x, t, make_cond(), route=0.0).repa, _run(back, x, t, make_cond(), route=0.0).repa)


def test_save_and_load_without_repa(tmp_path):
    m = perturbed(tiny(repa_block=None))
    m.save_pretrained(tmp_path)
    back = NanoDiT.from_pretrained(tmp_path)
    assert back.config.repa_block is None and back.repa_proj is None
    x, t = make_x()
    assert torch.equal(_run(m, x, t, make_cond()).x0, _run(back, x, t, make_cond()).x0)
