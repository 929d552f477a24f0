"""load_image: every colour mode, EXIF orientation and every user error; list_images expansion."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mask2former.data.image_io import ImageReadError, list_images, load_image

DATA = Path(__file__).parent / "data"


def test_real_png_pixels_are_the_decoded_file():
    image = load_image(DATA / "chelsea.png")
    assert image.shape == (300, 451, 3) and image.dtype == np.uint8
    # PNG decoding is lossless, so these values are fixed facts of the file.
    assert image[0, 0].tolist() == [143, 120, 104]
    assert image[150, 225].tolist() == [190, 150, 124]
    assert int(image.sum(dtype=np.int64)) == 46802357


def test_real_jpeg_and_str_path():
    image = load_image(str(DATA / "rocket.jpg"))
    assert image.shape == (427, 640, 3) and image.dtype == np.uint8
    assert image.flags.c_contiguous and image.flags.writeable


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((20, 40, 3), np.uint8)  # 20 high, 40 wide: left half red, right half blue
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    image = load_image(path)
    assert image.shape == (40, 20, 3)
    # After a clockwise quarter turn the stored left (red) half is on top.
    assert image[5, 10, 0] > 200 and image[5, 10, 2] < 60
    assert image[35, 10, 2] > 200 and image[35, 10, 0] < 60


@pytest.mark.parametrize(
    "mode, color, expected",
    [
        ("L", 77, [77, 77, 77]),
        ("LA", (90, 0), [90, 90, 90]),
        ("RGBA", (10, 20, 30, 0), [10, 20, 30]),  # alpha dropped, not composited (PIL convert("RGB"))
        ("1", 1, [255, 255, 255]),
        ("CMYK", (0, 0, 0, 0), [255, 255, 255]),
        ("CMYK", (0, 0, 0, 255), [0, 0, 0]),
    ],
)
def test_colour_modes(mode, color, expected):
    image = load_image(Image.new(mode, (5, 3), color))
    assert image.shape == (3, 5, 3) and image.dtype == np.uint8
    assert (image == np.array(expected, np.uint8)).all()


def test_palette_with_transparency_drops_alpha_without_warning(tmp_path):
    palette_image = Image.new("P", (4, 4), 1)
    palette_image.putpalette([0, 0, 0, 200, 100, 50] + [0] * (256 * 3 - 6))
    palette_image.info["transparency"] = 1
    path = tmp_path / "palette.png"
    palette_image.save(path, transparency=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = load_image(path)
    assert (image == np.array([200, 100, 50], np.uint8)).all()


def test_sixteen_bit_png_divides_by_257(tmp_path):
    values = np.array([[0, 257 * 100], [65535, 257 * 3 + 100]], np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    image = load_image(path)
    assert image[..., 0].tolist() == [[0, 100], [255, 3]]
    assert (image[..., 0] == image[..., 2]).all()


def test_int32_and_float_images(tmp_path):
    int_path, float_path = tmp_path / "int.tif", tmp_path / "float.tif"
    Image.fromarray(np.array([[0, 65535]], np.int32)).save(int_path)
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)).save(float_path)
    assert load_image(int_path)[0, :, 1].tolist() == [0, 255]
    assert load_image(float_path)[0, :, 1].tolist() == [0, 128, 255]
    # Out of the 16-bit range: stretched min..max instead of clipped.
    stretched = load_image(Image.fromarray(np.array([[-1000, 0, 1000]], np.int32)))
    assert stretched[0, :, 0].tolist() == [0, 128, 255]


def test_arrays():
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    assert load_image(rgb) is rgb
    gray = np.array([[0, 9], [200, 255]], np.uint8)
    assert (load_image(gray) == gray[:, :, None]).all() and load_image(gray).shape == (2, 2, 3)
    rgba = np.dstack([rgb, np.zeros((2, 3), np.uint8)])
    assert (load_image(rgba) == rgb).all()
    assert load_image(np.full((2, 2), 65535, np.uint16)).max() == 255


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((4, 4, 3), np.float32),
        np.zeros((4, 4, 2), np.uint8),
        np.zeros((4, 4, 3, 1), np.uint8),
        np.zeros((4,), np.uint8),
        np.zeros((0, 4, 3), np.uint8),
    ],
)
def test_bad_arrays(array):
    with pytest.raises(ImageReadError):
        load_image(array)


def _assert_one_line_naming(error: pytest.ExceptionInfo, path: Path) -> None:
    message = str(error.value)
    assert str(path) in message and "\n" not in message


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageReadError, match="not found") as error:
        load_image(tmp_path / "nope.jpg")
    _assert_one_line_naming(error, tmp_path / "nope.jpg")
    with pytest.raises(ImageReadError, match="folder"):
        load_image(tmp_path)


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("hello, not a JPEG\n")
    with pytest.raises(ImageReadError, match="not an image") as error:
        load_image(path)
    _assert_one_line_naming(error, path)


def test_truncated_jpeg_is_caught(tmp_path):
    data = (DATA / "rocket.jpg").read_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated") as error:
        load_image(path)
    _assert_one_line_naming(error, path)


def test_unsupported_source_type():
    with pytest.raises(ImageReadError):
        load_image(12345)


def test_list_images(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for name in ("b.png", "a.JPG", "sub/c.png"):
        Image.new("RGB", (2, 2)).save(folder / name, format="PNG")
    (folder / "notes.txt").write_text("x")
    assert list_images([str(folder)]) == [folder / "a.JPG", folder / "b.png"]
    assert list_images([str(folder / "*.png")]) == [folder / "b.png"]
    assert list_images([str(folder / "**" / "*.png")]) == [folder / "b.png", folder / "sub" / "c.png"]
    # Explicit files are kept whatever their extension; duplicates collapse, order is kept.
    assert list_images([str(folder / "notes.txt"), str(folder), str(folder / "b.png")]) == [
        folder / "notes.txt",
        folder / "a.JPG",
        folder / "b.png",
    ]


def test_list_images_errors(tmp_path):
    with pytest.raises(ImageReadError, match=r"\*\.gif: pattern matches no image"):
        list_images([str(tmp_path / "*.gif")])
    with pytest.raises(ImageReadError, match="no such file"):
        list_images([str(tmp_path / "missing.png")])
    # one missing path among others is kept: reading it skips it like a bad file in a folder
    (tmp_path / "ok.png").write_bytes(b"")
    assert list_images([str(tmp_path / "ok.png"), str(tmp_path / "missing.png")]) == [
        tmp_path / "ok.png",
        tmp_path / "missing.png",
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageReadError, match="no image files"):
        list_images([str(empty)])


def test_bytes_decode_like_the_file(tmp_path):
    path = tmp_path / "scene.png"
    pixels = np.random.default_rng(0).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    assert np.array_equal(load_image(path.read_bytes()), pixels)
    with pytest.raises(ImageReadError, match="not an image"):
        load_image(b"plain text")
    with pytest.raises(ImageReadError, match="truncated"):
        load_image(path.read_bytes()[: path.stat().st_size // 2])


def test_max_pixels_refuses_from_the_header(tmp_path):
    from mask2former.data.image_io import ImageTooLargeError

    path = tmp_path / "wide.png"
    Image.new("1", (4000, 3000)).save(path)  # small file, 12 M pixels
    with pytest.raises(ImageTooLargeError, match="4000x3000 = 12000000 pixels is over the limit of 1000000"):
        load_image(path.read_bytes(), max_pixels=1_000_000)
    with pytest.raises(ImageTooLargeError):
        load_image(path, max_pixels=1_000_000)
    assert load_image(path, max_pixels=12_000_000).shape == (3000, 4000, 3)
