"""EdgeVL distillation of the quickstart's teacher (real DINOv2-S/14 + trained image adapter)
into a compact two-view (RGB + depth) ViT student; see `edgeglass_jax/tasks/distill.py`.

  python -m edgeglass_jax.main --config=configs/distill.py:stage1 --workdir=runs/distill/s1
  python -m edgeglass_jax.main --config=configs/distill.py:stage2 --workdir=runs/distill/s2 \
      --config.distill.init_workdir=runs/distill/s1

ARG: comma-separated words: `stage1` | `stage2` | `qat` (default stage1; `qat` is stage 2's
int8 QAT with the stage-1 loss only, no triplets: EdgeVL's "plain QAT" row); `ti` | `s` (the
student, ViT-Ti/8 or ViT-S/8 on 64 px, default ti); `int8` | `fp32` (int8 QAT through
`quant.py` on or off; on by default in stage 2 only); `tiny` (a 2-layer student of width 192
and a few steps, for tests and notebooks: point `distill.teacher_workdir` / `teacher_config`
at a small align run). EdgeVL's optimiser: AdamW 1e-4, cosine to 5e-6, weight decay 1e-3; the
step counts are scaled down for a 2-core CPU.
"""
from edgeglass_jax import configs

WORDS = ("stage1", "stage2", "qat", "ti", "s", "int8", "fp32", "tiny")


def get_config(arg: str = ""):
  words = [w for w in arg.split(",") if w]
  unknown = sorted(set(words) - set(WORDS))
  if unknown:
    raise ValueError(f"configs/distill.py: unknown ARG words {unknown}; use some of {WORDS}")
  stage = 2 if "stage2" in words or "qat" in words else 1
  tiny = "tiny" in words
  config = configs.base("distill")
  config.distill = dict(
      stage=stage, teacher_workdir="runs/quickstart", teacher_config="configs/quickstart.py",
      teacher_features="", width=256, views=("rgb", "depth"),
      label_tasks=("shape",), tau=0.25, confidence_scale=100.0,
      init_workdir="", margin=0.3, num_negatives=3, stage2_triplet_weight=0.0 if "qat" in words
      else 1.0, stage2_distill_weight=1.0)
  config.student = dict(size="s" if "s" in words else "ti", patch_size=8, image_size=64,
                        layers=2 if tiny else 0)
  qat = (stage == 2 or "int8" in words) and "fp32" not in words
  config.quant = configs.quant(kind="int8" if qat else "none")
  config.quant_eval = dict(calibration_batches=2 if tiny else 8)
  steps = 8 if tiny else (400 if stage == 1 else 200)
  config.train = dict(
      split="train", steps=steps, batch_size=16 if tiny else 64,
      learning_rate=1e-3 if tiny else (1e-4 if stage == 2 else 5e-4),
      warmup_steps=max(steps // 20, 1), end_lr_fraction=0.05, weight_decay=1e-3, b1=0.9,
      b2=0.999, clip_norm=1.0, frozen="", lr_scale="", log_every=2 if tiny else 25, eval_every=0,
      checkpoint_every=4 if tiny else 100, keep=2, keep_best_metric="", keep_best=1,
      best_mode="max", async_checkpoint=not tiny, max_nonfinite=20)
  config.eval = dict(split="test", batch_size=16 if tiny else 64,
                     latency_batches=(1, 32), latency_repeats=3 if tiny else 20)
  config.axis_rules = ()
  return config
