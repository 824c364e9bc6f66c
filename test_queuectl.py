"""Tests for queuectl: black-box through the real CLI (child processes run
with sys.executable) plus unit tests of pure functions.

Run: python3 test_queuectl.py   (or: make test)

Every test uses its own temporary home; every worker a test starts is
stopped by pid in cleanup; every wait has a timeout.
"""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import unittest

import queuectl

HERE = os.path.dirname(os.path.abspath(__file__))
PROG = os.path.join(HERE, "queuectl.py")
PY = sys.executable


# Helpers #####################################################################


class Result:
    def __init__(self, proc):
        self.code = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr

    def __repr__(self):
        return f"Result(code={self.code}, out={self.out!r}, err={self.err!r})"


class QueueTest(unittest.TestCase):
    """A test with its own temporary home; helpers to run the CLI."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="queuectl-test-")
        self.home = os.path.join(self.tmp, "home")
        self.work = os.path.join(self.tmp, "work")
        os.mkdir(self.work)
        self.env = dict(os.environ)
        self.env["QUEUECTL_HOME"] = self.home
        self.env.pop("QUEUECTL_DEBUG", None)
        self.env.pop("NO_COLOR", None)
        self.env["COLUMNS"] = "80"
        self.procs = []
        self.addCleanup(self._cleanup)

    def _cleanup(self):
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=10)
            for f in (p.stdout, p.stderr):
                if f:
                    f.close()
        # Jobs run in their own process groups: kill any left behind.
        for pgid in self._job_pgids():
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        subprocess.run(["rm", "-rf", self.tmp], check=False)

    def _job_pgids(self):
        db = os.path.join(self.home, "queue.db")
        if not os.path.exists(db):
            return []
        try:
            con = sqlite3.connect(db, timeout=5)
            rows = con.execute("SELECT pid FROM jobs WHERE pid IS NOT NULL").fetchall()
            con.close()
        except sqlite3.Error:
            return []
        return [r[0] for r in rows]

    def q(self, *args, input=None, timeout=30, env=None, cwd=None):
        """Run queuectl with args; a Result."""
        proc = subprocess.run([PY, PROG, *args], input=input, capture_output=True,
                              text=True, timeout=timeout, env=env or self.env,
                              cwd=cwd or self.work)
        return Result(proc)

    def ok(self, *args, **kw):
        """Run queuectl; assert exit 0 and an empty stderr; stdout."""
        r = self.q(*args, **kw)
        self.assertEqual(r.code, 0, r)
        return r.out

    def enqueue(self, *args, **kw):
        return self.ok("enqueue", *args, **kw).strip()

    def fails(self, code, *args, **kw):
        """Run queuectl; assert the exit code, one error line, no traceback."""
        r = self.q(*args, **kw)
        self.assertEqual(r.code, code, r)
        self.assertNotIn("Traceback", r.err)
        self.assertTrue(r.err.strip().splitlines()[-1].startswith("queuectl: error: "), r)
        return r

    def drain(self, *args, timeout=60):
        """worker start --drain; the Result."""
        return self.q("worker", "start", "--drain", *args, timeout=timeout)

    def start_worker(self, *args):
        """A background worker process, killed in cleanup."""
        p = subprocess.Popen([PY, PROG, "worker", "start", *args], env=self.env,
                             cwd=self.work, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        self.wait_for(lambda: self.live_workers() >= 1 or p.poll() is not None,
                      what="worker to start")
        return p

    def live_workers(self):
        out = self.q("worker", "status", "--json").out
        try:
            return len(json.loads(out))
        except ValueError:
            return 0

    def job(self, job_id):
        return json.loads(self.ok("show", job_id, "--json"))

    def state(self, job_id):
        return self.job(job_id)["state"]

    def wait_for(self, cond, timeout=20, what="condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            time.sleep(0.05)
        self.fail(f"timed out waiting for {what}")

    def wait_state(self, job_id, state, timeout=20):
        self.wait_for(lambda: self.state(job_id) == state, timeout,
                      f"{job_id} to be {state}")

    def db(self):
        con = sqlite3.connect(os.path.join(self.home, "queue.db"), timeout=10)
        self.addCleanup(con.close)
        return con

    def db_dump(self):
        """Everything in the db, to assert that a command changed nothing."""
        path = os.path.join(self.home, "queue.db")
        if not os.path.exists(path):
            return None
        con = sqlite3.connect(path, timeout=10)
        try:
            return list(con.iterdump())
        finally:
            con.close()

    def integrity_ok(self):
        con = self.db()
        self.assertEqual(con.execute("PRAGMA integrity_check").fetchone()[0], "ok")

    def set_fast_retries(self):
        self.ok("config", "set", "max_backoff", "0.01")

    def log(self, job_id):
        return self.ok("logs", job_id)

    def path(self, *parts):
        return os.path.join(self.work, *parts)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


# Runner ######################################################################


def run_all():
    """Run every test; close with 'N passed, N failed, N skipped'."""
    suite = unittest.defaultTestLoader.loadTestsFromModule(sys.modules[__name__])
    runner = unittest.TextTestRunner(verbosity=2 if "-v" in sys.argv else 1)
    result = runner.run(suite)
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    skipped = len(result.skipped)
    passed = result.testsRun - failed - skipped
    print(f"unittest: {passed} passed, {failed} failed, {skipped} skipped")
    return 0 if failed == 0 and result.testsRun > 0 else 1


if __name__ == "__main__":
    sys.exit(run_all())
