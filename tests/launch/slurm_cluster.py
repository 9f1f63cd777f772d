"""A real one-machine SLURM cluster for the launch tests (Debian's slurmctld/slurmd + munge).

Everything lives in one private folder: its own munged (own key and socket), a slurm.conf
on free ports (clients find it through ``SLURM_CONF``), state, spool, logs and pid files.
Daemons are stopped by the pids in their pid files, never by name, so a cluster that
someone else runs on the same machine is left alone.

Without accounting storage ``sacct`` fails, and submitit then never learns that a job
ended without a result (killed, cancelled). ``bin/sacct`` here is a stand-in answering
from ``squeue --states=all`` (finished jobs stay listed for ``MinJobAge``); its folder
goes first on the ``PATH`` of the tests and, through sbatch's exported environment, of
the jobs.

Usable from the command line too (``python -m tests.launch.slurm_cluster DIR``: start,
print the environment to use, wait for Enter, stop).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "munged", "mungekey")

SACCT_STAND_IN = """#!/bin/sh
# sacct stand-in for a cluster without accounting storage: the JobID|State|NodeList
# lines submitit asks for (sacct -o JobID,State,NodeList --parsable2 -j ID ...), read from
# squeue, which keeps finished jobs listed for MinJobAge seconds.
echo 'JobID|State|NodeList'
while [ $# -gt 0 ]; do
  case "$1" in
    -j|--jobs) shift; squeue -h -r --states=all -j "$1" -o '%i|%T|%N' 2>/dev/null ;;
    -j*) squeue -h -r --states=all -j "${1#-j}" -o '%i|%T|%N' 2>/dev/null ;;
  esac
  shift
done
exit 0
"""


class Unavailable(Exception):
    """SLURM cannot run here (not root, no apt, install failed): the reason, for a skip."""


def missing_binaries() -> list[str]:
    return [name for name in BINARIES if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]


def ensure_installed(timeout_s: float = 600) -> None:
    """Install the Debian packages if a binary is missing (needs root and apt-get)."""
    if not missing_binaries():
        return
    if os.geteuid() != 0:
        raise Unavailable(f"SLURM is not installed ({', '.join(missing_binaries())} missing) and installing "
                          "it needs root")
    if shutil.which("apt-get") is None:
        raise Unavailable(f"SLURM is not installed ({', '.join(missing_binaries())} missing) and there is no "
                          "apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"],
                    ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]):
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout_s)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise Unavailable(f"'{' '.join(command)}' failed: {' / '.join(tail)}")
    if missing_binaries():
        raise Unavailable(f"installed {', '.join(PACKAGES)} but {', '.join(missing_binaries())} still missing")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def poll(condition, deadline_s: float, what: str, interval_s: float = 0.2):
    """``condition()``'s first truthy value, checked every ``interval_s`` until ``deadline_s``."""
    deadline = time.monotonic() + deadline_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {deadline_s:.0f} s")
        time.sleep(interval_s)  # polling interval of a condition with a deadline


