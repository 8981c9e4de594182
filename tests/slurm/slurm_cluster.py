"""A private one-node Slurm cluster (munge, MariaDB + slurmdbd, slurmctld, slurmd) for the tests.

Debian's ``slurmctld slurmd slurm-client munge slurmdbd mariadb-server`` packages, started without
systemd by the root user, every daemon on its own socket/port with all state in one scratch directory,
so two test sessions on one machine do not meet. Stopped by pid: jobs are cancelled first (a job alive
when slurmd stops survives as an orphaned ``slurmstepd``). Fast settings: a requeued job waits
``cred_expire + 1`` s, so ``cred_expire=10`` and a 2 s scheduler interval bring a requeue to ~12 s.

Run by hand (what ``tests/slurm/conftest.py`` does):

    python tests/slurm/slurm_cluster.py start /tmp/ssa-slurm   # prints `export SLURM_CONF=...`
    python tests/slurm/slurm_cluster.py stop /tmp/ssa-slurm
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

# The packages .ci/run installs; every binary below comes from one of them.
APT_PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge", "slurmdbd", "mariadb-server"]
BINARIES = ["munged", "mungekey", "slurmctld", "slurmd", "slurmdbd", "mariadbd", "mariadb-install-db",
            "mariadb", "sbatch", "srun", "scontrol", "squeue", "scancel", "sacct", "sacctmgr"]
CLUSTER_NAME = "ssatest"


def unavailable_reason() -> str | None:
    """Why a cluster cannot be started here, or None."""
    if sys.platform != "linux":
        return f"a local Slurm cluster needs Linux, not {sys.platform}"
    if os.geteuid() != 0:
        return "starting slurmd/munged needs root (run the suite as root, as CI does)"
    missing = [b for b in BINARIES if shutil.which(b, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None]
    if missing:
        return (f"Slurm packages are not installed (missing {' '.join(missing)}): "
                f"apt-get install --no-install-recommends {' '.join(APT_PACKAGES)} (.ci/run does)")
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "the munge user does not exist (the munge package's postinst creates it)"
    return None


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _which(name: str) -> str:
    path = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    assert path, name
    return path


def _wait_for(what: str, check, timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    raise RuntimeError(f"{what} did not come up within {timeout:.0f} s\n{tail}")


def _node_line() -> str:
    """``slurmd -C``'s node line with RealMemory lowered 10% (slurmd refuses a node that reports less)."""
    line = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    fields = dict(kv.split("=", 1) for kv in line.split())
    fields["RealMemory"] = str(int(int(fields["RealMemory"]) * 0.9))
    return " ".join(f"{k}={v}" for k, v in fields.items())


