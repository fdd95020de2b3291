"""A real one-node Slurm cluster for tests: Debian's ``slurm-wlm`` and ``munge``, started
without systemd (the test machines run as root in a container).

Everything lives under one short temporary directory (Unix socket paths are limited to 108
bytes): its own munge key and ``munged`` socket, ``slurm.conf`` with free ports, state, spool
and logs, so several clusters (other sessions' test runs) can share a machine. ``slurmctld``
and ``slurmd`` run in the foreground as our children and are stopped by PID. Start-up takes
about 6 s; installing the packages with apt, once per machine, about 15 s.

Used through the session-scoped ``slurm_cluster`` fixture of ``tests/conftest.py``.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

PACKAGES = ("slurm-wlm", "munge")
COMMANDS = ("slurmctld", "slurmd", "munged", "sbatch", "scontrol", "scancel", "squeue", "sinfo")


class SlurmUnavailable(RuntimeError):
    """The packages are missing and cannot be installed here: the reason to skip."""


def ensure_installed(timeout: float = 600) -> None:
    """Install ``slurm-wlm`` and ``munge`` with apt unless their commands are present."""
    if all(shutil.which(c) or os.path.exists(f"/usr/sbin/{c}") for c in COMMANDS):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable("slurm-wlm/munge are not installed and cannot be installed "
                               "(needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y",
               "--no-install-recommends", *PACKAGES]
    proc = subprocess.run(install, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:  # stale or missing package lists: update once and retry
        subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=300", "update"],
                       capture_output=True, env=env, timeout=timeout)
        proc = subprocess.run(install, capture_output=True, text=True, env=env,
                              timeout=timeout)
    if proc.returncode != 0:
        raise SlurmUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: "
                               f"{proc.stderr.strip()[-500:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_hardware() -> str:
    """``CPUs=… Boards=… … RealMemory=…`` of this machine, from ``slurmd -C``."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    line = out.splitlines()[0]
    return re.sub(r"^NodeName=\S+\s*", "", line)


@dataclass
class SlurmCluster:
    """A running cluster; ``env`` points the client commands (and jobs) at it."""

    root: str
    env: dict[str, str]
    cpus: int
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, *cmd: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=kwargs.pop("env", self.env),
                              timeout=kwargs.pop("timeout", 60), **kwargs)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): "
                                 f"{proc.stdout}{proc.stderr}\n{self.logs()}")
        return proc

    def sbatch(self, *args: str, cwd: str, env: dict[str, str] | None = None) -> int:
        out = self.run("sbatch", "--parsable", *args, cwd=cwd, env={**self.env, **(env or {})})
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (``JobState``, ``Restarts``, ``ExitCode``, …)."""
        out = self.run("scontrol", "show", "job", "--oneliner", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_for(self, predicate, timeout: float, what: str, poll: float = 0.5,
                 details=lambda: ""):
        """Poll ``predicate`` until true; on timeout fail with ``details()`` (e.g. the job's
        log) and the daemons' logs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(poll)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n"
                             f"{details()}\n{self.logs()}")

    def logs(self, tail: int = 3000) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = os.path.join(self.root, "log", name)
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    parts.append(f"--- {name} (tail)\n{f.read()[-tail:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel every job of this cluster, then stop the daemons by PID."""
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            self.run("scancel", "--user", pwd.getpwuid(os.getuid()).pw_name, check=False)
            try:
                self.wait_for(lambda: not self.run("squeue", "-h", check=False).stdout.strip(),
                              30, "jobs to end")
            except AssertionError:
                pass
        for name in ("slurmd", "slurmctld", "munged"):  # reverse start order
            proc = self.processes.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def _start_munged(root: str) -> tuple[subprocess.Popen, str]:
    """Our own munged (own key and socket), run as the ``munge`` user as the package expects."""
    munge = pwd.getpwnam("munge")
    home = os.path.join(root, "munge")
    os.makedirs(home)
    os.chmod(home, 0o711)  # munged: clients must reach the socket; the key stays 0400
    key = os.path.join(home, "munge.key")
    with open(key, "wb") as f:
        f.write(os.urandom(1024))
    os.chmod(key, 0o400)
    for path in (home, key):
        os.chown(path, munge.pw_uid, munge.pw_gid)
    sock = os.path.join(home, "munge.socket")
    cmd = ["munged", "--foreground", f"--socket={sock}", f"--key-file={key}",
           f"--pid-file={home}/munged.pid", f"--log-file={home}/munged.log",
           f"--seed-file={home}/munged.seed"]
    stderr = os.path.join(root, "log", "munged.stderr")  # a file: a full pipe would block it
    with open(stderr, "w") as err:
        proc = subprocess.Popen(cmd, user=munge.pw_uid, group=munge.pw_gid,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
    deadline = time.monotonic() + 10
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"munged did not start: {open(stderr).read()[-2000:]}")
        time.sleep(0.05)
    return proc, sock


def _write_conf(root: str, munge_socket: str, hardware: str) -> str:
    """slurm.conf for one node. A requeued job waits ``cred_expire`` seconds (default 120)
    before it may start again, then for the next scheduling pass (``sched_interval``, default
    60 s): both are shortened so that a requeue test takes seconds."""
    user = pwd.getpwuid(os.getuid()).pw_name
    conf = f"""\
ClusterName=longctx{os.getpid()}
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
PlugStackConfig={root}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=10
InactiveLimit=0
NodeName=localhost NodeAddr=127.0.0.1 {hardware} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""
    path = os.path.join(root, "slurm.conf")
    with open(path, "w") as f:
        f.write(conf)
    open(os.path.join(root, "plugstack.conf"), "w").close()  # no SPANK plugins (pyxis)
    return path


def start_cluster(timeout: float = 60) -> SlurmCluster:
    """Install if needed, then start munged, slurmctld and slurmd; returns once the node is
    idle. Raises :class:`SlurmUnavailable` when the packages cannot be installed."""
    ensure_installed()
    root = tempfile.mkdtemp(prefix="longctx-slurm-")
    os.chmod(root, 0o711)  # the munge user reaches its socket directory inside
    for sub in ("state", "spool", "log"):
        os.makedirs(os.path.join(root, sub))
    hardware = _node_hardware()
    cpus = int(re.search(r"CPUs=(\d+)", hardware).group(1))
    cluster = SlurmCluster(root, env={}, cpus=cpus)
    try:
        cluster.processes["munged"], munge_socket = _start_munged(root)
        conf = _write_conf(root, munge_socket, hardware)
        cluster.env = {**os.environ, "SLURM_CONF": conf}
        for name, cmd in (("slurmctld", ["slurmctld", "-D", "-i"]),
                          ("slurmd", ["slurmd", "-D", "-N", "localhost"])):
            cluster.processes[name] = subprocess.Popen(
                cmd, env=cluster.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True)

        def node_idle() -> bool:
            for name, proc in cluster.processes.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode})\n{cluster.logs()}")
            out = cluster.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout
            return out.strip() == "idle"

        cluster.wait_for(node_idle, timeout, "the node to be idle", poll=0.2)
    except BaseException:
        cluster.stop()
        raise
    return cluster
