"""Host-side preprocessing (numpy + PIL + tokenizers; no jax, no torch).

    image  → load_image → smart_resize → bicubic → normalize → patchify   (image.py, loading.py, patches.py)
    video  → fetch_video (files: PyAV) → per-frame budget → same pipeline (video.py, video_decode.py)
    chat   → ChatTemplate (the checkpoint's Jinja) → expand_vision_placeholders (chat.py, chat_jinja.py)
    all    → Processor(...) → HF-named numpy batch                        (processor.py)
"""

from qwen2vl_jax.processing.chat import (
    DEFAULT_SYSTEM_PROMPT,
    ChatTemplate,
    apply_chat_template,
    expand_vision_placeholders,
)
from qwen2vl_jax.processing.image import preprocess_image, smart_resize
from qwen2vl_jax.processing.loading import load_image
from qwen2vl_jax.processing.patches import patchify
from qwen2vl_jax.processing.processor import Processor, VisionOptions
from qwen2vl_jax.processing.tokenizer import SPECIAL_TOKENS, Qwen2VLTokenizer
from qwen2vl_jax.processing.video import (
    VideoMetadata,
    fetch_video,
    preprocess_video,
    sample_video_frames,
    video_frame_indices,
    video_frame_size,
)

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "ChatTemplate",
    "SPECIAL_TOKENS",
    "Processor",
    "Qwen2VLTokenizer",
    "VideoMetadata",
    "VisionOptions",
    "apply_chat_template",
    "expand_vision_placeholders",
    "fetch_video",
    "load_image",
    "patchify",
    "preprocess_image",
    "preprocess_video",
    "sample_video_frames",
    "smart_resize",
    "video_frame_indices",
    "video_frame_size",
]
