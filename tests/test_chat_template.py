"""The checkpoint's own Jinja chat template: parity with transformers, one renderer for inference and training
(same ids, even where BPE merges across what used to be piece boundaries), labels on assistant spans, and where
the template comes from (.jinja > .json > tokenizer_config.json > built-in)."""
import contextlib
import json
import pickle
import types

import numpy as np
import pytest
from PIL import Image
from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessorPil, Qwen2VLProcessor

from data_pipeline.transforms import ToExample
from qwen2vl_jax.inputs import IGNORE
from qwen2vl_jax.processing import ChatTemplate, Processor, apply_chat_template
from qwen2vl_jax.processing.chat import BUILTIN_ORIGIN, DEFAULT_SYSTEM_PROMPT, QWEN2VL_CHAT_TEMPLATE
from qwen2vl_jax.processing.fixtures import _CORPUS, build_tiny_tokenizer, write_tiny_processor

MAX = 64 * 28 * 28


def noise(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def user(*content):
    return {"role": "user", "content": list(content)}


def text(t):
    return {"type": "text", "text": t}


# ---------------------------------------------------------------- parity with transformers


class _ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """transformers' processor without its video half (which needs torchvision, not installed here)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        return None if argument_name == "video_processor" else super().check_argument_for_proper_class(
            argument_name, argument)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_processor(tmp_path_factory.mktemp("ckpt"), min_pixels=3136, max_pixels=MAX)


@pytest.fixture(scope="module")
def hf_tokenizer(folder):
    return PreTrainedTokenizerFast(tokenizer_file=f"{folder}/tokenizer.json", pad_token="<|endoftext|>",
                                   chat_template=QWEN2VL_CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def hf_processor(folder, hf_tokenizer):
    return _ImageOnlyQwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=MAX),
                                      tokenizer=hf_tokenizer, video_processor=None,
                                      chat_template=QWEN2VL_CHAT_TEMPLATE)


# image items carry PIL images, so transformers' processor can take the same conversation end to end
IMAGE_CONVERSATIONS = [
    [user({"type": "image", "image": noise(60, 90, 0)}, text("Describe this image."))],
    [{"role": "system", "content": "Be brief."}, user(text("Compare"), {"type": "image", "image": noise(50, 50, 1)},
                                                      {"type": "image", "image": noise(90, 40, 2)})],
    [user({"type": "image", "image": noise(56, 56, 3)}, text("\nWhat is it?\n\n")),
     {"role": "assistant", "content": [text("A cat.")]},
     user(text("And "), text("this?"), {"type": "image", "image": noise(30, 80, 4)})],
]
TEXT_CONVERSATIONS = [
    [{"role": "user", "content": "plain string content"}],
    [{"role": "system", "content": [text("sys as list")]}, {"role": "user", "content": "ok"}],
    [{"role": "user", "content": "\n\nHi there \n"}, {"role": "assistant", "content": "  spaced  \n"},
     {"role": "user", "content": [text("\n"), text("more\n")]}],
    [user({"type": "video", "video": ["f0", "f1"]}, {"image_url": "x"}, text("And now?")),
     {"role": "assistant", "content": "Two things."}, user({"type": "video"}, text("again"))],
    [{"role": "assistant", "content": "first is assistant"}],
]


@pytest.mark.parametrize("add_vision_id", [False, True])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("index", range(len(IMAGE_CONVERSATIONS) + len(TEXT_CONVERSATIONS)))
def test_released_template_renders_and_tokenizes_as_transformers(folder, hf_tokenizer, index, add_generation_prompt,
                                                                 add_vision_id):
    messages = (IMAGE_CONVERSATIONS + TEXT_CONVERSATIONS)[index]
    processor = Processor.from_pretrained(folder)
    assert processor.chat_template.origin.endswith("chat_template.json")
    ours = processor.apply_chat_template(messages, add_generation_prompt, add_vision_id=add_vision_id)
    expected = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                add_vision_id=add_vision_id)
    assert ours == expected
    assert apply_chat_template(messages, add_generation_prompt, add_vision_id=add_vision_id) == expected  # built-in
    expected_ids = hf_tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, add_vision_id=add_vision_id)["input_ids"]
    assert processor.tokenizer.encode(ours) == expected_ids


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("index", range(len(IMAGE_CONVERSATIONS)))
def test_processor_batch_equals_transformers_end_to_end(folder, hf_processor, index, add_generation_prompt):
    """Images taken from the items, placeholders expanded: the whole batch as transformers' processor makes it."""
    messages = IMAGE_CONVERSATIONS[index]
    ours = Processor.from_pretrained(folder)(messages, add_generation_prompt=add_generation_prompt)
    expected = hf_processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="np",
                                                add_generation_prompt=add_generation_prompt)
    np.testing.assert_array_equal(ours["input_ids"], expected["input_ids"])
    np.testing.assert_array_equal(ours["image_grid_thw"], expected["image_grid_thw"])


