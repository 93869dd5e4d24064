"""Image message payloads <-> numpy, without cv_bridge and without rclpy.

Works on anything shaped like sensor_msgs/Image or sensor_msgs/CompressedImage (rclpy
messages and rosbags messages alike).
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Encodings accepted on the image topic: channels and dtype.
ENCODINGS: dict[str, tuple[int, np.dtype]] = {
    "mono8": (1, np.dtype(np.uint8)), "8uc1": (1, np.dtype(np.uint8)),
    "mono16": (1, np.dtype(np.uint16)), "16uc1": (1, np.dtype(np.uint16)),
    "rgb8": (3, np.dtype(np.uint8)), "bgr8": (3, np.dtype(np.uint8)),
    "rgba8": (4, np.dtype(np.uint8)), "bgra8": (4, np.dtype(np.uint8)),
    # 4:2:2 YUV, two bytes per pixel: luma in byte 1 (UYVY order: ROS "yuv422", "uyvy") or
    # byte 0 (YUYV order: "yuv422_yuy2", "yuyv"); grey = the luma, chroma is dropped
    "yuv422": (2, np.dtype(np.uint8)), "uyvy": (2, np.dtype(np.uint8)),
    "yuv422_yuy2": (2, np.dtype(np.uint8)), "yuyv": (2, np.dtype(np.uint8)),
}
#: Byte of the luma in each 2-byte pixel of the 4:2:2 encodings above.
_YUV422_LUMA = {"yuv422": 1, "uyvy": 1, "yuv422_yuy2": 0, "yuyv": 0}

#: Largest accepted image side in pixels (protects the node from absurd messages).
MAX_SIDE_PX = 8192
#: Default cap on width x height of an accepted image (guidance_node ``max_image_pixels``).
DEFAULT_MAX_PIXELS = 4096 * 4096


class ImageFormatError(ValueError):
    """The image message cannot be turned into an array (encoding, size, data length)."""


class ImageTooLargeError(ImageFormatError):
    """The image is larger than allowed (found from the header, before any decoding)."""


def check_size(width: int, height: int, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
    """Raise :class:`ImageTooLargeError` beyond :data:`MAX_SIDE_PX` per side or ``max_pixels``."""
    if width > MAX_SIDE_PX or height > MAX_SIDE_PX:
        raise ImageTooLargeError(f"image too large ({width} x {height}); limit {MAX_SIDE_PX} px per side")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(f"image too large ({width} x {height} = {width * height} px); "
                                 f"limit {max_pixels} px (max_image_pixels)")


#: JPEG start-of-frame markers (SOF0..SOF15 without DHT C4, JPG C8, DAC CC): they carry the size.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def compressed_image_size(data: Any) -> tuple[str, int, int]:
    """(format, width, height) of PNG or JPEG bytes, read from the header without decoding.

    PNG: the IHDR chunk, which must come first. JPEG: the first SOFn segment. Raises
    :class:`ImageFormatError` for other formats or a malformed header.
    """
    buf = _buffer(data)
    head = buf[:8].tobytes()
    if head == _PNG_SIGNATURE:
        if buf.size < 24 or buf[12:16].tobytes() != b"IHDR":
            raise ImageFormatError("PNG without an IHDR chunk first")
        w, h = int.from_bytes(buf[16:20].tobytes(), "big"), int.from_bytes(buf[20:24].tobytes(), "big")
        if w == 0 or h == 0:
            raise ImageFormatError(f"PNG header says {w} x {h}")
        return "png", w, h
    if head[:2] == b"\xff\xd8":
        b = memoryview(np.ascontiguousarray(buf))
        i, n = 2, buf.size
        while i + 4 <= n:
            if b[i] != 0xFF:
                raise ImageFormatError(f"JPEG: no marker at byte {i}")
            marker = b[i + 1]
            if marker == 0xFF:                      # fill byte
                i += 1
                continue
            if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # stand-alone markers
                i += 2
                continue
            if marker in (0xD9, 0xDA):              # end of image / start of scan before any frame
                break
            length = (b[i + 2] << 8) | b[i + 3]
            if length < 2:
                raise ImageFormatError("JPEG: bad segment length")
            if marker in _JPEG_SOF:
                if i + 9 > n:
                    break
                h, w = (b[i + 5] << 8) | b[i + 6], (b[i + 7] << 8) | b[i + 8]
                if w == 0 or h == 0:
                    raise ImageFormatError(f"JPEG frame header says {w} x {h} (height by DNL is unsupported)")
                return "jpeg", w, h
            i += 2 + length
        raise ImageFormatError("JPEG without a frame header (SOF) before the image data")
    raise ImageFormatError("compressed image is neither PNG nor JPEG (by its signature)")


def _buffer(data: Any) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return data.view(np.uint8).reshape(-1)
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except TypeError:
        return np.asarray(data, dtype=np.uint8)


def image_msg_to_array(msg: Any, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """sensor_msgs/Image -> (H, W) or (H, W, C) array in the message's encoding.

    Honours ``step`` (row padding) and ``is_bigendian``. Raises :class:`ImageFormatError`
    on an unsupported encoding, a zero size, or data shorter than ``step * height``, and
    :class:`ImageTooLargeError` beyond :data:`MAX_SIDE_PX` per side or ``max_pixels``.
    """
    enc = str(msg.encoding).lower()
    if enc not in ENCODINGS:
        raise ImageFormatError(
            f"unsupported image encoding {msg.encoding!r}; supported: {', '.join(sorted(ENCODINGS))}")
    channels, dtype = ENCODINGS[enc]
    if msg.is_bigendian and dtype.itemsize > 1:
        dtype = dtype.newbyteorder(">")
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    if h <= 0 or w <= 0:
        raise ImageFormatError(f"empty image ({w} x {h})")
    check_size(w, h, max_pixels)
    row = w * channels * dtype.itemsize
    data = _buffer(msg.data)
    if step < row:
        raise ImageFormatError(f"step {step} smaller than a row of {row} bytes")
    if data.size < step * h:
        raise ImageFormatError(f"image data too short: {data.size} bytes for {h} rows of step {step}")
    rows = data[: step * h].reshape(h, step)[:, :row]
    arr = np.ascontiguousarray(rows).view(dtype)
    arr = arr.reshape(h, w, channels) if channels > 1 else arr.reshape(h, w)
    return arr.astype(dtype.newbyteorder("="), copy=False)


def to_gray_u8(image: np.ndarray, encoding: str = "mono8") -> np.ndarray:
    """Any accepted encoding's array -> (H, W) uint8 grayscale."""
    enc = encoding.lower()
    if enc in _YUV422_LUMA and image.ndim == 3 and image.shape[2] == 2:
        return np.ascontiguousarray(image[..., _YUV422_LUMA[enc]])
    if image.ndim == 2:
        if image.dtype == np.uint16:
            return (image >> 8).astype(np.uint8)
        return image.astype(np.uint8, copy=False)
    rgb = image[..., :3].astype(np.float32)
    if enc.startswith("bgr"):
        rgb = rgb[..., ::-1]
    gray = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.clip(gray + 0.5, 0, 255).astype(np.uint8)


