"""The demo set with a subset of question types (config.data.demo_set.types): only those types, the default set
unchanged, unknown names refused with the field named."""
import hashlib

import numpy as np
import pytest

from data_pipeline import synthetic

# make_example(index) before the types option existed: (index, question, answer, type, md5 of the pixels)
DEFAULT = [
    (0, "Which colour is the object in the picture?", "orange", "colour", "4e79dfc4b7dfc98eeae8d3e1ee5971bb"),
    (1, "Name the shape in the image.", "square", "shape", "865b504be85f62d8b2364256db0216f3"),
    (2, "How many shapes are there?", "5", "count", "b2abcd87d1429a1dd14ce57d6c5f9091"),
    (3, "Read the digit in the picture.", "5", "digit", "fb24a22907c55b8f75ff50b5bfc5f622"),
    (4, "Name the colour of the shape.", "blue", "colour", "efdd021640a19a8769e69bf8a2ad13aa"),
    (1000000003, "Which number is written in the image?", "5", "digit", "a17169282cddd26256781cc25b5ef33e"),
]


def _md5(image) -> str:
    return hashlib.md5(np.asarray(image).tobytes()).hexdigest()


@pytest.mark.parametrize("types", [synthetic.QUESTION_TYPES, "", None, "colour,shape,count,digit"])
def test_default_types_leave_the_examples_unchanged(types):
    for index, question, answer, qtype, md5 in DEFAULT:
        ex = synthetic.make_example(index, 0) if types is None else synthetic.make_example(index, 0, types)
        assert (ex["question"], ex["answer"], ex["question_type"]) == (question, answer, qtype)
        if qtype != "digit":  # digit pixels depend on the installed font
            assert _md5(ex["image"]) == md5


def test_a_subset_cycles_over_its_types_only():
    assert [synthetic.make_example(i, 0, "shape, count,digit")["question_type"] for i in range(6)] == \
        ["shape", "count", "digit"] * 2
    colour = [synthetic.make_example(i, 0, "colour") for i in range(12)]
    assert {ex["question_type"] for ex in colour} == {"colour"}
    assert {ex["answer"] for ex in colour} <= set(synthetic.COLOURS)
    assert all(ex["question"] in synthetic.QUESTIONS["colour"] for ex in colour)


def test_unknown_or_repeated_types_are_refused():
    with pytest.raises(ValueError, match="'color'.*colour, shape, count, digit"):
        synthetic.question_types("color,shape")
    with pytest.raises(ValueError, match="twice"):
        synthetic.question_types("shape,shape")


def test_write_tfds_writes_only_the_chosen_types(tmp_path):
    from data_pipeline.sources import open_source

    synthetic.write_tfds(tmp_path, {"train": 4, "test": 2}, types="colour")
    for split in ("train", "test"):
        source = open_source(f"tfds:synthetic_vqa:{split}", data_dir=str(tmp_path))
        assert {source[i]["question_type"] for i in range(len(source))} == {"colour"}
    synthetic.write_tfds(tmp_path, {"train": 4, "test": 2}, types="colour")  # the same set again: reused
    with pytest.raises(FileExistsError, match="shape/count"):  # same sizes, other types: not silently reused
        synthetic.write_tfds(tmp_path, {"train": 4, "test": 2}, types="shape,count")


def test_prepare_workdir_names_the_field(tmp_path):
    from configs.demo_cpu import get_config
    from training.preflight import PreflightError
    from training.train import prepare_workdir

    config = get_config()
    config.tokenizer = ""
    config.data.demo_set.types = "colour,colours"
    with pytest.raises(PreflightError, match=r"data\.demo_set\.types: .*'colours'"):
        prepare_workdir(config, str(tmp_path))
