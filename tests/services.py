"""Real services for the tests, on loopback with their own data directories, stopped by PID:
redis-server and PostgreSQL (Debian's packages; .ci/run installs them)."""
import glob
import os
import shutil
import signal
import tempfile
import subprocess
import time

from bench.live_backend import REDIS, start_redis, stop_redis  # noqa: F401 (one launcher)


def _pg_bin():
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


PG_BIN = _pg_bin()


class Postgres:
    """A PostgreSQL server in ``root`` on 127.0.0.1:``port`` (trust auth, user ``ihp``, database
    ``ihp``). As root, the server runs as the ``postgres`` user (initdb refuses root)."""

    def __init__(self, port: int):
        # its own directory under /tmp: the postgres user cannot enter pytest's root-only tmp dirs
        self.root, self.port = tempfile.mkdtemp(prefix="ihp-pg-"), port
        self.data = os.path.join(self.root, "data")
        self.url = f"postgresql://ihp@127.0.0.1:{port}/ihp"
        self.pid = None

    def _as_owner(self, cmd):
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--"] + cmd
        return cmd

    def start(self) -> "Postgres":
        os.makedirs(self.root, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
        if not os.path.isdir(self.data):
            subprocess.run(self._as_owner([os.path.join(PG_BIN, "initdb"), "-D", self.data, "-A", "trust", "-U", "ihp",
                                           "--no-sync"]), check=True, capture_output=True)
        subprocess.run(self._as_owner([os.path.join(PG_BIN, "pg_ctl"), "-D", self.data, "-l",
                                       os.path.join(self.root, "log"), "-w", "-t", "30", "-o",
                                       f"-p {self.port} -h 127.0.0.1 -k {self.root} -c fsync=off "
                                       f"-c max_connections=200", "start"]), check=True, capture_output=True)
        with open(os.path.join(self.data, "postmaster.pid")) as f:
            self.pid = int(f.readline())
        import psycopg
        with psycopg.connect(self.url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as db:
            if not db.execute("SELECT 1 FROM pg_database WHERE datname='ihp'").fetchone():
                db.execute("CREATE DATABASE ihp")
        return self

    def stop(self, keep: bool = False) -> None:
        """Fast shutdown by PID (SIGINT to the postmaster), then wait for it to go; the data
        directory is removed unless ``keep`` (a restart)."""
        if self.pid is None:
            if not keep:
                shutil.rmtree(self.root, ignore_errors=True)
            return
        try:
            os.kill(self.pid, signal.SIGINT)
        except ProcessLookupError:
            self.pid = None
            return
        for _ in range(300):
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            os.kill(self.pid, signal.SIGKILL)
        self.pid = None
        if not keep:
            shutil.rmtree(self.root, ignore_errors=True)