# ---------------------------------------------------------------- a checkpoint's own template is used everywhere

PIRATE_TEMPLATE = """{% for message in messages %}
{% if loop.first and message['role'] != 'system' %}
<|im_start|>SYSTEM: You are a terse pirate.<|im_end|>

{% endif %}
<|im_start|>{{ message['role'] | upper }}: {% if message['content'] is string %}{{ message['content'] }}\
{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' or 'image' in item %}\
[img]<|vision_start|><|image_pad|><|vision_end|>{% elif item['type'] == 'video' or 'video' in item %}\
[vid]<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in item %}{{ item['text'] }}{% endif %}{% endfor %}\
{% endif %}<|im_end|>

{% endfor %}
{% if add_generation_prompt %}
<|im_start|>ASSISTANT: {% endif %}
"""


@pytest.fixture(scope="module")
def pirate(tmp_path_factory):
    path = write_tiny_processor(tmp_path_factory.mktemp("pirate"), min_pixels=3136, max_pixels=MAX)
    with open(f"{path}/chat_template.jinja", "w") as f:
        f.write(PIRATE_TEMPLATE)
    return path


def test_custom_template_drives_processor_cli_and_training_alike(pirate, folder, monkeypatch):
    processor = Processor.from_pretrained(pirate)
    assert processor.chat_template.origin.endswith("chat_template.jinja")
    image = noise(60, 90, 5)
    prompt = [user({"type": "image"}, text("Where is the treasure?"))]
    rendered = processor.apply_chat_template(prompt)
    assert rendered == ("<|im_start|>SYSTEM: You are a terse pirate.<|im_end|>\n\n<|im_start|>USER: [img]"
                        "<|vision_start|><|image_pad|><|vision_end|>Where is the treasure?<|im_end|>\n\n"
                        "<|im_start|>ASSISTANT: ")
    # transformers renders the same template the same way
    hf = PreTrainedTokenizerFast(tokenizer_file=f"{pirate}/tokenizer.json", chat_template=PIRATE_TEMPLATE)
    assert hf.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == rendered
    ids = processor(prompt, images=[image])["input_ids"]
    builtin_ids = Processor.from_pretrained(folder)(prompt, images=[image])["input_ids"]
    assert ids.shape != builtin_ids.shape or (ids != builtin_ids).any()

    # the generation CLI builds its prompt through the checkpoint's Processor
    import qwen2vl_jax
    from evaluation import generate_cli

    seen = {}

    def fake_generate(config, params, batch, **kwargs):
        seen["batch"] = batch
        return np.array([[processor.tokenizer.token_to_id("<|im_end|>")]])

    fake_model = types.SimpleNamespace(config=None, params=None, context=contextlib.nullcontext)
    monkeypatch.setattr(generate_cli, "open_model", lambda *args, **kwargs: fake_model)
    monkeypatch.setattr(qwen2vl_jax, "generate", fake_generate)
    image_path = f"{pirate}/image.png"
    image.save(image_path)
    generate_cli.answer(pirate, "Where is the treasure?", image=image_path)
    np.testing.assert_array_equal(seen["batch"]["input_ids"], ids)

    # training renders the same template: same ids (the answer appended), labels on the answer only
    conversation = prompt + [{"role": "assistant", "content": "Under the mat."}]
    example = ToExample(processor, max_length=4096, max_vision_rows=4096).map(
        {"messages": conversation, "images": [image], "id": "p"})
    reference = processor(conversation, images=[image], add_generation_prompt=False)["input_ids"][0]
    np.testing.assert_array_equal(example["input_ids"], reference)
    np.testing.assert_array_equal(example["input_ids"][:ids.shape[1]], ids[0])  # the prompt is a prefix
    labelled = example["labels"][example["labels"] != IGNORE]
    assert processor.tokenizer.decode(labelled) == "Under the mat.<|im_end|>"


