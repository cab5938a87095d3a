"""lmms-eval (0.7.x) model `qwen2vl_jax`: lmms-eval's tasks served by this project's batched, bucketed, sharded
generation (`qwen2vl_jax.generation.generate_many` on a mesh from `evaluation.serving.open_model`).

Install (lmms-eval 0.7.3's own requirements pin av<16, protobuf<7 via wandb and torch 2.14 via torchvision, which
this project's pins exclude, so lmms-eval goes in without its dependencies and the `lmms` extra brings the ones its
evaluation path imports):

    pip install -e '.[lmms]' && pip install --no-deps lmms-eval==0.7.3

Run:

    lmms-eval --model qwen2vl_jax --model_args checkpoint=DIR,mesh=data=-1,batch_size=8 --tasks TASKS \\
        --output_path results/

The model registers through lmms-eval's entry-point group `lmms_eval.models` (setup.py: `qwen2vl_jax =
evaluation.lmms:manifest`), so an installed checkout needs no --include_path or LMMS_EVAL_PLUGINS.

model_args (key=value, comma separated):
    checkpoint      converted or Hugging Face Qwen2-VL folder (required)
    mesh            axis=size pairs over this host's devices, default data=-1; several axes: separate them with
                    ';' or quote the value (mesh="data=2,tensor=4"): lmms-eval splits model_args at commas
    dtype           cast weights/compute, e.g. bfloat16 (default: as stored)
    batch_size      requests per generate call (default: lmms-eval's --batch_size, else 8)
    max_new_tokens  when a task's generation_kwargs give none (default 128)
    system_prompt   a system turn (text or a file); none: the chat template's default
    seed            sampling seed for temperature > 0 (default 0)
    compile_cache   JAX persistent compile cache folder ("" = off; default: the CLIs' ~/.cache/qwen2vl-jax/...)

generate_until honours a task's generation_kwargs: max_new_tokens, temperature (0 or do_sample=False: greedy),
top_p, top_k, repetition_penalty, and `until` (the answer is cut at the first stop string). num_beams > 1 is not
supported (greedy is used, with a warning). loglikelihood (multiple-choice-by-likelihood tasks) and multi-round
generation raise NotImplementedError.
"""
from __future__ import annotations

MODEL_ID = "qwen2vl_jax"
CLASS_PATH = "evaluation.lmms.model.Qwen2VLJax"


def manifest():
    """The `lmms_eval.models` entry point: lmms-eval's ModelManifest for `qwen2vl_jax` (imports lmms-eval only)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH, aliases=("qwen2vl-jax",))
