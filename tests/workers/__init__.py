"""Scripts that tests start in subprocesses (``accelerate launch ... tests/workers/<worker>.py``)."""