class SlurmCluster:
    """Start/stop the daemons under ``root``; ``env`` is what client commands (and jobs) need."""

    def __init__(self, root: str | os.PathLike, accounting: bool = True):
        self.root = Path(root)
        self.accounting = accounting
        self.conf = self.root / "etc" / "slurm.conf"
        self.logs = self.root / "log"
        self.hostname = socket.gethostname().split(".")[0]

    @property
    def env(self) -> dict:
        return {"SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> str:
        """A client command against this cluster; its stdout."""
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **self.env})
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    # --- start ------------------------------------------------------------------------------------------

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # munged (user munge) must reach its directory
        for d in ("etc", "log", "state", "spool", "run"):
            (self.root / d).mkdir(exist_ok=True)
        ctld_port, slurmd_port, dbd_port = _free_ports(3)
        self._start_munge()
        if self.accounting:
            self._start_mariadb()
        self._write_configs(ctld_port, slurmd_port, dbd_port)
        if self.accounting:
            self._daemon("slurmdbd", [_which("slurmdbd")], self.root / "run" / "slurmdbd.pid",
                         env={"MYSQL_UNIX_PORT": str(self.root / "mysql" / "mysql.sock")})
            _wait_for("slurmdbd", self._sacctmgr_ok, 30, self.logs / "slurmdbd.log")
            self.run("sacctmgr", "-i", "add", "cluster", CLUSTER_NAME)
        self._daemon("slurmctld", [_which("slurmctld"), "-f", str(self.conf)], self.root / "run" / "slurmctld.pid")
        self._daemon("slurmd", [_which("slurmd"), "-f", str(self.conf)], self.root / "run" / "slurmd.pid")
        _wait_for("the node", lambda: self.run("sinfo", "-h", "-N", "-o", "%t", check=False).strip() == "idle",
                  30, self.logs / "slurmctld.log")

    def _sacctmgr_ok(self) -> bool:
        proc = subprocess.run(["sacctmgr", "-n", "list", "cluster"], capture_output=True, text=True,
                              env={**os.environ, **self.env})
        return proc.returncode == 0

    def _start_munge(self) -> None:
        d = self.root / "munge"
        d.mkdir(exist_ok=True)
        key = d / "munge.key"
        subprocess.run([_which("mungekey"), "--create", "--force", f"--keyfile={key}"], check=True, capture_output=True)
        shutil.chown(d, "munge", "munge")
        shutil.chown(key, "munge", "munge")
        d.chmod(0o755)  # clients need execute permission on the socket's directory
        key.chmod(0o600)
        self.munge_socket = d / "munge.socket"
        pid_file = self.root / "run" / "munged.pid"
        # munged runs as user munge: its pid/log/seed files live in its own directory
        subprocess.run(["runuser", "-u", "munge", "--", _which("munged"), f"--socket={self.munge_socket}",
                        f"--key-file={key}", f"--pid-file={d / 'munged.pid'}", f"--log-file={d / 'munged.log'}",
                        f"--seed-file={d / 'munged.seed'}"], check=True, capture_output=True, close_fds=True)
        _wait_for("munged", lambda: (d / "munged.pid").exists() and self.munge_socket.exists(), 10, d / "munged.log")
        shutil.copy(d / "munged.pid", pid_file)

    def _start_mariadb(self) -> None:
        d = self.root / "mysql"
        data = d / "data"
        d.mkdir(exist_ok=True)
        subprocess.run([_which("mariadb-install-db"), f"--datadir={data}", "--user=root", "--skip-test-db",
                        "--auth-root-authentication-method=socket"], check=True, capture_output=True)
        sock = d / "mysql.sock"
        log = self.logs / "mariadb.log"
        subprocess.Popen([_which("mariadbd"), "--no-defaults", f"--datadir={data}", f"--socket={sock}",
                          "--skip-networking", f"--pid-file={self.root / 'run' / 'mariadbd.pid'}", f"--log-error={log}",
                          "--user=root", "--innodb-buffer-pool-size=16M", "--innodb-log-file-size=8M",
                          "--performance-schema=OFF"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, close_fds=True)
        _wait_for("mariadbd", lambda: subprocess.run([_which("mariadb"), f"--socket={sock}", "-e", "select 1"],
                                                     capture_output=True).returncode == 0, 60, log)

    def _write_configs(self, ctld_port: int, slurmd_port: int, dbd_port: int) -> None:
        r = self.root
        auth_info = f"AuthInfo=socket={self.munge_socket},cred_expire=10"
        accounting = (f"AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=localhost\n"
                      f"AccountingStoragePort={dbd_port}\n"
                      # the munge socket for connections to slurmdbd (AuthInfo's socket covers the rest)
                      f"AccountingStoragePass={self.munge_socket}\n" if self.accounting else
                      "AccountingStorageType=accounting_storage/none\n")
        self.conf.write_text(
            f"ClusterName={CLUSTER_NAME}\nSlurmctldHost={self.hostname}\nSlurmctldPort={ctld_port}\n"
            f"SlurmdPort={slurmd_port}\nSlurmUser=root\nSlurmdUser=root\n"
            f"AuthType=auth/munge\nCredType=cred/munge\n{auth_info}\n"
            f"StateSaveLocation={r / 'state'}\nSlurmdSpoolDir={r / 'spool'}\n"
            f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}\nSlurmdPidFile={r / 'run' / 'slurmd.pid'}\n"
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}\nSlurmdLogFile={r / 'log' / 'slurmd.log'}\n"
            "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nSelectType=select/cons_tres\n"
            "SelectTypeParameters=CR_Core\nMpiDefault=none\nReturnToService=2\nJobRequeue=1\n"
            "JobAcctGatherType=jobacct_gather/none\n" + accounting +
            "KillWait=5\nMailProg=/bin/true\nMinJobAge=600\n"
            "SchedulerParameters=sched_interval=2,bf_interval=2\n"
            f"{_node_line()} State=UNKNOWN\n"
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n"
        )
        if self.accounting:
            dbd = self.conf.parent / "slurmdbd.conf"  # slurmdbd finds it beside $SLURM_CONF
            dbd.write_text(
                f"AuthType=auth/munge\n{auth_info}\nDbdHost=localhost\nDbdPort={dbd_port}\nSlurmUser=root\n"
                f"PidFile={r / 'run' / 'slurmdbd.pid'}\nLogFile={r / 'log' / 'slurmdbd.log'}\n"
                "StorageType=accounting_storage/mysql\nStorageHost=localhost\nStorageUser=root\n"
                "StorageLoc=slurm_acct_db\n"
            )
            dbd.chmod(0o600)

    def _daemon(self, name: str, cmd: list[str], pid_file: Path, env: dict | None = None) -> None:
        # Each daemonizes and writes its pid file a few ms after returning.
        proc = subprocess.run(cmd, env={**os.environ, **self.env, **(env or {})}, capture_output=True, text=True,
                              close_fds=True, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} exited {proc.returncode}: {proc.stderr.strip()}")
        _wait_for(name, pid_file.exists, 10, self.logs / f"{name}.log")

    # --- stop -------------------------------------------------------------------------------------------

    def cancel_all_jobs(self, timeout: float = 60) -> None:
        if not self.conf.exists():
            return
        self.run("scancel", "--user", "root", check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.run("squeue", "-h", check=False).strip():
            time.sleep(0.5)

    def stop(self) -> None:
        """Cancel every job, then SIGTERM each daemon by its pid file (SIGKILL after 15 s)."""
        try:
            self.cancel_all_jobs()
        finally:
            for name in ("slurmd", "slurmctld", "slurmdbd", "mariadbd", "munged"):
                _stop_pid(self.root / "run" / f"{name}.pid")


def _stop_pid(pid_file: Path, timeout: float = 15) -> None:
    try:
        pid = int(pid_file.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pid_file.unlink(missing_ok=True)
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(pid):
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)


def _gone(pid: int) -> bool:
    """Exited (mariadbd is our child, not a daemon: reap it; a zombie counts as gone)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return True
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


# --- job helpers for the tests --------------------------------------------------------------------------

def wait_for_job(cluster: SlurmCluster, job_id: str, timeout: float) -> None:
    """Until the job (every array task) has left the queue, requeues included."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not cluster.run("squeue", "-h", "-j", job_id, check=False).strip():
            return
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} still queued after {timeout:.0f} s:\n{cluster.run('squeue', check=False)}")


