"""NanoDiT: a pixel-space diffusion transformer that predicts the clean image (x0).

    model = NanoDiT.preset("baseline", text_dim=1024, dino_dim=1024)
    out = model(x_t, t, cond)              # out.x0: (B, 3, H, W)
    model.save_pretrained(dir)             # safetensors + config.json (diffusers)

Image: RGB in [-1, 1], cut into patch_size² patches (16 by default: at 1 MP that is
4,096 tokens, one per DINOv3/16 patch, so REPA aligns token to token), with a 2-D
sin-cos position so any aspect ratio works. Blocks: adaLN-zero modulating
self-attention (QK-norm), cross-attention to the conditioning, and an MLP; SDPA
throughout. The timestep enters through a sinusoidal embedding of t × 1000 (t in
[0, 1] varies too little for the usual frequencies).

Conditioning, one cross-attended sequence (`Conditioning` says which parts each
sample keeps; a dropped part is masked out of attention, not zeroed):
  T5 tokens (their own mask) | DINOv3 CLS | DINOv3 patches (+ their 2-D position,
  in image-token coordinates, so a pooled grid lines up) | 133 pose tokens | one
  learned register token that is always there, so a fully unconditional sample
  still has something to attend to.
Pose tokens: MLP 3→H→H (GELU) + a learned embedding per joint; a joint under
`pose_null_threshold` confidence gets a learned NULL_POSE token instead of the MLP
output (its joint embedding stays, so the model knows which joint is missing).

TREAD (`route` > 0): a random share of image tokens skips blocks
[tread_start, tread_end) and rejoins unchanged; no weights are added.
REPA: the output of block `repa_block` goes through a small MLP projector to
DINOv3's width; the objective aligns it with the DINO patch each token lies in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

PRESETS = {
    # For CI and the demo on a CPU: a few seconds a step at 256², meaning nothing.
    "tiny": dict(hidden_size=64, depth=4, num_heads=4, mlp_ratio=2.0, repa_hidden=256),
    # The smallest that learns on a CPU: with patch_size 8 (192 values a patch, as wide as the
    # model) it memorises 4 photographs at 64 px in ~2,000 steps (bench/bench_learn.py).
    "small": dict(hidden_size=192, depth=6, num_heads=6, repa_hidden=512),
    "baseline": dict(hidden_size=384, depth=12, num_heads=6),
    "production": dict(hidden_size=768, depth=18, num_heads=12),
}
CONTEXT_PARTS = ("text", "cls", "patches", "pose")


@dataclass
class Conditioning:
    """One batch's conditioning. `keep` (B, 4) bool: text, cls, patches, pose kept per sample."""
    t5: torch.Tensor            # (B, L, text_dim)
    t5_mask: torch.Tensor       # (B, L) bool
    dino_cls: torch.Tensor      # (B, dino_dim)
    dino_patches: torch.Tensor  # (B, h, w, dino_dim)
    pose: torch.Tensor          # (B, 133, 3) [x_norm, y_norm, conf]
    keep: torch.Tensor          # (B, 4) bool

    def with_keep(self, keep: torch.Tensor) -> "Conditioning":
        return Conditioning(self.t5, self.t5_mask, self.dino_cls, self.dino_patches, self.pose, keep)

    def repeat(self, n: int) -> "Conditioning":
        r = lambda x: x.repeat(n, *([1] * (x.dim() - 1)))  # noqa: E731
        return Conditioning(*(r(getattr(self, f)) for f in ("t5", "t5_mask", "dino_cls", "dino_patches",
                                                             "pose", "keep")))


@dataclass
class DiTOutput:
    x0: torch.Tensor                    # (B, 3, H, W), the predicted clean image
    repa: torch.Tensor | None = None    # (B, n, dino_dim) projected hidden states of the REPA block
    repa_index: torch.Tensor | None = None  # (B, n) which image tokens those are
    active_tokens: int = 0              # image tokens × blocks actually computed (TREAD's saving)


