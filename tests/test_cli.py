import errno
import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import click
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import assert_one_line_error, read_only_dir

from nca_tiles import __version__
from nca_tiles_cli.main import COMMANDS, cli


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_help_lists_every_command():
    result = CliRunner().invoke(cli, ["-h"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output


def test_help_does_not_import_heavy_modules():
    # --help must be instant: torch, zarr and dask are imported only inside command bodies.
    code = (
        "import sys; from nca_tiles_cli.main import cli\n"
        "try:\n    cli(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'zarr', 'dask', 'openslide', 'tifffile') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out, out
    assert time.perf_counter() - start < 5


# --- the safety net: the operating system's errors are one line, bugs stay visible -------------


def _run_raising(monkeypatch, exc: BaseException):
    @click.command()
    def boom():
        raise exc

    monkeypatch.setattr(cli, "get_command", lambda ctx, name: boom)
    return CliRunner().invoke(cli, ["boom"])


@pytest.mark.parametrize(
    "exc, fragments",
    [
        (PermissionError(errno.EACCES, "Permission denied", "/data/out.zarr"),
         ["Permission denied: /data/out.zarr", "check the permissions"]),
        (OSError(errno.ENOSPC, "No space left on device"), ["No space left on device", "free some space"]),
        (OSError(errno.EROFS, "Read-only file system", "/mnt/x"), ["Read-only file system: /mnt/x", "writable disk"]),
        (OSError(errno.EIO, "Input/output error", "/slides/a.svs"),
         ["Input/output error: /slides/a.svs", "check the disk"]),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "a\nb"), ["No such file or directory: a b"]),
    ],
    ids=["permission", "disk-full", "read-only", "io", "newline-in-name"],
)
def test_os_errors_are_one_line_with_what_to_do(monkeypatch, exc, fragments):
    result = _run_raising(monkeypatch, exc)
    assert result.exit_code == 1
    assert_one_line_error(result, *fragments)


def test_bugs_keep_their_traceback(monkeypatch):
    result = _run_raising(monkeypatch, ZeroDivisionError("a bug"))
    assert isinstance(result.exception, ZeroDivisionError)  # not turned into a user error


def test_a_full_disk_is_one_line(tmp_path, sample_slide):
    """A real ENOSPC: a 64 KiB tmpfs, too small for the patch store (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    full = tmp_path / "full"
    full.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        args = ["extract-patches", str(sample_slide), "--out", str(full / "p.zarr"), "--mpp", "2"]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1
        assert_one_line_error(result, "No space left on device", "free some space")
        assert os.listdir(full) == []  # the partial store is gone
    finally:
        subprocess.run(["umount", str(full)], check=True)


# --- Ctrl-C --------------------------------------------------------------------------------------


def test_interrupted_message_starts_its_own_line_after_a_progress_bar(monkeypatch):
    from tqdm import tqdm

    @click.command()
    def slow():
        bar = tqdm(total=10, disable=False)  # left drawn, as a loop interrupted midway leaves it
        bar.update(3)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "get_command", lambda ctx, name: slow)
    result = CliRunner().invoke(cli, ["slow"])
    assert result.exit_code == 130
    lines = result.stderr.replace("\r", "\n").splitlines()
    assert lines[-1] == "Interrupted: no output was written; run the command again.", result.stderr
    assert "3/10" in result.stderr  # the bar is still there, above the message


def test_error_after_a_progress_bar_starts_its_own_line(monkeypatch):
    from tqdm import tqdm

    from nca_tiles.errors import NcaTilesError

    @click.command()
    def failing():
        bar = tqdm(total=10, disable=False)
        bar.update(3)
        raise NcaTilesError("slide.svs is truncated")

    monkeypatch.setattr(cli, "get_command", lambda ctx, name: failing)
    result = CliRunner().invoke(cli, ["failing"])
    assert result.exit_code == 1
    assert result.stderr.replace("\r", "\n").splitlines()[-1] == "Error: slide.svs is truncated", result.stderr


SLOW_COMMAND = """
import sys, time
import click
from tqdm import tqdm
from nca_tiles_cli.main import cli

@click.command()
def slow():
    bar = tqdm(total=100, disable=None)  # drawn on a terminal only, as the commands' bars
    bar.update(3)
    time.sleep(60)

cli.get_command = lambda ctx, name: slow
cli(["slow"])
"""


def test_ctrl_c_on_a_terminal():
    """A real SIGINT to a process on a pseudo-terminal: the message is on a line of its own."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal's width
    # SIGINT as a terminal's process has it: a suite started in the background of a script (`&`)
    # runs with SIGINT ignored, which its children would inherit, and Python then never raises
    # KeyboardInterrupt.
    proc = subprocess.Popen([sys.executable, "-c", SLOW_COMMAND], stdin=slave, stdout=slave, stderr=slave,
                            close_fds=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    os.close(slave)
    output = b""
    try:
        deadline = time.time() + 60
        while b"0/100" not in output and time.time() < deadline:  # the bar is drawn
            output += os.read(master, 4096)
        time.sleep(0.2)  # in the command's work, as a person's Ctrl-C
        proc.send_signal(signal.SIGINT)
        # Read while waiting: a child whose terminal is not read blocks on its next write (a full
        # pseudo-terminal buffer) and never exits.
        deadline = time.time() + 30
        while time.time() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the other side is closed
                    chunk = b""
                output += chunk
                if not chunk and proc.poll() is not None:
                    break
            elif proc.poll() is not None:
                break
        assert proc.wait(timeout=1) == 130, output
    finally:
        proc.kill()
        os.close(master)
    text = output.decode()
    assert "Interrupted: " in text, text
    line = next(line for line in text.replace("\r", "\n").split("\n") if "Interrupted" in line)
    assert line.startswith("Interrupted: "), text
    assert "3/100" in text  # the bar's last state stays on screen, above the message


def test_demo_refuses_a_read_only_out_before_any_work(tmp_path):
    with read_only_dir(tmp_path / "ro") as ro:
        start = time.perf_counter()
        result = CliRunner().invoke(cli, ["demo", "--out", str(ro / "demo")])
        assert_one_line_error(result, f"cannot write --out {ro / 'demo'}", "choose another location")
        assert time.perf_counter() - start < 30  # refused, not after minutes of synthesis
        assert list(ro.iterdir()) == []


# --- truncated and corrupt slides, through a real process: one line on stderr, nothing else ------


@pytest.fixture(scope="module")
def damaged_slides(tmp_path_factory, sample_slide):
    from helpers import corrupt_fine_levels, truncated_copy, write_ome_pyramid

    folder = tmp_path_factory.mktemp("damaged")
    tiles = folder / "tiles.ome.tif"
    image = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    write_ome_pyramid(tiles, image, 0.5, compression="jpeg")
    corrupt_fine_levels(tiles, 3)
    # At 99 % tifffile logged "<tifffile.TiffPages @…> invalid page offset" before the error;
    # at 30 % its first directory is gone ("IndexError: list index out of range").
    return {"svs-99": truncated_copy(sample_slide, folder / "cut99.svs", 0.99),
            "svs-30": truncated_copy(sample_slide, folder / "cut30.svs", 0.3),
            "garbage-tiles": tiles}


DAMAGED_CASES = [
    (command, case)
    for command in ("info", "preview", "extract-patches")
    for case in ("svs-99", "svs-30", "garbage-tiles")
    if (command, case) != ("info", "garbage-tiles")  # info reads no pixels: intact directories describe fine
]


@pytest.mark.parametrize("command, case", DAMAGED_CASES)
def test_damaged_slide_is_one_line_from_a_real_process(damaged_slides, tmp_path, command, case):
    path = damaged_slides[case]
    args = {"info": [], "preview": ["--out", tmp_path / "t.png"], "extract-patches": ["--out", tmp_path / "p.zarr"]}
    proc = subprocess.run([sys.executable, "-m", "nca_tiles_cli.main", command, path, *map(str, args[command])],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    assert f"{path.name}: " in lines[0] and "truncated or corrupt; copy it again from its source" in lines[0]
    assert os.listdir(tmp_path) == []
