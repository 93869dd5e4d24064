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
}

#: Largest accepted image side in pixels (protects the node from absurd messages).
MAX_SIDE_PX = 8192


class ImageFormatError(ValueError):
    """The image message cannot be turned into an array (encoding, size, data length)."""


def _buffer(data: Any) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return data.view(np.uint8).reshape(-1)
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except TypeError:
        return np.asarray(data, dtype=np.uint8)


def image_msg_to_array(msg: Any) -> np.ndarray:
    """sensor_msgs/Image -> (H, W) or (H, W, C) array in the message's encoding.

    Honours ``step`` (row padding) and ``is_bigendian``. Raises :class:`ImageFormatError`
    on an unsupported encoding, a zero or huge size, or data shorter than ``step * height``.
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
    if h > MAX_SIDE_PX or w > MAX_SIDE_PX:
        raise ImageFormatError(f"image too large ({w} x {h}); limit {MAX_SIDE_PX} px per side")
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
    if image.ndim == 2:
        if image.dtype == np.uint16:
            return (image >> 8).astype(np.uint8)
        return image.astype(np.uint8, copy=False)
    rgb = image[..., :3].astype(np.float32)
    if enc.startswith("bgr"):
        rgb = rgb[..., ::-1]
    gray = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.clip(gray + 0.5, 0, 255).astype(np.uint8)


def compressed_msg_to_gray(msg: Any) -> np.ndarray:
    """sensor_msgs/CompressedImage (jpeg/png) -> (H, W) uint8 grayscale."""
    import cv2

    data = _buffer(msg.data)
    if data.size == 0:
        raise ImageFormatError("compressed image has no data")
    img = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise ImageFormatError(f"cannot decode compressed image (format {msg.format!r})")
    if img.shape[0] > MAX_SIDE_PX or img.shape[1] > MAX_SIDE_PX:
        raise ImageFormatError(f"image too large ({img.shape[1]} x {img.shape[0]})")
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
