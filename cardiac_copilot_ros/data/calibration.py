"""Probe calibration: the fixed transform from the tracked tool frame to the image frame.

A robot (or an optical tracker) reports the pose of its flange / tool frame, not of the
ultrasound image. The image frame's pose is ``T_base_image = T_base_tool @ X`` with ``X`` the
probe calibration (``tool <- image``), constant for one probe mount. Image-frame axes (see
docs/DATA.md, ``docs/image_frame_axes.png``): origin at the transducer face centre, **x**
lateral across the image, **y** elevation (out of the image plane), **z** along the beam into
the body (image depth).

Sources, in this order of precedence (``dataset build``):

1. ``--probe-calibration FILE``: a YAML file

   .. code-block:: yaml

      parent_frame: tool0            # the frame whose pose the pose topic carries
      child_frame: us_image          # the image frame
      translation_m: [0.0, 0.0, 0.105]          # image origin in the parent frame, metres
      quaternion_xyzw: [0.0, 0.0, 0.0, 1.0]     # image axes in the parent frame

2. The bag's ``/tf_static`` (``tf2_msgs/TFMessage``): the chain of static transforms from the
   tool frame (``--tool-frame``; default: the parent of the image frame's static transform)
   down to the images' ``header.frame_id``.
3. None: the poses are taken as the image frame's poses (the simulator's case).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..pose import matrix_to_pose, pose_to_matrix

#: Topic and type of static transforms in a bag.
TF_STATIC_TOPIC = "/tf_static"
TF_MESSAGE_TYPE = "tf2_msgs/msg/TFMessage"
#: Keys of a calibration YAML file.
YAML_KEYS = ("parent_frame", "child_frame", "translation_m", "quaternion_xyzw")
#: A probe calibration further than this from the tool frame is taken as a unit mistake.
MAX_TRANSLATION_M = 1.0


class CalibrationError(ValueError):
    """A calibration file or a bag's static transforms cannot give a probe calibration."""


