"""distmaml.run.signals: the signals a user or a scheduler sends become a flag the training loop reads."""

import os
import signal
import time

from distmaml.run import signals


def test_sighup_under_nohup_stays_ignored_and_only_a_second_ctrl_c_exits_at_once(monkeypatch):
    """Under nohup SIGHUP is ignored: a closed terminal must not stop the run. A shell starts background
    jobs with SIGINT ignored: a SIGINT sent on purpose still asks for a checkpoint. And a Ctrl-C after a
    scheduler's SIGUSR1 or SIGTERM still ends in the checkpoint that signal asked for."""
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in (signal.SIGHUP, signal.SIGINT)}
    try:
        with signals.PreemptionWatch() as watch:
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.3)
            assert watch.signum is None
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.3)
            assert watch.signum == signal.SIGINT
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    exits = []
    monkeypatch.setattr(signals.os, "_exit", exits.append)
    watch = signals.PreemptionWatch()
    watch._handle(signal.SIGTERM)
    watch._handle(signal.SIGINT)
    assert watch.signum == signal.SIGTERM and exits == []
    watch = signals.PreemptionWatch()
    watch._handle(signal.SIGINT)
    watch._handle(signal.SIGINT)
    assert exits == [128 + signal.SIGINT]
