"""Locks on output locations and the writability pre-flight."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest
from helpers import lock_held_elsewhere, read_only_dir

from nca_tiles.errors import NcaTilesError
from nca_tiles.runtime.locking import exclusive_lock, lock_path
from nca_tiles.runtime.preflight import check_writable

def test_second_holder_is_refused_with_the_holders_pid_and_host(tmp_path):
    target = tmp_path / "job.work"
    with lock_held_elsewhere(target, "work dir", "use another --work-dir") as proc:
        with pytest.raises(NcaTilesError, match=rf"in use by process {proc.pid} on host \S+ .*use another --work-dir"):
            with exclusive_lock(target, "work dir", "use another --work-dir"):
                pass


def test_refusal_names_a_holder_that_has_locked_but_not_yet_written_its_record(tmp_path):
    """The holder writes who it is just after taking the lock: a process refused in between waits
    briefly for that record instead of saying "another process" (a race seen in CI)."""
    target = tmp_path / "job.work"
    fd = os.open(lock_path(target), os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX)
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "now", "command": "test"})
    late_writer = threading.Timer(0.3, os.write, (fd, record.encode()))
    late_writer.start()
    try:
        with pytest.raises(NcaTilesError, match=rf"in use by process {os.getpid()} on host "):
            with exclusive_lock(target, "work dir", "use another --work-dir"):
                pass
    finally:
        late_writer.join()
        os.close(fd)


def test_lock_of_a_killed_process_does_not_block(tmp_path):
    target = tmp_path / "job.work"
    with lock_held_elsewhere(target, "work dir", "use another --work-dir") as proc:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert lock_path(target).exists()  # left behind by kill -9 ...
    with exclusive_lock(target, "work dir", "use another --work-dir"):  # ... and no obstacle
        assert lock_path(target).exists()
    assert not lock_path(target).exists()  # removed on release


def test_lock_is_released_and_retaken_in_one_process(tmp_path):
    for _ in range(3):
        with exclusive_lock(tmp_path / "out", "output", "choose another --out"):
            pass
    assert os.listdir(tmp_path) == []


def test_many_processes_racing_for_one_lock_never_share_it(tmp_path):
    """Each process appends 'in' and 'out' while it holds the lock: the log never interleaves."""
    script = """
import sys, time
from pathlib import Path
from nca_tiles.errors import NcaTilesError
from nca_tiles.runtime.locking import exclusive_lock
log = Path(sys.argv[2])
deadline = time.time() + 20
done = 0
while done < 5 and time.time() < deadline:
    try:
        with exclusive_lock(Path(sys.argv[1]), "x", "y"):
            with log.open("a") as f: f.write("in\\n")
            time.sleep(0.01)
            with log.open("a") as f: f.write("out\\n")
            done += 1
    except NcaTilesError:
        time.sleep(0.001)
"""
    log = tmp_path / "log"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "t"), str(log)]) for _ in range(4)]
    for p in procs:
        assert p.wait(timeout=60) == 0
    lines = log.read_text().split()
    assert lines == ["in", "out"] * (len(lines) // 2) and len(lines) == 40


def test_check_writable_accepts_a_new_nested_location(tmp_path):
    check_writable(tmp_path / "a" / "b" / "slide.ome.tif", "--out")
    assert os.listdir(tmp_path) == []  # the probe leaves nothing


def test_check_writable_refuses_a_read_only_folder(tmp_path):
    with read_only_dir(tmp_path / "ro") as ro:
        with pytest.raises(NcaTilesError, match=r"cannot write --out .*not writable"):
            check_writable(ro / "sub" / "slide.ome.tif", "--out")


def test_check_writable_refuses_a_file_as_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NcaTilesError, match="is not a folder"):
        check_writable(tmp_path / "file" / "slide.ome.tif", "--out")
