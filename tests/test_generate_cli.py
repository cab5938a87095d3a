"""qwen2vl-generate end to end on a tiny random checkpoint with the tiny tokenizer: its answer is the text of
transformers' greedy tokens for the same processed inputs."""
import dataclasses

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from qwen2vl_jax import Qwen2VLConfig
from evaluation.generate_cli import main
from qwen2vl_jax.processing import Processor
from qwen2vl_jax.processing.fixtures import write_tiny_processor
from reference import hf_config, mm_token_type_ids

NEW = 6


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    tiny = Qwen2VLConfig.preset("tiny")  # untied: random tied models repeat their last input token
    config = hf_config(tiny.replace(text=dataclasses.replace(tiny.text, tie_word_embeddings=False)))
    config.initializer_range = 0.2  # answers that vary
    model = transformers.Qwen2VLForConditionalGeneration(config).eval()
    with torch.no_grad():  # only the ~400 tokens the tiny tokenizer can spell may win: answers are readable text
        model.lm_head.weight[400:] = 0
    model.save_pretrained(folder)
    write_tiny_processor(folder, max_pixels=28 * 28 * 16)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (90, 140, 3), np.uint8)).save(folder / "image.png")
    (folder / "frames").mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 48, 3), np.uint8)).save(folder / "frames" / f"{i:02d}.png")
    return folder, model


def _transformers_answer(folder, model, prompt, image=None, frames=None):
    processor = Processor.from_pretrained(folder)
    content = ([{"type": "image"}] if image else []) + ([{"type": "video"}] if frames is not None else [])
    batch = processor([{"role": "user", "content": content + [{"type": "text", "text": prompt}]}],
                      images=[image] if image else None, videos=[frames] if frames is not None else None)
    kwargs = {k: torch.from_numpy(v.astype(np.int64) if v.dtype.kind == "i" else v) for k, v in batch.items()
              if k != "second_per_grid_ts"}  # Qwen2.5-VL's video time: transformers' Qwen2-VL refuses the argument
    kwargs["mm_token_type_ids"] = torch.from_numpy(mm_token_type_ids(Qwen2VLConfig.from_hf(folder),
                                                                     batch["input_ids"]))
    with torch.no_grad():
        out = model.generate(**kwargs, max_new_tokens=NEW, do_sample=False,
                             eos_token_id=list(processor.tokenizer.eos_token_ids), pad_token_id=151643)
    return processor.decode(out[0, batch["input_ids"].shape[1]:].numpy())


def test_answers_about_an_image_and_a_video_like_transformers(checkpoint, capsys):
    folder, model = checkpoint
    main(["--checkpoint", str(folder), "--image", str(folder / "image.png"), "--prompt", "What is in the picture?",
          "--max-new-tokens", str(NEW)])
    answer = capsys.readouterr().out
    assert answer == _transformers_answer(folder, model, "What is in the picture?", image=str(folder / "image.png")) + "\n"
    assert len(answer.strip()) >= NEW
    main(["--checkpoint", str(folder), "--video", str(folder / "frames"), "--prompt", "Describe the video.",
          "--max-new-tokens", str(NEW)])
    frames = np.stack([np.asarray(Image.open(folder / "frames" / f"{i:02d}.png")) for i in range(4)])
    assert capsys.readouterr().out == _transformers_answer(folder, model, "Describe the video.", frames=frames) + "\n"


def test_a_missing_video_file_is_named(checkpoint):
    folder, _ = checkpoint
    with pytest.raises(SystemExit, match="video file not found: 'clip.mp4'"):
        main(["--checkpoint", str(folder), "--video", "clip.mp4", "--prompt", "hi"])
