"""bench/bench_scale.py's hook: the model stages' Workers return synthetic bytes of real shapes.

Put this folder on PYTHONPATH with NICHE_BENCH_SYNTHETIC=1 and every Python process started
under it (the `dvc` command and the stages it runs) arms an import hook
(tasks/core/importhook.py, loaded by path: nothing is imported at start-up). When
`tasks.core.workers` is imported, `Worker.__init_subclass__` is wrapped, so the stage Workers
named in SYNTHETIC get a `setup` that loads nothing and a `run` that returns, per input, the
safetensors bytes the real model would give for it: the same tensor names, shapes, dtypes and
metadata (what the stage and the shard stage read back), with seeded random values. The
classes are patched as they are defined, so this works for `python -m tasks.x` (`__main__`).
The stages' keys, stores, manifests and DVC are untouched. Without the variable: nothing.
With NICHE_BENCH_TRACE=<file>, each process appends its script and start/end times there.

    hidden states  T5-large      (n, 1024) float16, n = ~1.3 tokens per caption word + EOS
    cls, patches   DINOv3 ViT-L  (1024,), (H/16, W/16, 1024) float16 at the bucket's size
    pose           DWPose        (133, 3) float16, box (4,) float32, n_people int32
    mean, std      SDXL VAE      (4, h/8, w/8) float16 at the stage's encoded size
"""
import os

if os.environ.get("NICHE_BENCH_SYNTHETIC") == "1":
    import hashlib
    import importlib.util
    from pathlib import Path

    T5_DIM, DINO_DIM, KEYPOINTS, PATCH, VAE_FACTOR = 1024, 1024, 133, 16, 8
    SDXL_SCALING = 0.13025

    def _rng(*parts):
        import numpy as np

        h = hashlib.sha256()
        for p in parts:
            h.update(p if isinstance(p, bytes) else str(p).encode())
        return np.random.default_rng(int.from_bytes(h.digest()[:8], "little"))

    def _f16(rng, shape, scale=1.0):
        import numpy as np

        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float16)

    def _setup(self):
        return f"{type(self).__name__}: synthetic outputs (bench/scale_hook), no model loaded"

    def _text(self, texts):
        import numpy as np

        from tasks.core.store import tensor_bytes

        out = []
        for t in texts:
            tokens = int(len(t.split()) * 1.3 + 0.5) + 1  # T5's SentencePiece: ~1.3 per English word, + EOS
            n = min(tokens, self.max_length)
            meta = {"model": self.model.key(), "dtype": self.dtype, "length": str(n),
                    "truncated": "1" if tokens > self.max_length else "0"}
            out.append(tensor_bytes({"hidden": _f16(_rng(t), (n, T5_DIM), 0.2),
                                     "length": np.array(n, np.int32),
                                     "truncated": np.array(tokens > self.max_length, np.bool_)}, meta))
        return out

    def _image(self, images):
        from tasks.core.store import tensor_bytes

        out = []
        for img in images:
            rng = _rng(img.data)
            out.append(tensor_bytes(
                {"cls": _f16(rng, (DINO_DIM,)),
                 "patches": _f16(rng, (img.height // PATCH, img.width // PATCH, DINO_DIM))},
                {"model": self.model.key(), "dtype": self.dtype, "bucket": f"{img.width}x{img.height}"}))
        return out

    def _pose(self, images):
        import numpy as np

        from tasks.core.store import tensor_bytes

        out = []
        for img in images:
            rng = _rng(img.data)
            n = int(rng.choice([0, 1, 1, 1, 2]))
            if n == 0:
                pose, box, score, conf = np.zeros((KEYPOINTS, 3), np.float16), np.zeros(4, np.float32), 0.0, 0.0
            else:
                xy = rng.uniform(-1, 1, (KEYPOINTS, 2))
                c = rng.uniform(0, 1, (KEYPOINTS, 1))
                pose = np.concatenate([xy, c], 1).astype(np.float16)
                (x0, x1), (y0, y1) = np.sort(rng.uniform(-1, 1, 2)), np.sort(rng.uniform(-1, 1, 2))
                box = np.array([x0, y0, x1, y1], np.float32)
                score, conf = float(rng.uniform(0.3, 1)), float(c.mean())
            meta = {"n_people": str(n), "det_score": f"{score:.6g}", "pose_conf": f"{conf:.6g}",
                    "size": f"{img.width}x{img.height}"}
            out.append(tensor_bytes({"pose": pose, "box": box, "n_people": np.array(n, np.int32)}, meta))
        return out

    def _latents(self, inputs):
        from tasks.core.store import tensor_bytes

        out = []
        for item in inputs:
            rng = _rng(item.id, item.image.data)
            shape = (4, item.height // VAE_FACTOR, item.width // VAE_FACTOR)
            meta = {"id": item.id, "bucket": item.bucket, "width": str(item.width), "height": str(item.height),
                    "vae": self.vae_key, "dtype": self.dtype, "scaling_factor": repr(SDXL_SCALING)}
            out.append(tensor_bytes({"mean": _f16(rng, shape, 5.0), "std": abs(_f16(rng, shape, 0.05))}, meta))
        return out

    SYNTHETIC = {"TextWorker": _text, "ImageWorker": _image, "PoseWorker": _pose, "LatentWorker": _latents}

    def _patch(module):
        base = module.Worker
        previous = base.__dict__.get("__init_subclass__")

        def __init_subclass__(cls, **kw):
            if previous is not None:
                previous.__func__(cls, **kw)
            else:
                super(base, cls).__init_subclass__(**kw)
            if cls.__name__ in SYNTHETIC:
                cls.setup, cls.run = _setup, SYNTHETIC[cls.__name__]

        base.__init_subclass__ = classmethod(__init_subclass__)

    _hook = Path(__file__).resolve().parents[2] / "tasks" / "core" / "importhook.py"
    _spec = importlib.util.spec_from_file_location("_niche_bench_importhook", _hook)
    _mod = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_mod)
    _mod.arm("tasks.core.workers", _patch, "__niche_bench_synthetic__")

if os.environ.get("NICHE_BENCH_TRACE"):
    # One JSON line per process at exit: its script and wall-clock start and end, so the bench can
    # tell a stage's own process time from DVC's work around it.
    import atexit
    import json
    import sys
    import time

    _t0 = time.time()

    def _trace():
        with open(os.environ["NICHE_BENCH_TRACE"], "a") as f:
            f.write(json.dumps({"argv0": sys.argv[0] if sys.argv else "", "start": _t0,
                                "end": time.time()}) + "\n")

    atexit.register(_trace)