def test_processor_with_a_template_pickles(pirate):
    """grain workers receive the processor pickled: the template travels as its source."""
    processor = Processor.from_pretrained(pirate)
    clone = pickle.loads(pickle.dumps(processor))
    assert clone.chat_template == processor.chat_template
    conversation = [{"role": "user", "content": "Ahoy"}]
    assert clone.apply_chat_template(conversation) == processor.apply_chat_template(conversation)


# ---------------------------------------------------------------- one tokenization: ids and labels

NEWLINE_CORPUS = _CORPUS + ["Hello\n\nworld\n\n", "One.\n\nTwo.\n\n\nThree \n\n", "What is it?\n\nA cat.\n\n"]


@pytest.fixture(scope="module")
def merging(tmp_path_factory):
    """A checkpoint whose tokenizer learned "\\n\\n" (as the real Qwen2 one has), so BPE merges across what
    used to be separately tokenized pieces."""
    path = write_tiny_processor(tmp_path_factory.mktemp("merging"), min_pixels=3136, max_pixels=MAX)
    build_tiny_tokenizer(corpus=NEWLINE_CORPUS).save(f"{path}/tokenizer.json")
    processor = Processor.from_pretrained(path)
    assert processor.tokenizer.tokenizer.token_to_id("ĊĊ") is not None  # the merge this test is about
    return processor


