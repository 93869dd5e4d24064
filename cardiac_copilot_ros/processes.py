"""Child processes of the demo and the benches: nodes run each in a process of their own."""

from __future__ import annotations

import signal
import subprocess


def stop_process(proc: subprocess.Popen, timeout_s: float = 10.0, sig: int = signal.SIGINT) -> int:
    """Ask a child to stop (SIGINT, as Ctrl-C would), kill it after ``timeout_s``; returns its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
