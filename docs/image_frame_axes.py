"""Draw docs/image_frame_axes.png: the image-frame axes convention and the probe calibration.

Run: python docs/image_frame_axes.py   (matplotlib only)
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Circle, FancyArrowPatch, Polygon, Wedge  # noqa: E402


def arrow(ax, start, end, color, **kw):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=18, lw=2.2, color=color, **kw))


def main(out: Path) -> None:
    box = dict(facecolor="white", edgecolor="none", alpha=0.85, pad=1.5)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 5.2), gridspec_kw={"width_ratios": [1, 1.15]})

    # left: the image as the scanner shows it
    a.set_title("image frame (as on the screen)", fontsize=12)
    a.add_patch(Wedge((0, 0), 10, -130, -50, facecolor="0.25", edgecolor="0.1"))
    th = np.radians(np.linspace(-40, 40, 9))
    for t in th:
        a.plot([0, 10 * np.sin(t)], [0, -10 * np.cos(t)], color="0.4", lw=0.5)
    a.add_patch(Polygon([[-1.6, 0], [1.6, 0], [1.2, 1.6], [-1.2, 1.6]], facecolor="0.75", edgecolor="0.2"))
    a.text(0, 0.8, "probe", ha="center", va="center", fontsize=9)
    arrow(a, (0, 0), (4.5, 0), "tab:red")
    a.text(4.7, 0.25, "x  lateral\n(image columns, left -> right)", color="tab:red", fontsize=10, va="bottom")
    arrow(a, (0, 0), (0, -4.5), "tab:blue")
    a.text(0.3, -4.6, "z  along the beam,\ninto the body\n(image rows, depth)", color="tab:blue", fontsize=10,
           va="top", bbox=box)
    a.add_patch(Circle((0, 0), 0.45, facecolor="white", edgecolor="tab:green", lw=2))
    a.plot(0, 0, "o", color="tab:green", ms=4)
    a.text(-2.2, 1.2, "y  elevation\n(out of the image,\ntowards you)", color="tab:green", fontsize=10,
           ha="right", va="center", bbox=box)
    a.text(0, -11.3, "origin: centre of the transducer face (sector apex)\nright-handed: x × y = z",
           ha="center", fontsize=9)
    a.set_xlim(-10, 10)
    a.set_ylim(-13, 2.5)
    a.set_aspect("equal")
    a.axis("off")

    # right: robot tool frame -> image frame
    b.set_title("tool pose x calibration = image-frame pose", fontsize=12)
    b.add_patch(Polygon([[-0.8, 5.5], [0.8, 5.5], [0.8, 7.5], [-0.8, 7.5]], facecolor="0.85", edgecolor="0.3"))
    b.text(-1.0, 7.9, "robot flange / tool", fontsize=9, ha="right")
    b.add_patch(Polygon([[-0.6, 1.2], [0.6, 1.2], [0.9, 5.5], [-0.9, 5.5]], facecolor="0.75", edgecolor="0.2"))
    b.text(1.1, 3.5, "probe\nholder", fontsize=9)
    b.add_patch(Wedge((0, 1.2), 4.2, -125, -55, facecolor="0.3", alpha=0.6))
    # tool frame (drawn tilted: its axes need not match the image's)
    o = np.array([0.0, 6.5])
    arrow(b, o, o + [1.6, 0.9], "0.35")
    arrow(b, o, o + [-0.9, 1.6], "0.35")
    b.text(*(o + [1.7, 0.9]), "tool x", fontsize=8, color="0.35")
    b.text(*(o + [-0.5, 1.8]), "tool z", fontsize=8, color="0.35")
    # image frame
    i = np.array([0.0, 1.2])
    arrow(b, i, i + [2.2, 0], "tab:red")
    arrow(b, i, i + [0, -2.2], "tab:blue")
    b.text(*(i + [2.3, 0.1]), "x", color="tab:red", fontsize=11)
    b.text(*(i + [0.15, -2.5]), "z", color="tab:blue", fontsize=11)
    b.add_patch(Circle(i, 0.25, facecolor="white", edgecolor="tab:green", lw=2))
    b.text(*(i + [-0.9, 0.2]), "y", color="tab:green", fontsize=11)
    arrow(b, o + [-0.1, -0.2], i + [-0.15, 0.35], "tab:purple", connectionstyle="arc3,rad=0.5")
    b.text(-4.9, 3.8, "X = calibration\n(tool <- image):\ntranslation_m,\nquaternion_xyzw", color="tab:purple",
           fontsize=9)
    b.text(0, -4.3, "T_base_image = T_base_tool · X\n(pose topic: T_base_tool; --probe-calibration or /tf_static: X)",
           ha="center", fontsize=9)
    b.set_xlim(-5.2, 5.2)
    b.set_ylim(-5, 8.5)
    b.set_aspect("equal")
    b.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(Path(__file__).with_name("image_frame_axes.png"))