def compressed_msg_to_gray(msg: Any, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """sensor_msgs/CompressedImage (jpeg/png) -> (H, W) uint8 grayscale.

    The size is read from the PNG / JPEG header and checked against :data:`MAX_SIDE_PX` and
    ``max_pixels`` *before* decoding (:class:`ImageTooLargeError`), so a decompression bomb
    (a few hundred KB that inflate to gigapixels) is refused at once; other formats are refused.
    """
    import cv2

    data = _buffer(msg.data)
    if data.size == 0:
        raise ImageFormatError("compressed image has no data")
    _, w, h = compressed_image_size(data)
    check_size(w, h, max_pixels)
    img = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise ImageFormatError(f"cannot decode compressed image (format {msg.format!r})")
    check_size(img.shape[1], img.shape[0], max_pixels)  # belt and braces (EXIF rotation may swap w, h)
    return img


def image_fields(image: np.ndarray) -> dict[str, Any]:
    """Fields of a sensor_msgs/Image for a mono8 / mono16 / rgb8 array (no header)."""
    image = np.ascontiguousarray(image)
    if image.ndim == 2 and image.dtype == np.uint8:
        enc, step = "mono8", image.shape[1]
    elif image.ndim == 2 and image.dtype == np.uint16:
        enc, step = "mono16", image.shape[1] * 2
    elif image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
        enc, step = "rgb8", image.shape[1] * 3
    else:
        raise ImageFormatError(f"unsupported image array {image.shape} {image.dtype}")
    return {"height": image.shape[0], "width": image.shape[1], "encoding": enc,
            "is_bigendian": 0, "step": step, "data": image.tobytes()}


def resize_gray(gray: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 -> (h, w) uint8 at ``size_hw`` (area averaging when shrinking, bilinear else).

    The one resize of the package: the dataset builder and the inference runtime both use it,
    so a model sees frames at run time exactly as it saw them in training.
    """
    import cv2

    h, w = int(size_hw[0]), int(size_hw[1])
    if gray.shape[:2] == (h, w):
        return np.ascontiguousarray(gray)
    shrink = h <= gray.shape[0] and w <= gray.shape[1]
    return cv2.resize(np.ascontiguousarray(gray), (w, h),
                      interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