def old_piecewise_ids(processor, messages, grids):
    """What ToExample did before: each piece of the ChatML tokenized on its own."""
    tok, ids = processor.tokenizer, []
    grids = iter(grids)
    for i, message in enumerate(messages):
        if i == 0 and message["role"] != "system":
            ids += tok.encode(f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n")
        ids += tok.encode(f"<|im_start|>{message['role']}\n")
        content = message["content"]
        for item in [text(content)] if isinstance(content, str) else content:
            if item.get("type") == "image":
                n = int(np.prod(next(grids))) // 4
                ids += [tok.token_to_id("<|vision_start|>")] + [tok.image_token_id] * n + [
                    tok.token_to_id("<|vision_end|>")]
            else:
                ids += tok.encode(item["text"])
        ids += [tok.token_to_id("<|im_end|>")] + tok.encode("\n")
    return ids


def labelled_runs(processor, labels):
    """The decoded texts of the contiguous labelled stretches."""
    mask = labels != IGNORE
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return [processor.tokenizer.decode(labels[a:b]) for a, b in zip(edges[::2], edges[1::2])]


WHITESPACE_CONVERSATION = [
    {"role": "user", "content": "\nWhat is it?\n\n"},
    {"role": "assistant", "content": "A cat.\n\n"},
    user({"type": "image"}, text("\n\nHello"), text("\n\nworld ")),
    {"role": "assistant", "content": [text("One.\n\n"), text("\nTwo.")]},
]


def test_training_ids_equal_processor_ids_where_pieces_would_merge(merging):
    image = noise(56, 84, 6)
    example = ToExample(merging, max_length=4096, max_vision_rows=4096).map(
        {"messages": WHITESPACE_CONVERSATION, "images": [image], "id": "w"})
    assert "error" not in example, example.get("error")
    reference = merging(WHITESPACE_CONVERSATION, images=[image], add_generation_prompt=False)["input_ids"][0]
    np.testing.assert_array_equal(example["input_ids"], reference)
    old = old_piecewise_ids(merging, WHITESPACE_CONVERSATION, example["image_grid_thw"])
    assert old != reference.tolist()  # the piece-by-piece ids really differed here
    # labels: exactly each assistant message's content and <|im_end|>
    assert labelled_runs(merging, example["labels"]) == ["A cat.\n\n<|im_end|>", "One.\n\n\nTwo.<|im_end|>"]
    vision = np.isin(example["input_ids"], [merging.tokenizer.token_to_id(t) for t in
                                            ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")])
    assert vision.sum() == int(np.prod(example["image_grid_thw"][0])) // 4 + 2
    assert (example["labels"][vision] == IGNORE).all()


def test_a_token_merged_across_the_span_start_is_learned(merging):
    """Content starting with "\\n" merges with the template's "assistant\\n" into one "\\n\\n" token: it
    overlaps the assistant span, so it is learned (the model must produce the content's newline)."""
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "\nworld"}]
    example = ToExample(merging, max_length=4096, max_vision_rows=4096).map({"messages": messages, "id": "s"})
    np.testing.assert_array_equal(example["input_ids"],
                                  merging(messages, add_generation_prompt=False)["input_ids"][0])
    assert labelled_runs(merging, example["labels"]) == ["\n\nworld<|im_end|>"]


def test_spans_are_the_assistant_turns(merging):
    full, spans = merging.chat_template.render_with_assistant_spans(WHITESPACE_CONVERSATION)
    assert full == merging.apply_chat_template(WHITESPACE_CONVERSATION, add_generation_prompt=False)
    assert [full[a:b] for a, b in spans] == ["A cat.\n\n<|im_end|>", "One.\n\n\nTwo.<|im_end|>"]


def test_count_mismatches_keep_their_messages(merging):
    to_example = ToExample(merging, max_length=4096, max_vision_rows=4096)
    messages = [user({"type": "image"}, text("a")), {"role": "assistant", "content": "b"}]
    out = to_example.map({"messages": messages, "images": [], "id": "m"})
    assert "more image items than the 0 image(s) given" in out["error"]
    text_only = [{"role": "user", "content": "a"}, messages[1]]
    out = to_example.map({"messages": text_only, "images": [noise(30, 30, 0)], "id": "m"})
    assert "1 image(s) given but the messages reference fewer" in out["error"]


def test_a_template_that_rewrites_history_cannot_label(tmp_path):
    """Renders must be prefixes of each other; a template that, e.g., drops earlier turns is refused by name."""
    path = write_tiny_processor(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if loop.last %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    processor = Processor.from_pretrained(path)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    out = ToExample(processor, max_length=256, max_vision_rows=256).map({"messages": messages, "id": "h"})
    assert "cannot be used for training labels" in out["error"] and "chat_template.jinja" in out["error"]


def test_an_assistant_first_conversation_is_refused_for_training(merging):
    out = ToExample(merging, max_length=256, max_vision_rows=256).map(
        {"messages": [{"role": "assistant", "content": "x"}], "id": "a"})
    assert "message 0 is an assistant message" in out["error"]


# ---------------------------------------------------------------- where the template comes from


def _templates(tmp_path, jinja=None, json_template=None, config_template=None):
    path = write_tiny_processor(tmp_path)
    (tmp_path / "chat_template.json").unlink()
    if jinja is not None:
        (tmp_path / "chat_template.jinja").write_text(jinja)
    if json_template is not None:
        (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": json_template}))
    if config_template is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": config_template,
                                                                    "eos_token": {"content": "<|endoftext|>"}}))
    return path


MESSAGES = [{"role": "user", "content": "Hi"}]