class LocalSlurm:
    """One node (this machine), one partition ``debug``; ``env`` is what clients need."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.munge_dir = self.root / "munge"
        self.socket = self.munge_dir / "munge.socket"
        self.conf = self.root / "slurm.conf"
        self.bin = self.root / "bin"
        self.pid_files = {name: self.root / f"{name}.pid" for name in ("slurmctld", "slurmd")}
        self.munged_pid_file = self.munge_dir / "munged.pid"
        self.started_s: float | None = None

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf), "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}"}

    def _run(self, *command: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                env={**os.environ, **self.env})
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    # -- start -----------------------------------------------------------------------

    def start(self, deadline_s: float = 90) -> None:
        begin = time.monotonic()
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # munged runs as the munge user and must reach its folder
        self._start_munged()
        self._write_conf()
        self._write_sacct()
        for daemon in ("slurmctld", "slurmd"):
            self._run(_sbin(daemon), "-f", str(self.conf))
            poll(lambda d=daemon: _read_pid(self.pid_files[d]), 30, f"{daemon} pid file")
        try:
            poll(self._node_idle, deadline_s, "node state 'idle'", 0.5)
        except TimeoutError as exc:
            raise RuntimeError(f"{exc}; slurmctld log:\n{self.log_tail('slurmctld')}\nslurmd log:\n"
                               f"{self.log_tail('slurmd')}") from None
        self.started_s = time.monotonic() - begin

    def _start_munged(self) -> None:
        munge = pwd.getpwnam("munge")
        self.munge_dir.mkdir(mode=0o700, exist_ok=True)
        os.chown(self.munge_dir, munge.pw_uid, munge.pw_gid)
        key = self.munge_dir / "munge.key"
        key.unlink(missing_ok=True)  # a fresh key for every start
        subprocess.run(["runuser", "-u", "munge", "--", _sbin("mungekey"), "--create", f"--keyfile={key}"],
                       check=True, capture_output=True, timeout=30)
        # the socket folder must be searchable by every job's user
        self.munge_dir.chmod(0o755)
        subprocess.run(["runuser", "-u", "munge", "--", _sbin("munged"), f"--socket={self.socket}",
                        f"--key-file={key}", f"--pid-file={self.munged_pid_file}",
                        f"--log-file={self.munge_dir / 'munged.log'}",
                        f"--seed-file={self.munge_dir / 'munged.seed'}"],
                       check=True, capture_output=True, text=True, timeout=30)
        poll(lambda: subprocess.run(f"munge -n -S {self.socket} | unmunge -S {self.socket}", shell=True,
                                     capture_output=True).returncode == 0, 20, "munged answering")

    def _node_line(self) -> str:
        line = self._run(_sbin("slurmd"), "-C").stdout.splitlines()[0]
        fields = dict(item.split("=", 1) for item in line.split())
        fields["RealMemory"] = str(max(256, int(int(fields.get("RealMemory", "1024")) * 0.8)))
        self.node = fields["NodeName"]
        fields["Features"] = "gppqtest"  # a node feature for launch.constraint to ask for
        return " ".join(f"{key}={value}" for key, value in fields.items()) + " NodeAddr=127.0.0.1 State=UNKNOWN"

    def _write_conf(self) -> None:
        node = self._node_line()
        for folder in ("state", "spool", "log"):
            (self.root / folder).mkdir(exist_ok=True)
        host = socket.gethostname().split(".")[0]
        lines = [
            "ClusterName=gppqtest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.socket},cred_expire=10",
            "MailProg=/bin/true",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none",
            "SchedulerParameters=bf_interval=2,sched_interval=2",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            "MinJobAge=3600",
            "KillWait=5",
            "InactiveLimit=0",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.pid_files['slurmctld']}",
            f"SlurmdPidFile={self.pid_files['slurmd']}",
            f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'log' / 'slurmd.log'}",
            node,
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _write_sacct(self) -> None:
        self.bin.mkdir(exist_ok=True)
        sacct = self.bin / "sacct"
        sacct.write_text(SACCT_STAND_IN)
        sacct.chmod(0o755)

    def _node_idle(self) -> bool:
        result = self._run("sinfo", "-h", "-N", "-o", "%t", check=False)
        return result.returncode == 0 and result.stdout.split() == ["idle"]

    # -- use -------------------------------------------------------------------------

    def log_tail(self, daemon: str, lines: int = 30) -> str:
        path = self.root / "log" / f"{daemon}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"

    def job_field(self, job_id: str, field: str) -> str | None:
        """One ``scontrol show job`` field (e.g. ``Restarts``, ``JobState``), None if unknown."""
        result = self._run("scontrol", "-o", "show", "job", job_id, check=False)
        for item in result.stdout.split():
            key, _, value = item.partition("=")
            if key == field:
                return value
        return None

    # -- stop ------------------------------------------------------------------------

    def stop(self, deadline_s: float = 30) -> None:
        """Cancel what is left, then stop slurmd, slurmctld and munged by their pids."""
        if self.pid_files["slurmctld"].exists():
            self._run("scancel", "--user", pwd.getpwuid(os.geteuid()).pw_name, check=False)
            try:
                poll(lambda: not self._run("squeue", "-h", "-t", "RUNNING,COMPLETING,PENDING,REQUEUED",
                                            check=False).stdout.strip(), deadline_s, "no job left", 0.5)
            except TimeoutError:
                pass  # stopping the daemons ends the rest
        for pid_file in (self.pid_files["slurmd"], self.pid_files["slurmctld"], self.munged_pid_file):
            pid = _read_pid(pid_file)
            if pid is None or not _alive(pid):
                continue
            os.kill(pid, signal.SIGTERM)
            try:
                poll(lambda p=pid: not _alive(p), deadline_s, f"pid {pid} ({pid_file.stem}) exiting")
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)


def make_root() -> Path:
    """A private folder under the system temp dir (the munge user must reach it)."""
    root = Path(tempfile.mkdtemp(prefix="gppq-slurm-"))
    root.chmod(0o755)
    return root


if __name__ == "__main__":
    import sys

    cluster = LocalSlurm(Path(sys.argv[1]) if len(sys.argv) > 1 else make_root())
    ensure_installed()
    cluster.start()
    print(f"up in {cluster.started_s:.1f} s; use:")
    for key, value in cluster.env.items():
        print(f"export {key}={value}")
    try:
        input("Enter stops it ")
    finally:
        cluster.stop()