def timestep_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0, max_period: float = 10000.0):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * scale)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_2d(ys: torch.Tensor, xs: torch.Tensor, dim: int) -> torch.Tensor:
    """(n, dim) for positions (ys[i], xs[i]); half the channels encode y, half x."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, device=ys.device, dtype=torch.float32) / quarter)
    enc = [f(c.float()[:, None] * omega[None]) for c in (ys, xs) for f in (torch.sin, torch.cos)]
    out = torch.cat(enc, dim=1)
    return F.pad(out, (0, dim - out.shape[1]))


def grid_positions(h: int, w: int, stretch_h: float = 1.0, stretch_w: float = 1.0, device=None):
    """Centres of an h × w grid, in units of a grid `stretch` times finer (image tokens)."""
    ys = (torch.arange(h, device=device) + 0.5) * stretch_h - 0.5
    xs = (torch.arange(w, device=device) + 0.5) * stretch_w - 0.5
    return ys.repeat_interleave(w), xs.repeat(h)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class Attention(nn.Module):
    """Multi-head attention with RMS-normed queries and keys; self-attention when ctx is None."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.kv, self.out = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.q_norm, self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6), nn.RMSNorm(self.head_dim, eps=1e-6)

    def forward(self, x, ctx=None, mask=None):
        B, N, D = x.shape
        src = x if ctx is None else ctx
        q = self.q(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(src).view(B, src.shape[1], 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        # The norms' weights in the activations' dtype: under bf16 autocast a mixed-dtype
        # RMSNorm falls back to the slow unfused kernel.
        q = F.rms_norm(q, (self.head_dim,), self.q_norm.weight.to(q.dtype), self.q_norm.eps).to(v.dtype)
        k = F.rms_norm(k, (self.head_dim,), self.k_norm.weight.to(k.dtype), self.k_norm.eps).to(v.dtype)
        attn_mask = None if mask is None else mask[:, None, None, :]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out(o.transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
                                              for _ in range(3))
        self.attn, self.cross = Attention(dim, heads), Attention(dim, heads)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 9 * dim))

    def forward(self, x, c, ctx, ctx_mask):
        m = self.ada(c).unsqueeze(1).chunk(9, dim=-1)
        x = x + m[2] * self.attn(modulate(self.norm1(x), m[0], m[1]))
        x = x + m[5] * self.cross(modulate(self.norm2(x), m[3], m[4]), ctx, ctx_mask)
        return x + m[8] * self.mlp(modulate(self.norm3(x), m[6], m[7]))


