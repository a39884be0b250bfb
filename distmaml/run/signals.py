"""The signals that stop a run cleanly: a preemption's or a time limit's (SIGUSR1, SIGTERM), Ctrl-C
(SIGINT) and a closed terminal (SIGHUP) become a flag the training loop reads between iterations,
so that it checkpoints (distmaml.run.checkpoint) and exits instead of losing what it did since the last
checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

log = logging.getLogger("distmaml.checkpoint")  # the logger these messages have always come from


class PreemptionWatch:
    """Turns SIGUSR1 / SIGTERM / SIGINT / SIGHUP into a flag the training loop reads between iterations.

    SLURM sends SIGUSR1 (--signal=B:USR1@T) before a preemption or time limit and SIGTERM when it
    cancels; Ctrl-C sends SIGINT; a closed terminal or a dropped remote login sends SIGHUP. Either
    way the loop finishes its iteration, saves and exits
    (128 + the signal's number) so that nothing since the last checkpoint is lost; the first
    signal received is the reason reported. A second Ctrl-C (SIGINT after SIGINT) ends the process at
    once. SIGHUP, if the process was started ignoring it (nohup), stays ignored.

    Python runs signal handlers only between bytecodes, so a main thread inside a long backward
    pass, or inside a collective waiting for a stopped rank, would not even notice a second Ctrl-C.
    So, from the main thread, the watch blocks these signals in this thread (and in every thread
    started while it is active: the process group's, wandb's) and takes them in a thread of its
    own with sigtimedwait, which sees each at once. Ordinary handlers stay installed for a signal
    that lands on a thread started before the watch. Elsewhere than the main thread it is inert.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watched: tuple[int, ...] = ()

    def _handle(self, signum, frame=None) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            log.warning("received SIGINT again: exiting now, without a checkpoint")
            logging.shutdown()
            os._exit(128 + signal.SIGINT)
        if self.signum is None:
            self.signum = signum
            again = "; Ctrl-C again to exit at once, without a checkpoint" if signum == signal.SIGINT else ""
            log.warning("received %s: finishing this iteration, then checkpointing and exiting%s",
                        signal.Signals(signum).name, again)

    def _take_signals(self) -> None:
        while not self._stop.is_set():
            taken = signal.sigtimedwait(self._watched, 0.1)
            if taken is not None:
                self._handle(taken.si_signo)

    def __enter__(self) -> "PreemptionWatch":
        if threading.current_thread() is threading.main_thread():
            # Under nohup a closed terminal's SIGHUP must not stop the run: started ignored, it stays
            # ignored. (Not so the others: a shell starts background jobs with SIGINT ignored, and a
            # SIGINT sent to such a run on purpose must still end in a checkpoint.)
            self._watched = tuple(signum for signum in self.SIGNALS
                                  if signum != signal.SIGHUP or signal.getsignal(signum) is not signal.SIG_IGN)
            for signum in self._watched:
                self._previous[signum] = signal.signal(signum, self._handle)
            signal.pthread_sigmask(signal.SIG_BLOCK, self._watched)
            self._thread = threading.Thread(target=self._take_signals, name="distmaml-signals", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self._watched)
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
