import os
import signal

import pytest

from utils.data.workers import ignore_stop_signals
from utils.system.stopping import STOP_SIGNALS, StopRequest


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_each_stop_signal_requests_a_stop_and_a_second_one_stops_at_once(signum):
    stop = StopRequest()
    with stop.handling_signals():
        os.kill(os.getpid(), signum)
        assert stop.signum == signum and stop.agreed(None)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signum)
    assert signal.getsignal(signum) is not None and stop.name == signal.Signals(signum).name


def test_loader_workers_ignore_the_stop_signals():
    saved = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    try:
        ignore_stop_signals(0)
        assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == dict.fromkeys(STOP_SIGNALS, signal.SIG_IGN)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