def test_jinja_beats_json_beats_tokenizer_config_beats_builtin(tmp_path):
    path = _templates(tmp_path, "J {{ messages[0]['content'] }}", "S {{ messages[0]['content'] }}",
                      "C {{ messages[0]['content'] }} {{ eos_token }}")
    assert ChatTemplate.from_pretrained(path).render(MESSAGES) == "J Hi"
    (tmp_path / "chat_template.jinja").unlink()
    assert ChatTemplate.from_pretrained(path).render(MESSAGES) == "S Hi"
    (tmp_path / "chat_template.json").unlink()
    template = ChatTemplate.from_pretrained(path)
    assert template.origin.endswith("tokenizer_config.json")
    assert template.render(MESSAGES) == "C Hi <|endoftext|>"  # the special tokens of tokenizer_config.json
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D {{ messages | length }}"}]}))
    assert ChatTemplate.from_pretrained(path).render(MESSAGES) == "D 1"
    (tmp_path / "tokenizer_config.json").unlink()
    template = ChatTemplate.from_pretrained(path)
    assert template.origin == BUILTIN_ORIGIN and template.source == QWEN2VL_CHAT_TEMPLATE
    assert Processor.from_pretrained(path).apply_chat_template(MESSAGES) == apply_chat_template(MESSAGES)


@pytest.mark.parametrize("where", ["jinja", "json", "config"])
def test_a_broken_template_is_a_value_error_naming_its_file(tmp_path, where):
    broken = "{% for m in messages %}{{ m['content'] }}"  # no endfor
    file, argument = {"jinja": ("chat_template.jinja", "jinja"), "json": ("chat_template.json", "json_template"),
                      "config": ("tokenizer_config.json", "config_template")}[where]
    path = _templates(tmp_path, **{argument: broken})
    with pytest.raises(ValueError, match=f"{file}.*not valid Jinja"):
        Processor.from_pretrained(path)


def test_bad_template_files_and_render_errors_say_what_is_wrong(tmp_path):
    path = write_tiny_processor(tmp_path)
    (tmp_path / "chat_template.json").write_text(json.dumps({"template": "x"}))
    with pytest.raises(ValueError, match="chat_template.json.*no 'chat_template' key"):
        ChatTemplate.from_pretrained(path)
    (tmp_path / "chat_template.json").write_text("{not json")
    with pytest.raises(ValueError, match="chat_template.json.*not valid JSON"):
        ChatTemplate.from_pretrained(path)
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": [{"name": "a", "template": "x"}]}))
    with pytest.raises(ValueError, match="none named 'default'"):
        ChatTemplate.from_pretrained(path)
    template = ChatTemplate("{{ raise_exception('only user messages, please') }}", "my_template.jinja")
    with pytest.raises(ValueError, match="my_template.jinja.*only user messages, please"):
        template.render(MESSAGES)
    with pytest.raises(ValueError, match="at least one"):
        template.render([])
    with pytest.raises(ValueError, match="'role' and 'content'"):
        template.render([{"text": "hi"}])


def test_template_helpers_and_media_values(folder):
    """tojson without HTML escaping, loopcontrols, {% generation %}, and media objects seen as "<TypeName>"."""
    template = ChatTemplate(
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{% generation %}"
        "{{ m['content'] | tojson }}{% endgeneration %}{% endfor %}"
        "{% for item in tools %}{{ item['image'] }}{% endfor %}", "helpers")
    messages = [{"role": "user", "content": "<a & b>"}, {"role": "user", "content": "skipped"}]
    assert template.render(messages, tools=[{"image": noise(4, 4, 0)}]) == '"<a & b>"<Image>'


# ---------------------------------------------------------------- the template file travels with checkpoints


def test_converter_and_export_carry_chat_template_jinja(tmp_path, pirate):
    from qwen2vl_jax.checkpoint.convert import _copy_side_files
    from training.export import SIDE_FILES

    assert {"chat_template.jinja", "chat_template.json", "tokenizer_config.json"} <= set(SIDE_FILES)
    (tmp_path / "out").mkdir()
    _copy_side_files(pirate, str(tmp_path / "out"), None)
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == PIRATE_TEMPLATE
    assert Processor.from_pretrained(tmp_path / "out").chat_template == Processor.from_pretrained(pirate).chat_template
