"""Thread shares: several nca-tiles processes never oversubscribe the cores."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from nca_tiles.errors import NcaTilesError
from nca_tiles.runtime.threads import ThreadShare, env_thread_limit, rebalance_threads, thread_share, usable_cores
from helpers import read_only_dir

HOLD = """
import sys, time
from pathlib import Path
from nca_tiles.runtime.threads import ThreadShare
limit = int(sys.argv[3]) if len(sys.argv) > 3 else None
share = ThreadShare(None if sys.argv[2] == "auto" else int(sys.argv[2]), folder=Path(sys.argv[1]), limit=limit)
print(share.threads, flush=True)
time.sleep(60)
"""


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _claim(folder, threads="auto", *limit):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), str(threads), *map(str, limit)],
                            stdout=subprocess.PIPE, text=True)
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


@pytest.mark.parametrize("value,limit", [("3", 3), ("4,2", 4), (" 2 ", 2), ("0", 1), ("", None), ("many", None)])
def test_omp_num_threads_is_read_as_a_limit(monkeypatch, value, limit):
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    assert env_thread_limit() == limit


def test_a_limit_caps_the_fair_share_and_leaves_the_rest_to_others(tmp_path, restore_threads, monkeypatch):
    if usable_cores() < 2:
        pytest.skip("needs 2 cores: with one, a limit of 1 does not cap anything")
    proc, threads = _claim(tmp_path, "auto", 1)  # OMP_NUM_THREADS=1 without --threads
    try:
        assert threads == 1
        assert (tmp_path / str(proc.pid)).read_text() == "fixed 1\n"  # the others need not wait for it
        monkeypatch.setattr("nca_tiles.runtime.threads.usable_cores", lambda: 8)
        with ThreadShare(folder=tmp_path) as share:
            assert share.threads == 7
    finally:
        proc.kill()
        proc.wait()


def test_thread_share_claims_for_a_command_nests_and_restores(tmp_path, restore_threads):
    torch.set_num_threads(3)
    assert rebalance_threads() is None  # no command claimed: nothing to do
    with thread_share(2, folder=tmp_path) as threads:
        assert threads == 2 == torch.get_num_threads()
        assert (tmp_path / str(os.getpid())).read_text() == "fixed 2\n"
        with thread_share(None, folder=tmp_path) as inner:  # e.g. demo running a synthesis: one claim
            assert inner == 2
        assert rebalance_threads(every_s=0) == 2 == torch.get_num_threads()
    assert torch.get_num_threads() == 3
    assert list(tmp_path.iterdir()) == []
    assert rebalance_threads() is None


def test_rebalance_threads_looks_at_the_others_at_most_every_so_often(tmp_path, restore_threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("nca_tiles.runtime.threads.usable_cores", lambda: 8)
    with thread_share(None, folder=tmp_path) as threads:
        assert threads == 8
        proc, _ = _claim(tmp_path, 3)
        try:
            assert rebalance_threads(every_s=3600) == 8  # looked a moment ago
            assert rebalance_threads(every_s=0) == 5 == torch.get_num_threads()
        finally:
            proc.kill()
            proc.wait()


def test_omp_num_threads_caps_a_commands_default_but_not_threads(tmp_path, restore_threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr("nca_tiles.runtime.threads.usable_cores", lambda: 8)
    with thread_share(None, folder=tmp_path) as threads:
        assert threads == 1
    with thread_share(4, folder=tmp_path) as threads:
        assert threads == 4


def test_without_a_writable_claims_folder_the_count_is_still_set(tmp_path, restore_threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(3)
    with read_only_dir(tmp_path / "claims") as folder:
        with thread_share(1, folder=folder) as threads:
            assert threads == 1 == torch.get_num_threads()
            assert rebalance_threads(every_s=0) is None
    assert torch.get_num_threads() == 3


@pytest.mark.parametrize("threads", [0, 1025])
def test_thread_share_refuses_bad_counts_before_claiming(tmp_path, threads):
    with pytest.raises(NcaTilesError, match="--threads must be between 1 and 1024"):
        with thread_share(threads, folder=tmp_path):
            pass
    assert list(tmp_path.iterdir()) == []


def test_worker_counts_follow_the_affinity():
    # A process pinned to one core (taskset, a batch scheduler's cpuset) must not start a worker
    # per core of the machine: export threads and dask worker threads follow usable_cores().
    script = (
        "import os\n"
        "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
        "from nca_tiles.export.pyramid import default_workers\n"
        "from nca_tiles.synthesis.sweeps import dask_worker_threads\n"
        "print(default_workers(), dask_worker_threads(1), dask_worker_threads(2))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", "1", "1"]
