import io

import numpy as np
import pytest
from PIL import Image

from facemt import FacemtError
from facemt.images import as_rgb_image, decode_file


def test_bad_files_raise_project_error_naming_the_file(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "text.jpg"
    text.write_text("hello, not a picture")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, "JPEG")
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(buf.getvalue()[:200])
    for path, what in [(empty, "empty file"), (text, "not a readable image"), (trunc, "cannot decode"), (tmp_path / "no.jpg", "no such file")]:
        with pytest.raises(FacemtError, match=what) as info:
            decode_file(path)
        assert path.name in str(info.value)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.new("L", (20, 10), 128),
        lambda: Image.new("RGBA", (20, 10), (255, 0, 0, 0)),
        lambda: Image.new("LA", (20, 10), (50, 255)),
        lambda: Image.new("RGB", (20, 10)).convert("P"),
        lambda: Image.new("CMYK", (20, 10), (0, 0, 0, 0)),
        lambda: Image.fromarray(np.full((10, 20), 40000, dtype=np.uint16)),
    ],
)
def test_every_mode_becomes_rgb(make, tmp_path):
    image = make()
    out = as_rgb_image(image)
    assert out.mode == "RGB" and out.size == (20, 10)


def test_transparent_pixels_become_white():
    out = as_rgb_image(Image.new("RGBA", (4, 4), (255, 0, 0, 0)))
    assert out.getpixel((0, 0)) == (255, 255, 255)


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), "blue")
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    path = tmp_path / "rot.jpg"
    image.save(path, exif=exif)
    assert decode_file(path).size == (20, 40)


def test_arrays_are_accepted():
    assert as_rgb_image(np.zeros((5, 6, 3), np.uint8)).size == (6, 5)
    assert as_rgb_image(np.zeros((5, 6), np.uint8)).mode == "RGB"
    assert as_rgb_image(np.ones((5, 6, 3), np.float32)).getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(FacemtError, match="shape"):
        as_rgb_image(np.zeros((5, 6, 7), np.uint8))
    with pytest.raises(FacemtError):
        as_rgb_image(42)
