"""Image decoding guards (no ROS): sizes from PNG/JPEG headers before decoding, YUV 4:2:2 to grey."""

from __future__ import annotations

import struct
import zlib
from types import SimpleNamespace

import numpy as np
import pytest

from cardiac_copilot_ros import images

cv2 = pytest.importorskip("cv2")


def png_zeros(width: int, height: int, bit_depth: int = 8) -> bytes:
    """A valid all-black greyscale PNG, built with zlib in chunks (never the whole raw image)."""
    row = (width * bit_depth + 7) // 8 + 1            # filter byte + packed pixels
    rows_per_chunk = max(1, (1 << 22) // row)
    block = bytes(row * rows_per_chunk)
    comp = zlib.compressobj(9)
    parts, left = [], height
    while left > 0:
        n = min(left, rows_per_chunk)
        parts.append(comp.compress(block[: n * row]))
        left -= n
    parts.append(comp.flush())

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def cmsg(data: bytes, fmt: str = "png") -> SimpleNamespace:
    return SimpleNamespace(format=fmt, data=data)


def test_png_generator_makes_real_pngs() -> None:
    gray = images.compressed_msg_to_gray(cmsg(png_zeros(64, 48, 1)))
    assert gray.shape == (48, 64) and gray.dtype == np.uint8 and not gray.any()


def test_png_decompression_bomb_refused_from_its_header() -> None:
    """Issue 14: 30000 x 30000 in a few hundred KB (it took guidance 7 s per message to decode)."""
    bomb = png_zeros(30000, 30000, 1)
    assert len(bomb) < 1_000_000
    assert images.compressed_image_size(bomb) == ("png", 30000, 30000)
    with pytest.raises(images.ImageTooLargeError, match="30000 x 30000"):
        images.compressed_msg_to_gray(cmsg(bomb))
    # refused from the header alone: the same bytes cut after IHDR cannot be decoded at all
    with pytest.raises(images.ImageTooLargeError):
        images.compressed_msg_to_gray(cmsg(bomb[:33]))
    with pytest.raises(images.ImageFormatError, match="cannot decode") as small:
        images.compressed_msg_to_gray(cmsg(png_zeros(64, 48)[:33]))
    assert not isinstance(small.value, images.ImageTooLargeError)


def test_pixel_cap_below_the_side_limit() -> None:
    png = png_zeros(4097, 4096, 1)                    # each side < 8192, area > 4096 * 4096
    with pytest.raises(images.ImageTooLargeError, match="max_image_pixels"):
        images.compressed_msg_to_gray(cmsg(png))
    assert images.compressed_msg_to_gray(cmsg(png), max_pixels=None).shape == (4096, 4097)
    with pytest.raises(images.ImageTooLargeError):
        images.compressed_msg_to_gray(cmsg(png_zeros(64, 48)), max_pixels=64 * 48 - 1)
    raw = SimpleNamespace(height=48, width=64, encoding="mono8", is_bigendian=0, step=64, data=bytes(64 * 48))
    assert images.image_msg_to_array(raw).shape == (48, 64)
    with pytest.raises(images.ImageTooLargeError):
        images.image_msg_to_array(raw, max_pixels=1000)


@pytest.mark.parametrize("progressive", [False, True])
def test_jpeg_size_from_the_frame_header(progressive: bool) -> None:
    gray = np.random.default_rng(0).integers(0, 256, (40, 56), dtype=np.uint8)
    params = [cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)]
    ok, buf = cv2.imencode(".jpg", gray, params)
    assert ok
    data = bytearray(buf.tobytes())
    assert images.compressed_image_size(data) == ("jpeg", 56, 40)
    assert images.compressed_msg_to_gray(cmsg(bytes(data), "jpeg")).shape == (40, 56)
    # the same file claiming 30000 x 30000 in its SOF segment is refused before decoding
    sof = next(i for i in range(2, len(data) - 1) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC2))
    data[sof + 5: sof + 9] = struct.pack(">HH", 30000, 30000)
    with pytest.raises(images.ImageTooLargeError, match="30000 x 30000"):
        images.compressed_msg_to_gray(cmsg(bytes(data), "jpeg"))


@pytest.mark.parametrize("data", [b"", b"GIF89a......", b"BM" + bytes(60), b"\x89PNG\r\n\x1a\n" + bytes(4),
                                  b"\xff\xd8\xff\xda\x00\x02"])
def test_unknown_or_malformed_compressed_refused(data: bytes) -> None:
    with pytest.raises(images.ImageFormatError):
        images.compressed_msg_to_gray(cmsg(data))


@pytest.mark.parametrize(("encoding", "luma"), [("yuv422", 1), ("uyvy", 1), ("yuv422_yuy2", 0), ("yuyv", 0)])
def test_yuv422_to_grey_is_the_luma(encoding: str, luma: int) -> None:
    rng = np.random.default_rng(1)
    h, w = 6, 8
    y = rng.integers(0, 256, (h, w), dtype=np.uint8)
    chroma = rng.integers(0, 256, (h, w), dtype=np.uint8)     # U, V alternating: dropped
    pix = np.empty((h, w, 2), np.uint8)
    pix[..., luma], pix[..., 1 - luma] = y, chroma
    step = w * 2 + 4                                          # padded rows
    data = np.zeros((h, step), np.uint8)
    data[:, : w * 2] = pix.reshape(h, w * 2)
    msg = SimpleNamespace(height=h, width=w, encoding=encoding, is_bigendian=0, step=step, data=data.tobytes())
    arr = images.image_msg_to_array(msg)
    np.testing.assert_array_equal(images.to_gray_u8(arr, encoding), y)
