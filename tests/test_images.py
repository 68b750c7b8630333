"""Every broken or unusual image is either decoded correctly or refused with a clear reason."""
from __future__ import annotations

import pytest

from badimages import CASES, write_all
from dhumor.errors import ImageError
from dhumor.images import load_image


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    return folder, write_all(folder)


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_bad_input(bad_folder, name):
    folder, expected = bad_folder
    kind, detail = expected[name]
    if kind == "ok":
        img = load_image(folder / name)
        assert img.mode == "RGB" and img.size == detail
    else:
        with pytest.raises(ImageError) as e:
            load_image(folder / name)
        assert detail in e.value.reason
        assert e.value.file == str(folder / name)  # the message names the file


def test_transparency_is_composited_on_white(bad_folder):
    folder, _ = bad_folder
    img = load_image(folder / "palette_transparent.png")
    assert img.getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_uses_the_full_range(bad_folder):
    folder, _ = bad_folder
    lo, hi = load_image(folder / "sixteen_bit.png").convert("L").getextrema()
    assert lo == 0 and hi == 255


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="file not found"):
        load_image(tmp_path / "nope.png")
