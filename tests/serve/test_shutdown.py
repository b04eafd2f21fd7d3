"""`kill PID` on the server stops its workers too: nothing is left running without its parent."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from .conftest import ServerProcess


def session_members(session_id: int) -> list[int]:
    """PIDs of the live processes of a session (the server and everything it started)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == session_id:  # state, ppid, pgrp, session
            members.append(int(stat.parent.name))
    return members


def test_sigterm_to_the_server_stops_every_worker(tiny_model_dir):
    with ServerProcess(["--model", str(tiny_model_dir)]) as server:
        assert len(session_members(server.process.pid)) > 1  # LitServe runs API and inference workers
        os.kill(server.process.pid, signal.SIGTERM)  # the main process only, as `kill PID` does
        server.process.wait(timeout=30)
        deadline = time.monotonic() + 20
        while session_members(server.process.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert session_members(server.process.pid) == []
