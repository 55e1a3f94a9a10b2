"""Small helpers shared by the test modules (pytest puts tests/ on sys.path)."""
import time


def wait_for(pred, timeout=10.0, step=0.02):
    """Poll pred() until it is true or timeout seconds passed; returns its last value."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()
