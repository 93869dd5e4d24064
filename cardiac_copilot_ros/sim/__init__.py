"""The built-in echocardiography simulator: phantom subjects (:mod:`.phantom`), B-mode
rendering (:mod:`.render`), scripted expert demonstrations (:mod:`.expert`), scan bags
(:mod:`.scan`), the ``simulate`` command (:mod:`.cli`) and ``bench sim`` (:mod:`.bench`).

numpy + OpenCV only; never imports rclpy or torch. See docs/SIMULATOR.md.
"""

from .phantom import Label, Subject, make_subject

__all__ = ["Label", "Subject", "make_subject"]
