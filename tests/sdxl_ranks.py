"""Run under torchrun by tests/test_train_sdxl.py: train, then each rank writes the sha256 of the
whole trained weights it holds (DDP: its replica; FSDP: gathered from the shards) to <out>/rank<r>.sha."""
import hashlib
import sys
from pathlib import Path

import torch.distributed as dist

from tasks.core.stage import section_or_exit, setup_logging
from tasks.sdxl.full import FullTrainer
from tasks.sdxl.full_params import FullParams

if __name__ == "__main__":
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    setup_logging()
    params_file, out = sys.argv[1], Path(sys.argv[2])
    t = FullTrainer(section_or_exit(FullParams, "train_sdxl", params_file))
    t.fit()
    whole = get_model_state_dict(t.trainable, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    h = hashlib.sha256()
    for k in sorted(whole):
        h.update(k.encode())
        h.update(whole[k].detach().cpu().contiguous().numpy().tobytes())
    out.mkdir(exist_ok=True)
    (out / f"rank{t.rank}.sha").write_text(h.hexdigest())
    if dist.is_initialized():
        dist.destroy_process_group()
