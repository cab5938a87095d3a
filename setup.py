from setuptools import find_packages, setup

setup(
    name="qwen2vl-jax",
    version="0.1.0",
    description="Qwen2-VL in JAX/Flax: packed native-resolution ViT, M-RoPE, Qwen2 decoder.",
    python_requires=">=3.11",  # the pinned jax and numpy wheels need 3.11+
    packages=find_packages(include=["qwen2vl_jax*", "training*", "sharding*", "data_pipeline*", "evaluation*", "configs*"]),
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "etils==1.15.0",
        "numpy==2.4.6",
        "pillow==13.0.0",
        "safetensors==0.8.0",
        "tokenizers==0.23.3",
        "jinja2==3.1.6",
        "ml_collections==1.1.0",
        "ml_dtypes==0.6.0",
        "orbax-checkpoint==0.12.8",
        "tensorstore==0.1.86",
        "tqdm==4.70.1",
        "absl-py==2.5.1",
        "grain==0.2.18",
        "tensorflow-datasets==4.9.10",
        "array-record==0.8.6",
        "protobuf==7.36.2",
        "tensorboard==2.21.0",
        "matplotlib==3.11.2",
        "rapidfuzz==3.14.6",
        "pyarrow==26.0.1",  # benchmark files: parquet:, hf: (save_to_disk Arrow folders)
        # video files (mp4, webm, mkv, mov, avi, gif): the wheels carry ffmpeg, so no system codec is needed
        "av==18.1.0",
    ],
    extras_require={
        "test": [
            "pytest==9.2.0",
            "torch==2.13.0",
            "transformers==5.24.0",
            "peft==0.22.0",  # tests/test_peft.py: transformers + peft load our LoRA adapter folders
            "accelerate==1.15.0",  # peft's dependency, at the lmms extra's pin
        ],
        # Cloud TPU VMs: jax's own TPU build of the pinned version (libtpu)
        "tpu": ["jax[tpu]==0.10.2"],
        # NVIDIA GPUs (CUDA 12 wheels, cuDNN attention)
        "cuda": ["jax[cuda12]==0.10.2"],
        # gs:// checkpoints, data, eval outputs and compile caches (etils.epath goes through gcsfs)
        "gcs": ["gcsfs==2026.10.1"],
        # sharding.plan --topology: compile for a TPU slice on a machine without one (jax 0.10.2's [tpu] pin)
        "tpu-plan": ["libtpu==0.0.42.1"],
        # lmms-eval's evaluation path (evaluation/lmms): the packages it imports; lmms-eval itself goes in with
        # `pip install --no-deps lmms-eval==0.7.3` (its metadata pins av<16, and its wandb/torchvision pins move
        # protobuf and torch off ours)
        "lmms": ["loguru==0.7.3", "datasets==5.2.0", "accelerate==1.15.0", "evaluate==0.4.6", "sacrebleu==2.6.0",
                 "tenacity==9.2.1", "pandas==3.1.1", "pytz==2026.6", "dill==0.4.1", "torch==2.13.0",
                 "pytablewriter==1.2.1",
                 "filelock==3.32.7"],  # lmms-eval 0.7.3 patches filelock._api, which filelock 4 dropped
    },
    entry_points={
        "console_scripts": [
            "qwen2vl-demo=qwen2vl_jax.demo:main",
            "qwen2vl-convert=qwen2vl_jax.checkpoint.convert:main",
            "qwen2vl-generate=evaluation.generate_cli:main",
            "qwen2vl-train=training.train:main",
            "qwen2vl-eval=evaluation.runner:main",
        ],
        # lmms-eval 0.7.x model plugins: `lmms-eval --model qwen2vl_jax --model_args checkpoint=DIR ...`
        "lmms_eval.models": ["qwen2vl_jax = evaluation.lmms:manifest"],
    },
)
