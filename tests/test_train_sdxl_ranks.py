"""The SDXL full fine-tune under torchrun with 2 gloo ranks: DDP and FSDP2 (SHARD_GRAD_OP) each
compute the step of one process with the same global batch (to 1e-5), and every rank ends with
the same weights. The text encoders train too (their gradients are averaged by hand), with EMA
and gradient checkpointing on, as the real recipe runs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tasks.sdxl.full_checkpoint import TRAIN_WEIGHTS
from tests.openai_server import free_port
from tests.test_train_sdxl import ROOT, SMALL, data_repo, losses, params, root  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow
COMMON = dict(SMALL, steps=2, grad_accum=2, checkpoint_every=2, ema=True, ema_decay=0.5, gradient_checkpointing=True,
              train_text_encoders=True, text_encoder_lr=1e-3, val_timesteps=0)


def _torchrun(root: Path, section: dict, out: Path) -> None:
    doc = yaml.safe_load((root / "params.yaml").read_text())
    doc["train_sdxl"] = {**doc["train_sdxl"], **section}
    params_file = root / f"params-{out.name}.yaml"
    params_file.write_text(yaml.safe_dump(doc))
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_port", str(free_port()), str(ROOT / "tests/sdxl_ranks.py"), str(params_file), str(out)],
                   cwd=root, env=env, check=True, timeout=600)


def test_two_gloo_ranks_ddp_and_fsdp_equal_one_process_with_the_same_global_batch(root):
    from tasks.sdxl.full import FullTrainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs: another thread count sums in another order
    try:
        FullTrainer(params(**dict(COMMON, batch_size=2, run="one")), root=root).fit()
    finally:
        torch.set_num_threads(threads)
    one = load_file(root / f"runs/one/checkpoints/step-000002/{TRAIN_WEIGHTS}")
    base = load_file(ROOT / "models/tiny/sdxl/unet/diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(one[f"unet.{k}"], v) for k, v in base.items())  # it did train
    assert any(k.startswith("te1.") for k in one) and any(k.startswith("te2.") for k in one)
    for parallel in ("ddp", "fsdp"):
        _torchrun(root, dict(COMMON, batch_size=1, run=parallel, parallel=parallel), root / parallel)
        two = load_file(root / f"runs/{parallel}/checkpoints/step-000002/{TRAIN_WEIGHTS}")
        assert one.keys() == two.keys()
        # Equal up to summation order: Adam's first steps turn a gradient that is a sum of
        # cancelling terms into a full +-lr step whatever its last bits, so single elements may
        # differ by a fraction of lr; the update as a whole must agree (a wrong batch split, other
        # noise or a wrong average would differ by the size of the update itself).
        worst = max(float((one[k] - two[k]).abs().max()) for k in one)
        diff = sum(float((one[f"unet.{k}"] - two[f"unet.{k}"]).pow(2).sum()) for k in base)
        update = sum(float((one[f"unet.{k}"] - v).pow(2).sum()) for k, v in base.items())
        assert worst < 0.1 * COMMON["lr"] and diff < 1e-6 * update, (parallel, worst, diff / update)
        # Every rank ends with the same weights (DDP: its replica; FSDP: the gathered shards).
        hashes = [(root / parallel / f"rank{r}.sha").read_text() for r in (0, 1)]
        assert hashes[0] == hashes[1], parallel
        l1, l2 = losses(root / "runs/one"), losses(root / f"runs/{parallel}")
        assert [s for s, _ in l1] == [s for s, _ in l2]
        assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(l1, l2)), (parallel, l1, l2)
