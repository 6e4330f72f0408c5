"""Shared pieces of the crash and soak harnesses: a private cluster, connections, results.

Each harness starts its own PostgreSQL cluster (the version scripts/test.sh runs) with scripts/common.sh (`start_cluster`),
so nothing it does (kill -9 included) can touch another cluster. Results are printed one per
line as `ok <check>` or `not ok <check>: <why>`; tests/crash/run.sh counts them.
"""

import fcntl
import os
import signal
import subprocess
import sys
import time

import psycopg

# The PostgreSQL major version under test (scripts/test.sh sets PGFLOW_PG; Debian layout).
PG_MAJOR = os.environ.get("PGFLOW_PG", "15")
LIBRARY = f"/usr/lib/postgresql/{PG_MAJOR}/lib/pgflow.so"
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PGBIN = f"/usr/lib/postgresql/{PG_MAJOR}/bin"


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Results:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, name, ok, why=""):
        if ok:
            self.passed += 1
            print(f"ok {name}", flush=True)
        else:
            self.failed += 1
            print(f"not ok {name}: {why}", flush=True)
        return ok

    def skip(self, name, why):
        print(f"skip {name}: {why}", flush=True)


def as_postgres(args):
    """Run a command as the postgres OS user (we may be root, or postgres already)."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--"] + args
    return args


class Cluster:
    def __init__(self, directory, port, dbname):
        self.dir = directory
        self.port = port
        self.dbname = dbname
        self.data = os.path.join(directory, "data")

    @property
    def dsn(self):
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={self.dbname} connect_timeout=5"

    def lock(self):
        """Hold DIR.lock for the life of this process: a second harness run on the same machine
        waits here instead of wiping the cluster of the first."""
        self._lock = open(self.dir.rstrip("/") + ".lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another run is using {self.dir}; waiting for it to finish")
            fcntl.flock(self._lock, fcntl.LOCK_EX)

    def library_changed(self):
        """Why a server may have crashed for reasons of its own: pgflow.so was reinstalled (by
        cargo pgrx install or cargo pgrx test, which write it in place) while it was mapped."""
        try:
            mtime = os.stat(LIBRARY).st_mtime
        except OSError:
            return f"{LIBRARY} is missing"
        if mtime != self.library_mtime:
            return (f"{LIBRARY} was replaced at {time.strftime('%H:%M:%S', time.localtime(mtime))} while the "
                    f"cluster ran (an install or a cargo pgrx test elsewhere); running servers may crash. Run again.")
        return None

    def log_tail(self, n=15):
        try:
            with open(os.path.join(self.dir, "server.log")) as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def start_fresh(self, extra_conf=""):
        self.lock()
        self.library_mtime = os.stat(LIBRARY).st_mtime
        cmd = f"source '{REPO}/scripts/common.sh' && start_cluster '{self.dir}' {self.port} '{self.dbname}'"
        subprocess.run(["bash", "-c", cmd], check=True)
        if extra_conf:
            conf = os.path.join(self.data, "postgresql.conf")
            with open(conf, "a") as f:
                f.write(extra_conf + "\n")
            self.restart_clean()
        with self.connect() as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pgflow")
            conn.execute("CREATE EXTENSION IF NOT EXISTS amcheck")

    def connect(self, autocommit=True):
        return psycopg.connect(self.dsn, autocommit=autocommit)

    def pg_ctl(self, *args):
        return subprocess.run(
            as_postgres([f"{PGBIN}/pg_ctl", "-D", self.data, "-l", os.path.join(self.dir, "server.log")] + list(args)),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def restart_clean(self):
        self.pg_ctl("-m", "fast", "-w", "stop")
        r = self.pg_ctl("-w", "-t", "120", "start")
        if r.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {r.stdout}")

    def postmaster_pid(self):
        with open(os.path.join(self.data, "postmaster.pid")) as f:
            return int(f.readline().strip())

    def kill9(self):
        """SIGKILL the postmaster and every one of its children at once, as a power cut would."""
        pid = self.postmaster_pid()
        kids = subprocess.run(["pgrep", "-P", str(pid)], stdout=subprocess.PIPE, text=True).stdout.split()
        for p in [pid] + [int(k) for k in kids]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.time() + 30
        for p in [pid] + [int(k) for k in kids]:
            while time.time() < deadline:
                try:
                    os.kill(p, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
        return pid, len(kids)

    def start_after_crash(self):
        t0 = time.time()
        r = self.pg_ctl("-w", "-t", "180", "start")
        if r.returncode != 0:
            raise RuntimeError(f"pg_ctl start after crash failed: {r.stdout}\n"
                               f"{self.library_changed() or ''}\nserver log:\n{self.log_tail()}")
        return time.time() - t0

    def stop(self):
        self.pg_ctl("-m", "fast", "-w", "stop")

    def amcheck(self):
        """pg_amcheck on the pgflow schema (heap and btree, with every index entry checked
        against the heap). Returns (ok, output)."""
        r = subprocess.run(
            [f"{PGBIN}/pg_amcheck", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
             "-d", self.dbname, "--schema=pgflow", "--heapallindexed", "--parent-check"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return r.returncode == 0 and r.stdout.strip() == "", r.stdout.strip()


def env_int(name, default):
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        sys.exit(f"{name} must be an integer")