class NanoDiT(ModelMixin, ConfigMixin):
    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, hidden_size: int = 384, depth: int = 12, num_heads: int = 6, patch_size: int = 16,
                 in_channels: int = 3, mlp_ratio: float = 4.0, text_dim: int = 1024, dino_dim: int = 1024,
                 pose_joints: int = 133, pose_null_threshold: float = 0.05, repa_block: int = -1,
                 repa_hidden: int = 2048, tread_start: int = 1, tread_end: int = -1):
        super().__init__()
        H, p = hidden_size, patch_size
        if H % num_heads or (H // num_heads) % 2:
            raise ValueError(f"hidden_size {H} must split into {num_heads} heads of an even width")
        self.gradient_checkpointing = False
        self.patch_in = nn.Linear(in_channels * p * p, H)
        self.t_embed = nn.Sequential(nn.Linear(256, H), nn.SiLU(), nn.Linear(H, H))
        self.text_proj = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, H))
        self.cls_proj = nn.Sequential(nn.LayerNorm(dino_dim), nn.Linear(dino_dim, H))
        self.patch_proj = nn.Sequential(nn.LayerNorm(dino_dim), nn.Linear(dino_dim, H))
        self.pose_mlp = nn.Sequential(nn.Linear(3, H), nn.GELU(), nn.Linear(H, H))
        self.joint_embed = nn.Parameter(torch.randn(pose_joints, H) * 0.02)
        self.null_pose = nn.Parameter(torch.randn(H) * 0.02)
        self.register = nn.Parameter(torch.randn(1, H) * 0.02)
        self.type_embed = nn.Parameter(torch.randn(len(CONTEXT_PARTS), H) * 0.02)
        self.ctx_norm = nn.LayerNorm(H)
        self.blocks = nn.ModuleList(Block(H, num_heads, mlp_ratio) for _ in range(depth))
        self.final_norm = nn.LayerNorm(H, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(H, 2 * H))
        self.patch_out = nn.Linear(H, in_channels * p * p)
        # REPA reads the output of the first `repa_at` blocks; None = no projector (REPA off).
        self.repa_at = self._block_index(repa_block, depth // 2) if repa_block is not None else None
        if self.repa_at == 0:
            raise ValueError("repa_block must be at least 1 (the output of the first block)")
        self.repa_proj = (nn.Sequential(nn.Linear(H, repa_hidden), nn.SiLU(), nn.Linear(repa_hidden, repa_hidden),
                                        nn.SiLU(), nn.Linear(repa_hidden, dino_dim))
                          if self.repa_at is not None else None)
        self.tread = (self._block_index(tread_start, 0), self._block_index(tread_end, depth - 1))
        self._init_weights()

    def _block_index(self, i: int, default: int) -> int:
        depth = self.config.depth
        j = default if i == -1 else i
        if not 0 <= j <= depth:
            raise ValueError(f"block index {i} outside 0..{depth}")
        return j

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # adaLN-zero: every block starts as the identity, and the output as mid-grey.
        for ada in [b.ada for b in self.blocks] + [self.final_ada]:
            nn.init.zeros_(ada[-1].weight)
            nn.init.zeros_(ada[-1].bias)
        nn.init.zeros_(self.patch_out.weight)
        nn.init.zeros_(self.patch_out.bias)

    @classmethod
    def preset(cls, name: str, **overrides) -> "NanoDiT":
        if name not in PRESETS:
            raise ValueError(f"unknown NanoDiT preset {name!r}; expected one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    # ------------------------------------------------------------ pieces
    def context(self, cond: Conditioning, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-attention sequence and its mask (True = attend)."""
        B, dtype = cond.t5.shape[0], self.patch_in.weight.dtype
        te = self.type_embed
        text = self.text_proj(cond.t5.to(dtype)) + te[0]
        cls_tok = self.cls_proj(cond.dino_cls.to(dtype))[:, None] + te[1]
        _, h, w, _ = cond.dino_patches.shape
        ys, xs = grid_positions(h, w, grid[0] / h, grid[1] / w, device=text.device)
        patches = (self.patch_proj(cond.dino_patches.to(dtype).flatten(1, 2))
                   + sincos_2d(ys, xs, self.config.hidden_size).to(dtype) + te[2])
        pose = cond.pose.to(dtype)
        low = (pose[..., 2:] < self.config.pose_null_threshold)
        pose_tok = torch.where(low, self.null_pose.to(dtype), self.pose_mlp(pose)) + self.joint_embed + te[3]
        reg = self.register.expand(B, -1, -1)
        ctx = self.ctx_norm(torch.cat([text, cls_tok, patches, pose_tok, reg], dim=1))
        k = cond.keep.bool()
        one = torch.ones(B, 1, dtype=torch.bool, device=k.device)
        mask = torch.cat([cond.t5_mask.bool() & k[:, :1], k[:, 1:2], k[:, 2:3].expand(B, h * w),
                          k[:, 3:4].expand(B, pose_tok.shape[1]), one], dim=1)
        return ctx, mask

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        B, C, Hh, W = x.shape
        p = self.config.patch_size
        if Hh % p or W % p:
            raise ValueError(f"image {W}x{Hh} is not a multiple of patch_size {p}")
        return x.view(B, C, Hh // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C * p * p)

    def unpatchify(self, tokens: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
        B, p, C = tokens.shape[0], self.config.patch_size, self.config.in_channels
        return tokens.view(B, gh, gw, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, gh * p, gw * p)

    def _run(self, block, *args):
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)

    # ------------------------------------------------------------ forward
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning, route: float = 0.0,
                generator: torch.Generator | None = None) -> DiTOutput:
        """route: the share of image tokens TREAD sends past the middle blocks (0 = dense).
        generator: draws which tokens (seeded sampling passes one; training uses the global RNG
        unless given)."""
        p = self.config.patch_size
        gh, gw = x_t.shape[-2] // p, x_t.shape[-1] // p
        dtype = self.patch_in.weight.dtype
        x = self.patch_in(self.patchify(x_t.to(dtype)))
        ys, xs = grid_positions(gh, gw, device=x.device)
        x = x + sincos_2d(ys, xs, self.config.hidden_size).to(dtype)
        c = self.t_embed(timestep_embedding(t, 256).to(dtype))
        ctx, mask = self.context(cond, (gh, gw))
        B, N, _ = x.shape
        start, end = self.tread
        keep_n = N - int(N * route) if route > 0 and end > start else N
        idx = None
        if keep_n < N:
            # Drawn where the generator lives (seeded CPU generators drive CUDA runs too).
            where = generator.device if generator is not None else x.device
            idx = torch.rand(B, N, device=where, generator=generator).to(x.device).argsort(dim=1)[:, :keep_n]
            idx = idx.sort(dim=1).values
        full, repa, repa_index, active = x, None, None, 0
        for i, block in enumerate(self.blocks):
            if idx is not None and i == start:
                full = x  # the routed-away tokens rejoin later as they are now
                x = full.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))
            x = self._run(block, x, c, ctx, mask)
            active += x.shape[1]
            if idx is not None and i == end - 1:
                full = full.scatter(1, idx[..., None].expand(-1, -1, x.shape[-1]), x)
                x = full
            if self.repa_at is not None and i == self.repa_at - 1:
                routed = idx is not None and start <= i < end - 1
                repa = self.repa_proj(x)
                repa_index = idx if routed else torch.arange(N, device=x.device).expand(B, -1)
        shift, scale = self.final_ada(c).unsqueeze(1).chunk(2, dim=-1)
        out = self.patch_out(modulate(self.final_norm(x), shift, scale))
        return DiTOutput(self.unpatchify(out, gh, gw), repa, repa_index, active)