def job_history(cluster: SlurmCluster, job_id: str, runs: int, timeout: float = 20) -> list[tuple[str, str]]:
    """(state, exit code) of each run of the job (requeues too, ``sacct --duplicates``) or of each array
    task, oldest first. slurmctld sends the records to slurmdbd asynchronously: waits for ``runs`` ended ones."""
    deadline = time.monotonic() + timeout
    while True:
        out = cluster.run("sacct", "-j", job_id, "-D", "-X", "-n", "-P", "-o", "State,ExitCode")
        history = [tuple(line.split("|")) for line in out.splitlines() if line.strip()]
        settled = not any(state in ("PENDING", "RUNNING", "COMPLETING", "SUSPENDED") for state, _ in history)
        if (len(history) >= runs and settled) or time.monotonic() > deadline:
            return history
        time.sleep(0.5)


def restart_count(cluster: SlurmCluster, job_id: str) -> int:
    out = cluster.run("scontrol", "show", "job", job_id)
    return int(out.split("Restarts=")[1].split()[0])


def wait_for_file(path: Path, timeout: float, job_id: str | None = None, cluster: SlurmCluster | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return
        if cluster is not None and job_id and not cluster.run("squeue", "-h", "-j", job_id, check=False).strip():
            raise RuntimeError(f"job {job_id} ended before {path} appeared")
        time.sleep(0.5)
    raise TimeoutError(f"{path} did not appear within {timeout:.0f} s")


if __name__ == "__main__":
    action, root = sys.argv[1], sys.argv[2]
    cluster = SlurmCluster(root)
    if action == "start":
        if (reason := unavailable_reason()) is not None:
            sys.exit(reason)
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}")
    else:
        cluster.stop()
