"""The SDXL objectives (models/sdxl/objective.py) and the LoRA schedule, without a model."""
from __future__ import annotations

import math

import pytest
import torch

from models.sdxl.objective import Objective, offset_noise, time_ids
from tasks.core.params import from_dict
from tasks.sdxl.trainer import lr_lambda
from tasks.sdxl.params import LoraParams

SCHED = {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
         "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon"}


def test_flow_matching_interpolates_toward_noise_and_targets_noise_minus_latents():
    x = torch.randn(4096, 4, 2, 2)
    noisy, t, target = Objective("flow", SCHED, noise_offset=0.0, t_shift=3.0).prepare(x, torch.Generator().manual_seed(0))
    noise = target + x
    s = (t / 1000).view(-1, 1, 1, 1)
    assert torch.allclose(noisy, (1 - s) * x + s * noise, atol=1e-5)
    # Shifted logit-normal: t = sigmoid(N(log 3, 1)), so the median is 3/4, the noisy end.
    assert abs(float((t / 1000).median()) - 0.75) < 0.02 and float(t.min()) > 0 and float(t.max()) < 1000
    again = Objective("flow", SCHED, t_shift=3.0).prepare(x, torch.Generator().manual_seed(0))
    assert torch.equal(again[1], t)  # seeded: resumable


def test_ddpm_predicts_the_noise_on_the_base_schedule_and_noise_offset_shifts_channel_means():
    x = torch.zeros(2, 4, 8, 8)
    obj = Objective("ddpm", SCHED, noise_offset=0.0)
    noisy, t, target = obj.prepare(x, torch.Generator().manual_seed(1))
    a = obj.ddpm.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert t.dtype == torch.long and torch.allclose(noisy, (1 - a).sqrt() * target, atol=1e-5)
    plain = offset_noise(torch.zeros(512, 4, 16, 16), 0.0, torch.Generator().manual_seed(2))
    shifted = offset_noise(torch.zeros(512, 4, 16, 16), 0.5, torch.Generator().manual_seed(2))
    spread = lambda n: float(n.mean(dim=(2, 3)).std())  # noqa: E731 — per-sample, per-channel means
    assert spread(shifted) > 4 * spread(plain)


def test_flow_sampler_is_a_flow_match_euler_schedule_with_the_shift():
    sched = Objective("flow", SCHED).sampler(SCHED, shift=6.0)
    sched.set_timesteps(4)
    assert type(sched).__name__ == "FlowMatchEulerDiscreteScheduler" and sched.config.shift == 6.0
    assert float(sched.sigmas[0]) == pytest.approx(1.0) and float(sched.sigmas[1]) > 0.9  # shift 6: noisy end longer
    assert type(Objective("ddpm", SCHED).sampler(SCHED, 3.0)).__name__ == "EulerDiscreteScheduler"
    assert time_ids((1024, 768), (3, 5), (512, 384)) == [1024, 768, 3, 5, 512, 384]


def test_constant_and_cosine_schedules_warm_up_then_hold_or_decay():
    const = lr_lambda(from_dict(LoraParams, {"steps": 100, "warmup_steps": 10}, "train_lora"))
    cos = lr_lambda(from_dict(LoraParams, {"steps": 100, "warmup_steps": 10, "schedule": "cosine"}, "train_lora"))
    assert const(0) == pytest.approx(0.1) and const(9) == 1.0 and const(99) == 1.0
    assert cos(10) == 1.0 and cos(55) == pytest.approx(0.5) and cos(100) == pytest.approx(0.0, abs=1e-9)
    assert math.isclose(cos(5), const(5))


def test_batches_keep_buckets_and_chunk_counts_apart_and_resume_in_place():
    from pathlib import Path

    from tasks.sdxl.data import BucketBatches, Row

    rows = [Row(f"{i:02d}", Path(f"{i}.safetensors"), "1024x1024" if i % 2 else "832x1216", (128, 128),
                f"prompt {i}", (1024, 1024, 0, 0, 128, 128)) for i in range(12)]
    chunks = {f"prompt {i}": 1 + (i % 3 == 0) for i in range(12)}
    b = BucketBatches(rows, batch_size=4, seed=0, chunks=chunks)
    epoch = [b.next() for _ in range(4)]  # (2 buckets x 2 chunk counts), batches of 4, 2 or 4
    assert sorted(r.id for batch in epoch for r in batch) == sorted(r.id for r in rows)  # each once
    assert all(len({(r.bucket, chunks[r.prompt]) for r in batch}) == 1 for batch in epoch)
    b.next()
    state = b.state_dict()
    again = BucketBatches(rows, batch_size=4, seed=0, chunks=chunks)
    again.load_state_dict(state)
    assert [r.id for r in again.next()] == [r.id for r in b.next()]
