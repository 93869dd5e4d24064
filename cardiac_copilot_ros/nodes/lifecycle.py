"""The one way our nodes start, spin and shut down: signals, start-up errors, clean exit codes.

``ros2 launch`` answers Ctrl-C with two SIGINTs in quick succession (the terminal's process group
and launch's own forward), then SIGTERM after a timeout. rclpy's own signal handlers shut every
context down from a thread of their own while callbacks still run (publishers then fail with
"publisher's context is invalid") and Python's default handler raises KeyboardInterrupt wherever
the main thread happens to be, so a second signal interrupts the shutdown itself. Instead:

* rclpy is initialised with ``SignalHandlerOptions.NO`` and SIGINT and SIGTERM get handlers of
  our own, installed explicitly (so also when SIGINT was inherited as ignored, as for a node
  started in the background from a script);
* while the node is being built (imports, model loading) the first signal aborts the start-up;
* while it spins, a signal only sets a flag: the callback running finishes, the executor stops,
  the node's shutdown hook runs (close the bag, send the zero twist) with the context still
  valid, then the node is destroyed and rclpy shut down. Further signals are counted, nothing
  more. A pipe written by the C-level signal handler (``signal.set_wakeup_fd``) wakes the
  executor while it waits in rcl;
* every path logs one line and returns 0; wrongly typed or invalid start-up parameters give one
  error line and exit status 2, no traceback.

rclpy is imported lazily so that ``cardiac_copilot_ros.nodes`` can install the handlers before
anything heavy is imported when a process is started as one of the nodes.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: The executables of setup.py (console scripts named like the node modules).
NODE_EXECUTABLES = ("guidance_node", "recorder_node", "servo_node", "scanner_sim_node")
_HANDLED = (signal.SIGINT, signal.SIGTERM)


class StartupInterrupted(BaseException):
    """A signal arrived while the node was being built (a BaseException: no ``except Exception``
    in the start-up code swallows it)."""


class _SignalState:
    """Process-wide: signals are delivered to the process, handled in its main thread."""

    def __init__(self) -> None:
        self.installed = False
        self.phase = "import"  # import -> startup -> spin -> shutdown
        self.signum: int | None = None  # the first signal received
        self.count = 0
        self.previous: dict[int, Any] = {}


_state = _SignalState()


def _on_signal(signum: int, _frame: Any) -> None:
    _state.count += 1
    if _state.signum is None:
        _state.signum = signum
        if _state.phase == "startup":
            raise StartupInterrupted(signum)


def install_signal_handlers() -> bool:
    """Handle SIGINT and SIGTERM ourselves (see the module doc); True when installed now.

    Only possible in the main thread; elsewhere (a node spun by a test) nothing is changed.
    """
    if _state.installed or threading.current_thread() is not threading.main_thread():
        return False
    for sig in _HANDLED:
        _state.previous[sig] = signal.signal(sig, _on_signal)
    _state.installed = True
    return True


def _finish_signal_handling(installed_here: bool) -> None:
    """After the node is gone: a node process ignores further signals (the interpreter's
    finalisation would reset our handlers to the default, so a late second SIGINT killed the
    exiting process with status -2). A caller that is not a node process (spin_node called from
    other code) gets its own handlers back."""
    if not _state.installed:
        return
    if installed_here and not started_as_node():
        for sig, handler in _state.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        _state.previous.clear()
        _state.installed = False
        _state.phase, _state.signum, _state.count = "import", None, 0
    else:
        for sig in _HANDLED:
            signal.signal(sig, signal.SIG_IGN)


def started_as_node() -> bool:
    """Whether this process was started as one of the nodes (console script or ``python -m``)."""
    argv = list(getattr(sys, "orig_argv", []))
    if sys.argv and sys.argv[0] == "-m" and "-m" in argv[1:]:  # runpy is importing the package
        i = argv.index("-m", 1)
        module = argv[i + 1] if i + 1 < len(argv) else ""
        return module.rsplit(".", 1)[-1] in NODE_EXECUTABLES and module.startswith(__package__ + ".")
    if not sys.argv:
        return False
    path = Path(sys.argv[0])  # the console script, or the module file once runpy runs it
    return path.name in NODE_EXECUTABLES or (path.stem in NODE_EXECUTABLES and path.parent.name == "nodes")


def install_early() -> None:
    """Called when ``cardiac_copilot_ros.nodes`` is imported: handlers from the first moment when
    this process is a node (a signal during the imports then ends the start-up cleanly)."""
    if started_as_node():
        install_signal_handlers()


def _signame(signum: int | None) -> str:
    try:
        return signal.Signals(signum).name
    except (TypeError, ValueError):
        return f"signal {signum}"


def startup_error_message(name: str, exc: BaseException) -> str:
    """One line for a node that cannot start (wrongly typed parameter, bad value, missing file)."""
    from rclpy.exceptions import InvalidParameterTypeException, ParameterException

    text = " ".join(str(exc).split())
    given = re.search(r"to '(-?\d+)' of type 'INTEGER', expecting type 'DOUBLE'", text)
    if isinstance(exc, InvalidParameterTypeException) and given:
        text += f" (a DOUBLE needs a decimal point: {given.group(1)}.0)"
    kind = "invalid parameter" if isinstance(exc, ParameterException) else "cannot start"
    return f"{name}: {kind}: {text}"


class _Waker:
    """Wakes the executor when a signal arrives while it waits in rcl (main thread blocked in C).

    The C-level handler writes the signal number to a pipe; a thread reading it triggers a guard
    condition of the node, so ``spin_once`` returns and the main loop sees the flag.
    """

    def __init__(self, node: Any) -> None:
        self._gc = node.create_guard_condition(lambda: None)
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)
        self._old_fd = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._run, name="signal-waker", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                data = os.read(self._r, 64)
            except OSError:
                return
            if not data:
                return
            try:
                self._gc.trigger()
            except Exception:  # already destroyed: shutting down anyway
                return

    def close(self) -> None:
        signal.set_wakeup_fd(self._old_fd)
        os.close(self._w)
        self._thread.join(2.0)
        os.close(self._r)


def spin_node(make_node: Callable[[], Any], name: str, args: list[str] | None = None,
              startup_errors: tuple[type[BaseException], ...] = (ValueError,),
              make_executor: Callable[[], Any] | None = None,
              on_shutdown: Callable[[Any], None] | None = None) -> int:
    """Init rclpy, build the node, spin until SIGINT/SIGTERM, shut down cleanly.

    ``on_shutdown(node)`` runs after the executor stopped and before the node is destroyed, with
    the context still valid (close files, publish a last message). Returns 0 after a signal (also
    during start-up) and 2 when the node cannot start: one of ``startup_errors`` or an rclpy
    ``ParameterException`` (a wrongly typed or out-of-range ``-p``); the message is one line on
    stderr, naming the node.
    """
    import rclpy
    import rclpy.logging
    from rclpy.exceptions import ParameterException
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
    from rclpy.signals import SignalHandlerOptions

    installed_here = install_signal_handlers()
    logger = rclpy.logging.get_logger(name)
    node = None
    try:
        if _state.signum is not None:  # during the imports
            raise StartupInterrupted(_state.signum)
        _state.phase = "startup"
        rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
        node = make_node()
        _state.phase = "spin"
    except StartupInterrupted:
        _state.phase = "shutdown"
        logger.info(f"{_signame(_state.signum)} during start-up: exiting")
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
        _finish_signal_handling(installed_here)
        return 0
    except (*startup_errors, ParameterException) as exc:
        _state.phase = "shutdown"
        print(startup_error_message(name, exc), file=sys.stderr, flush=True)
        rclpy.try_shutdown()
        _finish_signal_handling(installed_here)
        return 2
    except BaseException:
        _state.phase = "shutdown"
        rclpy.try_shutdown()
        _finish_signal_handling(installed_here)
        raise

    logger = node.get_logger()
    executor = (make_executor or SingleThreadedExecutor)()
    waker = _Waker(node) if _state.installed else None
    try:
        executor.add_node(node)
        while _state.signum is None and rclpy.ok():
            executor.spin_once()
    except ExternalShutdownException:
        pass
    except KeyboardInterrupt:  # handlers not ours (not the main thread)
        pass
    finally:
        _state.phase = "shutdown"
        if _state.signum is not None:
            logger.info(f"{_signame(_state.signum)}: shutting down")
        if waker is not None:
            waker.close()
        executor.shutdown()
        try:
            if on_shutdown is not None:
                on_shutdown(node)
        finally:
            node.destroy_node()
            rclpy.try_shutdown()
            _finish_signal_handling(installed_here)
    return 0


class BackgroundSpin:
    """Spin ``executor`` in a daemon thread for a tool (a bench, the demo) whose main thread does the work;
    :meth:`stop` ends the thread first and only then shuts the executor down. (``Executor.shutdown`` while
    another thread is inside ``spin()`` can destroy a guard condition under it: an AttributeError
    traceback from rclpy's wait set at the end of a run.)"""

    def __init__(self, executor: Any, name: str = "spin", period_s: float = 0.05) -> None:
        import threading

        self.executor = executor
        self._stop = threading.Event()
        self._period_s = period_s
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.executor.spin_once(timeout_sec=self._period_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop spinning (waits for the callback running), then shut the executor down."""
        self._stop.set()
        self._thread.join(timeout=timeout_s)
        self.executor.shutdown(timeout_sec=2.0)
