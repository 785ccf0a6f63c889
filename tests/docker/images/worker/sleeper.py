"""A stand-in replica for the scaling tests: sleeps until SIGTERM (or SIGINT), then exits 0 at once."""

import signal
import sys
import threading

stop = threading.Event()
# PID 1 ignores signals it has no handler for, so without these `docker stop` would wait for SIGKILL.
signal.signal(signal.SIGTERM, lambda *_: stop.set())
signal.signal(signal.SIGINT, lambda *_: stop.set())
print("sleeper up", flush=True)
stop.wait()
print("sleeper stopping", flush=True)
sys.exit(0)
