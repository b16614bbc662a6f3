"""The sandbox launcher: run as its own fresh process (`python -I -S launcher.py LIMITS_JSON PROGRAM`), it
isolates and limits, then executes one untrusted program. Standard library only: it imports nothing from
lmstack, so no threads or locks of the evaluator are copied into the child.

    launcher (own session and process group, started by lmstack.eval.sandbox)
      unshare: new network namespace (only a down loopback: no network), new PID namespace, new mount
        namespace where the program's private directory is /tmp (and /var/tmp, /dev/shm are empty)
      fork -> child = PID 1 of that namespace:
        dies with the launcher (PR_SET_PDEATHSIG), and when it dies the kernel kills every process
        left in the namespace (forks, daemons, process-group escapees)
        resource limits: address space, CPU seconds, file size, open files, no core dumps; as root,
        drops to the `nobody` user, where a process-count limit also holds
        exec python -I -B PROGRAM in its private temporary directory, with a minimal environment
      exit status: the child's (128 + signal when killed)

As root the namespaces need no setup; otherwise a user namespace is tried first. Where neither works the
program still runs with its limits, and the first line on stderr says which isolation was missing.
"""

import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
PR_SET_PDEATHSIG = 1
NOBODY = 65534


def _unshare(libc, flags):
    return libc.unshare(flags) == 0


def private_tmp(libc, workdir):
    """In a new mount namespace, the program's directory becomes /tmp, and /var/tmp and /dev/shm are empty
    tmpfs mounts: what it writes to a temporary location lands in its own directory. True when it worked."""
    mount = libc.mount
    mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    if mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:  # nothing propagates back to the host
        return False
    if mount(workdir.encode(), b"/tmp", None, MS_BIND, None) != 0:
        return False
    for target in (b"/var/tmp", b"/dev/shm"):
        if os.path.isdir(target):
            mount(b"tmpfs", target, b"tmpfs", 0, b"size=16m")
    return True


def isolate(libc, workdir):
    """Enter new network, PID and mount namespaces; returns what was achieved, e.g. 'netns+pidns+tmp'."""
    if _unshare(libc, CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWNS):
        return "netns+pidns" + ("+tmp" if private_tmp(libc, workdir) else "")
    uid, gid = os.getuid(), os.getgid()
    if _unshare(libc, CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWNS):
        try:  # map ourselves so files we create keep our uid
            with open("/proc/self/setgroups", "w") as f:
                f.write("deny")
            with open("/proc/self/uid_map", "w") as f:
                f.write(f"{uid} {uid} 1")
            with open("/proc/self/gid_map", "w") as f:
                f.write(f"{gid} {gid} 1")
        except OSError:
            pass
        return "userns+netns+pidns" + ("+tmp" if private_tmp(libc, workdir) else "")
    return "none"


def limit(limits, drop):
    memory = int(limits["memory_bytes"])
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    cpu = int(limits["cpu_seconds"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    size = int(limits["file_bytes"])
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if drop:  # root ignores RLIMIT_NPROC; the nobody user does not
        os.setgroups([])
        os.setgid(NOBODY)
        resource.setrlimit(resource.RLIMIT_NPROC, (int(limits["processes"]), int(limits["processes"])))
        os.setuid(NOBODY)


def main():
    limits, program = json.loads(sys.argv[1]), sys.argv[2]
    libc = ctypes.CDLL(None, use_errno=True)
    workdir = os.path.dirname(program)
    isolation = isolate(libc, workdir) if limits.get("isolate", True) else "off"
    if isolation.endswith("+tmp"):
        workdir, program = "/tmp", os.path.join("/tmp", os.path.basename(program))
    launcher = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if "pidns" not in isolation and os.getppid() != launcher:  # the launcher died before prctl
                os._exit(137)
            if isolation == "none":
                os.write(2, b"sandbox: no network/PID namespace available; running with resource limits only\n")
            limit(limits, drop=bool(limits.get("drop_privileges")))
            os.chdir(workdir)
            env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
                   "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
            os.execve(limits["python"], [limits["python"], "-I", "-B", program], env)
        except BaseException as e:  # never return into the launcher's code
            os.write(2, f"sandbox: could not start the program: {e}\n".encode())
            os._exit(126)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except ChildProcessError:
            status = 0
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        sys.exit(128 + os.WTERMSIG(status))
    sys.exit(os.WEXITSTATUS(status))


if __name__ == "__main__":
    main()
