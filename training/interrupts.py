"""SIGINT / SIGTERM before a run's first train step end it within seconds, with nothing half-written.

Until the first step, a run only reads (config, tokenizer, checkpoint), prepares data and compiles: a stop there has
no work to save. `StopBeforeFirstStep` makes both signals raise `Interrupted` in the main thread, which unwinds the
run normally (worker processes closed, the checkpoint manager's temporary folders never committed). The raise can
be lost (the main thread cannot take a Python signal while XLA compiles, minutes on TPU; and code that catches every
exception, like JAX's compilation-cache read or a gc callback, swallows it), so the request is also remembered: a
watcher thread, woken through `signal.set_wakeup_fd`, ends the process with the same message if the run has not
ended `grace_s` after the signal (also when unwinding itself hangs, e.g. on a wedged worker), and `disarm()` raises
it if the first step completed regardless. The data
set and the compilation cache are written atomically (a temporary name, then a rename), so neither is left cut.

After the first step, `disarm()` hands SIGTERM to the preemption handler (checkpoints.Preemption: save, then stop)
and SIGINT back to Python's KeyboardInterrupt. On several processes SIGTERM stays with JAX's preemption service
(it stops every process at one step) and only SIGINT is taken here."""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading

log = logging.getLogger(__name__)


class Interrupted(RuntimeError):
    """The run was stopped by a signal before its first train step."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"{signal.Signals(signum).name} before the first train step: stopped; no checkpoint was "
                         "written by this run, and a rerun of the same command starts (or resumes) where it would "
                         "have")


class StopBeforeFirstStep:
    """Context manager: SIGINT (and SIGTERM when `take_sigterm`) raise Interrupted until `disarm()`."""

    def __init__(self, take_sigterm: bool = True, grace_s: float = 5.0):
        self.signals = (signal.SIGINT, signal.SIGTERM) if take_sigterm else (signal.SIGINT,)
        self.grace_s = grace_s
        self.armed = False
        self.requested: int | None = None  # the stop signal received while armed
        self._finished = False  # the guarded run has ended (the context exited)
        self._previous: dict = {}
        self._wakeup = None

    def __enter__(self) -> "StopBeforeFirstStep":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers belong to the main thread; nothing to arm (e.g. train() in a test thread)
        self._previous = {s: signal.signal(s, self._handle) for s in self.signals}
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        self._wakeup = (reader, writer, signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False))
        threading.Thread(target=self._watch, args=(reader,), daemon=True, name="stop-before-first-step").start()
        self.armed = True
        return self

    def _handle(self, signum, frame) -> None:
        if self.armed:
            self.armed = False  # one raise; a second signal while unwinding takes the default path below
            self.requested = signum
            raise Interrupted(signum)
        self._default(signum)

    def _default(self, signum) -> None:
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, None)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt
        else:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def _watch(self, reader: socket.socket) -> None:
        """Woken by any signal the process gets; if a stop signal came while armed and the run has not ended
        within grace_s (the main thread is inside a compile, swallowed the raise, or hangs unwinding), ends the
        process."""
        while True:
            try:
                data = reader.recv(64)
            except OSError:
                return
            if not data:
                return
            if (self.armed or self.requested) and any(b in self.signals for b in data):
                signum = next(b for b in data if b in self.signals)
                threading.Event().wait(self.grace_s)
                if not self._finished:
                    log.error("%s (the run had not ended %.0f s later; ended here)", Interrupted(signum), self.grace_s)
                    logging.shutdown()
                    for child in multiprocessing.active_children():  # grain's workers would outlive us
                        child.kill()
                    os._exit(128 + signum)

    def disarm(self) -> None:
        """After the first step: SIGTERM to whoever installed a handler since (the preemption handler), SIGINT
        back to what it was."""
        if not self._wakeup:
            return
        self.armed = False
        for s in self.signals:
            if signal.getsignal(s) == self._handle:
                signal.signal(s, self._previous[s])
        if self.requested:  # the raise was swallowed on the way to the first step
            raise Interrupted(self.requested)

    def __exit__(self, *exc) -> None:
        if not self._wakeup:
            return
        self._finished = True
        self.armed = False
        for s, previous in self._previous.items():
            if signal.getsignal(s) == self._handle:
                signal.signal(s, previous)
        reader, writer, old_fd = self._wakeup
        signal.set_wakeup_fd(old_fd)
        writer.close()
        reader.close()
        self._wakeup = None
