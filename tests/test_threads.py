"""Thread shares: several nca-tiles processes never oversubscribe the cores."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from nca_tiles.errors import NcaTilesError
from nca_tiles.runtime.threads import ThreadShare, usable_cores

HOLD = """
import sys, time
from pathlib import Path
from nca_tiles.runtime.threads import ThreadShare
share = ThreadShare(None if sys.argv[2] == "auto" else int(sys.argv[2]), folder=Path(sys.argv[1]))
print(share.threads, flush=True)
time.sleep(60)
"""


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _claim(folder, threads="auto"):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), str(threads)], stdout=subprocess.PIPE, text=True)
    return proc, int(proc.stdout.readline())


def test_usable_cores_is_the_affinity():
    assert usable_cores() == len(os.sched_getaffinity(0))


def test_alone_a_process_takes_every_core(tmp_path, restore_threads):
    with ThreadShare(folder=tmp_path) as share:
        assert share.threads == usable_cores() == torch.get_num_threads()
    assert list(tmp_path.iterdir()) == []


def test_processes_share_the_cores_and_take_them_back(tmp_path, restore_threads, monkeypatch):
    monkeypatch.setattr("nca_tiles.runtime.threads.usable_cores", lambda: 8)  # the arithmetic, on any machine
    procs = []
    try:
        procs.append(_claim(tmp_path, 3)[0])  # a fixed --threads 3 leaves 5
        proc, _ = _claim(tmp_path)
        procs.append(proc)
        with ThreadShare(folder=tmp_path) as share:
            assert share.threads == 5 // 2
            procs[1].kill()  # kill -9: its claim is recognised as dead
            procs[1].wait()
            assert share.rebalance() == 5 and torch.get_num_threads() == 5
            assert sorted(p.name for p in tmp_path.iterdir()) == sorted([str(procs[0].pid), str(os.getpid())])
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_at_least_one_thread_however_busy(tmp_path, restore_threads):
    procs = [_claim(tmp_path)[0] for _ in range(usable_cores() + 1)]
    try:
        with ThreadShare(folder=tmp_path) as share:
            assert share.threads == 1
    finally:
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.wait()


@pytest.mark.parametrize("threads", [0, -1, 10**6])
def test_bad_thread_counts_are_refused(tmp_path, threads):
    with pytest.raises(NcaTilesError, match="--threads"):
        ThreadShare(threads, folder=tmp_path)