@dataclass(frozen=True)
class ProbeCalibration:
    """``tool <- image`` transform (translation in metres, unit quaternion x, y, z, w)."""

    parent_frame: str
    child_frame: str
    translation_m: tuple[float, float, float]
    quaternion_xyzw: tuple[float, float, float, float]
    source: str = ""

    def matrix_mm(self) -> np.ndarray:
        """4x4 homogeneous matrix, translation in mm (the pose.py convention)."""
        return pose_to_matrix(np.asarray(self.translation_m), np.asarray(self.quaternion_xyzw))

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "parent_frame": self.parent_frame, "child_frame": self.child_frame,
                "translation_m": [round(v, 9) for v in self.translation_m],
                "quaternion_xyzw": [round(v, 9) for v in self.quaternion_xyzw]}

    def apply(self, positions_m: np.ndarray, quats_xyzw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tool poses (N, 3) m / (N, 4) xyzw in the base frame -> image-frame poses."""
        T = pose_to_matrix(positions_m, quats_xyzw) @ self.matrix_mm()
        return matrix_to_pose(T)


def tf_static_cdr(calib: ProbeCalibration, stamp_ns: int) -> bytes:
    """A serialized ``tf2_msgs/TFMessage`` holding the calibration (for a bag's ``/tf_static``)."""
    from ..bagio import TYPESTORE, ns_to_stamp

    T = TYPESTORE.types
    t, q = calib.translation_m, calib.quaternion_xyzw
    tf = T["geometry_msgs/msg/TransformStamped"](
        header=T["std_msgs/msg/Header"](stamp=ns_to_stamp(int(stamp_ns)), frame_id=calib.parent_frame),
        child_frame_id=calib.child_frame,
        transform=T["geometry_msgs/msg/Transform"](
            translation=T["geometry_msgs/msg/Vector3"](x=t[0], y=t[1], z=t[2]),
            rotation=T["geometry_msgs/msg/Quaternion"](x=q[0], y=q[1], z=q[2], w=q[3])))
    return bytes(TYPESTORE.serialize_cdr(T[TF_MESSAGE_TYPE](transforms=[tf]), TF_MESSAGE_TYPE))


def make_calibration(parent: str, child: str, translation: Sequence[float], quaternion: Sequence[float],
                     source: str, where: str = "") -> ProbeCalibration:
    """Validated calibration (finite numbers, quaternion of norm 1 within 1e-3, |t| <= 1 m)."""
    at = f"{where}: " if where else ""
    try:
        t = [float(v) for v in translation]
        q = [float(v) for v in quaternion]
    except (TypeError, ValueError):
        raise CalibrationError(f"{at}translation_m and quaternion_xyzw must be lists of numbers") from None
    if len(t) != 3 or len(q) != 4:
        raise CalibrationError(f"{at}translation_m needs 3 numbers (x, y, z in m) and quaternion_xyzw 4 "
                               f"(x, y, z, w); got {len(t)} and {len(q)}")
    if not all(math.isfinite(v) for v in t + q):
        raise CalibrationError(f"{at}calibration numbers must be finite")
    n = math.sqrt(sum(v * v for v in q))
    if abs(n - 1.0) > 1e-3:
        raise CalibrationError(f"{at}quaternion_xyzw {q} has norm {n:.6g}, not 1 (order is x, y, z, w)")
    if math.sqrt(sum(v * v for v in t)) > MAX_TRANSLATION_M:
        raise CalibrationError(f"{at}translation_m {t} is more than {MAX_TRANSLATION_M:g} m from the tool "
                               "frame: the translation is in metres, not millimetres")
    if not str(parent).strip() or not str(child).strip():
        raise CalibrationError(f"{at}parent_frame and child_frame must be non-empty frame names")
    return ProbeCalibration(str(parent), str(child), (t[0], t[1], t[2]),
                            (q[0] / n, q[1] / n, q[2] / n, q[3] / n), source)


def load_calibration(path: str | Path) -> ProbeCalibration:
    """Read a calibration YAML file (keys :data:`YAML_KEYS`)."""
    from ruamel.yaml import YAML, YAMLError

    p = Path(path)
    try:
        data = YAML(typ="safe").load(p.read_text())
    except OSError as exc:
        raise CalibrationError(f"cannot read probe calibration {p}: {exc.strerror or exc}") from None
    except YAMLError as exc:
        raise CalibrationError(f"probe calibration {p} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict) or set(YAML_KEYS) - set(data):
        missing = sorted(set(YAML_KEYS) - set(data)) if isinstance(data, dict) else list(YAML_KEYS)
        raise CalibrationError(f"probe calibration {p}: missing {', '.join(missing)} (expected keys "
                               f"{', '.join(YAML_KEYS)}; see docs/DATA.md)")
    unknown = sorted(set(data) - set(YAML_KEYS))
    if unknown:
        raise CalibrationError(f"probe calibration {p}: unknown keys {', '.join(map(str, unknown))} "
                               f"(expected {', '.join(YAML_KEYS)})")
    return make_calibration(data["parent_frame"], data["child_frame"], data["translation_m"],
                            data["quaternion_xyzw"], source=str(p), where=f"probe calibration {p}")


def static_transforms(messages: Iterable[Any]) -> dict[str, tuple[str, np.ndarray]]:
    """tf2_msgs/TFMessage messages -> {child frame: (parent frame, 4x4 mm)}; later ones win."""
    out: dict[str, tuple[str, np.ndarray]] = {}
    for msg in messages:
        for tf in msg.transforms:
            tr, rot = tf.transform.translation, tf.transform.rotation
            q = np.array([rot.x, rot.y, rot.z, rot.w], dtype=float)
            t = np.array([tr.x, tr.y, tr.z], dtype=float)
            if not (np.all(np.isfinite(q)) and np.all(np.isfinite(t))) or np.linalg.norm(q) < 1e-9:
                continue
            out[str(tf.child_frame_id).lstrip("/")] = (str(tf.header.frame_id).lstrip("/"), pose_to_matrix(t, q))
    return out


def calibration_from_tf(tfs: dict[str, tuple[str, np.ndarray]], image_frame: str,
                        tool_frame: str | None = None) -> ProbeCalibration | None:
    """The ``tool <- image`` calibration from static transforms, or None when the image frame
    has no static parent (and no ``tool_frame`` was asked for)."""
    image_frame = image_frame.lstrip("/")
    if image_frame not in tfs:
        if tool_frame:
            raise CalibrationError(f"{TF_STATIC_TOPIC} has no transform to the image frame {image_frame!r} "
                                   f"(--tool-frame {tool_frame}); static frames: {', '.join(sorted(tfs)) or 'none'}")
        return None
    if not tool_frame:
        tool_frame = tfs[image_frame][0]
    T = np.eye(4)
    frame, chain = image_frame, [image_frame]
    while frame != tool_frame:
        if frame not in tfs or len(chain) > 64:
            raise CalibrationError(f"{TF_STATIC_TOPIC} has no chain of static transforms from --tool-frame "
                                   f"{tool_frame!r} to the image frame {image_frame!r} (reached "
                                   f"{' <- '.join(reversed(chain))})")
        parent, T_pc = tfs[frame]
        T = T_pc @ T
        frame = parent
        chain.append(frame)
    pos, quat = matrix_to_pose(T)
    return make_calibration(tool_frame, image_frame, pos, quat,
                            source=f"{TF_STATIC_TOPIC} ({' <- '.join(reversed(chain))})")
