"""Run untrusted programs (model-written code) one per process, isolated and limited.

Each program gets: its own private temporary directory (its working directory, removed afterwards), a
wall-clock time limit (the whole process group is SIGKILLed on overrun, and with it every process in its
PID namespace, however it forked), an address-space limit, a CPU-seconds limit, a file-size limit, no
network (a fresh network namespace has only a down loopback), and, when lmstack runs as root, the
unprivileged `nobody` user with a process-count limit. See `lmstack/eval/launcher.py` for the child side.

This is containment for buggy or runaway code (infinite loops, fork bombs, memory hogs, stray deletes,
network calls), not a security boundary against an attacker: the program can still read the files
`nobody` may read.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

_LAUNCHER = Path(__file__).with_name("launcher.py")


@dataclass
class Limits:
    timeout_s: float = 10.0  # wall clock, from start to the kill
    memory_bytes: int = 1 << 30  # address space
    cpu_seconds: int = 20
    file_bytes: int = 16 << 20  # largest file it may write
    processes: int = 64  # as root (run as nobody): processes that user may have
    isolate: bool = True  # network + PID namespaces


@dataclass
class RunResult:
    status: str  # "passed" | "failed" | "timeout"
    returncode: int | None
    seconds: float
    stdout: str
    stderr: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_program(source: str, limits: Limits | None = None) -> RunResult:
    """Run `source` as a Python program in the sandbox: "passed" when it exits 0 within the time limit."""
    limits = limits or Limits()
    python, drop = interpreter()
    workdir = Path(tempfile.mkdtemp(prefix="lmstack-sandbox-"))
    try:
        if drop:
            os.chown(workdir, 65534, 65534)  # the program runs as nobody and may write only here
        program = workdir / "program.py"
        program.write_text(source, encoding="utf-8")
        program.chmod(0o644)
        settings = {"memory_bytes": limits.memory_bytes, "cpu_seconds": limits.cpu_seconds,
                    "file_bytes": limits.file_bytes, "processes": limits.processes, "isolate": limits.isolate,
                    "python": python, "drop_privileges": drop}
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-I", "-S", str(_LAUNCHER), json.dumps(settings), str(program)],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   start_new_session=True, cwd=workdir)
        try:
            stdout, stderr = process.communicate(timeout=limits.timeout_s)
            status = "passed" if process.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            _kill_group(process)
            stdout, stderr = process.communicate()
            status = "timeout"
        return RunResult(status, process.returncode, time.perf_counter() - started,
                         stdout.decode("utf-8", "replace")[-2000:], stderr.decode("utf-8", "replace")[-2000:])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _world_executable(path: str) -> bool:
    """Whether a user with no rights of its own (nobody) can run `path`: o+x on the file and every folder above."""
    path = os.path.realpath(path)
    parts = Path(path).parents
    return all(os.stat(p).st_mode & 0o001 for p in [path, *map(str, parts)] if os.path.exists(p))


def interpreter() -> tuple[str, bool]:
    """(the Python that runs programs, whether it runs them as nobody). As root: this interpreter if nobody may
    run it, else the system's python3; root remains only when neither is runnable by nobody."""
    own = os.path.realpath(sys.executable)
    if os.geteuid() != 0:
        return own, False
    for candidate in (own, shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")):
        if candidate and _world_executable(candidate):
            return os.path.realpath(candidate), True
    return own, False


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group; the namespace's init dies with the launcher, and with it the rest."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_programs(sources: list[str], limits: Limits | None = None, workers: int | None = None) -> list[RunResult]:
    """Run many programs, `workers` at a time (default: the CPU count), results in input order."""
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda s: run_program(s, limits), sources))


__all__ = ["Limits", "RunResult", "run_program", "run_programs"]
