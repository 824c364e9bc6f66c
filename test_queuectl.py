"""Tests for queuectl: black-box through the real CLI (child processes run
with sys.executable) plus unit tests of pure functions.

Run: python3 test_queuectl.py   (or: make test)

Every test uses its own temporary home; every worker a test starts is
stopped by pid in cleanup; every wait has a timeout.

Fault points. A worker started with QUEUECTL_FAULT set stops or fails at a
named point, so that a freeze or an odd error hits exactly the window a test
is about (no sleep that hopes to). Only tests arm them.

    QUEUECTL_FAULT="POINT:ACTION[@JOB][*N]"   (comma-separated for several)

fires when the worker reaches POINT (for job JOB only, if given), N times per
process (default once). Points, in the order a job meets them:

    after-claim    its claim is committed; before the log header and spawn
    before-spawn   just before the job's shell is spawned
    after-spawn    the shell is spawned; before its pid is recorded
    before-record  the job ended and was reaped; before its outcome is written
    record         each try of the outcome's transaction (use fail*N)

and two of recovery (a job adopted from a dead worker, or handed to it):

    read-status    it reads a job's status file to learn how an adopted or
                   ended attempt ended (fail: the read says "cannot read it
                   now", as EMFILE would)
    adopt-store    just before a thread that watches an adopted job, records
                   a recovered outcome or hands a job to recovery opens its
                   own database connection (fail: that open fails)

and one of a worker's main thread:

    fire           it is about to fire due schedule slots (before its transaction)

and one of `wait` (not a worker's):

    wait-began     wait has taken stock of the jobs it waits for

Actions: stop (SIGSTOP to the worker: frozen, all threads, until SIGCONT),
kill (SIGKILL), raise (an unexpected exception: a bug), fail (a database
error such as a full disk or EIO).
"""

import errno

import json

import os
import re

import resource

import signal

import sqlite3

import subprocess

import sys

import tempfile

import threading

import time

import unittest

import uuid

import queuectl


# Helpers #####################################################################

HERE = os.path.dirname(os.path.abspath(__file__))

PROG = os.path.join(HERE, "queuectl.py")

PY = sys.executable

# How the tests run queuectl: from its cached bytecode, as ./queuectl.py and
# the installed command do. `python3 queuectl.py` compiles the whole file at
# every start (50 ms of CPU), which the suite would pay thousands of times;
# test_the_script_form_runs_too keeps that form covered. -S: without the
# site hooks some machines install (a .pth that adds 20-50 ms to each start;
# queuectl imports nothing from site-packages); tests that run queuectl as
# users do (./queuectl.py, make install) keep the interpreter's site.
QUEUECTL = [PY, "-S", "-c", "import sys; sys.path.insert(0, sys.argv.pop(1)); import queuectl; "
            "sys.exit(queuectl.main())", HERE]

def _compile_queuectl():
    """Write queuectl's cached bytecode once, even where
    PYTHONDONTWRITEBYTECODE is set (some CI images set it): it stops only
    the writing, so every child then reads the cache instead of compiling
    400 KB of source (60 ms of CPU) at each of its thousands of starts."""
    import importlib.util
    import py_compile
    try:
        py_compile.compile(PROG, cfile=importlib.util.cache_from_source(PROG), doraise=True)
    except (OSError, py_compile.PyCompileError):
        pass                             # a read-only checkout: children compile

_compile_queuectl()

class Result:
    def __init__(self, proc):
        self.code = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr

    def __repr__(self):
        return f"Result(code={self.code}, out={self.out!r}, err={self.err!r})"

def parse_exposition(text):
    """Parse the Prometheus text exposition format (version 0.0.4) strictly,
    by the rules of its specification
    (https://prometheus.io/docs/instrumenting/exposition_formats/):

    - lines end with \\n; `# HELP name text` and `# TYPE name type` are the
      only comments that mean something, at most one of each per metric,
      and TYPE comes before the metric's first sample;
    - a sample is `name{label="value",...} value [timestamp]`, names match
      [a-zA-Z_:][a-zA-Z0-9_:]*, label names [a-zA-Z_][a-zA-Z0-9_]* (never
      starting with __), label values escape only \\\\, \\" and \\n;
    - all samples of one metric form one group; a histogram named X has
      only X_bucket (with an le label), X_sum and X_count samples, its
      buckets cumulative (non-decreasing in le), an le="+Inf" bucket equal
      to X_count, for each set of other labels;
    - the same name and label set never appears twice.

    Returns {family: (type, [(sample name, {labels}, value)])}; raises
    AssertionError naming the line that breaks a rule."""
    import re
    name_re = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
    label_re = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')
    assert text.endswith("\n"), "the output must end with a newline"
    families, order, seen, current = {}, [], set(), None
    for n, line in enumerate(text[:-1].split("\n"), 1):
        where = f"line {n}: {line!r}"
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                assert name_re.fullmatch(parts[2]), where
                fam = families.setdefault(parts[2], {"type": None, "help": None,
                                                     "samples": []})
                key = parts[1].lower()
                assert fam[key] is None, f"{where}: a second {parts[1]}"
                if key == "type":
                    assert len(parts) == 4 and parts[3] in (
                        "counter", "gauge", "histogram", "summary", "untyped"), where
                    assert not fam["samples"], f"{where}: TYPE after samples"
                    fam["type"] = parts[3]
                else:
                    fam["help"] = parts[3] if len(parts) == 4 else ""
                    assert "\\" not in fam["help"].replace("\\\\", "").replace("\\n", ""), where
            continue
        assert line.strip(), f"{where}: an empty line"
        m = name_re.match(line)
        assert m, where
        name, rest = m.group(), line[m.end():]
        labels = {}
        if rest.startswith("{"):
            end = rest.index("}")
            body, rest = rest[1:end], rest[end + 1:]
            pos = 0
            while pos < len(body):
                lm = label_re.match(body, pos)
                assert lm, f"{where}: bad label at {body[pos:]!r}"
                lname = lm.group(1)
                assert not lname.startswith("__") and lname not in labels, where
                labels[lname] = re.sub(r"\\(.)", lambda e: {"n": "\n"}.get(e.group(1),
                                                                          e.group(1)),
                                       lm.group(2))
                pos = lm.end()
                if pos < len(body):
                    assert body[pos] == ",", where
                    pos += 1
        fields = rest.split(" ")
        assert fields[0] == "" and len(fields) in (2, 3), where
        value = float(fields[1])             # also +Inf, -Inf, NaN
        fam_name = name
        for suffix in ("_bucket", "_sum", "_count"):
            base = name[:-len(suffix)]
            if name.endswith(suffix) and families.get(base, {}).get("type") == "histogram":
                fam_name = base
        fam = families.setdefault(fam_name, {"type": None, "help": None, "samples": []})
        if fam_name != current:
            assert fam_name not in order, f"{where}: {fam_name}'s samples are split"
            order.append(fam_name)
            current = fam_name
        key = (name, tuple(sorted(labels.items())))
        assert key not in seen, f"{where}: a duplicate sample"
        seen.add(key)
        if fam["type"] == "histogram":
            assert name != fam_name, f"{where}: a histogram sample needs a suffix"
            assert (name.endswith("_bucket")) == ("le" in labels), where
        fam["samples"].append((name, labels, value))
    for fam_name, fam in families.items():
        if fam["type"] != "histogram":
            continue
        groups = {}
        for name, labels, value in fam["samples"]:
            other = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
            groups.setdefault(other, {"buckets": [], "count": None, "sum": None})
            g = groups[other]
            if name.endswith("_bucket"):
                g["buckets"].append((float(labels["le"]), value))
            else:
                g[name.rsplit("_", 1)[1]] = value
        for other, g in groups.items():
            bounds = [b for b, _ in g["buckets"]]
            assert bounds == sorted(bounds) and bounds[-1] == float("inf"), (fam_name, other)
            counts = [c for _, c in g["buckets"]]
            assert counts == sorted(counts), f"{fam_name} {other}: buckets not cumulative"
            assert g["count"] == counts[-1] and g["sum"] is not None, (fam_name, other)
    return {k: (v["type"], v["samples"]) for k, v in families.items()}

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
        proc = subprocess.run([*QUEUECTL, *args], input=input, capture_output=True,
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

    def drained(self, code, *args):
        """worker start --drain ARGS, which must exit with code (a failure
        shows what the worker printed); the Result."""
        r = self.drain(*args)
        self.assertEqual(r.code, code, f"worker start --drain exited {r.code}, not "
                         f"{code}; it printed:\n{r.out}{r.err}")
        return r

    def start_worker(self, *args):
        """A background worker process, killed in cleanup."""
        p = subprocess.Popen([*QUEUECTL, "worker", "start", *args], env=self.env,
                             cwd=self.work, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        self.wait_for(lambda: self.live_workers() >= 1 or p.poll() is not None,
                      what="worker to start")
        return p

    def worker_output(self, w):
        """What a start_worker() process has printed so far."""
        # The worker's stdout is a pipe; read what is there without blocking,
        # from the descriptor itself (a buffered readline could keep a line
        # in its buffer where select() cannot see it).
        import select
        buf = getattr(w, "_seen", b"")
        fd = w.stdout.fileno()
        while select.select([fd], [], [], 0)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
        w._seen = buf
        return buf.decode("utf-8", "replace")

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

    def lines(self, name):
        """Words of a file a job wrote in self.work ([] if there is none)."""
        try:
            with open(self.path(name)) as f:
                return f.read().split()
        except FileNotFoundError:
            return []

    # Jobs that record what they did in files of self.work ------------------

    def order(self):
        return self.lines("order.txt")

    def error_line(self, r):
        return r.err.strip().splitlines()[-1]

    def drain_in_processes(self, n, threads):
        """n worker processes of threads each, --drain; each must exit 0."""
        procs = [subprocess.Popen([*QUEUECTL, "worker", "start", "--count", str(threads),
                                   "--drain"], env=self.env, cwd=self.work,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True) for _ in range(n)]
        self.procs.extend(procs)
        for p in procs:
            self.assertEqual(p.wait(timeout=90), 0, p.stderr.read())

    def drain_within(self, seconds, *args):
        """worker start --drain that must exit within seconds; the Result."""
        try:
            return self.drain(*args, timeout=seconds)
        except subprocess.TimeoutExpired:
            self.fail(f"worker start --drain {' '.join(args)} still running "
                      f"after {seconds}s")

    # Running jobs: their pids and the files they write -----------------------

    def kill_worker_running(self, job_id):
        """Start a worker, wait until it runs job_id, SIGKILL the worker (its
        job, in a session of its own, runs on)."""
        a = self.start_worker()
        self.wait_running(job_id)
        os.kill(a.pid, signal.SIGKILL)
        a.wait(timeout=10)

    def job_pid(self, job_id):
        row = self.db().execute("SELECT pid FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row[0] if row else None

    def wait_running(self, job_id, timeout=20):
        self.wait_for(lambda: self.state(job_id) == "processing" and self.job_pid(job_id),
                      timeout, f"{job_id} to run")
        return self.job_pid(job_id)

    def read_pid(self, name, timeout=10):
        self.wait_for(lambda: "".join(self.lines(name)), timeout, f"{name} to be written")
        return int(self.lines(name)[0])

    # Fault points: workers armed with faults, their output, other homes -----

    def fault_env(self, spec, env=None):
        return dict(env or self.env, QUEUECTL_FAULT=spec)

    def run_q(self, *args, env=None, timeout=30, **kw):
        """self.q that fails the test (not errors it) on a timeout."""
        try:
            return self.q(*args, env=env, timeout=timeout, **kw)
        except subprocess.TimeoutExpired:
            self.fail(f"queuectl {' '.join(args)} still running after {timeout}s")

    def drain_env(self, env=None, timeout=20, *args):
        return self.run_q("worker", "start", "--drain", *args, env=env, timeout=timeout)

    def spawn_worker(self, *args, env=None):
        """A background `worker start ARGS` whose output is collected by a
        thread (self.output(p)); killed by pid in cleanup."""
        p = subprocess.Popen([*QUEUECTL, "worker", "start", *args], env=env or self.env,
                             cwd=self.work, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        self.procs.append(p)
        p.seen = []

        def read():
            try:
                for line in p.stdout:
                    p.seen.append(line)
            except (OSError, ValueError):
                pass
        threading.Thread(target=read, daemon=True).start()
        return p

    def output(self, p):
        return "".join(p.seen)

    def wait_listed(self, p, env=None):
        """Wait until worker p is in `worker status --json`; its entry."""
        found = []

        def listed():
            r = self.q("worker", "status", "--json", env=env)
            try:
                found[:] = [w for w in json.loads(r.out) if w["pid"] == p.pid]
            except ValueError:
                return False
            return bool(found) or p.poll() is not None
        self.wait_for(listed, what="the worker to be listed")
        self.assertIsNone(p.poll(), self.output(p))
        return found[0]

    def q_tty(self, *args, answer="", env=None):
        """Run queuectl with a terminal as stdin (answer typed into it); its
        stdout and stderr are pipes. A Result."""
        master, slave = os.openpty()
        try:
            p = subprocess.Popen([*QUEUECTL, *args], stdin=slave, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, env=env or self.env,
                                 cwd=self.work, text=True)
            self.procs.append(p)
            if answer:
                os.write(master, answer.encode())
            out, err = p.communicate(timeout=30)
        finally:
            os.close(slave)
            os.close(master)
        p.stdout = p.stderr = None
        return Result(subprocess.CompletedProcess(p.args, p.returncode, out, err))

    def on_pty(self, *args, streams=("stderr",), input=None, timeout=60):
        """Run queuectl with streams (stdout, stderr) on a terminal, read as
        it writes (a full terminal would block it); (exit code, what went to
        the pipes, what the terminal showed with \\r\\n as \\n)."""
        import threading
        master, slave = os.openpty()
        chunks = []

        def read():
            while True:
                try:
                    chunk = os.read(master, 65536)
                except OSError:              # EIO: the other side is closed
                    return
                if not chunk:
                    return
                chunks.append(chunk)
        t = threading.Thread(target=read, daemon=True)
        t.start()
        try:
            p = subprocess.Popen(
                [*QUEUECTL, *args], env=self.env, cwd=self.work, text=True,
                stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                stdout=slave if "stdout" in streams else subprocess.PIPE,
                stderr=slave if "stderr" in streams else subprocess.PIPE)
            self.procs.append(p)
            os.close(slave)
            slave = None
            out, err = p.communicate(input, timeout=timeout)
            t.join(10)
        finally:
            if slave is not None:
                os.close(slave)
            os.close(master)
        return p.returncode, (out or "") + (err or ""), \
            b"".join(chunks).decode().replace("\r\n", "\n")

    def nobody(self):
        """The passwd entry of the unprivileged user nobody (else skip)."""
        import pwd
        try:
            return pwd.getpwnam("nobody")
        except KeyError:
            self.skipTest("no user nobody")

    def show_env(self, job_id):
        """The environment `show --env --json` gives for a job."""
        return self.show(job_id, "--env")["environment"]

    def show(self, job_id, *args, env=None):
        r = self.q("show", job_id, "--json", *args, env=env)
        self.assertEqual(r.code, 0, r)
        return json.loads(r.out)

    def cont_in_cleanup(self, p):
        self.addCleanup(lambda: p.poll() is None and os.kill(p.pid, signal.SIGCONT))

    def touch(self, name):
        with open(self.path(name), "w"):
            pass

    def mount_tmpfs(self, path, size):
        """A small tmpfs at path (root only: skips the test otherwise),
        unmounted in cleanup after every process of the test is stopped."""
        os.makedirs(path, mode=0o700, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700",
                            "tmpfs", path], capture_output=True, text=True, timeout=10)
        if r.returncode != 0:
            self.skipTest(f"mount failed: {r.stderr}")
        self.addCleanup(self._stop_and_umount, path)
        return path

    def fill(self, path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            size = 1 << 16
            while size:
                try:
                    if os.write(fd, b"\0" * size) == 0:
                        size //= 2
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    size //= 2
        finally:
            os.close(fd)

    def _stop_and_umount(self, mnt):
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGCONT)
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=10)
        for pgid in self._job_pgids():
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for _ in range(50):
            if subprocess.run(["umount", mnt], capture_output=True,
                              timeout=10).returncode == 0:
                return
            time.sleep(0.1)
        subprocess.run(["umount", "-l", mnt], capture_output=True, timeout=10)

    # Frozen workers: output in files, freezing, ageing, gated jobs ----------

    def bg(self, *args, fault=None):
        """A background `worker start ARGS` (QUEUECTL_FAULT=fault if given);
        its stdout/stderr go to files (read with out()/err()). Returns once
        its workers row exists (or it has exited or stopped)."""
        env = dict(self.env)
        if fault:
            env["QUEUECTL_FAULT"] = fault
        n = len(self.procs)
        outpath = os.path.join(self.tmp, f"worker{n}.out")
        errpath = os.path.join(self.tmp, f"worker{n}.err")
        with open(outpath, "w") as out, open(errpath, "w") as err:
            p = subprocess.Popen([*QUEUECTL, "worker", "start", *args], env=env,
                                 cwd=self.work, stdout=out, stderr=err)
        p.outpath, p.errpath = outpath, errpath
        self.procs.append(p)
        self.wait_for(lambda: self.worker_row(p) is not None or p.poll() is not None
                      or self.proc_state(p.pid) == "T", 20, "the worker to start")
        return p

    def worker_row(self, p):
        try:
            return self.db().execute("SELECT id FROM workers WHERE pid = ?",
                                     (p.pid,)).fetchone()
        except sqlite3.Error:
            return None

    def worker_id(self, p):
        self.wait_for(lambda: self.worker_row(p) is not None, 20,
                      f"worker pid {p.pid} to register")
        return self.worker_row(p)[0]

    def out(self, p):
        if not hasattr(p, "outpath"):
            return "(not kept)"
        with open(p.outpath) as f:
            return f.read()

    def err(self, p):
        if not hasattr(p, "errpath"):
            return "(not kept)"
        with open(p.errpath) as f:
            return f.read()

    @staticmethod
    def proc_state(pid):
        return proc_state(pid)

    def wait_stopped(self, p, timeout=10):
        """Wait until p is in state T (it hit a `stop` fault or got SIGSTOP)."""
        self.wait_for(lambda: self.proc_state(p.pid) == "T" or p.poll() is not None,
                      timeout, f"worker pid {p.pid} to stop (fault point)")
        self.assertEqual(self.proc_state(p.pid), "T",
                         f"worker exited instead of stopping: {p.returncode}; "
                         f"out={self.out(p)!r} err={self.err(p)!r}")

    def wait_out(self, p, text, what, timeout=20):
        """Wait until worker p has printed text (a failure shows its output)."""
        deadline = time.monotonic() + timeout
        while text not in self.out(p):
            if time.monotonic() > deadline:
                self.fail(f"timed out waiting for {what}: no {text!r} in its "
                          f"output {self.out(p)!r}, stderr {self.err(p)!r}")
            time.sleep(0.05)

    def stop_workers(self, *args):
        """worker stop ARGS --wait --timeout 20, which must succeed."""
        r = self.q("worker", "stop", *args, "--wait", "--timeout", "20")
        self.assertEqual(r.code, 0, f"{r}; worker output: " + " | ".join(
            self.out(p) + self.err(p) for p in self.procs if hasattr(p, "outpath")))

    def freeze(self, p, tries=20):
        """SIGSTOP p at a moment it holds no database write lock (else the
        test could not write either): retried with SIGCONT if it does."""
        for _ in range(tries):
            os.kill(p.pid, signal.SIGSTOP)
            self.wait_stopped(p)
            con = sqlite3.connect(os.path.join(self.home, "queue.db"), timeout=0.5,
                                  isolation_level=None)
            try:
                con.execute("BEGIN IMMEDIATE")
                con.execute("ROLLBACK")
                return
            except sqlite3.OperationalError:
                os.kill(p.pid, signal.SIGCONT)
                time.sleep(0.1)
            finally:
                con.close()
        self.fail("could not freeze the worker outside a write transaction")

    def resume_in_cleanup(self, p):
        # Runs before QueueTest._cleanup (cleanups are LIFO), which kills p.
        def resume():
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        self.addCleanup(resume)

    def release_and_check_it_ran_once(self, job_id):
        """Let a gate_cmd() job finish: it completes on its first attempt,
        having started and finished exactly once."""
        self.go()
        self.wait_state(job_id, "completed")
        job = self.job(job_id)
        self.assertEqual((job["state"], job["attempts"], job["exit_code"]),
                         ("completed", 1, 0))
        self.assertEqual(self.lines("runs"), ["start", "done"])

    def adopt_from(self, a, job_id):
        """Age frozen worker a past its lease and start worker B, which must
        adopt job_id; (B, B's worker id)."""
        self.age(a)
        b = self.bg()
        bid = self.worker_id(b)
        self.wait_for(lambda: self.job(job_id)["worker"] == bid, 20,
                      f"worker B to adopt {job_id}")
        return b, bid

    def age(self, p):
        """Make worker p look past its lease."""
        con = self.db()
        con.execute("UPDATE workers SET heartbeat = ? WHERE pid = ?", (OLD_HEARTBEAT, p.pid))
        con.commit()

    def gate_cmd(self, tail=""):
        """A job that appends start, waits for the file `go`, appends done.
        It ends by itself (exit 3) if the test's directory is removed."""
        runs, go = self.path("runs"), self.path("go")
        return (f"echo start >> {runs}; while [ ! -f {go} ]; do "
                f"[ -d {self.work} ] || exit 3; sleep 0.05; done; "
                f"echo done >> {runs}{tail}")

    def go(self):
        with open(self.path("go"), "w"):
            pass

    def drain_adopting_the_gated_job(self):
        """A worker --drain that adopts a running gate_cmd() job: the gate
        opens once it says so (the job still runs when it is adopted), and
        the drain must exit 0."""
        b = self.bg("--drain")
        self.wait_out(b, "adopted", "the running job to be adopted")
        self.go()
        self.assertEqual(b.wait(timeout=30), 0, self.err(b))

    def run_files(self, suffixes):
        try:
            names = os.listdir(os.path.join(self.home, "run"))
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n.endswith(suffixes))

    def qb(self, *args, input=None, **kw):
        """Run queuectl with bytes input/output; the CompletedProcess."""
        return subprocess.run([*QUEUECTL, *args], input=input, capture_output=True,
                              env=self.env, cwd=self.work, timeout=30, **kw)

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

def proc_state(pid):
    """The state letter of a process (R, S, T, Z...), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None

def all_stopped(pid):
    """True when every thread of the process is stopped (SIGSTOP)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    return bool(tids) and all(proc_state(f"{pid}/task/{t}") == "T" for t in tids)

def now_iso():
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())

def can_mount_tmpfs():
    if os.geteuid() != 0 or not os.path.exists("/proc/mounts"):
        return False
    import tempfile
    d = tempfile.mkdtemp(prefix="queuectl-mnt-probe-")
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", d],
                           capture_output=True, timeout=10)
        if r.returncode != 0:
            return False
        subprocess.run(["umount", d], capture_output=True, timeout=10)
        return True
    except (OSError, subprocess.TimeoutExpired):
        return False
    finally:
        try:
            os.rmdir(d)
        except OSError:
            pass

TIME_RE = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"

# A time in human output: local, with its zone.
HUMAN_TIME_RE = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \S+"

SPEC_JOB_FIELDS = ("id", "command", "state", "queue", "priority", "attempts",
                   "max_retries", "timeout", "run_at", "depends_on", "cwd", "env",
                   "created_at", "updated_at", "started_at", "finished_at",
                   "exit_code", "last_error", "worker")

MARKER_JOB = "test -f marker || { touch marker; exit 1; }"

RECORD = 'echo "$QUEUECTL_JOB_ID" >> order.txt'

# Deterministic: workers are frozen or broken at named fault points
# (QUEUECTL_FAULT, see the module docstring), never by a sleep that hopes to
# hit a window.

OLD_HEARTBEAT = "2000-01-01T00:00:00.000000Z"

WAIT_GO = "while [ ! -f {go} ]; do sleep 0.05; done"

# The use of an attempt whose CPU and RSS were not measured (Store.add_history).
UNMEASURED = {"max_rss": None, "cpu_user": None, "cpu_sys": None}

# queuectl run in-process with everything it imports lazily already loaded, so
# that a low descriptor limit hits its own opens (the db, then the lock files)
# rather than Python's imports.
PRELOADED_STATUS = """
import sys, resource
sys.path.insert(0, sys.argv[1])
import queuectl
import fcntl, sqlite3, json, signal, select, threading, errno, stat, shutil
import argparse, datetime, math, re, textwrap
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE,
                   (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
sys.exit(queuectl.main(["worker", "status", "--json"]))
"""


# What a command that creates a home says on stderr (% the home).
CREATED = ("queuectl: note: created a new queue home in %s; --home or QUEUECTL_HOME "
           "selects another\n")

# The schemas older versions of queuectl created, as they created them
# (sqlite_master of a fresh home of each): migration tests start from these.
OLD_SCHEMAS = {
    1: [
        "CREATE TABLE jobs (\n        seq INTEGER PRIMARY KEY,\n        id TEXT NOT NULL UNIQUE,\n        command TEXT NOT NULL,\n        state TEXT NOT NULL,\n        queue TEXT NOT NULL DEFAULT 'default',\n        priority INTEGER NOT NULL DEFAULT 0,\n        attempts INTEGER NOT NULL DEFAULT 0,\n        max_retries INTEGER,\n        timeout REAL,\n        run_at TEXT NOT NULL,\n        depends_on TEXT,\n        blocked INTEGER NOT NULL DEFAULT 0,\n        cwd TEXT NOT NULL,\n        env TEXT,\n        created_at TEXT NOT NULL,\n        updated_at TEXT NOT NULL,\n        started_at TEXT,\n        finished_at TEXT,\n        exit_code INTEGER,\n        last_error TEXT,\n        worker TEXT,\n        claim TEXT,\n        pid INTEGER,\n        pid_start TEXT)",
        "CREATE INDEX jobs_ready ON jobs (priority DESC, run_at, seq)\n        WHERE state IN ('pending', 'failed') AND blocked = 0",
        'CREATE INDEX jobs_state ON jobs (state, queue, finished_at)',
        'CREATE TABLE deps (\n        job TEXT NOT NULL,\n        dep TEXT NOT NULL,\n        PRIMARY KEY (job, dep)) WITHOUT ROWID',
        'CREATE INDEX deps_dep ON deps (dep)',
        'CREATE TABLE workers (\n        id TEXT PRIMARY KEY,\n        pid INTEGER NOT NULL,\n        host TEXT NOT NULL,\n        threads INTEGER NOT NULL,\n        queues TEXT,\n        started_at TEXT NOT NULL,\n        heartbeat TEXT NOT NULL)',
        'CREATE TABLE paused (queue TEXT PRIMARY KEY)',
        'CREATE TABLE stats (\n        queue TEXT PRIMARY KEY,\n        attempts INTEGER NOT NULL DEFAULT 0,\n        failures INTEGER NOT NULL DEFAULT 0,\n        duration_sum REAL NOT NULL DEFAULT 0,\n        duration_count INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID',
    ],
    2: [
        "CREATE TABLE jobs (\n        seq INTEGER PRIMARY KEY,\n        id TEXT NOT NULL UNIQUE,\n        command TEXT NOT NULL,\n        state TEXT NOT NULL,\n        queue TEXT NOT NULL DEFAULT 'default',\n        priority INTEGER NOT NULL DEFAULT 0,\n        attempts INTEGER NOT NULL DEFAULT 0,\n        max_retries INTEGER,\n        timeout REAL,\n        run_at TEXT NOT NULL,\n        depends_on TEXT,\n        blocked INTEGER NOT NULL DEFAULT 0,\n        cwd TEXT NOT NULL,\n        env TEXT,\n        created_at TEXT NOT NULL,\n        updated_at TEXT NOT NULL,\n        started_at TEXT,\n        finished_at TEXT,\n        exit_code INTEGER,\n        last_error TEXT,\n        worker TEXT,\n        claim TEXT,\n        pid INTEGER,\n        pid_start TEXT,\n        env_id INTEGER,\n        umask INTEGER)",
        "CREATE INDEX jobs_ready ON jobs (priority DESC, run_at, seq)\n        WHERE state IN ('pending', 'failed') AND blocked = 0",
        'CREATE INDEX jobs_state ON jobs (state, queue, finished_at)',
        'CREATE TABLE envs (id INTEGER PRIMARY KEY AUTOINCREMENT,\n    hash INTEGER NOT NULL, vars BLOB NOT NULL)',
        'CREATE INDEX envs_hash ON envs (hash)',
        'CREATE INDEX jobs_env ON jobs (env_id) WHERE env_id IS NOT NULL',
        'CREATE TABLE durations (\n    queue TEXT NOT NULL,\n    le REAL NOT NULL,\n    n INTEGER NOT NULL DEFAULT 0,\n    PRIMARY KEY (queue, le)) WITHOUT ROWID',
        'CREATE TABLE deps (\n        job TEXT NOT NULL,\n        dep TEXT NOT NULL,\n        PRIMARY KEY (job, dep)) WITHOUT ROWID',
        'CREATE INDEX deps_dep ON deps (dep)',
        'CREATE TABLE workers (\n        id TEXT PRIMARY KEY,\n        pid INTEGER NOT NULL,\n        host TEXT NOT NULL,\n        threads INTEGER NOT NULL,\n        queues TEXT,\n        started_at TEXT NOT NULL,\n        heartbeat TEXT NOT NULL)',
        'CREATE TABLE paused (queue TEXT PRIMARY KEY)',
        'CREATE TABLE stats (\n        queue TEXT PRIMARY KEY,\n        attempts INTEGER NOT NULL DEFAULT 0,\n        failures INTEGER NOT NULL DEFAULT 0,\n        duration_sum REAL NOT NULL DEFAULT 0,\n        duration_count INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID',
    ],
    3: [
        "CREATE TABLE jobs (\n        seq INTEGER PRIMARY KEY,\n        id TEXT NOT NULL UNIQUE,\n        command TEXT NOT NULL,\n        state TEXT NOT NULL,\n        queue TEXT NOT NULL DEFAULT 'default',\n        priority INTEGER NOT NULL DEFAULT 0,\n        attempts INTEGER NOT NULL DEFAULT 0,\n        max_retries INTEGER,\n        timeout REAL,\n        run_at TEXT NOT NULL,\n        depends_on TEXT,\n        blocked INTEGER NOT NULL DEFAULT 0,\n        cwd TEXT NOT NULL,\n        env TEXT,\n        created_at TEXT NOT NULL,\n        updated_at TEXT NOT NULL,\n        started_at TEXT,\n        finished_at TEXT,\n        exit_code INTEGER,\n        last_error TEXT,\n        worker TEXT,\n        claim TEXT,\n        pid INTEGER,\n        pid_start TEXT,\n        env_id INTEGER,\n        umask INTEGER,\n        keys TEXT,\n        hooks TEXT,\n        retry_on TEXT,\n        no_retry_on TEXT,\n        hook_of TEXT)",
        "CREATE INDEX jobs_ready ON jobs (priority DESC, run_at, seq)\n        WHERE state IN ('pending', 'failed') AND blocked = 0",
        'CREATE INDEX jobs_state ON jobs (state, queue, finished_at)',
        'CREATE TABLE envs (id INTEGER PRIMARY KEY AUTOINCREMENT,\n    hash INTEGER NOT NULL, vars BLOB NOT NULL)',
        'CREATE INDEX envs_hash ON envs (hash)',
        'CREATE INDEX jobs_env ON jobs (env_id) WHERE env_id IS NOT NULL',
        'CREATE TABLE durations (\n    queue TEXT NOT NULL,\n    le REAL NOT NULL,\n    n INTEGER NOT NULL DEFAULT 0,\n    PRIMARY KEY (queue, le)) WITHOUT ROWID',
        'CREATE TABLE deps (\n        job TEXT NOT NULL,\n        dep TEXT NOT NULL,\n        PRIMARY KEY (job, dep)) WITHOUT ROWID',
        'CREATE INDEX deps_dep ON deps (dep)',
        'CREATE TABLE workers (\n        id TEXT PRIMARY KEY,\n        pid INTEGER NOT NULL,\n        host TEXT NOT NULL,\n        threads INTEGER NOT NULL,\n        queues TEXT,\n        started_at TEXT NOT NULL,\n        heartbeat TEXT NOT NULL)',
        'CREATE TABLE paused (queue TEXT PRIMARY KEY)',
        'CREATE TABLE job_keys (\n    key TEXT NOT NULL,\n    job TEXT NOT NULL,\n    PRIMARY KEY (key, job)) WITHOUT ROWID',
        'CREATE INDEX job_keys_job ON job_keys (job)',
        'CREATE TABLE limits (\n    key TEXT PRIMARY KEY,\n    n INTEGER NOT NULL) WITHOUT ROWID',
        'CREATE INDEX jobs_hook_of ON jobs (hook_of) WHERE hook_of IS NOT NULL',
        'CREATE TABLE stats (\n        queue TEXT PRIMARY KEY,\n        attempts INTEGER NOT NULL DEFAULT 0,\n        failures INTEGER NOT NULL DEFAULT 0,\n        duration_sum REAL NOT NULL DEFAULT 0,\n        duration_count INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID',
    ],
    4: [
        "CREATE TABLE jobs (\n        seq INTEGER PRIMARY KEY,\n        id TEXT NOT NULL UNIQUE,\n        command TEXT NOT NULL,\n        state TEXT NOT NULL,\n        queue TEXT NOT NULL DEFAULT 'default',\n        priority INTEGER NOT NULL DEFAULT 0,\n        attempts INTEGER NOT NULL DEFAULT 0,\n        max_retries INTEGER,\n        timeout REAL,\n        run_at TEXT NOT NULL,\n        depends_on TEXT,\n        blocked INTEGER NOT NULL DEFAULT 0,\n        cwd TEXT NOT NULL,\n        env TEXT,\n        created_at TEXT NOT NULL,\n        updated_at TEXT NOT NULL,\n        started_at TEXT,\n        finished_at TEXT,\n        exit_code INTEGER,\n        last_error TEXT,\n        worker TEXT,\n        claim TEXT,\n        pid INTEGER,\n        pid_start TEXT,\n        env_id INTEGER,\n        umask INTEGER,\n        keys TEXT,\n        hooks TEXT,\n        retry_on TEXT,\n        no_retry_on TEXT,\n        hook_of TEXT,\n        mem INTEGER,\n        cpu_time REAL,\n        nofile INTEGER,\n        nice INTEGER,\n        schedule TEXT,\n        usage TEXT)",
        "CREATE INDEX jobs_ready ON jobs (priority DESC, run_at, seq)\n        WHERE state IN ('pending', 'failed') AND blocked = 0",
        'CREATE INDEX jobs_state ON jobs (state, queue, finished_at)',
        'CREATE TABLE envs (id INTEGER PRIMARY KEY AUTOINCREMENT,\n    hash INTEGER NOT NULL, vars BLOB NOT NULL)',
        'CREATE INDEX envs_hash ON envs (hash)',
        'CREATE INDEX jobs_env ON jobs (env_id) WHERE env_id IS NOT NULL',
        'CREATE TABLE durations (\n    queue TEXT NOT NULL,\n    le REAL NOT NULL,\n    n INTEGER NOT NULL DEFAULT 0,\n    PRIMARY KEY (queue, le)) WITHOUT ROWID',
        'CREATE TABLE deps (\n        job TEXT NOT NULL,\n        dep TEXT NOT NULL,\n        PRIMARY KEY (job, dep)) WITHOUT ROWID',
        'CREATE INDEX deps_dep ON deps (dep)',
        'CREATE TABLE workers (\n        id TEXT PRIMARY KEY,\n        pid INTEGER NOT NULL,\n        host TEXT NOT NULL,\n        threads INTEGER NOT NULL,\n        queues TEXT,\n        started_at TEXT NOT NULL,\n        heartbeat TEXT NOT NULL)',
        'CREATE TABLE paused (queue TEXT PRIMARY KEY)',
        'CREATE TABLE job_keys (\n    key TEXT NOT NULL,\n    job TEXT NOT NULL,\n    PRIMARY KEY (key, job)) WITHOUT ROWID',
        'CREATE INDEX job_keys_job ON job_keys (job)',
        'CREATE TABLE limits (\n    key TEXT PRIMARY KEY,\n    n INTEGER NOT NULL) WITHOUT ROWID',
        'CREATE INDEX jobs_hook_of ON jobs (hook_of) WHERE hook_of IS NOT NULL',
        'CREATE TABLE stats (\n        queue TEXT PRIMARY KEY,\n        attempts INTEGER NOT NULL DEFAULT 0,\n        failures INTEGER NOT NULL DEFAULT 0,\n        duration_sum REAL NOT NULL DEFAULT 0,\n        duration_count INTEGER NOT NULL DEFAULT 0,\n        cpu_user REAL NOT NULL DEFAULT 0,\n        cpu_sys REAL NOT NULL DEFAULT 0,\n        rss_sum REAL NOT NULL DEFAULT 0,\n        rss_count INTEGER NOT NULL DEFAULT 0,\n        rss_b0 INTEGER NOT NULL DEFAULT 0,\n        rss_b1 INTEGER NOT NULL DEFAULT 0,\n        rss_b2 INTEGER NOT NULL DEFAULT 0,\n        rss_b3 INTEGER NOT NULL DEFAULT 0,\n        rss_b4 INTEGER NOT NULL DEFAULT 0,\n        rss_b5 INTEGER NOT NULL DEFAULT 0,\n        rss_b6 INTEGER NOT NULL DEFAULT 0,\n        rss_b7 INTEGER NOT NULL DEFAULT 0,\n        rss_b8 INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID',
        'CREATE TABLE attempts (\n    job TEXT NOT NULL,\n    attempt INTEGER NOT NULL,\n    queue TEXT NOT NULL,\n    state TEXT NOT NULL,\n    started_at TEXT,\n    ended_at REAL NOT NULL,\n    wall REAL,\n    cpu_user REAL,\n    cpu_sys REAL,\n    max_rss INTEGER,\n    max_rss_bound INTEGER,\n    exit_code INTEGER,\n    signal INTEGER,\n    error TEXT,\n    PRIMARY KEY (job, attempt, ended_at)) WITHOUT ROWID',
        'CREATE TABLE schedules (\n    name TEXT PRIMARY KEY,\n    cron TEXT NOT NULL,\n    spec TEXT NOT NULL,\n    env_id INTEGER,\n    umask INTEGER,\n    overlap TEXT NOT NULL,\n    catch_up INTEGER NOT NULL,\n    jitter REAL NOT NULL,\n    paused INTEGER NOT NULL DEFAULT 0,\n    created_at TEXT NOT NULL,\n    last_slot REAL NOT NULL,\n    next_at REAL NOT NULL,\n    last_job TEXT,\n    skips INTEGER NOT NULL DEFAULT 0,\n    last_skip TEXT,\n    last_success REAL) WITHOUT ROWID',
        'CREATE INDEX jobs_schedule ON jobs (schedule) WHERE schedule IS NOT NULL',
        'CREATE INDEX jobs_claimed ON jobs (state, queue) WHERE claim IS NOT NULL',
    ],
}

# Text, time and values #######################################################

class TestPureHelpers(unittest.TestCase):
    def test_every_fault_point_is_declared_called_and_documented(self):
        import re
        with open(PROG) as f:
            called = set(re.findall(r'\bfault\("([a-z-]+)"', f.read()))
        self.assertEqual(called, set(queuectl.FAULT_POINTS))
        for point in queuectl.FAULT_POINTS:
            self.assertRegex(__doc__, rf"\n    {point} +\S", point)
        with self.assertRaises(ValueError):
            queuectl._parse_faults("after-clam:stop")

    def test_a_jobs_values_come_from_the_job_its_queue_or_the_home(self):
        cfg = dict(queuectl.CONFIG_DEFAULTS, **{
            "queue.q.max_retries": 7, "queue.q.on_dead": "mail", "on_dead": "log",
            "no_retry_on": "2", "queue.q.job_timeout": 60})
        job = {c: None for c in queuectl.ROW_FIELDS}
        job.update(queue="q", timeout=5, retry_on="1", hooks='{"on_success": ""}')
        eff = queuectl.effective(job, cfg)
        self.assertEqual(set(eff), {e[0] for e in queuectl.EFFECTIVE})
        self.assertEqual(eff["max_retries"], (7, "queue"))
        self.assertEqual(eff["timeout"], (5, "job"))
        self.assertEqual(eff["backoff_base"], (2, "home"))
        # A job that sets one retry list sets the pair; "" is no hook.
        self.assertEqual((eff["retry_on"], eff["no_retry_on"]), (("1", "job"), ("", "job")))
        self.assertEqual((eff["on_success"], eff["on_dead"], eff["on_failure"]),
                         (("", "job"), ("mail", "queue"), ("", "home")))
        job.update(queue="other", timeout=None, retry_on=None, hooks=None)
        eff = queuectl.effective(job, queuectl.queue_config(cfg, "other"))
        self.assertEqual((eff["max_retries"], eff["timeout"], eff["no_retry_on"]),
                         ((3, "home"), (0, "home"), ("2", "home")))

    def test_parse_duration_accepts_the_documented_forms(self):
        for text, secs in (("90", 90), ("90s", 90), ("5m", 300), ("2h", 7200),
                           ("1d", 86400), ("1w", 604800), ("1h30m", 5400),
                           ("0", 0), ("0s", 0), ("1.5", 1.5), (" 2M ", 120)):
            with self.subTest(text=text):
                self.assertEqual(queuectl.parse_duration(text), secs)

    def test_parse_duration_refuses_nonsense(self):
        for text in ("", "5x", "abc", "-5", "1e3", "s", "5 m", "1..2", "1e99d",
                     "m5", "nan", "inf"):
            with self.subTest(text=text):
                with self.assertRaises(queuectl.UsageError) as cm:
                    queuectl.parse_duration(text, "delay")
                self.assertIn("delay", str(cm.exception))
                self.assertEqual(cm.exception.code, 2)

    def test_parse_time_utc_offset_and_naive_local(self):
        import calendar
        import datetime
        utc = calendar.timegm((2026, 11, 23, 9, 30, 0))
        self.assertEqual(queuectl.parse_time("2026-11-23T09:30:00Z"), utc)
        self.assertEqual(queuectl.parse_time("2026-11-23T09:30:00z"), utc)
        self.assertEqual(queuectl.parse_time("2026-11-23T11:30:00+02:00"), utc)
        local = datetime.datetime(2026, 11, 23, 9, 30).timestamp()
        self.assertEqual(queuectl.parse_time("2026-11-23 09:30"), local)
        self.assertEqual(queuectl.parse_time("2026-11-23T09:30:00"), local)

    def test_parse_time_refuses_nonsense(self):
        for text in ("", "tomorrowish", "2026-13-01", "Z", "2026-11-23T25:00"):
            with self.subTest(text=text):
                with self.assertRaises(queuectl.UsageError) as cm:
                    queuectl.parse_time(text)
                self.assertIn("ISO-8601", str(cm.exception))

    def test_valid_name(self):
        for good in ("a", "A", "0", "a.b_c-d", "Job-1.2", "x" * 128, "a..b"):
            with self.subTest(good=good):
                self.assertTrue(queuectl.valid_name(good))
        for bad in ("", "../x", "a/b", "-x", ".x", "_x", "x" * 129, "é", "aé",
                    "a b", "a\n", "a\0", None, 5, "/"):
            with self.subTest(bad=bad):
                self.assertFalse(queuectl.valid_name(bad))

    def test_iso_and_epoch_round_trip(self):
        import calendar
        t = calendar.timegm((2026, 11, 23, 9, 30, 0))
        self.assertEqual(queuectl.iso(t), "2026-11-23T09:30:00.000000Z")
        self.assertEqual(queuectl.show_time(queuectl.iso(t + 0.75)),
                         "2026-11-23T09:30:00Z")
        self.assertEqual(queuectl.iso(0), "1970-01-01T00:00:00.000000Z")
        self.assertEqual(queuectl.epoch("1970-01-01T00:00:00.000000Z"), 0)
        self.assertEqual(queuectl.epoch("2026-11-23T09:30:00Z"), t)
        self.assertIsNone(queuectl.iso(None))
        self.assertIsNone(queuectl.epoch(None))
        # Microseconds that round up carry into the next second.
        self.assertEqual(queuectl.iso(t + 0.9999999), "2026-11-23T09:30:01.000000Z")
        for ts in (0.0, 1.5, 951782400.25, 1e9 + 0.123456, time.time(),
                   4102444800.999999, 1709164800.0):   # incl. leap days
            with self.subTest(ts=ts):
                s = queuectl.iso(ts)
                self.assertRegex(s, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
                self.assertAlmostEqual(queuectl.epoch(s), ts, delta=1e-6)
                # Sorting the stored strings sorts the times.
        stamps = [queuectl.iso(x) for x in (5.0, 100.0, 1e9, 2e9)]
        self.assertEqual(stamps, sorted(stamps))

    def test_backoff_delay(self):
        cfg = {"backoff_base": 2, "max_backoff": 3600}
        self.assertEqual([queuectl.backoff_delay(n, cfg) for n in (1, 2, 3, 4)],
                         [2, 4, 8, 16])
        self.assertEqual(queuectl.backoff_delay(20, cfg), 3600)
        self.assertEqual(queuectl.backoff_delay(100000, cfg), 3600)
        self.assertEqual(queuectl.backoff_delay(
            5000, {"backoff_base": 2.5, "max_backoff": 60}), 60)   # float overflow
        self.assertEqual(queuectl.backoff_delay(
            3, {"backoff_base": 1, "max_backoff": 60}), 1)
        self.assertEqual(queuectl.backoff_delay(
            3, {"backoff_base": 2, "max_backoff": 0.01}), 0.01)

    def test_check_config_value(self):
        ccv = queuectl.check_config_value
        self.assertEqual(ccv("max_retries", 3), 3)
        self.assertEqual(ccv("max_retries", 3.0), 3)
        self.assertIsInstance(ccv("max_retries", 3.0), int)
        self.assertEqual(ccv("max_retries", 0), 0)
        self.assertEqual(ccv("backoff_base", 1.5), 1.5)
        self.assertEqual(ccv("backoff_base", 1), 1)
        self.assertEqual(ccv("max_backoff", 0.01), 0.01)
        self.assertEqual(ccv("job_timeout", 0), 0)
        for key, value in (("max_retries", 3.5), ("max_retries", True),
                           ("max_retries", "3"), ("max_retries", -1),
                           ("max_retries", float("nan")), ("max_retries", float("inf")),
                           ("max_retries", None), ("backoff_base", 0.5),
                           ("backoff_base", 0), ("max_backoff", -0.1),
                           ("max_backoff", float("-inf")), ("kill_grace", [1])):
            with self.subTest(key=key, value=value):
                with self.assertRaises(queuectl.UsageError) as cm:
                    ccv(key, value)
                self.assertIn(key, str(cm.exception))
                self.assertIn("from", str(cm.exception))

    def test_new_id_format(self):
        ids = [queuectl.new_id() for _ in range(200)]
        for i in ids:
            self.assertRegex(i, r"^[0-9a-z]{6}$")
            self.assertTrue(queuectl.valid_name(i))
        self.assertGreater(len(set(ids)), 195)


# Files and permissions #######################################################

class TestFilesAndPermissions(QueueTest):
    def test_files_are_private_whatever_the_umask(self):
        old = os.umask(0)
        try:
            job = self.enqueue("echo hi")
            self.drain()
        finally:
            os.umask(old)
        for path, mode in ((self.home, 0o700), (os.path.join(self.home, "queue.db"), 0o600),
                           (os.path.join(self.home, "logs", job + ".log"), 0o600)):
            self.assertEqual(os.stat(path).st_mode & 0o777, mode, path)

    def test_group_writable_db_is_refused(self):
        self.enqueue("true")
        db = os.path.join(self.home, "queue.db")
        os.chmod(db, 0o664)
        r = self.fails(2, "list")
        self.assertIn(db, r.err)
        self.assertIn("chmod go-w", r.err)

    def test_planted_log_symlink_is_not_followed(self):
        target = self.path("target")
        with open(target, "w") as f:
            f.write("precious\n")
        self.enqueue("--id", "j", "--max-retries", "0", "echo clobbered")
        os.makedirs(os.path.join(self.home, "logs"), exist_ok=True)
        os.symlink(target, os.path.join(self.home, "logs", "j.log"))
        r = self.drain()
        self.assertEqual(r.code, 1, r)
        with open(target) as f:
            self.assertEqual(f.read(), "precious\n")
        self.assertIn("could not open its log", self.job("j")["last_error"])

    def test_not_a_queuectl_database_is_refused_unchanged(self):
        os.mkdir(self.home, 0o700)
        db = os.path.join(self.home, "queue.db")
        con = sqlite3.connect(db)
        con.execute("CREATE TABLE mine (x)")
        con.commit()
        con.close()
        os.chmod(db, 0o600)
        before = self.db_dump()
        r = self.fails(2, "enqueue", "true")
        self.assertIn("not a queuectl database", r.err)
        self.assertEqual(self.db_dump(), before)

    def test_garbage_file_as_database_is_refused(self):
        os.mkdir(self.home, 0o700)
        db = os.path.join(self.home, "queue.db")
        with open(db, "wb") as f:
            f.write(b"this is not sqlite at all" * 100)
        os.chmod(db, 0o600)
        r = self.fails(2, "list")
        self.assertIn("not a usable queuectl database", r.err)

    def test_newer_schema_is_refused(self):
        self.enqueue("true")
        con = self.db()
        con.execute(f"PRAGMA user_version = {queuectl.SCHEMA_VERSION + 1}")
        con.commit()
        r = self.fails(2, "list")
        self.assertIn("newer", r.err)

    def schema(self, db):
        """What a database is made of: each table's columns (PRAGMA
        table_info), each index's and trigger's table and SQL (white space
        folded)."""
        con = sqlite3.connect(db)
        try:
            out = {}
            for kind, name, table, sql in con.execute(
                    "SELECT type, name, tbl_name, sql FROM sqlite_master "
                    "WHERE name NOT LIKE 'sqlite_%'"):
                if kind == "table":
                    out[name] = [r[1:] for r in con.execute(f"PRAGMA table_info({name})")]
                else:
                    out[name] = (kind, table, " ".join((sql or "").split()))
            return out
        finally:
            con.close()

    def test_a_migrated_database_is_a_fresh_one(self):
        self.enqueue("true")
        fresh = self.schema(os.path.join(self.home, "queue.db"))
        for version, statements in OLD_SCHEMAS.items():
            with self.subTest(schema=version):
                home = os.path.join(self.tmp, f"v{version}")
                os.mkdir(home, 0o700)
                db = os.path.join(home, "queue.db")
                con = sqlite3.connect(db)
                for sql in statements:
                    con.execute(sql)
                con.execute(f"PRAGMA user_version = {version}")
                con.execute(f"PRAGMA application_id = {queuectl.APPLICATION_ID}")
                con.commit()
                con.close()
                os.chmod(db, 0o600)
                queuectl.Store(home).close()
                self.assertEqual(self.schema(db), fresh)

    def test_older_schema_is_migrated_in_one_transaction(self):
        self.enqueue("--id", "a", "true")
        version = queuectl.SCHEMA_VERSION
        saved = dict(queuectl.MIGRATIONS)
        self.addCleanup(lambda: (queuectl.MIGRATIONS.clear(),
                                 queuectl.MIGRATIONS.update(saved),
                                 setattr(queuectl, "SCHEMA_VERSION", version)))
        queuectl.SCHEMA_VERSION = version + 1
        # A migration that fails half-way changes nothing.
        queuectl.MIGRATIONS[version] = ["ALTER TABLE jobs ADD COLUMN note TEXT",
                                        "SELECT no_such_function()"]
        with self.assertRaises(queuectl.QueuectlError):
            queuectl.Store(self.home)
        con = self.db()
        self.assertEqual(con.execute("PRAGMA user_version").fetchone()[0], version)
        cols = [r[1] for r in con.execute("PRAGMA table_info(jobs)")]
        self.assertNotIn("note", cols)
        queuectl.MIGRATIONS[version] = ["ALTER TABLE jobs ADD COLUMN note TEXT"]
        queuectl.Store(self.home).close()
        self.assertEqual(con.execute("PRAGMA user_version").fetchone()[0], version + 1)
        self.assertIn("note", [r[1] for r in con.execute("PRAGMA table_info(jobs)")])
        self.assertEqual(con.execute("SELECT id FROM jobs").fetchall(), [("a",)])

    def test_large_binary_output_is_stored_whole(self):
        self.enqueue("--id", "big", "head -c 20000000 /dev/urandom; printf 'no newline'")
        self.drained(0)
        path = os.path.join(self.home, "logs", "big.log")
        self.assertGreater(os.path.getsize(path), 20_000_000)
        tail = subprocess.run([*QUEUECTL, "logs", "big", "--tail", "1"], env=self.env,
                              capture_output=True, timeout=30)
        self.assertEqual(tail.returncode, 0)
        self.assertTrue(tail.stdout.startswith(b"[queuectl] attempt 1 ended: exit 0"),
                        tail.stdout[:200])
        two = subprocess.run([*QUEUECTL, "logs", "big", "--tail", "2"], env=self.env,
                             capture_output=True, timeout=30).stdout
        self.assertIn(b"no newline\n[queuectl] attempt 1 ended", two)

class TestOwnership(QueueTest):
    @unittest.skipUnless(os.geteuid() == 0, "needs root to give a file away")
    def test_home_owned_by_another_user_is_refused(self):
        self.enqueue("true")
        os.chown(self.home, 12345, -1)
        self.addCleanup(os.chown, self.home, 0, -1)
        before = self.db_dump()
        r = self.fails(2, "enqueue", "true")
        self.assertIn("(uid 12345), not to you", r.err)
        self.assertIn(f"sudo -u '#12345' queuectl --home {self.home} …", r.err)
        self.assertEqual(self.db_dump(), before)

    @unittest.skipUnless(os.geteuid() == 0, "needs root to give a file away")
    def test_db_owned_by_another_user_is_refused(self):
        self.enqueue("true")
        db = os.path.join(self.home, "queue.db")
        os.chown(db, 12345, -1)
        r = self.fails(2, "list")
        self.assertIn(db, r.err)

class TestHomesAndFirstUse(QueueTest):
    def test_read_commands_never_create_a_home(self):
        for args in (("status",), ("list",), ("list", "--json"), ("metrics",),
                     ("worker", "status"), ("dlq", "list"), ("wait",), ("doctor",),
                     ("top", "--once"), ("worker", "stop"), ("prune", "--older-than", "1d"),
                     ("cancel", "--all"), ("retry", "--all")):
            with self.subTest(args=args):
                r = self.q(*args)
                self.assertEqual(r.code, 0, r)
                self.assertIn(f"there is no queue in {self.home} yet", r.err)
                self.assertIn("--home or QUEUECTL_HOME", r.err)
                self.assertFalse(os.path.exists(self.home))
        self.assertEqual(self.q("list", "--json").out, "[]\n")
        r = self.fails(1, "show", "nope")
        self.assertFalse(os.path.exists(self.home))
        self.enqueue("true")
        self.assertEqual(self.q("status").err, "")

    @unittest.skipUnless(os.geteuid() == 0, "needs root")
    def test_root_on_a_service_users_home_is_refused_and_creates_nothing(self):
        nobody = self.nobody()
        self.enqueue("--id", "j", "true")
        for dirpath, _dirnames, filenames in os.walk(self.home):
            for name in [dirpath] + [os.path.join(dirpath, n) for n in filenames]:
                os.chown(name, nobody.pw_uid, nobody.pw_gid)

        def files():
            return sorted((os.path.join(d, n), os.lstat(os.path.join(d, n)).st_uid)
                          for d, dirs, names in os.walk(self.home) for n in names + dirs)
        before = files()
        for args in (("status",), ("list",), ("enqueue", "true"), ("worker", "start", "--drain"),
                     ("config", "set", "max_retries", "1"), ("cancel", "j"),
                     ("logs", "j"), ("pause",)):
            with self.subTest(args=args):
                r = self.fails(2, *args)
                self.assertIn("belongs to nobody", r.err)
                self.assertIn("sudo -u nobody queuectl", r.err)
                self.assertEqual(files(), before)

    def test_enqueue_hints_at_a_missing_worker_only_on_a_terminal(self):
        self.q("enqueue", "true")                     # makes the home (says so)
        r = self.q("enqueue", "true")                 # stderr is a pipe (cron)
        self.assertEqual(r.err, "")
        err = self.stderr_on_tty("enqueue", "--queue", "reports", "true")
        self.assertIn("no worker is running for queue reports", err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.start_worker("--queue", "reports")
        self.assertEqual(self.stderr_on_tty("enqueue", "--queue", "reports", "true"), "")
        self.assertIn("queue default", self.stderr_on_tty("enqueue", "true"))

    def stderr_on_tty(self, *args):
        master, slave = os.openpty()
        try:
            r = subprocess.run([*QUEUECTL, *args], stdout=subprocess.PIPE, stderr=slave,
                               env=self.env, cwd=self.work, timeout=30)
            self.assertEqual(r.returncode, 0)
            os.close(slave)
            slave = None
            data = b""
            while True:
                try:
                    chunk = os.read(master, 4096)
                except OSError:              # EIO: the other side is closed
                    break
                if not chunk:
                    break
                data += chunk
        finally:
            if slave is not None:
                os.close(slave)
            os.close(master)
        return data.decode().replace("\r\n", "\n")

    def test_a_second_worker_says_how_many_will_run(self):
        self.start_worker("--count", "2")
        r = self.q("worker", "start", "--detach")
        self.assertEqual(r.code, 0, r)
        pid = int(r.out)
        self.addCleanup(lambda: proc_state(pid) and os.kill(pid, signal.SIGKILL))
        self.assertIn("1 worker (2 threads) already run on", r.err)
        self.assertIn("with this one, 2 workers (3 threads) will run", r.err)
        self.ok("worker", "stop", "--wait", "--timeout", "20")

class TestUmask(QueueTest):
    def test_home_works_under_umask_0277(self):
        def run(*args):
            return subprocess.run([*QUEUECTL, *args], capture_output=True, text=True,
                                  env=self.env, cwd=self.work, timeout=60,
                                  preexec_fn=lambda: os.umask(0o277))
        r = run("enqueue", "--id", "u", "echo hi")
        self.assertEqual(r.returncode, 0, r.stderr)
        r = run("worker", "start", "--drain")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertNotIn("Traceback", r.stderr)
        job = self.job("u")
        self.assertEqual((job["state"], job["attempts"], job["exit_code"]),
                         ("completed", 1, 0))
        self.assertIn("hi", self.log("u"))
        for path, mode in ((self.home, 0o700),
                           (os.path.join(self.home, "logs"), 0o700),
                           (os.path.join(self.home, "queue.db"), 0o600),
                           (os.path.join(self.home, "logs", "u.log"), 0o600)):
            self.assertEqual(oct(os.stat(path).st_mode & 0o777), oct(mode), path)

class TestPlantedSymlinks(QueueTest):
    def precious(self):
        target = self.path("target")
        with open(target, "w") as f:
            f.write("precious\n")
        return target

    def test_wake_symlink_is_never_written_through(self):
        target = self.precious()
        w = self.bg()
        os.symlink(target, os.path.join(self.home, "run", "planted.wake"))
        self.enqueue("--id", "j", "true")           # wakes the workers
        self.wait_state("j", "completed")
        with open(target) as f:
            self.assertEqual(f.read(), "precious\n")
        self.assertIsNone(w.poll())

    def test_log_symlink_is_not_read(self):
        secret = self.path("secret")
        with open(secret, "w") as f:
            f.write("top secret content\n")
        self.enqueue("--id", "j", "echo hi")
        self.drained(0)
        log = os.path.join(self.home, "logs", "j.log")
        os.unlink(log)
        os.symlink(secret, log)
        r = self.fails(1, "logs", "j")
        self.assertEqual(r.err, f"queuectl: error: the log {log} is not a regular file; "
                         "refusing to read it\n")
        self.assertNotIn("top secret", r.out)
        r = self.fails(1, "logs", "j", "--tail", "1")
        self.assertNotIn("top secret", r.out)

class TestFencesOnAFullDisk(QueueTest):
    """Taking a start fence is all or nothing: on a full disk it fails and
    changes nothing, so a frozen claimant can never start a job twice."""

    def test_revoke_on_a_full_disk_fails_and_leaves_no_file(self):
        run = self.mount_tmpfs(os.path.join(self.tmp, "mnt"), "64k")
        self.fill(os.path.join(run, "filler"))
        path = os.path.join(run, "j.tok.exit")
        with self.assertRaises(OSError):
            queuectl.revoke(path, "w1")
        self.assertEqual(queuectl.read_status(path), ("absent", None))
        self.assertEqual(os.listdir(run), ["filler"])

    def test_cancel_that_cannot_take_the_fence_changes_nothing(self):
        self.ok("status")                                # creates the home
        run = self.mount_tmpfs(os.path.join(self.home, "run"), "256k")
        self.enqueue("--id", "j", f"echo run >> {self.path('runs')}")
        a = self.spawn_worker(env=self.fault_env("after-claim:stop"))
        self.cont_in_cleanup(a)
        self.wait_for(lambda: proc_state(a.pid) == "T", what="A to stop after its claim")
        filler = os.path.join(run, "filler")
        self.fill(filler)
        r = self.fails(1, "cancel", "j")
        self.assertIn("cannot cancel job j now: No space left on device; try again", r.err)
        self.assertEqual(self.state("j"), "processing")
        self.assertEqual(sorted(n for n in os.listdir(run) if ".exit" in n), [])
        os.unlink(filler)
        self.assertEqual(self.ok("cancel", "j"), "j\n")
        os.kill(a.pid, signal.SIGCONT)
        self.wait_for(lambda: "j not started" in self.output(a), what="A to give up on j")
        self.assertEqual(self.state("j"), "cancelled")
        self.assertEqual(self.lines("runs"), [])         # never ran


# Processes ###################################################################

class TestFindJobProcess(QueueTest):
    @unittest.skipUnless(os.path.isdir("/proc/self"), "needs /proc")
    def spawn_job(self, command, token, status):
        env = dict(os.environ, QUEUECTL_JOB_ID="j", QUEUECTL_ATTEMPT="2",
                   QUEUECTL_CLAIM=token, __QUEUECTL_STATUS=status,
                   __QUEUECTL_COMMAND=command, __QUEUECTL_CWD=self.work,
                   __QUEUECTL_UMASK="0022")
        with open(os.devnull, "rb") as null:
            return queuectl.spawn(["/bin/sh", "-c", queuectl.JOB_WRAPPER, "sh"],
                                  self.work, env, null.fileno(), null.fileno())

    @unittest.skipUnless(os.path.isdir("/proc/self"), "needs /proc")
    def test_a_job_is_found_by_its_claim_token_even_after_exec(self):
        for n, command in enumerate(("sleep 0.5 | cat", "exec sleep 0.5")):
            with self.subTest(command=command):
                token = f"tok{n}"
                child = self.spawn_job(command, token, self.path(f"j.{token}.exit"))
                try:
                    self.assertEqual(queuectl.find_job_process("other"), (None, None))
                    pid, start = queuectl.find_job_process(token)
                    self.assertEqual(pid, child.pid)      # the leader, not its children
                    self.assertTrue(queuectl.same_process(pid, start))
                finally:
                    self.assertEqual(child.wait(), 0)
                self.assertEqual(queuectl.find_job_process(token), (None, None))

    def test_start_fence_revoked_first_means_the_command_never_runs(self):
        status = self.path("j.t1.exit")
        self.assertTrue(queuectl.revoke(status, "w1"))
        child = self.spawn_job(f"echo ran > {self.path('ran')}", "t1", status)
        self.assertEqual(child.wait(), queuectl.WRAPPER_REFUSED)
        self.assertFalse(os.path.exists(self.path("ran")))
        self.assertEqual(queuectl.read_status(status), ("revoked", "w1"))
        # Started first: the fence is the job's, and its status is written.
        status = self.path("j.t2.exit")
        child = self.spawn_job("exit 7", "t2", status)
        self.assertEqual(child.wait(), 7)
        self.assertFalse(queuectl.revoke(status, "w1"))
        self.assertEqual(queuectl.read_status(status), ("exit", 7))

    def test_jobs_get_default_sigpipe(self):
        self.enqueue("--id", "p", "yes | head -c 3")
        self.drained(0)
        self.assertNotIn("Broken pipe", self.log("p"))

@unittest.skipUnless(os.path.isdir("/proc/self"), "needs /proc")
class TestCommandVisibility(QueueTest):
    def cmdlines(self):
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/cmdline", "rb") as f:
                        yield int(name), f.read()
                except OSError:
                    pass

    def test_command_and_claim_are_not_in_any_argv(self):
        secret = "s3cr3t" + uuid.uuid4().hex[:8]
        # Through stdin, so that not even the enqueue's argv holds the secret.
        self.ok("enqueue", "--stdin", input=json.dumps(
            {"id": "v", "command": self.gate_cmd(f" # {secret}")}) + "\n")
        self.bg()
        pid = self.wait_running("v")
        self.wait_for(lambda: self.lines("runs") == ["start"], 10, "v to start")
        token = self.db().execute("SELECT claim FROM jobs WHERE id = 'v'").fetchone()[0]
        self.assertTrue(token)
        for p, cmdline in self.cmdlines():
            self.assertNotIn(secret.encode(), cmdline, f"pid {p}: {cmdline!r}")
            self.assertNotIn(token.encode(), cmdline, f"pid {p}: {cmdline!r}")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            self.assertEqual(f.read().split(b"\0")[-2:], [b"sh", b""])
        with open(f"/proc/{pid}/environ", "rb") as f:
            self.assertIn(b"QUEUECTL_CLAIM=" + token.encode(), f.read().split(b"\0"))
        self.go()
        self.wait_state("v", "completed")


# Config ######################################################################

class TestConfig(QueueTest):
    def test_defaults(self):
        out = self.ok("config", "list")
        for line in ("max_retries = 3", "backoff_base = 2", "max_backoff = 3600",
                     "job_timeout = 0", "kill_grace = 10"):
            self.assertIn(line, out)
        self.assertEqual(json.loads(self.ok("config", "list", "--json")),
                         {"max_retries": 3, "backoff_base": 2, "max_backoff": 3600,
                          "backoff_jitter": "10%", "scheduling_mode": "priority",
                          "job_timeout": 0, "slow_factor": 3, "kill_grace": 10,
                          "hook_timeout": 300,
                          "on_success": "", "on_failure": "", "on_dead": "",
                          "on_cancel": "", "retry_on": "", "no_retry_on": "", "mem": 0,
                          "cpu_time": 0, "nofile": 0, "nice": 0, "launcher": "",
                          "launcher_hosts": ""})
        self.assertEqual(self.ok("config", "get", "max_retries"), "3\n")

    def test_set_get_and_key_aliases(self):
        self.assertEqual(self.ok("config", "set", "max-retries", "5"), "max_retries = 5\n")
        self.assertEqual(self.ok("config", "get", "max_retries"), "5\n")
        self.assertEqual(self.ok("config", "get", "max-retries"), "5\n")
        self.ok("config", "set", "max_backoff", "0.5")
        self.assertEqual(self.ok("config", "get", "max-backoff"), "0.5\n")
        self.ok("config", "set", "job-timeout", "30")
        with open(os.path.join(self.home, "config.json")) as f:
            self.assertEqual(json.load(f), {"max_retries": 5, "max_backoff": 0.5,
                                            "job_timeout": 30})
        values = json.loads(self.ok("config", "list", "--json"))
        self.assertEqual(values["max_retries"], 5)
        self.assertEqual(values["backoff_base"], 2)
        out = self.ok("config", "list")
        self.assertRegex(out, r"(?m)^max_retries = 5$")
        self.assertRegex(out, r"(?m)^backoff_base = 2\s+\(default\)$")

    def test_invalid_values_are_refused(self):
        self.ok("config", "set", "max_retries", "4")
        path = os.path.join(self.home, "config.json")
        with open(path) as f:
            before = f.read()
        for key, value, allowed in (
                ("max_retries", "abc", "from 0 to"), ("max_retries", "NaN", "from 0 to"),
                ("max_retries", "inf", "from 0 to"), ("max_retries", "-1", "from 0 to"),
                ("max-retries", "true", "from 0 to"), ("max_retries", "2.5", "whole"),
                ("backoff_base", "0.5", "from 1 to")):
            with self.subTest(key=key, value=value):
                r = self.fails(2, "config", "set", key, value)
                self.assertIn(allowed, self.error_line(r))
                self.assertEqual(r.out, "")
        with open(path) as f:
            self.assertEqual(f.read(), before)
        self.assertEqual(self.ok("config", "get", "max_retries"), "4\n")

    def test_unknown_key_is_refused_naming_the_allowed_ones(self):
        for args in (("set", "retries", "1"), ("get", "retries")):
            with self.subTest(args=args):
                r = self.fails(2, "config", *args)
                line = self.error_line(r)
                self.assertIn("retries", line)
                for key in ("max_retries", "backoff_base", "max_backoff", "job_timeout",
                            "kill_grace"):
                    self.assertIn(key, line)
        self.assertFalse(os.path.exists(os.path.join(self.home, "config.json")))

    def test_config_file_that_is_not_json(self):
        self.enqueue("--id", "j", "true")
        path = os.path.join(self.home, "config.json")
        with open(path, "w") as f:
            f.write('{"max_retries": 2,,}\n')
        for args in (("config", "list"), ("config", "get", "max_retries"),
                     ("config", "set", "max_retries", "1"),
                     ("worker", "start", "--drain")):
            with self.subTest(args=args):
                r = self.fails(2, *args)
                self.assertIn(path, self.error_line(r))
        with open(path) as f:
            self.assertEqual(f.read(), '{"max_retries": 2,,}\n')

    def test_broken_config_refused_by_worker_and_doctor_not_by_enqueue(self):
        # enqueue does not use the config: a typo in it must not stop cron
        # from queueing work; the commands that use it name the file.
        self.enqueue("--id", "j", "true")
        path = os.path.join(self.home, "config.json")
        for n, text in enumerate(('{"max_retries": 2,,}\n', '{"max_retries": "x"}\n')):
            with self.subTest(text=text):
                with open(path, "w") as f:
                    f.write(text)
                self.assertEqual(self.enqueue("--id", f"k{n}", "true"), f"k{n}")
                before = self.db_dump()
                r = self.fails(2, "worker", "start", "--drain")
                self.assertIn(path, self.error_line(r))
                self.assertEqual(self.db_dump(), before)      # nothing ran
                r = self.q("doctor")
                self.assertEqual(r.code, 1, r)
                self.assertIn(path, r.out)

    def test_config_file_with_wrong_types(self):
        path = os.path.join(self.home, "config.json")
        os.makedirs(self.home, mode=0o700)
        for text, word in (('{"max_retries": "x"}', "max_retries"),
                           ('{"backoff_base": 0.5}', "backoff_base"),
                           ('{"nonsense": 1}', "nonsense"),
                           ('[1, 2]', "object"),
                           ('{"max_backoff": NaN}', path)):
            with self.subTest(text=text):
                with open(path, "w") as f:
                    f.write(text)
                r = self.fails(2, "config", "list")
                line = self.error_line(r)
                self.assertIn(path, line)
                self.assertIn(word, line)
        r = self.fails(2, "worker", "start", "--drain")
        self.assertIn(path, self.error_line(r))

    def test_config_is_written_atomically_leaving_no_temp_files(self):
        self.ok("config", "set", "max_retries", "1")
        self.ok("config", "set", "kill_grace", "2")
        self.assertEqual(sorted(n for n in os.listdir(self.home) if "config" in n),
                         ["config.json"])


# Enqueue and job specs #######################################################

class TestEnqueue(QueueTest):
    def test_plain_command_prints_only_the_id(self):
        r = self.q("enqueue", "echo hi")
        self.assertEqual(r.code, 0, r)
        self.assertEqual(r.err, CREATED % self.home)       # the first one only
        self.assertEqual(self.q("enqueue", "echo hi").err, "")
        self.assertRegex(r.out, r"^[0-9a-z]{6}\n$")
        job = self.job(r.out.strip())
        self.assertEqual(job["command"], "echo hi")
        self.assertEqual(job["state"], "pending")
        self.assertEqual(job["queue"], "default")
        self.assertEqual(job["priority"], 0)
        self.assertEqual(job["attempts"], 0)

    def test_generated_ids_are_short_and_distinct(self):
        ids = [self.enqueue("true") for _ in range(4)]
        for i in ids:
            self.assertRegex(i, r"^[0-9a-z]{6}$")
        self.assertEqual(len(set(ids)), 4)

    def test_json_object_job(self):
        out = self.ok("enqueue", '{"id":"a","command":"echo hi","max_retries":2,'
                      '"priority":5,"queue":"q1","timeout":7,"env":{"K":"v"}}')
        self.assertEqual(out, "a\n")
        job = self.job("a")
        self.assertEqual((job["command"], job["max_retries"], job["priority"],
                          job["queue"], job["timeout"], job["env"]),
                         ("echo hi", 2, 5, "q1", 7, ["K"]))
        self.assertEqual(self.show_env("a")["K"], "v")

    def test_json_output(self):
        r = self.q("enqueue", "--id", "j", "--json", "echo hi")
        self.assertEqual(r.code, 0, r)
        job = json.loads(r.out)
        self.assertEqual((job["id"], job["state"], job["command"]),
                         ("j", "pending", "echo hi"))

    def test_json_job_with_wrong_types_is_refused(self):
        self.enqueue("--id", "first", "true")
        before = self.db_dump()
        for text in ('{"command": 5}', '{"id": "a"}',
                     '{"command": "x", "priority": "high"}',
                     '{"command": "x", "max_retries": true}',
                     '{"command": "x", "timeout": "5"}',
                     '{"command": "x", "env": {"A": 1}}',
                     '{"command": "x", "depends_on": [1]}',
                     '{"command": "x", "bogus": 1}',
                     '{"command": "x", "max_retries": NaN}',
                     '{"command": "x"'):
            with self.subTest(text=text):
                r = self.fails(2, "enqueue", text)
                self.assertEqual(len(r.err.strip().splitlines()), 1, r)
                self.assertEqual(r.out, "")
        self.assertEqual(self.db_dump(), before)

    def test_json_job_id_must_be_a_string(self):
        self.enqueue("--id", "first", "true")
        before = self.db_dump()
        for text in ('{"id": 5, "command": "true"}', '{"id": true, "command": "true"}',
                     '{"id": ["a"], "command": "true"}'):
            with self.subTest(text=text):
                r = self.fails(2, "enqueue", text)
                self.assertIn("id", self.error_line(r))
                self.assertEqual(r.out, "")
        self.assertEqual(self.db_dump(), before)

    def test_json_run_at_must_be_a_time_string(self):
        self.enqueue("--id", "first", "true")
        before = self.db_dump()
        for text in ('{"command": "x", "run_at": 12}', '{"command": "x", "run_at": 12.5}'):
            with self.subTest(text=text):
                r = self.fails(2, "enqueue", text)
                self.assertIn("run_at", self.error_line(r))
        self.assertEqual(self.db_dump(), before)

    def test_invalid_ids_are_refused_and_nothing_changes(self):
        self.enqueue("--id", "first", "true")
        before = self.db_dump()
        for bad in ("../x", "a/b", "-x", "", "x" * 129, "é"):
            with self.subTest(bad=bad):
                r = self.fails(2, "enqueue", f"--id={bad}", "true")
                self.assertEqual(len(r.err.strip().splitlines()), 1, r)
                self.assertIn("--id needs a value" if bad == "" else "invalid job id",
                              r.err)
                self.assertEqual(r.out, "")
        r = self.fails(2, "enqueue", json.dumps({"id": "../x", "command": "true"}))
        self.assertIn("invalid job id", r.err)
        self.assertEqual(self.db_dump(), before)
        self.assertEqual(self.enqueue("--id", "y" * 128, "true"), "y" * 128)

    def test_duplicate_id_fails(self):
        self.enqueue("--id", "a", "echo one")
        before = self.db_dump()
        r = self.fails(1, "enqueue", "--id", "a", "echo two")
        self.assertIn("'a'", r.err)
        self.assertEqual(r.out, "")
        self.assertEqual(self.db_dump(), before)
        self.assertEqual(self.job("a")["command"], "echo one")

    def test_unique_prints_the_id_and_changes_nothing(self):
        self.enqueue("--id", "a", "echo one")
        before = self.db_dump()
        r = self.q("enqueue", "--id", "a", "--unique", "--priority", "9", "echo two")
        self.assertEqual((r.code, r.out, r.err), (0, "a\n", ""))
        self.assertEqual(self.db_dump(), before)
        # A new id with --unique is an ordinary enqueue.
        self.assertEqual(self.enqueue("--id", "b", "--unique", "true"), "b")

    def test_stdin_batch(self):
        text = 'echo 1\n{"id": "j2", "command": "echo 2", "priority": 3}\n\n  \necho 3\n'
        r = self.q("enqueue", "--stdin", input=text)
        self.assertEqual(r.code, 0, r)
        ids = r.out.split()
        self.assertEqual(len(ids), 3)
        self.assertEqual(ids[1], "j2")
        listed = [j["id"] for j in json.loads(self.ok("list", "--json"))]
        self.assertEqual(listed, ids)
        self.assertEqual(self.job("j2")["priority"], 3)

    def test_stdin_bad_line_rejects_the_whole_batch(self):
        self.enqueue("--id", "old", "true")
        before = self.db_dump()
        r = self.fails(2, "enqueue", "--stdin",
                       input='echo 1\n{"id": "n2", "command": "echo 2"}\n{"command": 5}\n'
                             'echo 4\n')
        self.assertIn("line 3", self.error_line(r))
        self.assertEqual(r.out, "")
        self.assertEqual(self.db_dump(), before)
        # A duplicate id (of the db or of an earlier line) is exit 1, named too.
        r = self.fails(1, "enqueue", "--stdin", input='echo 1\n{"id":"old","command":"x"}\n')
        self.assertIn("line 2", self.error_line(r))
        r = self.fails(1, "enqueue", "--stdin",
                       input='{"id":"n","command":"x"}\necho\n{"id":"n","command":"y"}\n')
        self.assertIn("line 3", self.error_line(r))
        self.assertEqual(self.db_dump(), before)
        self.fails(2, "enqueue", "--stdin", input="\n\n")
        self.assertEqual(self.db_dump(), before)

    def test_cwd_defaults_to_the_callers_directory(self):
        sub = self.path("sub dir")
        os.mkdir(sub)
        job_id = self.enqueue("pwd > out.txt", cwd=sub)
        self.assertEqual(os.path.realpath(self.job(job_id)["cwd"]), os.path.realpath(sub))
        self.drained(0)
        with open(os.path.join(sub, "out.txt")) as f:
            self.assertEqual(os.path.realpath(f.read().strip()), os.path.realpath(sub))

    def test_cwd_option(self):
        other = self.path("other")
        os.mkdir(other)
        self.enqueue("--id", "j", "--cwd", other, "pwd > out.txt")
        self.drained(0)
        self.assertTrue(os.path.exists(os.path.join(other, "out.txt")))
        self.assertFalse(os.path.exists(self.path("out.txt")))

    def test_env_and_job_variables_reach_the_job(self):
        self.enqueue("--id", "envjob", "--env", "FOO=bar baz", "--env", "X=1=2",
                     'printf "%s|%s|%s|%s\\n" "$FOO" "$X" "$QUEUECTL_JOB_ID" '
                     '"$QUEUECTL_ATTEMPT" > env.txt')
        self.assertEqual(self.job("envjob")["env"], ["FOO", "X"])
        env = self.show_env("envjob")
        self.assertEqual((env["FOO"], env["X"]), ("bar baz", "1=2"))
        self.drained(0)
        with open(self.path("env.txt")) as f:
            self.assertEqual(f.read(), "bar baz|1=2|envjob|1\n")

    def test_attempt_number_counts_up(self):
        self.set_fast_retries()
        self.enqueue("--id", "j", "--max-retries", "2",
                     'echo "$QUEUECTL_ATTEMPT" >> attempts.txt; exit 1')
        self.drained(1)
        self.assertEqual(self.lines("attempts.txt"), ["1", "2", "3"])

class TestJobEnvironment(QueueTest):
    """A job runs in the environment and umask of whoever enqueued it, as
    with at(1), pueue, tsp and nq; not in the worker's."""

    def enqueue_as(self, env_extra, umask, *args, input=None, drop=()):
        """enqueue run from a shell with env_extra set and this umask."""
        env = {k: v for k, v in self.env.items() if k not in drop}
        env.update(env_extra)
        r = subprocess.run(["/bin/sh", "-c", f'umask {umask}; exec "$@"', "sh", PY, PROG,
                            "enqueue", *args], env=env, cwd=self.work, input=input,
                           capture_output=True, text=True, timeout=30)
        self.assertEqual(r.returncode, 0, r.stderr)
        return r.stdout

    def drain_as_worker(self):
        """Drain with a worker whose environment says FOO=worker, umask 022."""
        env = dict(self.env, FOO="worker", ONLY_WORKER="w")
        r = subprocess.run(["/bin/sh", "-c", 'umask 022; exec "$@"', "sh", PY, PROG,
                            "worker", "start", "--drain"], env=env, cwd=self.work,
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    def test_plain_json_and_stdin_jobs_get_the_enqueuers_env_and_umask(self):
        def show(n):
            return f'echo "$FOO|${{ONLY_WORKER-unset}}|$(umask)" > {n}.txt; touch {n}.file'
        self.enqueue_as({"FOO": "plain"}, "027", "--id", "p", show("p"))
        self.enqueue_as({"FOO": "json"}, "027", json.dumps({"id": "j", "command": show("j")}))
        self.enqueue_as({"FOO": "stdin"}, "027", "--stdin",
                        input=json.dumps({"id": "s", "command": show("s")}) + "\n")
        self.drain_as_worker()
        for name in ("plain", "json", "stdin"):
            with self.subTest(name=name):
                self.assertEqual(self.lines(f"{name[0]}.txt"), [f"{name}|unset|0027"])
                mode = os.stat(self.path(f"{name[0]}.file")).st_mode & 0o777
                self.assertEqual(oct(mode), oct(0o640))

    def test_env_sets_and_passes_values_and_worker_env_opts_out(self):
        self.enqueue_as({"FOO": "mine", "BAR": "b"}, "077", "--id", "o",
                        "--env", "FOO=over", 'echo "$FOO|$BAR" > o.txt')
        # --worker-env: the worker's environment and umask; --env NAME still
        # passes that one variable from here.
        self.enqueue_as({"FOO": "mine", "BAR": "b"}, "077", "--id", "w", "--worker-env",
                        "--env", "BAR", 'echo "$FOO|$BAR|$ONLY_WORKER|$(umask)" > w.txt')
        r = self.fails(2, "enqueue", "--env", "NOT_SET_ANYWHERE", "true")
        self.assertIn("NOT_SET_ANYWHERE is not set here", r.err)
        self.drain_as_worker()
        self.assertEqual(self.lines("o.txt"), ["over|b"])
        self.assertEqual(self.lines("w.txt"), ["worker|b|w|0022"])
        self.assertEqual((self.job("o")["env_from"], self.job("w")["env_from"]),
                         ("enqueuer", "worker"))

    def test_queuectl_variables_of_the_enqueuer_never_reach_the_job(self):
        fake = {"QUEUECTL_JOB_ID": "fake", "QUEUECTL_ATTEMPT": "9",
                "QUEUECTL_CLAIM": "fakeclaim", "QUEUECTL_OTHER": "x",
                "__QUEUECTL_COMMAND": "echo hijacked"}
        self.enqueue_as(fake, "022", "--id", "real", "--env", "QUEUECTL_JOB_ID=fake2",
                        'echo "$QUEUECTL_JOB_ID|$QUEUECTL_ATTEMPT|${QUEUECTL_OTHER-unset}'
                        '|$QUEUECTL_HOME|${#QUEUECTL_CLAIM}" > ids.txt')
        self.assertNotIn("QUEUECTL_OTHER", self.show_env("real"))
        self.drain_as_worker()
        self.assertEqual(self.lines("ids.txt"), [f"real|1|unset|{self.home}|12"])

    def test_an_environment_is_stored_once_for_many_jobs(self):
        lines = "".join(f"echo {i}\n" for i in range(300))
        self.enqueue_as({"FOO": "same"}, "022", "--stdin", input=lines)
        for _ in range(3):
            self.enqueue_as({"FOO": "same"}, "022", "true")
        con = self.db()
        self.assertEqual(con.execute("SELECT count(*) FROM envs").fetchone()[0], 1)
        self.enqueue_as({"FOO": "other"}, "022", "--id", "other", "true")
        self.assertEqual(con.execute("SELECT count(*) FROM envs").fetchone()[0], 2)
        self.ok("cancel", "other")
        self.ok("prune", "--older-than", "0")
        # The last job that used it is gone: so is the environment.
        self.assertEqual(con.execute("SELECT count(*) FROM envs").fetchone()[0], 1)

    def test_values_are_printed_only_by_show_env(self):
        self.enqueue_as({"SECRET_TOKEN": "hunter2"}, "022", "--id", "s",
                        "--env", "API_KEY=swordfish", "true")
        for args in (("list",), ("list", "--json"), ("show", "s"), ("show", "s", "--json"),
                     ("status", "s"), ("dlq", "list")):
            with self.subTest(args=args):
                out = self.ok(*args)
                self.assertNotIn("hunter2", out)
                self.assertNotIn("swordfish", out)
        self.assertEqual(self.job("s")["env"], ["API_KEY"])
        out = self.ok("show", "s", "--env")
        self.assertIn("SECRET_TOKEN=hunter2", out)
        self.assertIn("API_KEY=swordfish", out)
        env = self.show_env("s")
        self.assertEqual((env["SECRET_TOKEN"], env["API_KEY"]), ("hunter2", "swordfish"))

    def test_an_environment_that_cannot_be_read_is_a_counted_failed_attempt(self):
        self.enqueue("--id", "j", "--max-retries", "0", "echo ran > ran.txt")
        con = self.db()
        con.execute("PRAGMA foreign_keys = OFF")
        con.execute("DELETE FROM envs")                  # as a damaged database would
        con.commit()
        self.drained(1)
        job = self.job("j")
        self.assertEqual((job["state"], job["attempts"]), ("dead", 1))
        self.assertIn("could not start", job["last_error"])
        self.assertIn("environment", job["last_error"])
        self.assertEqual(self.lines("ran.txt"), [])

    def test_an_environment_id_is_never_reused(self):
        # Workers cache environments by id: an id must never come to mean
        # another environment, even after its row was deleted and a hash
        # collided (here every hash collides).
        store = queuectl.Store(self.home)
        self.addCleanup(store.close)
        real = queuectl.env_key
        queuectl.env_key = lambda blob: 42
        self.addCleanup(setattr, queuectl, "env_key", real)
        with store.tx():
            alice = store.add_env(b"SECRET=alice")
        with store.tx():
            store.drop_unused_envs([alice])
        with store.tx():
            bob = store.add_env(b"SECRET=bob")
            carol = store.add_env(b"SECRET=carol")
            self.assertEqual(store.add_env(b"SECRET=bob"), bob)
        self.assertEqual(len({alice, bob, carol}), 3)
        self.assertEqual(store.env(bob), {"SECRET": "bob"})
        self.assertIsNone(store.env(alice))

    def test_what_python_adds_at_start_up_and_odd_names_are_not_captured(self):
        env = {k: v for k, v in self.env.items() if not k.startswith("LC_")}
        env.update({"LANG": "C", "a-b": "x", "OK_NAME": "y"})
        r = subprocess.run([*QUEUECTL, "enqueue", "--id", "j", "true"], env=env,
                           cwd=self.work, capture_output=True, text=True, timeout=30)
        self.assertEqual(r.returncode, 0, r.stderr)
        got = self.show_env("j")
        self.assertNotIn("LC_CTYPE", got)        # Python's locale coercion
        self.assertNotIn("a-b", got)             # no shell variable can carry it
        self.assertEqual((got["LANG"], got["OK_NAME"]), ("C", "y"))
        r = self.fails(2, "enqueue", "--env", "a-b=1", "true")
        self.assertIn("invalid environment variable name 'a-b'", r.err)

    def test_unique_on_an_existing_id_leaves_no_environment_behind(self):
        self.enqueue_as({"FOO": "1"}, "022", "--id", "x", "true")
        for value in ("2", "3"):
            self.assertEqual(self.enqueue_as({"FOO": value}, "022", "--id", "x",
                                             "--unique", "true"), "x\n")
        self.assertEqual(self.db().execute("SELECT count(*) FROM envs").fetchone()[0], 1)

    def downgrade_to_schema_1(self):
        """Make the home's database what queuectl 1.0 (schema 1) wrote."""
        con = sqlite3.connect(os.path.join(self.home, "queue.db"), timeout=10)
        for sql in ("DROP TABLE history", "ALTER TABLE jobs DROP COLUMN launcher",
                    "DROP INDEX jobs_label", "ALTER TABLE jobs DROP COLUMN label",
                    "DROP INDEX jobs_claimed", "DROP INDEX jobs_schedule",
                    "DROP TABLE schedules",
                    "DROP TABLE attempts",
                    *(f"ALTER TABLE jobs DROP COLUMN {c}" for c in (
                        "mem", "cpu_time", "nofile", "nice", "schedule", "usage")),
                    *(f"ALTER TABLE stats DROP COLUMN {c}" for c in (
                        "cpu_user", "cpu_sys", "rss_sum", "rss_count",
                        *queuectl.RSS_COLUMNS)),
                    "DROP INDEX jobs_hook_of", "DROP TABLE job_keys", "DROP TABLE limits",
                    *(f"ALTER TABLE jobs DROP COLUMN {c}" for c in (
                        "keys", "hooks", "retry_on", "no_retry_on", "hook_of")),
                    "DROP INDEX jobs_env", "DROP INDEX envs_hash", "DROP TABLE envs",
                    "DROP TABLE durations",
                    "ALTER TABLE jobs DROP COLUMN env_id",
                    "ALTER TABLE jobs DROP COLUMN umask", "PRAGMA user_version = 1"):
            con.execute(sql)
        con.commit()
        con.close()

    def test_migrating_says_so_when_an_older_worker_still_runs(self):
        old = os.path.join(self.tmp, "old", "queuectl.py")
        os.mkdir(os.path.dirname(old))
        with open(PROG) as f:
            text = f.read()
        with open(old, "w") as f:            # this file, as a schema-1 queuectl
            f.write(text.replace(f"SCHEMA_VERSION = {queuectl.SCHEMA_VERSION}",
                                 "SCHEMA_VERSION = 1"))
        p = subprocess.Popen([PY, old, "worker", "start"], env=self.env, cwd=self.work,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(p)
        def registered():
            try:
                return self.db().execute("SELECT count(*) FROM workers").fetchone()[0]
            except sqlite3.Error:            # no file or no table yet
                return False
        self.wait_for(registered, what="the older worker")
        self.downgrade_to_schema_1()
        r = self.q("status")
        self.assertEqual(r.code, 0, r)
        self.assertIn("upgraded", r.err)
        self.assertIn("1 worker of an older queuectl still run", r.err)
        self.assertEqual(self.q("status").err, "")

    def test_a_version_1_database_is_migrated_and_its_jobs_keep_the_workers_env(self):
        self.env.pop("FOO", None)
        self.enqueue("--id", "old", 'echo "$FOO" > old.txt')
        self.downgrade_to_schema_1()
        self.assertEqual(self.job("old")["env_from"], "worker")
        self.enqueue("--id", "new", 'echo "$FOO" > new.txt')
        self.assertEqual(self.db().execute("PRAGMA user_version").fetchone()[0],
                         queuectl.SCHEMA_VERSION)
        self.drain_as_worker()
        self.assertEqual((self.lines("old.txt"), self.lines("new.txt")), (["worker"], []))

class TestEnqueueStartUp(unittest.TestCase):
    """enqueue runs from cron thousands of times a day: its plain forms are
    parsed without argparse (fast_parse), exactly as argparse parses them,
    and it imports neither argparse nor the sqlite3 package."""

    SAMPLES = [
        ["enqueue", "true"],
        ["enqueue", "echo", "hello", "world"],
        ["enqueue", "pg_dump mydb > /backup/mydb.sql"],
        ["--home", "/tmp/h", "enqueue", "true"],
        ["--home=/tmp/h", "enqueue", "--home", "/tmp/g", "true"],
        ["enqueue", "--queue", "backups", "--priority", "5", "--max-retries=2",
         "rsync", "-a", "/srv/", "/backup/srv/"],
        ["enqueue", "-p", "3", "--timeout", "5m", "--delay", "90", "echo", "-n", "x"],
        ["enqueue", "--id", "nightly", "--unique", "--worker-env", "./backup.sh"],
        ["enqueue", "--env", "A=1", "--env", "B", "--after", "x", "--after=y", "true"],
        ["enqueue", "--stdin"],
        ["enqueue", "--json", "-c", "echo hi"],
        ["enqueue", "--run-at", "03:00", "--cwd", "/tmp", "./report.sh", "--full"],
        ["enqueue", '{"command": "echo hi"}'],
        ["enqueue", "-", "x"],
        ["enqueue", "--queue=", "true"],
        ["enqueue"],
        # argparse's alone: help, --, abbreviations, odd values, mistakes.
        ["enqueue", "--help"],
        ["enqueue", "--", "-x"],
        ["enqueue", "--prio", "5", "true"],
        ["enqueue", "-p5", "true"],
        ["enqueue", "--priority", "-5", "true"],
        ["enqueue", "--priority", "x", "true"],
        ["enqueue", "--unique=1", "true"],
        ["enqueue", "--bogus", "true"],
        ["enqueue", "--queue"],
        ["enqueue", "echo hi", "--queue", "q"],
        ["enqueue", "{", "echo", "hi;", "}"],
        ["--home", "enqueue", "true"],
        ["--hom", "/tmp/h", "enqueue", "true"],
        ["list"],
    ]

    PARSED_FAST = 16           # the first samples are the plain forms

    def argparse_args(self, argv):
        parser = queuectl.build_parser(queuectl._command_name(argv))
        parser.argv = argv
        with open(os.devnull, "w") as null:
            out, err = sys.stdout, sys.stderr
            sys.stdout = sys.stderr = null
            try:
                return vars(parser.parse_args(argv))
            except (SystemExit, queuectl.QueuectlError) as e:
                return repr(e)
            finally:
                sys.stdout, sys.stderr = out, err

    def test_fast_parse_agrees_with_argparse_or_leaves_it_the_argv(self):
        for i, argv in enumerate(self.SAMPLES):
            with self.subTest(argv=argv):
                fast = queuectl.fast_parse(argv)
                if i < self.PARSED_FAST:
                    self.assertIsNotNone(fast, "a plain form went to argparse")
                else:
                    self.assertIsNone(fast, "argparse's to parse")
                    continue
                slow = self.argparse_args(argv)
                self.assertIsInstance(slow, dict)
                got = vars(fast)
                for key in ("parser", "handler"):
                    got.pop(key), slow.pop(key)
                self.assertEqual(got, slow)
        self.assertEqual(queuectl.REMAINDER, __import__("argparse").REMAINDER)

    def test_enqueue_imports_neither_argparse_nor_the_sqlite3_package(self):
        # What the interpreter itself loads (a site .pth hook may load re)
        # does not count: only what queuectl adds to it.
        heavy = "('argparse', 're', 'sqlite3', 'datetime', 'json', 'subprocess')"
        bare = subprocess.run(
            [PY, "-I", "-c", f"import sys; print([m for m in {heavy} if m in sys.modules])"],
            capture_output=True, text=True, timeout=60).stdout.strip()
        with tempfile.TemporaryDirectory() as home:
            code = ("import sys; sys.path.insert(0, sys.argv[1]); import queuectl; "
                    "code = queuectl.main(['enqueue', '--queue', 'q', 'echo', 'hi']); "
                    f"print(code, [m for m in {heavy} if m in sys.modules])")
            p = subprocess.run([PY, "-I", "-c", code, HERE], capture_output=True,
                               text=True, timeout=60,
                               env=dict(os.environ, QUEUECTL_HOME=home))
            self.assertEqual(p.stderr, CREATED % home)
            job_id, last = p.stdout.splitlines()
            self.assertEqual(last, f"0 {bare}")
            con = sqlite3.connect(os.path.join(home, "queue.db"))
            try:
                row = con.execute("SELECT command, queue FROM jobs WHERE id = ?",
                                  (job_id,)).fetchone()
            finally:
                con.close()
            self.assertEqual(row, ("echo hi", "q"))

    def test_shell_names(self):
        for name, ok in [(b"A", True), (b"_a1", True), (b"_", True), (b"1a", False),
                         (b"a-b", False), (b"", False), (b"\xc3\xa9", False),
                         (b"a b", False), ("é".encode(), False), (b"A\x00", False)]:
            self.assertEqual(queuectl.shell_name(name), ok, name)


class TestCommandsAsTyped(QueueTest):
    """Commands as people type them: words, --, brace groups, times a person
    writes, durations, lists, -n, and exit 2 for what is not allowed."""

    def output_of(self, job_id):
        return [line for line in self.log(job_id).splitlines()
                if not line.startswith("[queuectl]")]

    def test_words_are_one_command_and_options_go_before_it(self):
        self.enqueue("--id", "w", "echo", "hello", "world")
        self.enqueue("--id", "q", "--queue", "q1", "printf", "%s|", "a  b", "it's", "-n")
        self.enqueue("--id", "d", "--max-retries", "0", "--", "-x")   # starts with -
        self.enqueue("--id", "old", "echo old way", "--queue", "q2")  # options after
        self.assertEqual([self.job(i)["command"] for i in ("w", "q", "d", "old")],
                         ["echo hello world", "printf '%s|' 'a  b' 'it'\"'\"'s' -n",
                          "-x", "echo old way"])
        self.assertEqual((self.job("q")["queue"], self.job("old")["queue"]), ("q1", "q2"))
        r = self.fails(2, "enqueue", "echo a b", "c")
        self.assertIn("not both", r.err)
        self.drain()
        self.assertEqual(self.output_of("w"), ["hello world"])
        self.assertEqual(self.output_of("q"), ["a  b|it's|-n|"])

    def test_a_brace_group_is_a_command_and_broken_json_points_at_c(self):
        self.enqueue("--id", "g", "{ echo a; echo b; } > g.txt")
        self.enqueue('{"id": "j", "command": "echo json"}')
        before = self.db_dump()
        r = self.fails(2, "enqueue", '{"id": "x", "command": ')
        self.assertIn("invalid JSON job", r.err)
        self.assertIn("-c", self.error_line(r))
        self.assertEqual(self.db_dump(), before)
        self.drain()
        self.assertEqual(self.lines("g.txt"), ["a", "b"])
        self.assertEqual(self.output_of("j"), ["json"])

    def test_run_at_as_a_person_types_it(self):
        now = time.time()
        self.enqueue("--id", "rel", "--run-at", "+90m", "true")
        self.enqueue("--id", "off", "--run-at", "2036-12-01T03:00+02:00", "true")
        self.enqueue("--id", "clock", "--run-at", "03:00", "true")
        self.enqueue("--id", "tom", "--run-at", "tomorrow 03:00", "true")
        self.enqueue("--id", "day", "--run-at", "2036-12-01 03:00", "true")
        rel = queuectl.epoch(self.job("rel")["run_at"])
        self.assertLess(abs(rel - (now + 5400)), 30)
        self.assertEqual(self.job("off")["run_at"], "2036-12-01T01:00:00Z")
        clock = queuectl.epoch(self.job("clock")["run_at"])
        self.assertTrue(now < clock <= now + 86400 + 3600)       # the next 03:00
        self.assertEqual(time.localtime(clock)[3:5], (3, 0))
        self.assertEqual(time.localtime(queuectl.epoch(self.job("tom")["run_at"]))[3:5],
                         (3, 0))
        self.assertEqual(time.localtime(queuectl.epoch(self.job("day")["run_at"]))[:5],
                         (2036, 12, 1, 3, 0))
        self.assertRegex(self.ok("show", "rel"),
                         rf"(?m)^run_at +{HUMAN_TIME_RE} \(in 1h30m\)$")
        listed = [line for line in self.ok("list").splitlines() if line.startswith("rel ")]
        self.assertIn("(in 1h30m)", listed[0])
        r = self.fails(2, "enqueue", "--run-at", "tomorrowish", "true")
        self.assertIn("tomorrow 03:00", r.err)

    def test_every_duration_takes_units(self):
        self.assertEqual(self.ok("config", "set", "job_timeout", "1h"), "job_timeout = 3600\n")
        self.assertEqual(self.ok("config", "set", "max_backoff", "10m"),
                         "max_backoff = 600\n")
        self.assertEqual(self.ok("config", "set", "kill_grace", "30s"), "kill_grace = 30\n")
        self.enqueue("--id", "t", "--timeout", "1m", "--delay", "1h", "true")
        self.assertEqual(self.job("t")["timeout"], 60)
        self.ok("worker", "stop", "--wait", "--timeout", "5m")
        self.assertEqual(self.q("wait", "t", "--timeout", "0.1s").code, 124)
        self.ok("cancel", "t", "--grace", "2s")
        self.assertEqual(self.q("wait", "t", "--timeout", "5m").code, 1)

    def test_filters_repeat_or_take_comma_lists(self):
        self.enqueue("--id", "a", "--queue", "qa", "--max-retries", "0", "exit 1")
        self.enqueue("--id", "b", "--queue", "qb", "true")
        self.enqueue("--id", "c", "--queue", "qc", "--delay", "1h", "true")
        self.drain()

        def ids(*args):
            return [j["id"] for j in json.loads(self.ok("list", "--json", *args))]
        self.assertEqual(ids("--state", "dead", "--state", "completed"), ["a", "b"])
        self.assertEqual(ids("--state", "dead,completed"), ["a", "b"])
        self.assertEqual(ids("--queue", "qa,qc"), ["a", "c"])
        self.assertEqual(ids("--queue", "qa", "--queue", "qb", "--state", "completed"), ["b"])
        self.assertEqual(self.ok("prune", "--older-than", "0", "--state", "dead,completed"),
                         "pruned 2 jobs\n")

    def test_logs_n_is_tail_n(self):
        self.enqueue("--id", "j", "seq 1 50")
        self.drain()
        self.assertEqual(self.ok("logs", "j", "-n", "2"), self.ok("logs", "j", "--tail", "2"))
        self.assertEqual(self.ok("logs", "-n", "3", "j").splitlines()[0], "49")

    def test_an_unknown_flag_is_one_line_naming_that_subcommands_help(self):
        for args, hint in ((("list", "--bogus"), "(see queuectl list --help)"),
                           (("worker", "start", "--bogus"), "(see queuectl worker start --help)"),
                           (("dlq", "retry", "--bogus"), "(see queuectl dlq retry --help)"),
                           (("logs", "x", "--nope"), "(see queuectl logs --help)")):
            with self.subTest(args=args):
                r = self.fails(2, *args)
                self.assertEqual(len(r.err.splitlines()), 1, r.err)
                self.assertTrue(r.err.rstrip().endswith(hint), r.err)

    def test_a_mistyped_command_names_the_nearest_one(self):
        for args, line in ((("lsit",), 'unknown command \'lsit\': did you mean "list"? '
                                       "(see queuectl --help)"),
                           (("worker", "strat"), 'unknown command \'strat\': did you mean '
                                                 '"start"? (see queuectl worker --help)'),
                           (("xyzzy",), "unknown command 'xyzzy' (see queuectl --help)")):
            with self.subTest(args=args):
                r = self.fails(2, *args)
                self.assertEqual(r.err, f"queuectl: error: {line}\n")

    def test_broken_json_is_never_a_command_and_comments_are_skipped(self):
        for text in ("{invalid json}", "{'id':'j','command':'x'}", "{id:j,command:x}"):
            with self.subTest(text=text):
                r = self.fails(2, "enqueue", text)
                self.assertIn("invalid JSON job", r.err)
        self.assertEqual(self.db_dump(), None)               # nothing, not even a home
        r = self.q("enqueue", "--stdin", input="# nightly jobs\n\n   # more\necho a\n")
        self.assertEqual(len(r.out.split()), 1, r)
        self.assertEqual([j["command"] for j in json.loads(self.ok("list", "--json"))],
                         ["echo a"])

    def test_config_get_with_no_key_prints_every_setting(self):
        self.ok("config", "set", "max-retries", "7")
        self.assertEqual(self.ok("config", "get"), self.ok("config", "list"))
        self.assertEqual(json.loads(self.ok("config", "get", "--json"))["max_retries"], 7)

    def test_empty_values_are_refused_with_what_is_allowed(self):
        self.enqueue("--id", "keep", "true")
        before = self.db_dump()
        r = self.fails(2, "list", "--state", "")
        self.assertIn("--state needs a value: one of pending, processing", r.err)
        for args in (("list", "--queue", ""), ("list", "--state", "dead,"),
                     ("enqueue", "--env", "", "true"), ("enqueue", "--cwd", "", "true"),
                     ("enqueue", "--queue", "", "true"), ("prune", "--older-than", ""),
                     ("cancel", "--queue", ""), ("logs", ""), ("wait", "")):
            with self.subTest(args=args):
                r = self.fails(2, *args)
                self.assertEqual(len(r.err.strip().splitlines()), 1, r)
        self.assertEqual(self.db_dump(), before)

    def test_every_rejected_stdin_line_is_named_by_its_number(self):
        self.enqueue("--id", "taken", "true")
        before = self.db_dump()
        for line, why in (('{"id": "../x", "command": "true"}', "invalid job id"),
                          ('{"id": 5, "command": "true"}', "an id is a string"),
                          ('{"command": "true", "bogus": 1}', "unknown job field"),
                          ('{"command": "true", "depends_on": ["nope"]}', "unknown job"),
                          ('{"id": "taken", "command": "true"}', "exists already"),
                          ('{"command": "true", "priority": "x"}', "priority"),
                          ('{"id": "y", "command": ', "invalid JSON")):
            with self.subTest(line=line):
                r = self.fails(2 if why != "exists already" and why != "unknown job"
                               else 1, "enqueue", "--stdin", input=f"true\n\n{line}\n")
                self.assertTrue(self.error_line(r).startswith("queuectl: error: line 3: "), r)
                self.assertIn(why, r.err)
        self.assertEqual(self.db_dump(), before)

class TestStdinSplitting(QueueTest):
    def one_job(self, data):
        r = self.qb("enqueue", "--stdin", input=data)
        self.assertEqual(r.returncode, 0, r.stderr)
        ids = r.stdout.decode().split()
        self.assertEqual(len(ids), 1, r.stdout)
        self.assertEqual(len(json.loads(self.ok("list", "--limit", "0", "--json"))), 1)
        return self.job(ids[0])

    def test_form_feed_stays_inside_the_line(self):
        self.assertEqual(self.one_job(b"echo a\fb\n")["command"], "echo a\fb")

    def test_file_separator_stays_inside_the_line(self):
        self.assertEqual(self.one_job(b"echo a\x1cb\n")["command"], "echo a\x1cb")

    def test_json_line_with_a_raw_line_separator_is_one_job(self):
        line = '{"id": "u", "command": "echo a\u2028b"}\n'.encode()
        job = self.one_job(line)
        self.assertEqual((job["id"], job["command"]), ("u", "echo a\u2028b"))

class TestBadInput(QueueTest):
    def test_bad_enqueue_values(self):
        self.enqueue("--id", "a0", "true")
        before = self.db_dump()
        cases = [
            (2, ("--delay", "5x"), "delay"),
            (2, ("--run-at", "tomorrowish"), "tomorrowish"),
            (2, ("--run-at", "2026-01-01T00:00:00Z", "--delay", "5"), "--delay"),
            (2, ("--id", "a", "--after", "a"), "itself"),
            (1, ("--after", "nope"), "nope"),
            (2, ("--after", "../x"), "../x"),
            (2, ("--priority", "high"), "--priority"),
            (2, ("--max-retries", "-1"), "max_retries"),
            (2, ("--timeout=-5",), "--timeout"),
            (2, ("--env", "NOEQUALS"), "NOEQUALS"),
            (2, ("--cwd", os.path.join(self.tmp, "missing")), "missing"),
            (2, ("--queue", "a/b"), "queue"),
            (2, ("--unique",), "--unique"),
        ]
        for code, args, word in cases:
            with self.subTest(args=args):
                r = self.fails(code, "enqueue", *args, "true")
                self.assertIn(word, self.error_line(r))
                self.assertEqual(r.out, "")
        for args in ((), ("   ",)):
            with self.subTest(args=args):
                self.fails(2, "enqueue", *args)
        self.assertEqual(self.db_dump(), before)

    def test_bad_usage_of_other_commands(self):
        self.enqueue("--id", "a0", "true")
        before = self.db_dump()
        for args in (("frob",), ("worker",), ("worker", "start", "--count", "0"),
                     ("list", "--state", "bogus"), ("list", "--limit=-1"),
                     ("prune", "--older-than", "5x"),
                     ("prune", "--older-than", "1d", "--state", "pending"),
                     ("wait", "a0", "--timeout=-1"), ("pause", "../q"),
                     ("enqueue", "--bogus", "true")):
            with self.subTest(args=args):
                self.fails(2, *args)
        self.assertEqual(self.db_dump(), before)

class TestMainInProcess(unittest.TestCase):
    """Parsing and validation through main(argv) in this process, with its
    output captured: milliseconds, not a child process each."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="queuectl-test-")
        self.addCleanup(subprocess.run, ["rm", "-rf", self.tmp], check=False)
        self.home = os.path.join(self.tmp, "home")

    def main(self, *argv):
        import contextlib
        import io
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = queuectl.main(["--home", self.home, *argv])
            except SystemExit as e:              # argparse's --help and its errors
                code = e.code
        return code, out.getvalue(), err.getvalue()

    def test_bad_input_is_one_error_line_and_exit_2(self):
        for argv, words in ((["enqueue", "--priority", "high", "true"], "--priority"),
                            (["enqueue", "--timeout", "-1", "true"], "--timeout"),
                            (["list", "--state", "bogus"], "bogus"),
                            (["config", "set", "no_such_key", "1"], "no_such_key"),
                            (["config", "set", "max_retries", "many"], "max_retries"),
                            (["enqueue", "--run-at", "tomorrowish", "true"], "tomorrowish"),
                            (["schedule", "add", "s", "61 * * * *", "--", "true"], "minute"),
                            (["limit", "set", "queue:", "2"], "queue")):
            with self.subTest(argv=argv):
                code, out, err = self.main(*argv)
                self.assertEqual(code, 2, err)
                self.assertEqual(out, "")
                self.assertNotIn("Traceback", err)
                last = err.strip().splitlines()[-1]
                self.assertTrue(last.startswith("queuectl: error: "), err)
                self.assertIn(words, last)

    def test_a_good_enqueue_and_its_json(self):
        code, out, err = self.main("enqueue", "--id", "a", "--priority", "5", "echo", "hi")
        self.assertEqual((code, out, err), (0, "a\n", CREATED % self.home))
        code, out, _ = self.main("show", "a", "--json")
        job = json.loads(out)
        self.assertEqual((job["command"], job["priority"], job["state"]),
                         ("echo hi", 5, "pending"))

class TestMoreBadInput(QueueTest):
    def test_each_is_refused_with_one_line_and_no_change(self):
        self.enqueue("--id", "keep", "true")
        before = self.db_dump()
        for args in (["enqueue", "--run-at", "0999-06-01T00:00:00Z", "x"],
                     ["enqueue", "--run-at", "9999-12-31T23:00:00-05:00", "x"],
                     ["enqueue", '{"command": "x", "run_at": "0500-01-01"}'],
                     ["list", "--limit", "99999999999999999999"],
                     ["dlq", "list", "--limit", "-1"],
                     ["--home=", "list"]):
            with self.subTest(args=args):
                self.fails(2, *args)
        r = subprocess.run([*QUEUECTL, "enqueue", b"echo \xff\xfe"], env=self.env,
                           capture_output=True, timeout=30)
        self.assertEqual(r.returncode, 2)
        self.assertEqual(r.stderr, b"queuectl: error: the command is not valid UTF-8\n")
        gone = self.path("gone")
        os.mkdir(gone)
        r = subprocess.run([*QUEUECTL, "enqueue", "true"], env=self.env, cwd=gone,
                           capture_output=True, text=True, timeout=30,
                           preexec_fn=lambda: os.rmdir(gone))
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertIn("current directory no longer exists", r.stderr)
        self.assertEqual(self.db_dump(), before)

class TestExitCodes(QueueTest):
    def setUp(self):
        super().setUp()
        self.enqueue("--id", "keep", "true")
        self.before = self.db_dump()

    def unchanged(self):
        self.assertEqual(self.db_dump(), self.before)

    def test_run_at_year_1_is_out_of_range(self):
        r = self.fails(2, "enqueue", "--run-at", "0001-01-01", "x")
        self.assertIn("out of range", r.err)
        self.assertIn("from 1970 to 9999", r.err)
        self.assertEqual(len(r.err.strip().splitlines()), 1, r)
        self.unchanged()

    def test_non_utf8_bytes_on_stdin(self):
        for data, n in ((b"echo ok\necho \xff\n", 2),
                        (b'echo ok\n{"command": "true", "env": {"A": "\xff"}}\n', 2),
                        (b"\xfe\n", 1)):
            with self.subTest(data=data):
                self.before = self.db_dump()
                r = self.qb("enqueue", "--stdin", input=data)
                self.assertEqual(r.returncode, 2, r)
                err = r.stderr.decode("utf-8", "replace")
                self.assertNotIn("Traceback", err)
                self.assertEqual(len(err.strip().splitlines()), 1, err)
                self.assertTrue(err.startswith("queuectl: error: "), err)
                self.assertIn(f"line {n}", err)
                self.assertIn("not valid UTF-8", err)
                self.assertEqual(r.stdout, b"")
                self.unchanged()

    def test_home_that_is_a_regular_file(self):
        f = self.path("afile")
        with open(f, "w") as fh:
            fh.write("mine\n")
        r = self.fails(2, "--home", f, "list")
        self.assertIn(f"the home {f} is not a directory", r.err)
        self.assertEqual(len(r.err.strip().splitlines()), 1, r)
        self.fails(2, "--home", f, "enqueue", "true")
        with open(f) as fh:
            self.assertEqual(fh.read(), "mine\n")
        self.unchanged()


# Store: claims, concurrency, scale ###########################################

class TestClaimPlan(QueueTest):
    def test_claim_is_one_walk_of_the_ready_index(self):
        self.enqueue("--id", "a", "true")
        self.enqueue("--after", "a", "--queue", "q2", "true")
        con = self.db()
        for where, params in (("", []), (" AND queue IN (?,?)", ["a", "b"]),
                              (" AND queue NOT IN (?)", ["p"])):
            plan = " ".join(r[-1] for r in con.execute(
                "EXPLAIN QUERY PLAN " + queuectl.SQL_CLAIMABLE.format(
                    where=where, order=queuectl.order_by("-priority")),
                ["2030-01-01T00:00:00.000000Z"] + params))
            self.assertIn("jobs_ready", plan)
            self.assertNotIn("TEMP B-TREE", plan)

    def sql_texts(self):
        """Every SQL text of the program: its SQL_* constants, FENCE and
        SCHEMA (lists of statements flattened)."""
        out = {}
        for name in dir(queuectl):
            v = getattr(queuectl, name)
            if name.startswith("SQL_") or name in ("FENCE", "SCHEMA", "READY"):
                for i, text in enumerate(v if isinstance(v, (list, tuple)) else [v]):
                    if isinstance(text, str):
                        out[f"{name}[{i}]"] = text
        return out

    def test_every_state_the_sql_names_is_a_state(self):
        import re
        found = set()
        for name, text in self.sql_texts().items():
            for group in re.findall(r"state\s*(?:=|!=|IN)\s*\(?((?:'\w+'(?:,\s*)?)+)", text):
                for state in re.findall(r"'(\w+)'", group):
                    found.add(state)
                    self.assertIn(state, queuectl.STATES, name)
        self.assertTrue({"pending", "processing", "cancelled"} <= found, found)

    def test_every_constant_is_declared_once(self):
        import ast
        import collections
        with open(PROG) as f:
            tree = ast.parse(f.read())
        names = collections.Counter(t.id for node in tree.body if isinstance(node, ast.Assign)
                                    for t in node.targets if isinstance(t, ast.Name)
                                    and t.id.isupper())
        self.assertEqual([n for n, k in names.items() if k > 1], [])

    def test_every_query_of_the_ready_index_says_its_predicate(self):
        texts = self.sql_texts()
        users = [n for n, t in texts.items() if "INDEXED BY jobs_ready" in t]
        self.assertGreaterEqual(len(users), 5)
        for name in users:
            self.assertIn(queuectl.READY, texts[name], name)
        ddl = [t for t in texts.values() if "CREATE INDEX jobs_ready" in t]
        self.assertEqual(len(ddl), 1)
        self.assertTrue(" ".join(ddl[0].split()).endswith("WHERE " + queuectl.READY))

    def test_why_says_ready_exactly_for_the_job_claim_picks(self):
        # Random homes (jobs with priorities, run_at, dependencies, keys,
        # running holders, limits, paused queues, scheduling modes): why's
        # "ready" (ignoring whether a worker is live) and the claim decide
        # alike: claim takes the first ready job in claim order (priority,
        # or fifo for the home or a queue), and none when none is ready.
        import contextlib
        import io
        import random
        rng = random.Random(20261206)
        for trial in range(150):
            home = os.path.join(self.tmp, f"h{trial}")
            with contextlib.redirect_stderr(io.StringIO()):     # "created a new home"
                store = queuectl.Store(home)
            self.addCleanup(store.close)
            now = time.time()
            ids = []
            with store.tx():
                for i in range(rng.randint(1, 7)):
                    spec = {"id": f"j{i}", "command": "true", "cwd": "/",
                            "queue": rng.choice(["a", "b"]), "priority": rng.randint(0, 2)}
                    if rng.random() < 0.3:
                        spec["run_at"] = queuectl.iso(now + rng.choice([-60, 0.5, 3600]))
                    if rng.random() < 0.4:
                        spec["keys"] = rng.sample(["k1", "k2"], rng.randint(1, 2))
                    if ids and rng.random() < 0.3:
                        spec["depends_on"] = [rng.choice(ids)]
                    store.insert(queuectl.check_spec(spec), now)
                    ids.append(f"j{i}")
            con = sqlite3.connect(os.path.join(home, "queue.db"))
            for job_id in rng.sample(ids, rng.randint(0, min(2, len(ids)))):
                state = rng.choice(["processing", "completed", "dead"])
                con.execute("UPDATE jobs SET state = ?, claim = ?, worker = 'w' WHERE id = ?",
                            (state, "c" + job_id if state == "processing" else None, job_id))
                if state == "completed":
                    con.execute("UPDATE jobs SET blocked = 0 WHERE id IN (SELECT job FROM "
                                "deps WHERE dep = ?) AND NOT EXISTS (SELECT 1 FROM deps d "
                                "JOIN jobs x ON x.id = d.dep WHERE d.job = jobs.id AND "
                                "x.state != 'completed')", (job_id,))
            con.commit()
            con.close()
            if rng.random() < 0.4:
                store.set_limit(rng.choice(["k1", "k2", "queue:a"]), rng.randint(1, 2))
            if rng.random() < 0.2:
                store.pause([rng.choice(["a", "b"])])
            jobs = [store.must_get(i) for i in ids]
            ctx = queuectl.WhyContext(store, now)
            ready = [j for j in jobs if j["state"] in ("pending", "failed") and not [
                c for c, _, _ in queuectl.why_reasons(store, j, now, ctx)
                if c not in ("ready", "no_worker", "workers_busy")]]
            cfg = {"scheduling_mode": rng.choice(["priority", "fifo"])}
            if rng.random() < 0.5:
                cfg["queue.a.scheduling_mode"] = rng.choice(["priority", "fifo"])
            fifo = {q for q in "ab" if cfg.get(f"queue.{q}.scheduling_mode",
                                               cfg["scheduling_mode"]) == "fifo"}
            expected = min(ready, key=lambda j: (0 if j["queue"] in fifo else -j["priority"],
                                                 j["run_at"], j["seq"]), default=None)
            store.db.execute("BEGIN IMMEDIATE")
            claimed = store.claim("w2", None, now, order=queuectl.ClaimOrder(cfg))
            store.db.execute("ROLLBACK")
            self.assertEqual(claimed and claimed["id"], expected and expected["id"],
                             f"trial {trial}: ready {[j['id'] for j in ready]}")

    def test_prune_reclaims_space(self):
        lines = "".join(f"echo {'x' * 2000}\n" for _ in range(2000))
        self.ok("enqueue", "--stdin", input=lines.replace("echo", "true ||"))
        self.assertEqual(self.ok("cancel", "--all"), "cancelled 2000 jobs\n")
        con = self.db()
        before = con.execute("PRAGMA page_count").fetchone()[0]
        self.assertIn("pruned 2000 jobs", self.ok("prune", "--older-than", "0"))
        after = con.execute("PRAGMA page_count").fetchone()[0]
        self.assertLess(after, before / 4)

class TestTransitions(unittest.TestCase):
    """Every transition of the table in queuectl's schema section, in
    process on a Store of a temporary home (milliseconds each): what it
    moves, and that a stale worker or claim moves nothing."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="queuectl-test-")
        self.addCleanup(subprocess.run, ["rm", "-rf", self.tmp], check=False)
        self.store = queuectl.Store(os.path.join(self.tmp, "home"))
        self.addCleanup(self.store.close)
        self.cfg = dict(queuectl.CONFIG_DEFAULTS, max_backoff=0)

    def enqueue(self, job_id, **spec):
        with self.store.tx():
            self.store.insert(queuectl.check_spec({"id": job_id, "command": "true",
                                                   "cwd": "/", **spec}), time.time())
        return self.store.must_get(job_id)

    def claim(self, worker="w1"):
        with self.store.tx():
            return self.store.claim(worker, None, time.time())

    def finish(self, job, ended, worker="w1", token=None):
        with self.store.tx():
            return self.store.finish(job, worker, token or job["claim"], ended, self.cfg, 0.1)

    def state(self, job_id):
        return self.store.must_get(job_id)["state"]

    def test_enqueue_then_claim(self):
        job = self.enqueue("a", priority=3)
        self.assertEqual((job["state"], job["attempts"], job["claim"]), ("pending", 0, None))
        claimed = self.claim()
        row = self.store.must_get("a")
        self.assertEqual((row["state"], row["worker"], row["claim"]),
                         ("processing", "w1", claimed["claim"]))
        self.assertIsNone(self.claim())              # nothing else to claim

    def test_record_pid_and_take_are_fenced(self):
        self.enqueue("a")
        job = self.claim()
        with self.store.tx():
            self.assertEqual(self.store.record_pid("a", "w1", job["claim"], 42, "9")[0], True)
            self.assertFalse(self.store.record_pid("a", "w1", "stale", 43, "9")[0])
            self.assertFalse(self.store.take("a", "w9", job["claim"], "w2"))
            self.assertTrue(self.store.take("a", "w1", job["claim"], "w2"))
        row = self.store.must_get("a")
        self.assertEqual((row["pid"], row["worker"]), (42, "w2"))

    def test_complete_fail_and_dead(self):
        self.enqueue("ok")
        self.enqueue("bad", max_retries=1)
        ok = self.claim()
        self.assertEqual(self.finish(ok, queuectl.Outcome.of_exit(0))[0], "completed")
        bad = self.claim()
        self.assertEqual(self.finish(bad, queuectl.Outcome.of_exit(3))[0], "failed")
        bad = self.claim()
        state, _, error = self.finish(bad, queuectl.Outcome.of_exit(3))
        row = self.store.must_get("bad")
        self.assertEqual((state, row["attempts"], row["exit_code"], error, row["claim"]),
                         ("dead", 2, 3, "exit code 3", None))

    def test_a_stale_claim_finishes_nothing(self):
        self.enqueue("a")
        job = self.claim()
        self.assertEqual(self.finish(job, queuectl.Outcome.of_exit(0), token="old")[0], None)
        self.assertEqual(self.finish(job, queuectl.Outcome.of_exit(0), worker="w2")[0], None)
        self.assertEqual(self.state("a"), "processing")

    def test_requeue_gives_the_attempt_back_uncounted(self):
        self.enqueue("a")
        job = self.claim()
        self.assertFalse(self.store.requeue("a", "w2", job["claim"]))
        self.assertTrue(self.store.requeue("a", "w1", job["claim"]))
        row = self.store.must_get("a")
        self.assertEqual((row["state"], row["attempts"], row["claim"], row["worker"]),
                         ("pending", 0, None, None))

    def test_cancel_keeps_a_running_claim_until_cancel_ended(self):
        self.enqueue("a", keys=["k"])
        job = self.claim()
        now = time.time()
        with self.store.tx():
            self.store.cancel(job, now, self.cfg, grace=7)
        row = self.store.must_get("a")
        self.assertEqual((row["state"], row["claim"]), ("cancelled", job["claim"]))
        self.assertAlmostEqual(queuectl.epoch(row["run_at"]), now + 7, delta=0.01)
        self.assertEqual(self.store.held()["k"], 1)      # its keys are held still
        with self.store.tx():
            self.assertFalse(self.store.cancel_ended(row, "stale", self.cfg))
            self.assertTrue(self.store.cancel_ended(row, job["claim"], self.cfg))
            self.assertFalse(self.store.cancel_ended(row, job["claim"], self.cfg))
        row = self.store.must_get("a")
        self.assertEqual((row["claim"], row["attempts"]), (None, 1))
        self.assertNotIn("k", self.store.held())

    def test_reset_clears_what_the_table_says(self):
        self.enqueue("a")
        job = self.claim()
        self.finish(job, queuectl.Outcome.of_exit(0))
        with self.store.tx():
            self.store.reset(self.store.must_get("a"), time.time())
        row = self.store.must_get("a")
        self.assertEqual(row["state"], "pending")
        self.assertEqual(row["attempts"], 0)
        for column in queuectl.job_columns("r"):
            self.assertIsNone(row[column], column)

class TestConcurrency(QueueTest):
    def test_two_processes_four_threads_run_each_job_exactly_once(self):
        ids = [f"j{i}" for i in range(300)]
        out = self.path("out")
        lines = "".join(json.dumps({"id": i, "command": f"echo {i} >> {out}"}) + "\n"
                        for i in ids)
        self.ok("enqueue", "--stdin", input=lines)
        self.drain_in_processes(2, 4)
        got = self.lines("out")
        self.assertEqual(sorted(got), sorted(ids))       # each exactly once
        counts = json.loads(self.ok("status", "--json"))["counts"]
        self.assertEqual(counts["completed"], 300)
        self.integrity_ok()

    def test_concurrent_enqueues_while_a_worker_runs(self):
        self.start_worker("--count", "2")
        script = ("import sys; sys.path.insert(0, sys.argv[1]); import queuectl\n"
                  "codes = [queuectl.main(['enqueue', '--id', f'p{sys.argv[2]}-{i}', 'true'])"
                  " for i in range(25)]\n"
                  "sys.exit(max(codes))\n")
        procs = [subprocess.Popen([PY, "-c", script, os.path.dirname(PROG), str(n)],
                                  env=self.env, cwd=self.work, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for n in range(20)]
        self.procs.extend(procs)
        for p in procs:
            self.assertEqual(p.wait(timeout=90), 0, p.stderr.read())
        self.wait_for(lambda: json.loads(self.ok("status", "--json"))["counts"]["completed"]
                      == 500, 60, "500 jobs to complete")
        ids = {j["id"] for j in json.loads(self.ok("list", "--limit", "0", "--json"))}
        self.assertEqual(ids, {f"p{n}-{i}" for n in range(20) for i in range(25)})
        self.integrity_ok()


# Liveness ####################################################################

class TestDescriptorExhaustion(QueueTest):
    """Out of descriptors, `worker status` fails clearly or lists the live
    worker: it never forgets it nor deletes its files."""

    def check_status(self, r, w, limit):
        """The rule for one `worker status --json` run under a limit."""
        what = f"limit {limit}: {r!r}"
        self.assertNotIn("Traceback", r.err, what)
        if r.code == 0:
            self.assertIn(w.pid, [x["pid"] for x in json.loads(r.out)], what)
        else:
            lines = r.err.strip().splitlines()
            self.assertEqual(len(lines), 1, what)
            self.assertTrue(lines[0].startswith("queuectl: error: "), what)

    def check_worker_kept(self, w, info):
        now = json.loads(self.ok("worker", "status", "--json"))
        self.assertEqual([(x["pid"], x["jobs"]) for x in now], [(w.pid, ["long"])])
        for suffix in (".lock", ".wake"):
            self.assertTrue(os.path.exists(os.path.join(self.home, "run",
                                                        info["id"] + suffix)), suffix)

    def start_long(self):
        self.enqueue("--id", "long", WAIT_GO.format(go=self.path("go")))
        w = self.spawn_worker()
        info = self.wait_listed(w)
        self.wait_running("long")
        return w, info

    def stop(self, w):
        self.touch("go")
        self.ok("worker", "stop", "--wait", "--timeout", "20")
        self.assertEqual(w.wait(timeout=10), 0)
        self.assertEqual(self.state("long"), "completed")

    def test_worker_status_under_low_descriptor_limits(self):
        w, info = self.start_long()
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        for limit in range(8, 41):
            r = Result(subprocess.run(
                [*QUEUECTL, "worker", "status", "--json"], capture_output=True,
                text=True, timeout=30, env=self.env, cwd=self.work,
                preexec_fn=lambda n=limit: resource.setrlimit(
                    resource.RLIMIT_NOFILE, (n, hard))))
            self.check_status(r, w, limit)
        self.check_worker_kept(w, info)
        self.stop(w)

    def test_worker_status_when_only_the_lock_file_cannot_be_opened(self):
        # Limits low enough that the db opens but the lock files may not.
        w, info = self.start_long()
        for limit in range(4, 17):
            r = Result(subprocess.run(
                [PY, "-c", PRELOADED_STATUS, HERE, str(limit)], capture_output=True,
                text=True, timeout=30, env=self.env, cwd=self.work))
            self.check_status(r, w, limit)
            self.check_worker_kept(w, info)
        self.stop(w)

    def test_count_beyond_the_descriptor_limit_is_refused(self):
        self.enqueue("--id", "j", f"echo ran >> {self.path('runs')}")
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]

        def run(*args):
            return Result(subprocess.run(
                [*QUEUECTL, "worker", "start", *args], capture_output=True, text=True,
                timeout=30, env=self.env, cwd=self.work,
                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE,
                                                      (min(256, hard), hard))))
        r = run("--count", "256", "--drain")
        self.assertEqual(r.code, 2, r)
        self.assertNotIn("Traceback", r.err)
        self.assertEqual(len(r.err.strip().splitlines()), 1, r)
        line = r.err.strip()
        self.assertTrue(line.startswith("queuectl: error: invalid --count 256: 256 threads "
                                        "need about "), line)
        self.assertIn(" open files but the limit is 256 (ulimit -n); raise the limit "
                      "or use a smaller --count", line)
        self.assertEqual(self.lines("runs"), [])              # started nothing
        self.assertEqual(self.state("j"), "pending")
        self.assertEqual(json.loads(self.ok("worker", "status", "--json")), [])
        r = run("--count", "2", "--drain")                    # a count that fits runs
        self.assertEqual(r.code, 0, r)
        self.assertEqual(self.lines("runs"), ["ran"])


# One attempt: run, retry, time out, cancel, record ###########################

class TestWorkerBasics(QueueTest):
    def test_stdout_and_stderr_reach_the_log_with_header_and_footer(self):
        self.enqueue("--id", "j", "echo out-line; echo err-line >&2")
        r = self.drain()
        self.assertEqual(r.code, 0, r)
        log = self.log("j")
        for text in ("[queuectl] attempt 1 started", "out-line", "err-line",
                     "[queuectl] attempt 1 ended"):
            self.assertIn(text, log)
        self.assertLess(log.index("attempt 1 started"), log.index("out-line"))
        self.assertLess(log.index("out-line"), log.index("attempt 1 ended"))
        self.assertLess(log.index("err-line"), log.index("attempt 1 ended"))
        self.assertRegex(log.splitlines()[0], r"attempt 1 started " + HUMAN_TIME_RE)
        with open(os.path.join(self.home, "logs", "j.log")) as f:
            self.assertEqual(f.read(), log)

    def test_log_of_a_retried_job_has_every_attempt(self):
        self.set_fast_retries()
        self.enqueue("--id", "j", "--max-retries", "1", "echo try $QUEUECTL_ATTEMPT; exit 4")
        self.drained(1)
        log = self.log("j")
        for n in (1, 2):
            self.assertIn(f"[queuectl] attempt {n} started", log)
            self.assertIn(f"try {n}", log)
            self.assertIn(f"[queuectl] attempt {n} ended", log)
        self.assertNotIn("attempt 3", log)
        self.assertIn("4", log.splitlines()[-1])

    def test_drain_exit_code_zero_when_all_completed(self):
        for i in range(3):
            self.enqueue("--id", f"j{i}", "true")
        r = self.drain()
        self.assertEqual(r.code, 0, r)
        for i in range(3):
            self.assertEqual(self.state(f"j{i}"), "completed")

    def test_drain_exit_code_one_when_a_job_died(self):
        self.enqueue("--id", "good", "true")
        self.enqueue("--id", "bad", "--max-retries", "0", "exit 3")
        r = self.drain()
        self.assertEqual(r.code, 1, r)
        self.assertEqual(self.state("good"), "completed")
        self.assertEqual(self.state("bad"), "dead")
        # Nothing left to run: a second drain finishes nothing dead.
        self.drained(0)

    def test_drain_with_nothing_to_do(self):
        r = self.drain()
        self.assertEqual(r.code, 0, r)

    def test_state_survives_a_worker_restart(self):
        self.enqueue("--id", "j", "echo run >> runs.txt")
        self.drained(0)
        self.drained(0)
        self.assertEqual(self.lines("runs.txt"), ["run"])
        job = self.job("j")
        self.assertEqual((job["state"], job["attempts"], job["exit_code"]),
                         ("completed", 1, 0))

    def test_home_and_files_are_private(self):
        old = os.umask(0)
        try:
            self.enqueue("--id", "j", "echo hi")
            self.set_fast_retries()
            self.drained(0)
        finally:
            os.umask(old)

        def mode(*p):
            return os.stat(os.path.join(self.home, *p)).st_mode & 0o777
        self.assertEqual(mode(), 0o700)
        self.assertEqual(mode("queue.db"), 0o600)
        self.assertEqual(mode("config.json"), 0o600)
        self.assertEqual(mode("logs", "j.log"), 0o600)
        self.assertFalse(mode("logs") & 0o077)

    def test_group_writable_home_is_refused(self):
        self.enqueue("--id", "j", "true")
        os.chmod(self.home, 0o770)
        before = self.db_dump()
        for args in (("list",), ("enqueue", "true"), ("worker", "start", "--drain"),
                     ("show", "j")):
            with self.subTest(args=args):
                r = self.fails(2, *args)
                self.assertIn(self.home, self.error_line(r))
        self.assertEqual(self.db_dump(), before)
        os.chmod(self.home, 0o700)
        os.chmod(os.path.join(self.home, "queue.db"), 0o666)
        r = self.fails(2, "list")
        self.assertIn(os.path.join(self.home, "queue.db"), self.error_line(r))

    def test_home_option_before_and_after_the_command(self):
        env = dict(self.env)
        env.pop("QUEUECTL_HOME")
        fake_home = os.path.join(self.tmp, "user")
        os.mkdir(fake_home)
        env["HOME"] = fake_home
        h1 = os.path.join(self.tmp, "h1")
        h2 = os.path.join(self.tmp, "h2")
        self.assertEqual(self.q("--home", h1, "enqueue", "--id", "a", "true", env=env).code, 0)
        self.assertEqual(self.q("enqueue", "--home", h2, "--id", "b", "true", env=env).code, 0)
        r = self.q("list", "--json", "--home", h1, env=env)
        self.assertEqual([j["id"] for j in json.loads(r.out)], ["a"], r)
        r = self.q("--home", h2, "list", "--json", env=env)
        self.assertEqual([j["id"] for j in json.loads(r.out)], ["b"], r)
        r = self.q("worker", "start", "--drain", "--home", h1, env=env)
        self.assertEqual(r.code, 0, r)
        r = self.q("--home", h1, "show", "a", "--json", env=env)
        self.assertEqual(json.loads(r.out)["state"], "completed")
        r = self.q("--home", h2, "show", "b", "--json", env=env)
        self.assertEqual(json.loads(r.out)["state"], "pending")
        self.assertFalse(os.path.exists(os.path.join(fake_home, ".queuectl")))
        self.assertFalse(os.path.exists(self.home))

    def test_version(self):
        r = self.q("--version")
        self.assertEqual(r.code, 0, r)
        self.assertEqual(r.out.strip(), f"queuectl {queuectl.__version__}")

    def test_no_arguments_prints_usage(self):
        r = self.q()
        self.assertEqual(r.code, 0, r)
        self.assertIn("usage: queuectl", r.out)
        self.assertEqual(r.err, "")
        self.assertFalse(os.path.exists(self.home))

    def test_job_stdin_is_dev_null(self):
        self.enqueue("--id", "j", "cat > in.txt; echo done")
        r = self.drain(timeout=20)
        self.assertEqual(r.code, 0, r)
        with open(self.path("in.txt")) as f:
            self.assertEqual(f.read(), "")

class TestRetriesAndDLQ(QueueTest):
    def test_dlq_list_counts_tries_by_the_queues_own_retries(self):
        self.ok("config", "set", "queue.q.max_retries", "0")
        self.enqueue("--id", "f", "--queue", "q", "false")
        self.drain()
        row = self.ok("dlq", "list").splitlines()[1].split()
        self.assertEqual(row[:3], ["f", "q", "1/1"])

    def test_runs_max_retries_plus_one_times_then_dead(self):
        self.set_fast_retries()
        self.enqueue("--id", "j", "--max-retries", "2", "echo run >> runs.txt; exit 3")
        r = self.drain()
        self.assertEqual(r.code, 1, r)
        self.assertEqual(len(self.lines("runs.txt")), 3)
        job = self.job("j")
        self.assertEqual((job["state"], job["attempts"], job["exit_code"]), ("dead", 3, 3))
        self.assertIn("3", job["last_error"])
        self.assertRegex(job["finished_at"], "^" + TIME_RE + "$")
        dead = json.loads(self.ok("dlq", "list", "--json"))
        self.assertEqual([d["id"] for d in dead], ["j"])
        self.assertIn("j", self.ok("dlq", "list"))

    def test_config_max_retries_is_the_default(self):
        self.set_fast_retries()
        self.ok("config", "set", "max-retries", "1")
        self.enqueue("--id", "j", "echo run >> runs.txt; exit 1")
        self.drained(1)
        self.assertEqual(len(self.lines("runs.txt")), 2)
        self.assertEqual(self.state("j"), "dead")

    def test_default_max_retries_is_three(self):
        self.set_fast_retries()
        self.enqueue("--id", "j", "echo run >> runs.txt; exit 1")
        self.drained(1)
        self.assertEqual(len(self.lines("runs.txt")), 4)

    def test_max_retries_zero_is_dead_after_the_first_failure(self):
        self.enqueue("--id", "j", "--max-retries", "0", "echo run >> runs.txt; exit 1")
        self.drained(1)
        self.assertEqual(self.lines("runs.txt"), ["run"])
        job = self.job("j")
        self.assertEqual((job["state"], job["attempts"]), ("dead", 1))

    def test_success_on_a_retry_completes(self):
        self.set_fast_retries()
        self.enqueue("--id", "j", "--max-retries", "2", MARKER_JOB)
        self.drained(0)
        job = self.job("j")
        self.assertEqual((job["state"], job["attempts"], job["exit_code"], job["last_error"]),
                         ("completed", 2, 0, None))

    def test_failed_job_waits_its_backoff(self):
        self.ok("config", "set", "backoff_base", "10")
        self.enqueue("--id", "j", "--max-retries", "1", "exit 1")
        self.start_worker()
        self.wait_state("j", "failed")
        job = self.job("j")
        self.assertEqual(job["attempts"], 1)
        wait = queuectl.epoch(job["run_at"]) - queuectl.epoch(job["updated_at"])
        self.assertGreaterEqual(wait, 9)
        self.assertLessEqual(wait, 11)
        self.assertIn("failed", self.ok("list"))

    def test_dlq_retry_brings_a_job_back(self):
        self.enqueue("--id", "j", "--max-retries", "0", MARKER_JOB)
        self.drained(1)
        self.assertEqual(self.state("j"), "dead")
        self.assertEqual(self.ok("dlq", "retry", "j"), "j\n")
        job = self.job("j")
        self.assertEqual((job["state"], job["attempts"], job["exit_code"],
                          job["last_error"], job["finished_at"]),
                         ("pending", 0, None, None, None))
        self.assertEqual(json.loads(self.ok("dlq", "list", "--json")), [])
        self.drained(0)
        job = self.job("j")
        self.assertEqual((job["state"], job["attempts"]), ("completed", 1))

    def test_dlq_retry_all(self):
        for i in ("a", "b"):
            self.enqueue("--id", i, "--max-retries", "0", "exit 1")
        self.enqueue("--id", "ok", "true")
        self.drained(1)
        self.assertEqual(self.ok("dlq", "retry", "--all"), "retried 2 jobs\n")
        self.assertEqual(self.state("a"), "pending")
        self.assertEqual(self.state("b"), "pending")
        self.assertEqual(self.state("ok"), "completed")

    def test_dlq_retry_of_a_job_that_is_not_dead(self):
        self.enqueue("--id", "j", "true")
        self.drained(0)
        before = self.db_dump()
        r = self.fails(1, "dlq", "retry", "j")
        self.assertIn("completed", self.error_line(r))
        self.fails(1, "dlq", "retry", "nope")
        self.assertEqual(self.db_dump(), before)

    def test_dlq_purge_one_removes_job_and_log(self):
        self.enqueue("--id", "a", "--max-retries", "0", "echo bye; exit 1")
        self.enqueue("--id", "b", "--max-retries", "0", "exit 1")
        self.drained(1)
        logfile = os.path.join(self.home, "logs", "a.log")
        self.assertTrue(os.path.exists(logfile))
        self.ok("dlq", "purge", "a")
        self.fails(1, "show", "a")
        self.assertFalse(os.path.exists(logfile))
        self.assertEqual(self.state("b"), "dead")

    def test_dlq_purge_all_keeps_other_jobs(self):
        self.enqueue("--id", "a", "--max-retries", "0", "exit 1")
        self.enqueue("--id", "b", "--max-retries", "0", "exit 1")
        self.enqueue("--id", "ok", "true")
        self.enqueue("--id", "later", "--delay", "1h", "true")
        self.drained(1)
        self.ok("dlq", "purge", "--all")
        ids = sorted(j["id"] for j in json.loads(self.ok("list", "--json")))
        self.assertEqual(ids, ["later", "ok"])
        self.assertFalse(os.path.exists(os.path.join(self.home, "logs", "a.log")))
        self.assertTrue(os.path.exists(os.path.join(self.home, "logs", "ok.log")))

    def test_dlq_purge_refuses_a_job_that_is_not_dead(self):
        self.enqueue("--id", "p", "true")
        before = self.db_dump()
        r = self.fails(1, "dlq", "purge", "p")
        self.assertIn("pending", self.error_line(r))
        self.assertEqual(self.db_dump(), before)

    def test_dlq_needs_ids_or_all(self):
        self.enqueue("--id", "p", "true")
        self.fails(2, "dlq", "purge")
        self.fails(2, "dlq", "retry")
        self.fails(2, "dlq", "purge", "p", "--all")

    def test_retry_of_a_completed_job_runs_it_again(self):
        self.enqueue("--id", "j", "echo run >> runs.txt")
        self.drained(0)
        self.assertEqual(self.ok("retry", "j"), "j\n")
        job = self.job("j")
        self.assertEqual((job["state"], job["attempts"]), ("pending", 0))
        self.drained(0)
        self.assertEqual(self.lines("runs.txt"), ["run", "run"])
        job = self.job("j")
        self.assertEqual((job["state"], job["attempts"]), ("completed", 1))

    def test_retry_of_a_dead_job(self):
        self.enqueue("--id", "j", "--max-retries", "0", MARKER_JOB)
        self.drained(1)
        self.assertEqual(self.ok("retry", "j"), "j\n")
        job = self.job("j")
        self.assertEqual((job["state"], job["attempts"], job["last_error"]),
                         ("pending", 0, None))

    def test_retry_of_a_pending_job_fails(self):
        self.enqueue("--id", "j", "true")
        before = self.db_dump()
        r = self.fails(1, "retry", "j")
        self.assertIn("pending", self.error_line(r))
        self.assertEqual(self.db_dump(), before)
        self.fails(1, "retry", "nope")
        self.fails(2, "retry", "../x")

class TestTimeoutsAndCancel(QueueTest):
    def test_timeout_kills_the_whole_tree(self):
        self.enqueue("--id", "slow", "--timeout", "1", "--max-retries", "0",
                     f"echo before; sleep 301 & echo $! > {self.path('pid')}; wait")
        r = self.drain()
        self.assertEqual(r.code, 1, r)
        job = self.job("slow")
        self.assertEqual(job["state"], "dead")
        self.assertIn("timed out", job["last_error"])
        self.assertFalse(pid_alive(self.read_pid("pid")))
        log = self.log("slow")
        self.assertIn("before", log)                       # output kept
        self.assertIn("timed out", log)

    def test_timeout_escalates_to_sigkill_after_kill_grace(self):
        self.ok("config", "set", "kill_grace", "0.5")
        self.ok("config", "set", "job_timeout", "1")           # the config default
        self.enqueue("--id", "stubborn", "--max-retries", "0",
                     f"trap '' TERM; sleep 302 & echo $! > {self.path('pid')}; wait; "
                     "sleep 302")
        r = self.drain()
        self.assertEqual(r.code, 1, r)
        self.assertIn("timed out", self.job("stubborn")["last_error"])
        self.assertFalse(pid_alive(self.read_pid("pid")))

    def test_cancel_running_job_stops_its_tree_and_never_retries(self):
        self.enqueue("--id", "c", f"sleep 303 & echo $! > {self.path('pid')}; wait")
        self.start_worker()
        self.wait_running("c")
        child = self.read_pid("pid")
        w = self.procs[-1]
        self.assertEqual(self.ok("cancel", "c").strip(), "c")
        self.assertFalse(pid_alive(child))           # gone when cancel returns
        self.assertEqual(self.state("c"), "cancelled")
        # The worker has seen the end of the attempt: still cancelled, the
        # attempt counted, its claim (which holds its keys) let go.
        self.wait_for(lambda: "c cancelled" in self.worker_output(w), 10,
                      "the worker to see the cancel")
        self.wait_for(lambda: self.job("c")["attempts"] == 1, 10, "the attempt counted")
        self.assertEqual(self.state("c"), "cancelled")

    def test_cancel_pending_and_refuse_finished(self):
        self.enqueue("--id", "p", "--delay", "1h", "true")
        self.ok("cancel", "p")
        self.assertEqual(self.state("p"), "cancelled")
        self.fails(1, "cancel", "p")
        self.fails(1, "cancel", "nosuchjob")

class TestTimeoutKillsTheWholeGroup(QueueTest):
    def test_children_that_ignore_sigterm_are_killed_after_the_leader_died(self):
        self.ok("config", "set", "kill_grace", "0.5")
        pidfile = self.path("pid")
        self.enqueue("--id", "t", "--timeout", "1", "--max-retries", "0",
                     f"sh -c 'trap \"\" TERM; echo $$ > {pidfile}; exec sleep 40' & wait")
        r = self.drain_env(timeout=30)
        self.assertEqual(r.code, 1, r)
        self.assertEqual(self.job("t")["last_error"], "timed out after 1s")
        pid = int(self.lines("pid")[0])
        self.wait_for(lambda: not pid_alive(pid), 5, "the TERM-proof child to be killed")

class TestCancelThenRetry(QueueTest):
    """retry at once after cancel: the new attempt never starts while a
    process of the cancelled one lives."""

    def command(self, trap):
        # Each attempt logs start:PID, an overlap:P line for any earlier
        # attempt's shell P still alive (not a zombie), and end:PID.
        trace, pids = self.path("trace"), self.path("pids")
        return (f"echo start:$$ >> {trace}; "
                f"for p in $(cat {pids} 2>/dev/null); do "
                f"s=$(cut -d' ' -f3 /proc/$p/stat 2>/dev/null); "
                f"if [ -n \"$s\" ] && [ \"$s\" != Z ]; then echo overlap:$p >> {trace}; fi; "
                f"done; echo $$ >> {pids}; {trap}; echo $$ >> {self.path('trapped')}; "
                + WAIT_GO.format(go=self.path("go")) + f"; echo end:$$ >> {trace}")

    def cancel_then_retry(self, trap, grace):
        self.enqueue("--id", "c", self.command(trap))
        self.spawn_worker("--count", "2")
        self.wait_running("c")
        # Cancelled only once its trap is set: a TERM before it would end
        # the shell at once, which is not what these tests are about.
        self.wait_for(lambda: self.lines("trapped"), what="the job to set its trap")
        cancel = subprocess.Popen([*QUEUECTL, "cancel", "c", "--grace", grace], env=self.env,
                                  cwd=self.work,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        self.procs.append(cancel)
        con = self.db()
        self.wait_for(lambda: con.execute("SELECT state FROM jobs WHERE id = 'c'")
                      .fetchone()[0] == "cancelled", what="c to be cancelled")
        r = self.run_q("retry", "c", timeout=20)
        self.assertEqual(r.code, 0, r)
        self.assertEqual(r.out.strip(), "c")
        self.assertEqual(cancel.wait(timeout=20), 0, cancel.stderr.read())
        self.touch("go")
        self.wait_state("c", "completed")
        self.assertEqual(self.job("c")["attempts"], 1)
        return self.lines("trace"), [int(p) for p in self.lines("pids")]

    def test_retry_right_after_cancel_waits_for_the_trapping_job(self):
        trace, pids = self.cancel_then_retry(      # the grace is never used up
            f"trap 'sleep 0.5; echo end:$$ >> {self.path('trace')}; exit 143' TERM", "10")
        self.assertEqual(len(pids), 2, trace)
        p1, p2 = pids
        self.assertEqual(trace, [f"start:{p1}", f"end:{p1}", f"start:{p2}", f"end:{p2}"])

    def test_retry_right_after_cancel_waits_for_a_job_ignoring_term(self):
        trace, pids = self.cancel_then_retry("trap '' TERM", "1")     # SIGKILL after 1 s
        self.assertEqual(len(pids), 2, trace)
        p1, p2 = pids
        self.assertEqual(trace, [f"start:{p1}", f"start:{p2}", f"end:{p2}"])

class TestPoisonJob(QueueTest):
    """A job that cannot be started is a counted failed attempt; it never
    blocks the queue, never loops uncounted, and --drain ends."""

    def test_enqueue_refuses_env_that_is_not_utf8(self):
        self.enqueue("--id", "keep", "true")
        before = self.db_dump()
        r = self.fails(2, "enqueue", '{"command":"true","env":{"X":"\\ud800"}}')
        self.assertEqual(r.err.strip().splitlines(),
                         ["queuectl: error: env 'X' is not valid UTF-8"])
        self.assertEqual(r.out, "")
        r = self.fails(2, "enqueue", '{"command":"true","env":{"\\ud800":"v"}}')
        self.assertIn("invalid environment variable name", r.err)
        self.assertEqual(len(r.err.strip().splitlines()), 1, r)
        self.assertEqual(self.db_dump(), before)              # stored nothing
        ids = [j["id"] for j in json.loads(self.ok("list", "--json"))]
        self.assertEqual(ids, ["keep"])

    def test_unencodable_env_in_an_old_row_is_a_counted_failure(self):
        self.set_fast_retries()
        self.enqueue("--id", "poison", "--max-retries", "1",
                     f"echo ran >> {self.path('poison-runs')}")
        self.enqueue("--id", "other", f"echo ran >> {self.path('other-runs')}")
        con = self.db()                     # a row an older queuectl let in
        con.execute("UPDATE jobs SET env = ? WHERE id = 'poison'", ('{"X":"\\ud800"}',))
        con.commit()
        r = self.drain_env(timeout=15)
        self.assertEqual(r.code, 1, r)                        # one job is dead
        self.assertNotIn("Traceback", r.out + r.err)
        poison = self.job("poison")
        self.assertEqual((poison["state"], poison["attempts"]), ("dead", 2), poison)
        self.assertTrue(poison["last_error"].startswith("could not start: "), poison)
        self.assertEqual(self.lines("poison-runs"), [])       # never ran
        other = self.job("other")
        self.assertEqual((other["state"], other["attempts"]), ("completed", 1))
        self.assertEqual(self.lines("other-runs"), ["ran"])

    def test_any_exception_before_the_spawn_is_a_counted_failure(self):
        self.enqueue("--id", "poison", "--max-retries", "0",
                     f"echo ran >> {self.path('poison-runs')}")
        self.enqueue("--id", "other", f"echo ran >> {self.path('other-runs')}")
        r = self.drain_env(self.fault_env("before-spawn:raise@poison"), timeout=15)
        self.assertEqual(r.code, 1, r)
        self.assertNotIn("Traceback", r.out + r.err)
        poison = self.job("poison")
        self.assertEqual((poison["state"], poison["attempts"]), ("dead", 1), poison)
        self.assertTrue(poison["last_error"].startswith("could not start: "), poison)
        self.assertEqual(self.lines("poison-runs"), [])
        self.assertEqual(self.state("other"), "completed")
        self.assertEqual(self.lines("other-runs"), ["ran"])

class TestOutcomeWrites(QueueTest):
    """An outcome that cannot be written yet is retried until written (the
    job never runs again), and doctor shows the job meanwhile."""

    def problem_line(self, job_id, wid):
        return (f"problem: job {job_id} is processing but its process has ended; "
                f"worker {wid} has not recorded the outcome yet (full disk? "
                "database errors?)")

    def check_doctor_reports(self, job_id, wid):
        r = self.run_q("doctor")
        self.assertEqual(r.code, 1, r)
        self.assertIn(self.problem_line(job_id, wid), r.out.splitlines())
        self.assertNotIn("is gone", r.out)              # its worker is alive

    def check_doctor_ok(self):
        r = self.run_q("doctor")
        self.assertEqual(r.code, 0, r)
        self.assertEqual(r.out.strip().splitlines()[-1], "ok")

    def test_failed_outcome_writes_are_retried(self):
        self.enqueue("--id", "j", f"echo hi >> {self.path('runs')}")
        r = self.drain_env(self.fault_env("record:fail*3"), timeout=20)
        self.assertEqual(r.code, 0, r)
        self.assertIn("j: cannot record its outcome yet, will retry: ", r.out)
        job = self.job("j")
        self.assertEqual((job["state"], job["attempts"], job["exit_code"]),
                         ("completed", 1, 0))
        self.assertEqual(self.lines("runs"), ["hi"])
        self.assertIn("[queuectl] attempt 1 ended: exit 0", self.log("j"))

    def test_doctor_shows_an_ended_job_not_yet_recorded(self):
        # Fault point: the worker freezes after reaping, before recording.
        self.enqueue("--id", "j", f"echo ran >> {self.path('runs')}")
        w = self.spawn_worker(env=self.fault_env("before-record:stop"))
        self.cont_in_cleanup(w)
        self.wait_for(lambda: all_stopped(w.pid) or w.poll() is not None,
                      what="the worker to stop before recording")
        self.assertIsNone(w.poll(), self.output(w))
        self.assertEqual(self.lines("runs"), ["ran"])
        wid = json.loads(self.ok("worker", "status", "--json"))[0]["id"]
        self.assertEqual(self.state("j"), "processing")
        self.check_doctor_reports("j", wid)
        os.kill(w.pid, signal.SIGCONT)
        self.wait_state("j", "completed")
        self.assertEqual(self.job("j")["attempts"], 1)
        self.check_doctor_ok()
        self.assertEqual(self.lines("runs"), ["ran"])

    def test_doctor_shows_a_job_that_ended_under_a_frozen_worker(self):
        # No fault point: SIGSTOP the worker while its job runs, then let the
        # job end (a zombie its worker cannot reap yet).
        self.enqueue("--id", "j", WAIT_GO.format(go=self.path("go"))
                     + f"; echo ran >> {self.path('runs')}")
        w = self.spawn_worker()
        wid = self.wait_listed(w)["id"]
        pid = self.wait_running("j")
        os.kill(w.pid, signal.SIGSTOP)
        self.cont_in_cleanup(w)
        self.wait_for(lambda: all_stopped(w.pid), what="the worker to be stopped")
        self.touch("go")
        self.wait_for(lambda: proc_state(pid) in ("Z", None), what="the job to end")
        self.check_doctor_reports("j", wid)
        os.kill(w.pid, signal.SIGCONT)
        self.wait_state("j", "completed")
        self.check_doctor_ok()
        self.assertEqual(self.lines("runs"), ["ran"])

    @unittest.skipUnless(can_mount_tmpfs(), "needs root and mount -t tmpfs")
    def test_full_disk_delays_the_outcome_and_never_reruns_the_job(self):
        mnt = self.mount_tmpfs(os.path.join(self.tmp, "mnt"), "4m")
        self.home = os.path.join(mnt, "home")
        self.env["QUEUECTL_HOME"] = self.home
        runs = self.path("runs")
        self.enqueue("--id", "j", f"echo run >> {runs}; "
                     + WAIT_GO.format(go=self.path("go")))
        w = self.spawn_worker()
        wid = self.wait_listed(w)["id"]
        self.wait_running("j")
        filler = os.path.join(mnt, "filler")
        self.fill(filler)
        self.touch("go")
        self.wait_for(lambda: "j: cannot record its outcome yet, will retry: "
                      in self.output(w), what="the worker to say it cannot record yet")
        self.assertEqual(self.state("j"), "processing")
        self.check_doctor_reports("j", wid)
        os.unlink(filler)                                # space comes back
        r = self.drain_env(timeout=20)                   # a 2nd worker: not again
        self.assertEqual(r.code, 0, r)
        self.wait_state("j", "completed")
        job = self.job("j")
        self.assertEqual((job["state"], job["attempts"], job["exit_code"]),
                         ("completed", 1, 0))
        r = self.drain_env(timeout=20)
        self.assertEqual(r.code, 0, r)
        self.assertEqual(self.lines("runs"), ["run"])    # ran exactly once
        self.check_doctor_ok()
        self.assertIsNone(w.poll(), self.output(w))      # the worker lived through it

class TestWorkerBugs(QueueTest):
    """A bug in the worker after a job started never leaves the job
    processing for good nor a worker that cannot stop."""

    def test_bug_after_the_job_ended_is_settled_from_its_status(self):
        self.enqueue("--id", "j", f"echo run >> {self.path('runs')}")
        r = self.drain_env(self.fault_env("before-record:raise"), timeout=20)
        self.assertEqual(r.code, 0, r)
        self.assertIn("j: internal error (RuntimeError('injected fault at "
                      "before-record')); handing it to recovery", r.out)
        job = self.job("j")
        self.assertEqual((job["state"], job["attempts"], job["exit_code"]),
                         ("completed", 1, 0))
        self.assertEqual(self.lines("runs"), ["run"])

    def test_a_bug_that_keeps_happening_does_not_spin_or_hang_the_drain(self):
        self.enqueue("--id", "j", f"echo run >> {self.path('runs')}")
        r = self.drain_env(self.fault_env("record:raise*1000"), timeout=20)
        self.assertEqual(r.code, 0, r)
        self.assertLess(r.out.count("internal error"), 5, r.out)
        self.assertEqual(self.state("j"), "processing")  # left for recovery
        r = self.drain_env(timeout=20)                   # a healthy worker settles it
        self.assertEqual(r.code, 0, r)
        job = self.job("j")
        self.assertEqual((job["state"], job["attempts"]), ("completed", 1))
        self.assertEqual(self.lines("runs"), ["run"])


# Recovery: crashed, suspended and frozen workers, other homes ################

class TestCrashRecovery(QueueTest):
    def test_killed_worker_running_job_is_adopted_not_rerun(self):
        self.enqueue("--id", "backup", self.gate_cmd())
        w = self.start_worker()
        self.wait_running("backup")
        os.kill(w.pid, signal.SIGKILL)
        w.wait(timeout=10)
        self.drain_adopting_the_gated_job()               # a new worker adopts it
        self.assertEqual(self.lines("runs"), ["start", "done"])   # ran exactly once
        job = self.job("backup")
        self.assertEqual((job["state"], job["attempts"], job["exit_code"]),
                         ("completed", 1, 0))
        self.integrity_ok()

    def test_job_that_ended_while_its_worker_was_dead_keeps_its_status(self):
        self.enqueue("--id", "quick", "--max-retries", "0", self.gate_cmd("; exit 4"))
        w = self.start_worker()
        self.wait_running("quick")
        os.kill(w.pid, signal.SIGKILL)
        w.wait(timeout=10)
        pid = self.job_pid("quick")
        self.go()                             # it ends while no worker is alive
        self.wait_for(lambda: not pid_alive(pid), 10, "the job to end")
        r = self.drain()
        self.assertEqual(r.code, 1, r)                    # it ended dead
        job = self.job("quick")
        self.assertEqual((job["state"], job["attempts"], job["exit_code"]), ("dead", 1, 4))

    def test_killed_worker_and_job_count_a_failed_attempt_then_retry(self):
        self.set_fast_retries()
        runs = self.path("runs")
        self.enqueue("--id", "flaky", f"echo run >> {runs}; "
                     f"[ $(wc -l < {runs}) -ge 2 ] || sleep 30")
        w = self.start_worker()
        pid = self.wait_running("flaky")
        os.kill(w.pid, signal.SIGKILL)
        os.killpg(pid, signal.SIGKILL)
        w.wait(timeout=10)
        r = self.drain()
        self.assertEqual(r.code, 0, r)
        job = self.job("flaky")
        self.assertEqual((job["state"], job["attempts"]), ("completed", 2))
        self.assertEqual(self.lines("runs"), ["run", "run"])
        self.assertIn("worker died", self.log("flaky"))
        self.integrity_ok()

    def test_job_that_kills_its_worker_every_time_ends_in_dlq(self):
        self.set_fast_retries()
        self.enqueue("--id", "killer", "--max-retries", "2",
                     f"echo x >> {self.path('runs')}; kill -9 $PPID; kill -9 0")
        for _ in range(8):
            if self.state("killer") == "dead":
                break
            self.drain()
        job = self.job("killer")
        self.assertEqual((job["state"], job["attempts"]), ("dead", 3))
        self.assertEqual(len(self.lines("runs")), 3)
        self.assertIn("worker died", job["last_error"])
        self.integrity_ok()

    def test_stale_worker_cannot_overwrite_a_recovered_job(self):
        self.enqueue("--id", "a", "true")
        store = queuectl.Store(self.home, durable=False)
        self.addCleanup(store.close)
        worker = queuectl.Worker(self.home)
        job = worker.claim(store)
        cfg = queuectl.Config(self.home).load()
        # Another worker takes the claim over; the stale one tries to record.
        self.db().execute("UPDATE jobs SET worker = 'other' WHERE id = 'a'").connection.commit()
        with store.tx():
            self.assertEqual(store.finish(job, worker.id, job["claim"], queuectl.Outcome.of_exit(0),
                                          cfg, 0.1),
                             (None, 0, None))
        self.assertEqual(self.state("a"), "processing")
        # The right worker and claim can.
        with store.tx():
            self.assertEqual(store.finish(job, "other", job["claim"], queuectl.Outcome.of_exit(0),
                                          cfg, 0.1),
                             ("completed", 0, None))

    def test_worker_status_shows_live_workers_and_forgets_dead_ones(self):
        self.enqueue("--id", "long", "sleep 30")
        w = self.start_worker("--count", "2")
        self.wait_running("long")
        info = json.loads(self.ok("worker", "status", "--json"))
        self.assertEqual(len(info), 1)
        self.assertEqual((info[0]["pid"], info[0]["threads"], info[0]["jobs"]),
                         (w.pid, 2, ["long"]))
        os.kill(w.pid, signal.SIGKILL)
        w.wait(timeout=10)
        self.assertEqual(json.loads(self.ok("worker", "status", "--json")), [])
        self.assertIn("no live workers", self.ok("worker", "status"))

class TestSuspendedWorker(QueueTest):
    def test_worker_past_its_lease_stays_visible_and_its_job_runs_once(self):
        self.enqueue("--id", "long", self.gate_cmd())
        a = self.start_worker()
        self.wait_running("long")
        os.kill(a.pid, signal.SIGSTOP)                   # Ctrl-Z, a suspended VM...
        self.addCleanup(lambda: a.poll() is None and os.kill(a.pid, signal.SIGCONT))
        con = self.db()
        con.execute("UPDATE workers SET heartbeat = '2000-01-01T00:00:00.000000Z'")
        con.commit()
        info = json.loads(self.ok("worker", "status", "--json"))
        self.assertEqual([w["pid"] for w in info], [a.pid])    # alive: it holds its lock
        self.drain_adopting_the_gated_job()               # recovers the stale worker's job
        job = self.job("long")
        self.assertEqual((job["state"], job["attempts"], job["exit_code"]),
                         ("completed", 1, 0))
        os.kill(a.pid, signal.SIGCONT)
        self.ok("worker", "stop", "--wait", "--timeout", "20")
        self.assertEqual(a.wait(timeout=10), 0)
        job = self.job("long")                            # the late worker changed nothing
        self.assertEqual((job["state"], job["attempts"]), ("completed", 1))
        self.assertEqual(self.lines("runs"), ["start", "done"])
        self.assertEqual([n for n in os.listdir(os.path.join(self.home, "run"))
                          if n.endswith(".exit")], [])
        self.integrity_ok()

class TestFrozenWorker(QueueTest):
    def test_worker_frozen_after_spawn_leaves_the_adopted_job_running(self):
        self.enqueue("--id", "long", self.gate_cmd())
        a = self.bg(fault="after-spawn:stop")
        self.resume_in_cleanup(a)
        self.wait_stopped(a)                       # spawned, pid not yet recorded
        self.wait_for(lambda: self.lines("runs") == ["start"], 10, "long to start")
        b, bid = self.adopt_from(a, "long")
        os.kill(a.pid, signal.SIGCONT)
        self.wait_out(a, "was taken over by worker", "A to see that long was taken over")
        self.assertIn(f"long was taken over by worker {bid}", self.out(a))
        self.assertTrue(pid_alive(self.job_pid("long")), "A killed the adopted job")
        self.assertEqual(self.lines("runs"), ["start"])
        self.assertEqual(self.state("long"), "processing")
        self.release_and_check_it_ran_once("long")
        # The worker's line drops the footer's "; result not recorded".
        self.wait_out(a, "long taken over by another worker", "A to give up on long")
        self.assertRegex(self.out(a), r"long taken over by another worker"
                         r"(; result not recorded)? \(attempt 1\)")
        self.assertEqual((a.poll(), b.poll()), (None, None))  # both still serve
        self.assertNotIn("Traceback", self.err(a) + self.err(b))
        self.integrity_ok()

class TestStopNowOfFrozenWorker(QueueTest):
    def test_stop_now_of_a_woken_worker_spares_the_job_it_lost(self):
        self.enqueue("--id", "long", self.gate_cmd())
        a = self.bg()
        self.resume_in_cleanup(a)
        pid = self.wait_running("long")
        self.wait_for(lambda: self.lines("runs") == ["start"], 10, "long to start")
        self.freeze(a)
        b, bid = self.adopt_from(a, "long")
        os.kill(a.pid, signal.SIGCONT)
        os.kill(a.pid, signal.SIGUSR1)             # = worker stop --now, for A only
        try:
            code = a.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.go()          # does A only wait for the job it no longer owns?
            try:
                a.wait(timeout=10)
                late = f"A exited ({a.returncode}) only once the job ended"
            except subprocess.TimeoutExpired:
                late = "A still runs after the job ended"
            self.fail(f"A did not exit within 15s of SIGUSR1 ({late}); "
                      f"out={self.out(a)!r}")
        self.assertEqual(code, 0, self.err(a))
        self.assertTrue(pid_alive(pid), "A killed the job B adopted")
        self.assertEqual(self.lines("runs"), ["start"])
        job = self.job("long")
        self.assertEqual((job["state"], job["worker"]), ("processing", bid))
        self.release_and_check_it_ran_once("long")
        self.assertIsNone(b.poll())
        self.assertNotIn("Traceback", self.err(a) + self.err(b))

class TestFrozenBeforeSpawn(QueueTest):
    def test_revoked_claim_is_never_started_by_the_woken_worker(self):
        self.set_fast_retries()
        self.enqueue("--id", "once", f"echo run >> {self.path('runs')}")
        a = self.bg(fault="after-claim:stop")
        self.resume_in_cleanup(a)
        self.wait_stopped(a)                       # claimed, not started
        self.assertEqual(self.state("once"), "processing")
        self.age(a)
        r = self.drain()                           # B: revokes, retries, runs it
        self.assertEqual(r.code, 0, r)
        self.assertEqual(self.lines("runs"), ["run"])
        job = self.job("once")
        self.assertEqual((job["state"], job["attempts"]), ("completed", 2))
        self.assertIn("not started", self.log("once"))
        os.kill(a.pid, signal.SIGCONT)
        self.stop_workers()
        self.assertEqual(a.wait(timeout=10), 0, self.err(a))
        self.assertEqual(self.lines("runs"), ["run"])  # A never started it
        job = self.job("once")
        self.assertEqual((job["state"], job["attempts"]), ("completed", 2))
        self.assertIn("once not started: taken over by another worker (attempt 1)",
                      self.out(a))
        self.assertEqual(self.run_files(".exit"), [])
        self.assertNotIn("Traceback", self.err(a))
        self.integrity_ok()

    def test_revocation_is_a_counted_attempt_with_a_clear_error(self):
        self.enqueue("--id", "once", "--max-retries", "0",
                     f"echo run >> {self.path('runs')}")
        a = self.bg(fault="after-claim:stop")
        self.resume_in_cleanup(a)
        self.wait_stopped(a)
        aid = self.worker_id(a)
        self.age(a)
        r = self.drain()
        self.assertEqual(r.code, 1, r)             # its only attempt ended dead
        job = self.job("once")
        self.assertEqual((job["state"], job["attempts"]), ("dead", 1))
        self.assertEqual(job["last_error"],
                         f"not started: worker {aid} stopped before starting it")
        self.assertEqual(self.lines("runs"), [])

class TestTwoHomes(QueueTest):
    """Jobs of the same id in two homes never mix: a worker of one home never
    adopts, waits on, or kills the other home's process."""

    def setUp(self):
        super().setUp()
        self.home_b = os.path.join(self.tmp, "home-b")
        self.env_b = dict(self.env, QUEUECTL_HOME=self.home_b)
        self.addCleanup(self._kill_b_jobs)

    def _kill_b_jobs(self):
        for p in self.procs:                  # workers first, by pid
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        pids = []
        try:
            pids.append(int(self.lines("b-pid")[0]))
        except (IndexError, ValueError):
            pass
        for pid in pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def start_b(self):
        """Home B's nightly: a long job, running under B's worker; its pid."""
        r = self.q("enqueue", "--id", "nightly", "--max-retries", "0",
                   f"echo $$ > {self.path('b-pid')}; "
                   + WAIT_GO.format(go=self.path("b-go"))
                   + f"; echo done >> {self.path('b-runs')}", env=self.env_b)
        self.assertEqual(r.code, 0, r)
        w = self.spawn_worker(env=self.env_b)
        self.wait_for(lambda: "".join(self.lines("b-pid")) or w.poll() is not None,
                      what="B's nightly to start")
        self.assertIsNone(w.poll(), self.output(w))
        pid = int(self.lines("b-pid")[0])
        self.wait_for(lambda: self.show("nightly", env=self.env_b)["state"] == "processing",
                      what="B's nightly to run")
        return pid

    def check_b_untouched_then_finish(self, b_pid):
        self.assertTrue(pid_alive(b_pid))
        self.assertEqual(self.show("nightly", env=self.env_b)["state"], "processing")
        self.touch("b-go")
        self.wait_for(lambda: self.show("nightly", env=self.env_b)["state"] == "completed",
                      what="B's nightly to complete")
        b = self.show("nightly", env=self.env_b)
        self.assertEqual((b["attempts"], b["exit_code"]), (1, 0))
        self.assertEqual(self.lines("b-runs"), ["done"])

    def test_worker_killed_after_spawn_is_recovered_in_its_own_home(self):
        b_pid = self.start_b()
        self.enqueue("--id", "nightly", f"echo ran >> {self.path('a-runs')}")
        a = self.spawn_worker("--drain", env=self.fault_env("after-spawn:kill"))
        self.assertEqual(a.wait(timeout=20), -signal.SIGKILL, self.output(a))
        self.wait_for(lambda: self.lines("a-runs") == ["ran"], what="A's nightly to run")
        r = self.drain_env(timeout=10)                 # quick: not B's process
        self.assertEqual(r.code, 0, r)
        job = self.job("nightly")
        self.assertEqual((job["state"], job["attempts"], job["exit_code"]),
                         ("completed", 1, 0), job)
        self.assertEqual(self.lines("a-runs"), ["ran"])
        self.assertTrue(pid_alive(b_pid))
        r = self.fails(1, "cancel", "nightly")        # A's is completed
        self.assertIn("completed", r.err)
        self.check_b_untouched_then_finish(b_pid)

    def test_orphaned_claim_is_never_matched_to_another_homes_process(self):
        # A's nightly claimed by a worker that died before its shell started
        # (no pid, no status file), while B's nightly, same id and attempt,
        # runs. Works without fault points, so it shows the old fault too.
        b_pid = self.start_b()
        self.enqueue("--id", "nightly", "--max-retries", "0",
                     f"echo ran >> {self.path('a-runs')}")
        con = self.db()
        stamp = now_iso()
        con.execute("UPDATE jobs SET state = 'processing', worker = 'ghost-1', "
                    "claim = 'ghostclaim00', started_at = ?, updated_at = ? "
                    "WHERE id = 'nightly'", (stamp, stamp))
        con.commit()
        r = self.drain_env(timeout=10)
        self.assertNotIn("adopted", r.out)
        job = self.job("nightly")
        self.assertEqual((job["state"], job["attempts"]), ("dead", 1), (job, r))
        self.assertEqual(r.code, 1, r)
        self.assertEqual(self.lines("a-runs"), [])
        self.check_b_untouched_then_finish(b_pid)


# Partial evidence (issue 22) #################################################

# No decision about a job on partial evidence: a reaped shell is not an ended
# group, an unreadable status file is not a failure, a database that cannot
# be opened now is not a reason to give up, and select() is not poll().

# A worker run with ~1,100 more descriptors open (os.dup: not inherited by
# its jobs), so that everything it opens itself is numbered above 1023.
HIGH_DESCRIPTORS = """
import os, resource, sys
sys.path.insert(0, sys.argv.pop(1))
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
soft = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
held = [os.dup(2) for _ in range(1100)]
assert min(held) < 1024 < max(held)
import queuectl
sys.exit(queuectl.main())
"""

# What a child under a TZ rule sees: [(wall clock, isdst)] now, 58 minutes
# ago, in 2 minutes, 5 minutes ago and 15 minutes ago.
TZ_PROBE = """
import json, time
now = time.time()
def wall(t):
    lt = time.localtime(t)
    return time.strftime("%Y-%m-%d %H:%M", lt), lt.tm_isdst
print(json.dumps([wall(now), wall(now - 3600 + 120), wall(now + 120), wall(now - 300),
                  wall(now - 900)]))
"""

def kill_group_quietly(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass

def clock_turned_back_tz(test, minutes_ago=10, margin=75):
    """A POSIX TZ under which the wall clock was turned back one hour
    minutes_ago minutes ago: standard time XST is UTC, daylight time XDT
    UTC+1, from 1 January until now - minutes_ago. So wall-clock times from
    now - minutes_ago to now + 60 - minutes_ago came once in XDT and come
    again now in XST (whose wall clock is the UTC one). Skips the test when
    that hour, or the next margin minutes, would cross midnight, or on 1
    January or 29 February (Jn counts 1..365 and never 29 February)."""
    import calendar
    import datetime as dt
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    end = now - dt.timedelta(minutes=minutes_ago)   # the instant, in XST wall time
    end_dst = end + dt.timedelta(hours=1)           # the rule gives it in XDT wall time
    if end.date() != (now + dt.timedelta(minutes=margin)).date() or \
            (end.month, end.day) in ((1, 1), (2, 29)):
        test.skipTest("the repeated hour would cross midnight, 1 January or 29 February")
    day = end.timetuple().tm_yday - (calendar.isleap(end.year) and end.month > 2)
    return f"XST0XDT-1,J1/0,J{day}/{end_dst:%H:%M:%S}"

class TestACancelledAttemptEndsWithItsGroup(QueueTest):
    """A cancelled attempt has ended only when no process of its group is
    left (or the group was killed after the grace): a reaped shell whose
    child still runs holds off retry and keeps the attempt's keys."""

    def test_a_child_that_outlives_its_shell_holds_off_retry_and_the_key(self):
        go = self.path("go")
        self.enqueue("--id", "c", "--key", "k",
                     f"echo $$ > {self.path('shell.pid')}; "
                     f"sh -c 'trap \"\" TERM; echo $$ > {self.path('child.pid')}; "
                     f"while [ ! -f {go} ]; do [ -d {self.work} ] || exit 3; "
                     "sleep 0.05; done' & wait")
        self.spawn_worker("--count", "2")         # a free thread for other jobs
        self.wait_running("c")
        shell = self.read_pid("shell.pid")
        child = self.read_pid("child.pid")

        def end_child():                          # before QueueTest's cleanup
            self.touch("go")
            if pid_alive(child):
                os.kill(child, signal.SIGKILL)
        self.addCleanup(end_child)
        # The grace outlasts retry's own wait (10 s): the child (TERM-proof)
        # lives until the test creates the file go.
        cancel = subprocess.Popen([*QUEUECTL, "cancel", "c", "--grace", "30"],
                                  env=self.env, cwd=self.work, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        self.procs.append(cancel)
        self.wait_for(lambda: self.state("c") == "cancelled" and not pid_alive(shell),
                      10, "c to be cancelled and its shell to end")
        self.assertTrue(pid_alive(child))
        r = self.run_q("retry", "c", timeout=40)
        self.assertEqual(r.code, 1, f"retry accepted while the cancelled attempt's "
                         f"child (pid {child}) runs: {r}")
        self.assertIn("its cancelled attempt still has running processes",
                      self.error_line(r))
        self.assertTrue(pid_alive(child))
        self.assertEqual(self.state("c"), "cancelled")
        # The key is still held: a job with it is passed over, and one
        # enqueued after it (claimed after it was) runs.
        second = self.enqueue("--key", "k", f"touch {self.path('second.txt')}")
        third = self.enqueue("true")
        self.wait_state(third, "completed")
        self.assertTrue(pid_alive(child))
        self.assertFalse(os.path.exists(self.path("second.txt")),
                         "a second job with key k ran while the cancelled one's child ran")
        self.assertEqual(self.state(second), "pending")
        reasons = json.loads(self.ok("why", second, "--json"))["reasons"]
        self.assertIn("key_full", [x["code"] for x in reasons])
        # Once the child has ended, the attempt has: cancel returns, the key
        # is let go, and retry is accepted.
        self.touch("go")
        self.assertEqual(cancel.wait(timeout=20), 0, cancel.stderr.read())
        self.wait_for(lambda: not pid_alive(child), 10, "the child to end")
        self.wait_state(second, "completed")
        self.assertEqual(self.ok("retry", "c"), "c\n")
        self.wait_state("c", "completed")
        self.assertEqual(self.job("c")["attempts"], 1)

class TestAnUnreadableStatusIsNoOutcome(QueueTest):
    """An adopter that cannot read a job's status file yet (EMFILE) reads it
    again later: "cannot tell" is never "failed"."""

    def test_an_adopted_job_that_exited_0_is_completed_not_rerun(self):
        self.set_fast_retries()
        self.enqueue("--id", "j", self.gate_cmd())
        self.kill_worker_running("j")
        b = self.spawn_worker(env=self.fault_env("read-status:fail@j*3"))
        # It ends once b watches it, so that b reads its status file.
        self.wait_for(lambda: "adopted" in self.output(b), 20, "b to adopt j")
        self.go()
        self.wait_state("j", "completed", timeout=30)
        job = self.job("j")
        self.assertEqual((job["state"], job["attempts"], job["exit_code"]),
                         ("completed", 1, 0), self.output(b))
        self.assertEqual(self.lines("runs"), ["start", "done"])     # never re-run
        self.assertIn("injected fault at read-status", self.output(b),
                      "the fault point was never reached")
        self.assertIsNone(b.poll(), self.output(b))

class TestAnAdoptionThatCannotOpenTheDatabase(QueueTest):
    """A thread that cannot open the database for an adopted job does not
    forget it: the worker's next recovery scan re-examines its own
    processing jobs that no thread tracks."""

    def test_the_adopters_next_scan_records_the_job(self):
        self.enqueue("--id", "j", f"sleep 2; echo ran >> {self.path('runs.txt')}")
        self.kill_worker_running("j")
        b = self.spawn_worker(env=self.fault_env("adopt-store:fail*2"))
        self.wait_state("j", "completed", timeout=25)     # scans run every 5 s
        job = self.job("j")
        self.assertEqual((job["state"], job["attempts"], job["exit_code"]),
                         ("completed", 1, 0), self.output(b))
        self.assertEqual(self.lines("runs.txt"), ["ran"])
        self.assertIn("injected fault at adopt-store", self.output(b),
                      "the fault point was never reached")
        self.assertIsNone(b.poll(), self.output(b))

class TestDescriptorsAbove1023(QueueTest):
    """A worker whose descriptors are numbered above 1023 (select()'s
    limit) waits for its jobs and its wake-ups all the same."""

    def test_256_threads_with_descriptors_above_1023_drain(self):
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if hard != resource.RLIM_INFINITY and hard < 4096:
            self.skipTest(f"the hard limit of open files is {hard}, below 4096")
        self.ok("enqueue", "--stdin", input="sleep 1\n" * 256)
        p = subprocess.Popen([PY, "-c", HIGH_DESCRIPTORS, HERE, "worker", "start",
                              "--count", "256", "--drain"], env=self.env, cwd=self.work,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.procs.append(p)
        try:
            out, _ = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.fail("worker start --count 256 --drain with descriptors above 1023 "
                      "still running after 60s; states: "
                      + json.dumps(json.loads(self.ok("status", "--json"))["counts"]))
        self.assertEqual(p.returncode, 0, out[-3000:])
        self.assertNotIn("Traceback", out)
        self.assertNotIn("handing it to recovery", out)
        counts = json.loads(self.ok("status", "--json"))["counts"]
        self.assertEqual(counts["completed"], 256, counts)

class TestABugRightAfterTheSpawn(QueueTest):
    """An exception between the spawn and the wait (after-spawn) hands the
    job to recovery: never processing for good, holding its keys, nor a
    worker that cannot stop."""

    def test_the_job_is_recorded_once_and_the_drain_ends(self):
        runs = self.path("runs.txt")
        self.enqueue("--id", "j", "--key", "k", f"sleep 0.3; echo ran >> {runs}")
        self.enqueue("--id", "n", "--key", "k", f"echo next >> {runs}")
        r = self.drain_env(self.fault_env("after-spawn:raise@j"), timeout=30)
        self.assertEqual(r.code, 0, r)
        self.assertNotIn("Traceback", r.out + r.err)
        job = self.job("j")
        # Recovery finds the attempt running (adopted: 1 attempt) or, when
        # the shell had not yet reached its start fence, takes the fence (a
        # counted "not started" attempt, then a retry): either way j ran once.
        self.assertEqual((job["state"], job["exit_code"]), ("completed", 0), r)
        self.assertEqual(job["attempts"], 1 if "not started" not in r.out else 2, r)
        self.assertEqual(self.state("n"), "completed")
        self.assertEqual(sorted(self.lines("runs.txt")), ["next", "ran"])   # j ran once

    def test_stop_now_stops_the_worker_and_its_job(self):
        self.enqueue("--id", "j", "--key", "k", f"echo $$ > {self.path('pid')}; sleep 30")
        w = self.spawn_worker(env=self.fault_env("after-spawn:raise@j"))
        self.wait_listed(w)
        pid = self.read_pid("pid")
        self.addCleanup(kill_group_quietly, pid)      # its pid may never be recorded
        self.wait_for(lambda: "injected fault at after-spawn" in self.output(w), 10,
                      "the worker to hit the fault")
        self.assertEqual(self.state("j"), "processing")
        r = self.run_q("worker", "stop", "--now", "--wait", "--timeout", "8", timeout=20)
        self.assertEqual(r.code, 0, f"{r}; worker output: {self.output(w)}")
        try:
            w.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.fail(f"the worker still runs after stop --now: {self.output(w)}")
        self.assertNotEqual(self.state("j"), "processing", self.output(w))
        self.wait_for(lambda: not pid_alive(pid), 10, "the job's shell to be stopped")

class TestTheRepeatedHour(QueueTest):
    """Within the hour after the clock was turned back (a DST end), a wall
    clock time that comes again later is in the future: a schedule fires
    no slot early, and --run-at reads one time one way."""

    def turned_back_env(self):
        tz = clock_turned_back_tz(self)
        env = dict(self.env, TZ=tz)
        r = subprocess.run([PY, "-c", TZ_PROBE], capture_output=True, text=True,
                           env=env, timeout=30)
        self.assertEqual(r.returncode, 0, r.stderr)
        now, hour_ago, soon, before, earlier = json.loads(r.stdout)
        self.assertEqual(now[1], 0, f"TZ={tz}: not standard time now")
        self.assertEqual((hour_ago, soon[1]), ([soon[0], 1], 0),
                         f"TZ={tz}: the wall clock of 2 minutes from now did not also "
                         "come 58 minutes ago")
        self.assertEqual((before[1], earlier[1]), (0, 1), f"TZ={tz}: the clock did not "
                         "turn back 10 minutes ago")
        return env

    def test_a_schedule_added_after_the_clock_turned_back_fires_no_future_slot(self):
        import datetime as dt
        env = self.turned_back_env()
        # In 10 minutes by the wall clock (XST's is UTC's): a time that also
        # came 50 minutes ago, in daylight time.
        soon = dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=10)
        out = self.ok("schedule", "add", "s", f"{soon.minute} {soon.hour} * * *", "--",
                      "true", env=env)
        self.assertNotIn("ago", out)
        out = self.ok("schedule", "add", "t", "*/10 * * * *", "--", "true", env=env)
        self.assertNotIn("ago", out)
        r = self.q("doctor", env=env)
        self.assertNotIn("has not succeeded", r.out, r)
        r = self.drain_env(env, timeout=30)
        self.assertEqual(r.code, 0, r)
        self.assertEqual(json.loads(self.ok("list", "--json", env=env)), [], r.out)
        now = dt.datetime.now(dt.timezone.utc)
        for sch in json.loads(self.ok("schedule", "list", "--json", env=env)):
            self.assertEqual((sch["skips"], sch["last_skip"], sch["last_job"]),
                             (0, None, None), sch)
            self.assertGreater(dt.datetime.strptime(sch["next_run"], "%Y-%m-%dT%H:%M:%SZ")
                               .replace(tzinfo=dt.timezone.utc), now, sch)
        r = self.q("doctor", env=env)
        self.assertNotIn("has not succeeded", r.out, r)
        self.assertNotIn("overdue", r.out, r)

    def test_run_at_today_and_a_date_give_one_time_in_the_repeated_hour(self):
        import datetime as dt
        env = self.turned_back_env()
        # In 20 minutes by the wall clock; it also came 40 minutes ago.
        t = dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=20)
        a = self.enqueue("--run-at", f"today {t:%H:%M}", "true", env=env)
        b = self.enqueue("--run-at", f"{t:%Y-%m-%d %H:%M}", "true", env=env)
        self.assertEqual(self.job(a)["run_at"], self.job(b)["run_at"])

class TestTheGroupIsTheEvidence(QueueTest):
    """Only the attempt's whole process group (and what carries its claim)
    is evidence of its end: not its shell, not its claim alone."""

    def test_a_cancelled_child_without_the_claim_keeps_the_job_until_killed(self):
        # env -i: the child carries no QUEUECTL_CLAIM, only the group; the
        # worker's own recovery scans (every 5 s) must not end the attempt.
        self.enqueue("--id", "c", "--key", "k",
                     "env -i sh -c 'trap \"\" TERM; echo $$ > child.pid; exec sleep 30' "
                     "& echo started")
        self.spawn_worker()
        child = self.read_pid("child.pid")
        self.addCleanup(kill_group_quietly, child)
        cancel = subprocess.Popen([*QUEUECTL, "cancel", "c", "--grace", "7"], env=self.env,
                                  cwd=self.work, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        self.procs.append(cancel)
        self.wait_state("c", "cancelled")
        r = self.run_q("retry", "c", timeout=40)
        self.assertEqual(r.code, 0, r)
        self.assertFalse(pid_alive(child), "retry was accepted while the cancelled "
                         "attempt's child still ran")

    def test_recovery_never_settles_while_the_group_runs(self):
        self.enqueue("--id", "c", "--key", "k",
                     "(sleep 3; touch child-end) & echo started")
        self.enqueue("--id", "d", "--key", "k",
                     "[ -f child-end ] || echo DOUBLE > double.txt")
        a = self.spawn_worker()
        self.wait_for(lambda: "left in its group" in self.output(a), 10,
                      "the worker to wait for the group")
        os.kill(a.pid, signal.SIGKILL)
        a.wait(timeout=10)
        r = self.drain_within(40)
        self.assertEqual(r.code, 0, r)
        self.assertFalse(os.path.exists(self.path("double.txt")),
                         "d ran while c's group still ran")
        self.assertEqual((self.state("c"), self.state("d")), ("completed", "completed"))

    def test_cancel_signals_the_group_its_shell_left(self):
        self.enqueue("--id", "c", "sleep 0.3; sh -c 'trap \"echo got-term > term.txt; "
                     "exit 0\" TERM; echo $$ > child.pid; sleep 30 & wait' & echo started")
        a = self.spawn_worker()
        child = self.read_pid("child.pid")
        self.addCleanup(kill_group_quietly, child)
        self.wait_for(lambda: "left in its group" in self.output(a), 10,
                      "the worker to wait for the group")
        self.ok("cancel", "c", "--grace", "20", timeout=40)
        self.assertEqual(self.lines("term.txt"), ["got-term"])
        self.assertFalse(pid_alive(child))

    def test_the_run_time_counts_until_the_group_ends(self):
        self.enqueue("--id", "c", "sleep 0.6 & echo bg")
        r = self.drain_within(30)
        ran = re.search(r"c completed \(attempt 1, ran (\d+\.\d+)s\)", r.out)
        self.assertIsNotNone(ran, r.out)
        self.assertGreaterEqual(float(ran.group(1)), 0.6)      # not the shell's 0.00x s
        self.assertGreaterEqual(self.job("c")["usage"]["wall"], 0.6)

    def test_remove_of_a_cancelled_job_whose_worker_died(self):
        self.enqueue("--id", "c", "sleep 30")
        self.kill_worker_running("c")
        self.ok("cancel", "c", "--grace", "1", timeout=30)
        self.assertEqual(self.ok("remove", "c", timeout=30), "c\n")
        self.assertEqual(self.q("show", "c").code, 1)

class TestWhyCountsJobThreads(QueueTest):
    """why counts only the jobs that occupy job threads: an adopted job is
    watched by a thread of its own."""

    def test_an_adopted_job_leaves_the_thread_free(self):
        self.enqueue("--id", "x", self.gate_cmd())
        a = self.bg("--count", "1")
        self.wait_running("x")
        os.kill(a.pid, signal.SIGKILL)
        a.wait(timeout=10)
        b = self.bg("--count", "1")
        bid = self.worker_id(b)
        self.wait_for(lambda: self.job("x")["worker"] == bid, 20, "B to adopt x")
        self.enqueue("--id", "z", "true")
        self.wait_state("z", "completed")          # B's one thread is free
        self.enqueue("--id", "y", "--run-at", "+1h", "true")
        codes = [x["code"] for x in json.loads(self.ok("why", "y", "--json"))["reasons"]]
        self.assertNotIn("workers_busy", codes)
        self.assertIn("scheduled", codes)
        self.go()
        self.wait_state("x", "completed")

class TestStopTimeoutWithoutWait(QueueTest):
    """worker stop --timeout without --wait is never accepted doing nothing:
    --timeout implies waiting."""

    def test_timeout_without_wait_waits_and_fails_while_the_worker_runs(self):
        self.enqueue("--id", "long", self.gate_cmd())
        w = self.bg()
        self.wait_running("long")
        began = time.monotonic()
        r = self.fails(1, "worker", "stop", "--timeout", "1")
        took = time.monotonic() - began
        self.assertIn("still running", self.error_line(r))
        self.assertGreaterEqual(took, 0.9, r)
        self.assertIsNone(w.poll())
        self.go()
        self.assertEqual(w.wait(timeout=15), 0, self.err(w))   # it was asked to stop
        self.assertEqual(self.state("long"), "completed")

class TestWorkerStopWaits(QueueTest):
    """worker stop returns once the workers have stopped (as other queuectl
    suites expect); --no-wait returns at once; a worker can be named."""

    def test_stop_waits_by_default_and_no_wait_does_not(self):
        self.enqueue("--id", "long", self.gate_cmd())
        w = self.bg()
        self.wait_running("long")
        r = self.ok("worker", "stop", "--no-wait")
        self.assertEqual(r, "stopping 1 worker\n")
        self.assertIsNone(w.poll())                       # still finishing its job
        stopper = subprocess.Popen([*QUEUECTL, "worker", "stop"], env=self.env,
                                   cwd=self.work, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        self.procs.append(stopper)
        self.wait_for(lambda: pid_alive(stopper.pid), 5, "worker stop to run")
        time.sleep(0.3)                                   # it waits: the job runs on
        self.assertIsNone(stopper.poll())
        self.go()
        self.assertEqual(stopper.wait(timeout=20), 0, stopper.stderr.read())
        self.assertEqual(w.wait(timeout=10), 0)           # it returned after the worker
        self.fails(2, "worker", "stop", "--no-wait", "--timeout", "5")

    def test_one_worker_is_stopped_by_pid(self):
        a, b = self.bg(), self.bg()
        self.wait_for(lambda: self.live_workers() == 2, 20, "two workers")
        self.assertEqual(self.ok("worker", "stop", str(a.pid)), "stopping 1 worker\n")
        self.assertEqual(a.wait(timeout=10), 0)
        self.assertIsNone(b.poll())
        self.assertEqual(self.live_workers(), 1)
        r = self.fails(1, "worker", "stop", "nosuch")
        self.assertIn("worker status", self.error_line(r))

    def test_readable_priority_bounds_and_one_limit_on_schedule_names(self):
        r = self.fails(2, "enqueue", "--priority", "99999999", "true")
        self.assertIn("from -1000000 to 1000000", self.error_line(r))
        for name in ("bad name", "a" * 101):
            with self.subTest(name=name[:10]):
                r = self.fails(2, "schedule", "add", name, "@daily", "--", "true")
                self.assertIn("use 1-100 of", self.error_line(r))

class TestTheFirstHour(QueueTest):
    """Forms and defaults a newcomer (and other queuectl suites) expect."""

    def test_json_gives_the_values_that_apply_and_whose_they_are(self):
        self.ok("config", "set", "queue.q.max_retries", "7")
        self.enqueue("--id", "a", "--queue", "q", "--timeout", "5", "true")
        self.enqueue("--id", "b", "true")
        a, b = self.job("a"), self.job("b")
        self.assertEqual((a["max_retries"], a["from"]["max_retries"]), (7, "queue"))
        self.assertEqual((a["timeout"], a["from"]["timeout"]), (5, "job"))
        self.assertEqual((b["max_retries"], b["from"]["max_retries"]), (3, "home"))
        listed = {j["id"]: j for j in json.loads(self.ok("list", "--json"))}
        self.assertEqual(listed["a"]["max_retries"], 7)
        self.assertIn("max_retries        7  (queue's)", self.ok("show", "a"))

    def test_a_command_that_cannot_run_is_not_retried_and_says_why(self):
        self.set_fast_retries()
        with open(self.path("plain.sh"), "w") as f:
            f.write("echo hi\n")                          # not executable
        self.enqueue("--id", "nf", "rsync-that-is-not-here -a /srv/ /backup/")
        self.enqueue("--id", "nx", "./plain.sh")
        self.enqueue("--id", "opt", "--retry-on", "127", "--max-retries", "1", "no-such-cmd")
        r = self.drained(1)
        nf, nx, opt = self.job("nf"), self.job("nx"), self.job("opt")
        self.assertEqual((nf["state"], nf["attempts"], nf["exit_code"]), ("dead", 1, 127), r)
        self.assertTrue(nf["last_error"].startswith(
            "command not found: rsync-that-is-not-here; not retried"), nf["last_error"])
        self.assertEqual((nx["state"], nx["attempts"], nx["exit_code"]), ("dead", 1, 126))
        self.assertTrue(nx["last_error"].startswith(
            "could not run: ./plain.sh: Permission denied"), nx["last_error"])
        self.assertEqual((opt["state"], opt["attempts"]), ("dead", 2))   # opted back in
        # The shell's own line reads as from any sh -c, without the wrapper.
        self.assertIn("sh: 1: rsync-that-is-not-here: not found\n", self.log("nf"))
        self.assertNotIn("queuectl-job", self.log("nf") + self.log("nx"))
        self.assertNotIn("eval", self.log("nf"))

    def test_errors_name_the_next_step(self):
        self.enqueue("--id", "bad", "--max-retries", "0", "exit 3")
        self.drained(1)
        r = self.fails(1, "wait", "bad")
        self.assertIn("(see queuectl logs bad, queuectl dlq list)", self.error_line(r))
        blocker = os.path.join(self.tmp, "file")
        with open(blocker, "w"):
            pass
        r = self.fails(2, "--home", os.path.join(blocker, "home"), "enqueue", "true")
        self.assertIn("cannot create the home directory", self.error_line(r))
        self.assertIn("--home DIR or QUEUECTL_HOME", self.error_line(r))

    def test_bare_queuectl_shows_the_queue_once_there_is_one(self):
        self.assertIn("Common commands:", self.ok())
        self.enqueue("--id", "a", "echo hi")
        out = self.ok()
        self.assertTrue(out.startswith("ID "), out)
        self.assertIn("echo hi", out)

    def test_show_gives_a_running_jobs_pid(self):
        self.enqueue("--id", "long", self.gate_cmd())
        self.bg()
        pid = self.wait_running("long")
        self.assertRegex(self.ok("show", "long"), rf"\npid +{pid}\n")
        self.assertEqual(self.job("long")["pid"], pid)
        self.go()

class TestHabitsFromTspAndPueue(QueueTest):
    """Issue 24, the rest: one home, one rule for options, labels, job
    numbers, threads changed live, schedules that say nobody fires them, a
    scheduling mode, jitter, and the job's own words in its error."""

    def test_a_command_that_creates_a_home_says_so_once(self):
        r = self.q("status")                           # reads: creates nothing
        self.assertIn("there is no queue in", r.err)
        self.assertFalse(os.path.exists(self.path_home("queue.db")))
        r = self.q("enqueue", "true")                  # stderr a pipe, as cron's
        self.assertEqual(r.err, CREATED % self.home)
        self.assertEqual(self.q("enqueue", "true").err, "")
        self.assertEqual(self.q("worker", "start", "--drain").err, "")

    def path_home(self, *parts):
        return os.path.join(self.home, *parts)

    def test_doctor_warns_about_a_second_home_in_home(self):
        fake_home = os.path.join(self.tmp, "userhome")
        os.mkdir(fake_home, 0o700)
        env = dict(self.env, HOME=fake_home)
        self.enqueue("true", env=env)
        self.assertNotIn("warning", self.ok("doctor", env=env))
        other = dict(env)
        del other["QUEUECTL_HOME"]                     # a sudo -u without the variable
        r = self.q("enqueue", "echo lost", env=other)
        self.assertIn(f"created a new queue home in {fake_home}/.queuectl", r.err)
        out = self.ok("doctor", env=env)
        self.assertIn(f"warning: {fake_home}/.queuectl is a queue home too, and not the "
                      f"one in use ({self.home})", out)
        self.assertNotIn("is a queue home too", self.ok("doctor", env=other))

    def test_options_come_first_and_a_late_option_is_pointed_out(self):
        r = self.q("enqueue", "--id", "a", "sleep", "5", "--timeout", "2")
        self.assertEqual((r.code, r.out), (0, "a\n"), r)
        self.assertIn("warning: --timeout comes after the command's first word", r.err)
        self.assertEqual((self.job("a")["command"], self.job("a")["from"]["timeout"]),
                         ("sleep 5 --timeout 2", "home"))
        for args in (["--id", "b", "--", "sleep", "5", "--timeout", "2"],
                     ["--id", "c", "--timeout", "2", "sleep", "5"],
                     ["--id", "d", "sleep 5", "--timeout", "2"],
                     ["--id", "e", "grep", "-c", "--timeoutx", "f"]):
            r = self.q("enqueue", *args)
            self.assertEqual((r.code, r.err), (0, ""), (args, r))
        self.assertEqual([self.job(i)["timeout"] for i in "cd"], [2, 2])
        r = self.q("schedule", "add", "s", "@daily", "sleep", "5", "--queue=x")
        self.assertIn("warning: --queue=x comes after the command's first word", r.err)
        r = self.q("enqueue", "./job.sh", "--home", "/srv/q")     # the wrong home, unsaid
        self.assertIn("warning: --home comes after the command's first word", r.err)

    def test_labels_select_work_like_queues(self):
        out = self.ok("enqueue", "--stdin", "--label", "batch 7",
                      input="echo one\n# a comment\nexit 3\n")
        one, three = out.split()
        self.enqueue("--id", "plain", "true")
        self.enqueue("--id", "lab", "--label", "other", "true")
        self.assertEqual(self.job(one)["label"], "batch 7")
        self.assertIsNone(self.job("plain")["label"])
        listed = self.ok("list", "--label", "batch 7")
        self.assertEqual([ln.split()[0] for ln in listed.splitlines()[1:]], [one, three])
        self.assertEqual(listed.splitlines()[0].split()[:5], ["ID", "#", "STATE", "QUEUE",
                                                                "LABEL"])
        self.assertIn("batch 7", listed)
        self.assertNotIn("LABEL", self.ok("list", "--state", "pending", "--queue", "nosuch"))
        self.ok("config", "set", "max_retries", "0")
        self.drained(1)
        r = self.q("wait", "--label", "batch 7")
        self.assertEqual(r.code, 1, r)
        self.assertIn(f"{three} dead", r.err)
        self.assertEqual(self.q("wait", "--label", "other").code, 0)
        self.assertEqual(self.ok("dlq", "retry", "--label", "other"), "retried 0 jobs\n")
        self.assertEqual(self.ok("dlq", "retry", "--label", "batch 7"), "retried 1 job\n")
        self.assertEqual(self.ok("cancel", "--label", "batch 7"), "cancelled 1 job\n")
        self.assertEqual(self.ok("retry", "--label", "batch 7", "--state", "cancelled"),
                         "retried 1 job\n")
        self.assertEqual(self.state(three), "pending")
        self.assertEqual(self.state("plain"), "completed")
        for bad in ("", " x", "a\tb", "x" * 101):
            self.fails(2, "enqueue", "--label", bad, "true")
        r = self.fails(2, "wait", "plain", "--label", "other")
        self.assertIn("not both", r.err)

    def test_a_job_is_named_by_its_number_too(self):
        self.enqueue("--id", "first", "echo from first")
        self.enqueue("--id", "2", "echo the id 2")       # an id that is a number wins
        self.enqueue("--id", "third", "echo from third")
        self.assertEqual(self.job("first")["number"], 1)
        self.assertEqual(self.job("#3")["id"], "third")
        self.assertEqual(self.job("3")["id"], "third")
        self.assertEqual(self.job("2")["id"], "2")       # the id, not number 2
        self.assertEqual(self.job("#2")["id"], "2")      # which is job 2 too
        self.drained(0)
        self.assertIn("from third", self.ok("logs", "3"))
        self.assertEqual(self.ok("retry", "#1"), "first\n")
        self.assertEqual(self.state("first"), "pending")
        self.assertIn("no job numbered 9", self.fails(1, "show", "#9").err)
        self.assertIn("no job numbered 9", self.fails(2, "wait", "9").err)   # as an unknown id
        # --after and depends_on take numbers too.
        self.enqueue("--id", "after1", "--after", "1", "true")
        self.enqueue("--id", "after3", "--after", "#3", "true")
        self.enqueue('{"id": "json2", "command": "true", "depends_on": ["#2"]}')
        self.assertEqual([self.job(i)["depends_on"] for i in ("after1", "after3", "json2")],
                         [["first"], ["third"], ["2"]])
        self.assertIn("no job numbered 99", self.fails(1, "enqueue", "--after", "#99",
                                                        "true").err)
        listed = self.ok("list").splitlines()
        self.assertEqual([ln.split()[:2] for ln in listed[1:4]],
                         [["first", "1"], ["2", "2"], ["third", "3"]])

    def test_a_running_worker_takes_more_threads_and_fewer(self):
        p = self.start_worker("--count", "1")
        for i in range(3):
            self.enqueue("--id", f"g{i}", self.gate_cmd())
        self.wait_for(lambda: self.running_count() == 1, what="one job to run")
        pid = str(p.pid)
        out = self.ok("worker", "threads", "3")
        self.assertRegex(out, rf"^worker \S+ \(pid {pid}\): 3 job threads, was 1\n$")
        self.wait_for(lambda: self.running_count() == 3, what="three jobs to run")
        self.assertIn("workers: 3 job threads in 1 live worker process", self.ok("status"))
        out = self.ok("worker", "threads", "1", pid)
        self.assertIn("1 job thread, was 3; a surplus thread ends when its job does", out)
        self.assertIn("workers: 1 job thread in 1 live worker process", self.ok("status"))
        self.assertEqual(self.running_count(), 3)        # nothing is killed
        self.go()
        # By id: a row's WHEN says "1s ago" a second after its end (a "g").
        self.wait_for(lambda: sorted(j["id"] for j in json.loads(self.ok(
            "list", "--state", "completed", "--json"))) == ["g0", "g1", "g2"],
                      what="the gated jobs to end")
        os.unlink(self.path("go"))
        for i in range(3, 6):
            self.enqueue("--id", f"g{i}", self.gate_cmd())
        self.wait_for(lambda: self.running_count() == 1, what="one job to run")
        deadline = time.monotonic() + 0.5      # one thread left: no second job starts
        while time.monotonic() < deadline:
            self.assertLessEqual(self.running_count(), 1)
            time.sleep(0.05)
        self.go()
        r = self.fails(1, "worker", "threads", "2", "nosuch")
        self.assertIn("no live worker 'nosuch'", r.err)
        self.fails(2, "worker", "threads", "0")

    def running_count(self):
        return len(json.loads(self.ok("list", "--state", "processing", "--json")))

    def test_a_schedule_says_when_no_worker_fires_it(self):
        r = self.q("schedule", "add", "nightly", "0 3 * * *", "--", "true")
        self.assertEqual(r.code, 0, r)
        self.assertIn("no worker is running on this home, so nothing fires until one "
                      "does", r.err)
        status = self.ok("status")
        self.assertRegex(status, r"schedule nightly \(0 3 \* \* \*\): next run .*; no "
                                 r"worker is running to fire it")
        self.assertEqual([s["name"] for s in json.loads(self.ok("status", "--json"))
                          ["schedules"]], ["nightly"])
        self.assertIn("warning: schedule nightly fires only while a worker runs",
                      self.ok("doctor"))
        self.start_worker()
        self.assertEqual(self.q("schedule", "add", "other", "@daily", "--", "true").err, "")
        self.assertNotIn("no worker", self.ok("status"))
        self.assertNotIn("fires only while", self.ok("doctor"))

    def test_scheduling_mode_fifo_ignores_priority_for_the_home_or_a_queue(self):
        self.enqueue("--id", "low", RECORD)
        self.enqueue("--id", "high", "--priority", "5", RECORD)
        self.ok("config", "set", "scheduling-mode", "fifo")
        self.drained(0)
        self.assertEqual(self.order(), ["low", "high"])
        os.unlink(self.path("order.txt"))
        self.ok("retry", "low", "high")
        self.ok("config", "set", "scheduling_mode", "priority")
        self.drained(0)
        self.assertEqual(self.order(), ["high", "low"])
        os.unlink(self.path("order.txt"))
        self.ok("retry", "low", "high")
        self.enqueue("--id", "x-high", "--queue", "x", "--priority", "9", RECORD)
        self.ok("config", "set", "scheduling_mode", "fifo")
        self.ok("config", "set", "queue.x.scheduling_mode", "priority")
        self.drained(0)
        self.assertEqual(self.order(), ["x-high", "low", "high"])
        r = self.fails(2, "config", "set", "scheduling_mode", "lifo")
        self.assertIn("give priority (higher priority first) or fifo", r.err)

    def test_why_names_the_jobs_ahead_in_the_claims_order(self):
        p = self.bg()
        self.freeze(p)                  # a live worker, with a free thread, that waits
        self.resume_in_cleanup(p)
        self.enqueue("--id", "low", "true")
        self.enqueue("--id", "high", "--priority", "5", "true")
        # Jobs no claim would take now are not ahead: a paused queue's, one
        # whose key is full.
        self.enqueue("--queue", "p", "--priority", "9", "true")
        self.ok("pause", "p")
        self.ok("limit", "set", "k", "1")
        self.enqueue("--id", "holder", "--key", "k", "--queue", "p", "true")
        self.db().execute("UPDATE jobs SET state = 'processing', claim = 'c', worker = 'w' "
                          "WHERE id = 'holder'").connection.commit()
        self.enqueue("--key", "k", "--priority", "9", "true")
        self.assertEqual(self.ok("why", "high"), "high: nothing holds it back: a worker "
                         "claims it next\n")
        self.assertIn("after the 1 due job ahead of it (scheduling_mode priority: higher "
                      "priority first, then the earlier due)", self.ok("why", "low"))
        self.ok("config", "set", "scheduling_mode", "fifo")
        self.assertIn("after the 1 due job ahead of it (scheduling_mode fifo: priority "
                      "ignored, the earlier due first)", self.ok("why", "high"))
        reason = json.loads(self.ok("why", "high", "--json"))["reasons"][0]
        self.assertEqual((reason["code"], reason["ahead"], reason["scheduling_mode"]),
                         ("ready", 1, "fifo"))

    def test_backoff_jitter_spreads_waits_and_can_be_turned_off(self):
        cfg = dict(queuectl.CONFIG_DEFAULTS)
        self.assertEqual(cfg["backoff_jitter"], "10%")
        delay = queuectl.backoff_delay
        self.assertAlmostEqual(delay(3, cfg, spread=0.0), 8 * 0.9)
        self.assertAlmostEqual(delay(3, cfg, spread=1.0), 8 * 1.1)
        self.assertAlmostEqual(delay(3, cfg, spread=0.5), 8)
        self.assertAlmostEqual(delay(3, dict(cfg, backoff_jitter="full"), spread=0.25), 2)
        self.assertEqual(delay(20, dict(cfg, max_backoff=600), spread=1.0), 600)  # still caps
        self.assertEqual(delay(3, dict(cfg, backoff_jitter="0"), spread=0.0), 8)
        waits = {delay(3, cfg) for _ in range(50)}
        self.assertGreater(len(waits), 1)
        self.assertTrue(all(7.2 <= w <= 8.8 for w in waits), waits)
        for typed, stored in (("25", "25%"), ("25%", "25%"), ("full", "full"),
                              ("off", "0"), ("0", "0")):
            self.assertEqual(self.ok("config", "set", "backoff-jitter", typed),
                             f"backoff_jitter = {stored}\n")
        self.ok("config", "set", "queue.q.backoff_jitter", "50%")
        for bad in ("101", "-5", "half", ""):
            self.fails(2, "config", "set", "backoff_jitter", bad)
        # Retries of jobs that failed together are spread, and list shows when.
        self.ok("config", "set", "backoff_jitter", "50%")
        self.ok("config", "set", "backoff_base", "100")
        for i in range(6):
            self.enqueue("--id", f"f{i}", "exit 1")
        self.start_worker()
        self.wait_for(lambda: all(self.state(f"f{i}") == "failed" for i in range(6)),
                      what="six failed attempts")
        run_at = {self.job(f"f{i}")["run_at"] for i in range(6)}
        self.assertGreater(len(run_at), 1)
        # "due 14:05 (in 2m)", or "due Mon 00:01 (in 2m)" across midnight
        self.assertRegex(self.ok("list"), r"failed +default +0 +1 +due [^()]+ \(in ")

    def test_the_error_carries_the_attempts_last_line(self):
        self.ok("config", "set", "max_retries", "1")
        self.ok("config", "set", "max_backoff", "0")
        self.enqueue("--id", "pg", "--on-dead", 'echo "$QUEUECTL_ERROR" > hook.txt',
                     'if [ "$QUEUECTL_ATTEMPT" = 1 ]; then echo said once; fi; '
                     'echo "pg_dump: error: connection refused $QUEUECTL_ATTEMPT" >&2; '
                     r'printf "\033[31mred\033[0m\t%s\n\n" "$(printf "x%.0s" $(seq 300))"; '
                     'exit 3')
        self.enqueue("--id", "quiet", "--max-retries", "1",
                     '[ "$QUEUECTL_ATTEMPT" = 1 ] && echo first only; exit 4')
        self.drained(1)
        self.wait_for(lambda: self.state(self.job("pg")["hook_jobs"][0]["id"]) == "completed",
                      what="the hook")
        error = self.job("pg")["last_error"]
        self.assertTrue(error.startswith("exit code 3: red " + "x" * 100), error)
        self.assertLessEqual(len(error), len("exit code 3: ") + 200)
        self.assertNotIn("\x1b", error)
        with open(self.path("hook.txt")) as f:
            self.assertEqual(f.read(), error + "\n")
        self.assertIn("exit code 3: red xx", self.ok("dlq", "list"))
        self.assertRegex(self.ok("why", "pg"),
                         r"^pg: dead (now|\S+ ago), after 2 attempts: exit code 3: red xxx")
        # An attempt that printed nothing says only its exit: never an older
        # attempt's words.
        self.assertEqual(self.job("quiet")["last_error"], "exit code 4")

    def test_a_cwd_the_worker_cannot_enter_is_not_retried(self):
        nobody = self.nobody()
        locked = os.path.join(self.tmp, "locked")
        os.mkdir(locked, 0o755)                      # locked once the jobs are enqueued
        home = os.path.join(self.tmp, "nobodyhome")
        os.mkdir(home, 0o700)
        os.chown(home, nobody.pw_uid, nobody.pw_gid)
        os.chmod(self.tmp, 0o755)
        env = {"PATH": "/usr/bin:/bin", "QUEUECTL_HOME": home}

        def as_nobody(*args):
            return subprocess.run(
                ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
                 "--clear-groups", PY, "-I", PROG, *args], cwd="/", capture_output=True,
                text=True, timeout=60, env=env)
        if as_nobody("--version").returncode != 0:
            self.skipTest("this interpreter cannot run as nobody")
        below = os.path.join(locked, "sub")          # a parent it cannot search
        os.mkdir(below)
        for job_id, cwd in (("j", locked), ("k", below)):
            r = as_nobody("enqueue", "--id", job_id, "--cwd", cwd, "true")
            self.assertEqual(r.returncode, 0, r.stderr)
        os.chmod(locked, 0o700)
        self.assertEqual(as_nobody("worker", "start", "--drain").returncode, 1)
        for job_id, cwd in (("j", locked), ("k", below)):
            job = json.loads(as_nobody("show", job_id, "--json").stdout)
            self.assertEqual((job["state"], job["attempts"], job["exit_code"]),
                             ("dead", 1, 126))
            self.assertEqual(job["last_error"], "could not start: Permission denied (cwd "
                             f"{cwd}); not retried: it cannot run (retry_on 126 retries it)")

# The README's examples ########################################################
#
# A fenced block whose first line starts with "$ " is an example: commands
# after "$ ", each followed by what it prints (stdout and stderr). The line
# before its fence says what the test does with it: <!-- example --> runs it
# in a fresh home and compares, <!-- example: not run: REASON --> counts it
# as exempt, with why. "$ export QUEUECTL_HOME=DIR" names the home the
# example shows, starting from nothing (the test runs it in one of its own
# and prints it as DIR); any other example runs in an empty home that
# exists. In what an example prints, a line "..." stands for any lines, and
# "... TEXT" for a line that ends with TEXT.

README = os.path.join(HERE, "README.md")

EXAMPLE_MARK = re.compile(r"^<!-- example(?:: not run: (?P<why>.+?))? -->$")

def readme_examples(text):
    """[(line number, mark or None, why, [lines])] of the README's examples."""
    lines, found, i = text.split("\n"), [], 0
    while i < len(lines):
        if lines[i].startswith("```") and i + 1 < len(lines) and lines[i + 1].startswith("$ "):
            j = lines.index("```", i + 1)
            m = EXAMPLE_MARK.match(lines[i - 1]) if i else None
            found.append((i + 1, m and "run" if m and not m.group("why") else
                          "skip" if m else None, m and m.group("why"), lines[i + 1:j]))
            i = j
        i += 1
    return found

def normalized(text, home=None, shown=None, ids=()):
    """Output with what differs from run to run made the same: times,
    durations, sizes, ids of jobs (ids: the random ones this run made; in
    a README, a 6-character id with a digit) and workers, pids, the home's
    path, and the blanks that align table columns."""
    if home:
        text = text.replace(home, shown)
    for job_id in ids:
        text = re.sub(rf"(?<![\w.-]){re.escape(job_id)}(?![\w.-])", "ID", text)
    subs = [(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(\.\d+)?( [A-Z]{3,5}|Z)?", "TIME"),
            (r"\d{4}-\d\d-\d\d", "DATE"),
            (r"\bvm-\d+-[0-9a-z]{4}\b|\b[\w.-]+-\d+-[0-9a-z]{4}\b", "WORKER"),
            (r"(?<![\w.])\d+(\.\d+)?(ms|s|m|h|d)(\d+(m|s))?\b", "DUR"),
            (r"(?<![\w.])\d+(\.\d+)?[KMGT]\b", "SIZE"),
            (r"\b[0-9a-hjkmnp-tv-z]{6}\b", lambda m: "ID" if any(
                c.isdigit() for c in m.group()) else m.group()),
            (r"(?m)^\d+$", "PID"), (r"\bpid \d+", "pid PID"),
            (r"@run-[0-9a-hjkmnp-tv-z]{6}\b", "@run-ID"),
            (r"\b((today|tomorrow|Mon|Tue|Wed|Thu|Fri|Sat|Sun) )?\d\d:\d\d\b", "CLOCK"),
            (r"(?<=  )(now|DUR ago)(?=  |$)", "WHEN"),
            # "(in 24m)" reads "(now)" in the second before a schedule's slot
            (r"(?<=since )(now|DUR ago)\b|(?<=\()(now|DUR ago|in DUR)(?=\))", "WHEN"),
            (r"(?<= )(now|DUR ago)(?=, after )", "WHEN"),      # why: "dead 2s ago, after"
            (r"(?<=\S) {2,}", "  "), (r" +$", "")]
    for pattern, repl in subs:
        text = re.sub(pattern, repl, text, flags=re.M)
    return text

def example_matches(got, want):
    """Whether what ran matches what the README says, command by command:
    the same lines; or, where the README elides ("..." for any lines,
    "... TEXT" for a line that ends with TEXT), its lines in order among
    what the command printed."""
    def sections(text):
        out = []
        for line in text.split("\n"):
            if line.startswith("$ ") or not out:
                out.append([line])
            else:
                out[-1].append(line)
        return out
    def same(a, b):
        """Equal lines; or, where a table cut them with …, the same up to
        the shorter cut (how far a column is cut moves with its width)."""
        if a == b or "…" not in a + b:
            return a == b
        a, b = (x[:x.find("…")].rpartition(" ")[0] if "…" in x else x for x in (a, b))
        return a.startswith(b) or b.startswith(a)
    got_s, want_s = sections(got), sections(want)
    if [s[0] for s in got_s] != [s[0] for s in want_s]:
        return False
    for g, w in zip(got_s, want_s):
        if not any(line.strip().startswith("...") for line in w[1:]):
            if len(g) != len(w) or not all(same(a, b) for a, b in zip(g, w)):
                return False
            continue
        rest = iter(g[1:])
        for line in w[1:]:
            text = line.strip()
            if text == "...":
                continue
            tail = text[4:] if text.startswith("... ") else None
            if not any(x.endswith(tail) if tail is not None else x == line for x in rest):
                return False
    return True

class TestReadme(QueueTest):
    """The README is the manual: its examples run, and it names every
    command and setting."""

    def run_example(self, block):
        """(what the block's commands print, what the block says), both
        normalized: each command run by bash in this test's own home, with
        `queuectl` this file on PATH, at 80 columns, in UTC."""
        bindir = os.path.join(self.tmp, "bin")
        os.makedirs(bindir, exist_ok=True)
        wrapper = os.path.join(bindir, "queuectl")
        with open(wrapper, "w") as f:          # as installed: from cached bytecode
            f.write(f"#!/bin/sh\nexec {PY} -I -c 'import sys; sys.path.insert(0, "
                    f"\"{HERE}\"); import queuectl; sys.exit(queuectl.main())' \"$@\"\n")
        os.chmod(wrapper, 0o755)
        home = os.path.join(self.tmp, "example-home")
        subprocess.run(["rm", "-rf", home], check=True)
        fresh = any(re.match(r"\$ export QUEUECTL_HOME=", line) for line in block)
        env = dict(self.env, PATH=bindir + ":" + self.env["PATH"], QUEUECTL_HOME=home,
                   COLUMNS="80", TZ="UTC")
        for name in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS"):    # from `make test`: a job's
            env.pop(name, None)                             # make would say its level
        shown, out = "/root/.queuectl", []         # the default home, as root sees it
        if not fresh:                    # an empty home that exists (says nothing)
            import contextlib
            import io
            with contextlib.redirect_stderr(io.StringIO()):
                queuectl.Store(home).close()
        for i, line in enumerate(block):
            if not line.startswith("$ "):
                continue
            typed = [line]               # and the lines a trailing \ continues it on
            while typed[-1].endswith("\\") and i + len(typed) < len(block):
                typed.append(block[i + len(typed)])
            out += typed
            m = re.match(r"export QUEUECTL_HOME=(\S+)", line[2:])
            if m:
                shown = m.group(1)
                continue
            r = subprocess.run(["bash", "-c", "\n".join(typed)[2:]], env=env, cwd=self.work,
                               timeout=60,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            out += r.stdout.splitlines()             # as a terminal shows both
        run = os.path.join(home, "run")
        if os.path.isdir(run) and any(n.endswith(".lock") for n in os.listdir(run)):
            # a worker it left detached
            subprocess.run([wrapper, "worker", "stop", "--now", "--timeout", "20"], env=env,
                           capture_output=True, timeout=60)
        ids = ()
        if os.path.exists(os.path.join(home, "queue.db")):
            con = sqlite3.connect(os.path.join(home, "queue.db"))
            typed = " ".join(line for line in block if line.startswith("$ "))
            ids = [r[0] for r in con.execute("SELECT id FROM jobs")
                   if re.fullmatch(r"[0-9a-hjkmnp-tv-z]{6}", r[0]) and r[0] not in typed]
            con.close()
        return normalized("\n".join(out), home, shown, ids), normalized("\n".join(block))

    def test_every_example_is_run_or_says_why_not(self):
        with open(README) as f:
            examples = readme_examples(f.read())
        unmarked = [n for n, mark, _, _ in examples if mark is None]
        self.assertEqual(unmarked, [], "README examples without <!-- example --> or "
                                       "<!-- example: not run: REASON --> (by line)")
        print(f"\nREADME examples: {sum(1 for e in examples if e[1] == 'run')} run, "
              f"{sum(1 for e in examples if e[1] == 'skip')} not run", file=sys.stderr)

    def run_examples(self, part, parts=3):
        """The README's examples to run, every parts-th from part on (the
        three parts are three tests: the runner's shards share them out)."""
        with open(README) as f:
            examples = [e for e in readme_examples(f.read()) if e[1] == "run"]
        for n, _, _, block in examples[part::parts]:
            with self.subTest(line=n):
                got, want = self.run_example(block)
                self.assertTrue(example_matches(got, want),
                                f"README line {n}: it says\n{want}\n\nit printed\n{got}")

    def test_the_readmes_examples_1_of_3(self):
        self.run_examples(0)

    def test_the_readmes_examples_2_of_3(self):
        self.run_examples(1)

    def test_the_readmes_examples_3_of_3(self):
        self.run_examples(2)

    def test_help_prints_the_readmes_sections(self):
        with open(README) as f:
            text = re.sub(r"<!--.*?-->\n?", "", f.read(), flags=re.S)
        keys = re.search(r"(?ms)^## Concurrency keys and limits\n.*?(?=^## )", text).group()
        self.assertEqual(self.ok("help", "keys"), keys.rstrip() + "\n")
        self.assertTrue(self.ok("help", "retry", "policy").startswith(
            "## Retry policy by exit code\n"))
        listed = self.ok("help").splitlines()[1:]
        self.assertEqual([x.strip() for x in listed], re.findall(r"(?m)^## (.*)$", text))
        self.assertIn("no section of the manual", self.fails(2, "help", "nothing").err)
        prefix = os.path.join(self.tmp, "prefix")     # the installed command has it too
        subprocess.run(["make", "-s", "-C", HERE, "install", f"PREFIX={prefix}",
                        f"PYTHON={PY}"], check=True, capture_output=True, timeout=60)
        r = subprocess.run([os.path.join(prefix, "bin", "queuectl"), "help", "keys"],
                           capture_output=True, text=True, timeout=60, env=self.env)
        self.assertEqual(r.stdout, keys.rstrip() + "\n")

    def test_the_reference_shows_each_commands_synopsis_and_an_example(self):
        """Issue 26: what `queuectl CMD --help` says (its usage at 80
        columns, one of its examples) is what the reference shows."""
        with open(README) as f:
            text = f.read()
        env = dict(self.env, COLUMNS="80")
        missing = []
        for c in queuectl.COMMAND_TABLE:
            if c.handler is None:
                continue
            r = subprocess.run([*QUEUECTL, *c.words, "--help"], capture_output=True,
                               text=True, env=env, timeout=60)
            usage = r.stdout.split("\n\n", 1)[0].rstrip("\n")
            self.assertTrue(usage.startswith("usage: queuectl " + " ".join(c.words)), usage)
            if f"```\n{usage}\n```" not in text:
                missing.append(f"{' '.join(c.words)}: its synopsis\n{usage}")
            if not any(f"\n$ {e}\n" in text for e in c.examples):
                missing.append(f"{' '.join(c.words)}: one of its --help examples")
        self.assertEqual(missing, [], "the reference lacks what --help shows")

    def test_the_reference_names_every_command_and_setting(self):
        with open(README) as f:
            text = f.read()
        self.assertEqual([" ".join(c.words) for c in queuectl.COMMAND_TABLE
                          if f"queuectl {' '.join(c.words)}" not in text], [],
                         "commands the README's reference never shows")
        self.assertEqual([k for k in queuectl.CONFIG_DEFAULTS if f"`{k}`" not in text], [],
                         "settings the README never names")

# Stand-in launchers (no Slurm, systemd or sshd here): LAUNCHER -- sh -c CMD.
FAKE_SRUN = """#!/bin/bash
# As srun: the command in a process group of its own; TERM and INT
# forwarded to it; its exit status returned.
[ "$1" = "--" ] && shift
set -m
"$@" &
child=$!
trap 'kill -TERM -- -$child 2>/dev/null' TERM
trap 'kill -INT -- -$child 2>/dev/null' INT
while true; do wait $child; rc=$?; kill -0 $child 2>/dev/null || exit $rc; done
"""

BROKEN_LAUNCHER = """#!/bin/bash
# Dies on TERM without passing it on: its child stays in the job's group.
[ "$1" = "--" ] && shift
"$@" &
wait $!
"""

SLOW_LAUNCHER = """#!/bin/sh
# Takes its time before it runs the command.
[ "$1" = "--" ] && shift
sleep 0.3
exec "$@"
"""

class TestLaunchers(QueueTest):
    """Issue 28: a queue runs its jobs through a launcher (srun,
    systemd-run, ssh) and everything else holds; tested with stand-ins."""

    def launcher(self, name, text):
        path = os.path.join(self.tmp, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o755)
        return path

    def test_a_launched_job_runs_with_its_exit_code_env_and_cwd(self):
        srun = self.launcher("srun", FAKE_SRUN)
        self.ok("config", "set", "queue.hpc.launcher", f"{srun} --")
        self.enqueue("--id", "ok", "--queue", "hpc", "--env", "FOO=bar",
                     'echo "foo=$FOO in $(pwd) as $0"; ps -o pid= -o ppid= -p $$ > me')
        self.enqueue("--id", "bad", "--queue", "hpc", "--max-retries", "0", "echo no; exit 3")
        self.enqueue("--id", "here", "--launcher", "", "--queue", "hpc", "echo local")
        self.enqueue("--id", "again", "--queue", "hpc", MARKER_JOB)    # fails once
        self.set_fast_retries()
        self.drained(1)
        again = self.job("again")
        self.assertEqual((again["state"], again["attempts"]), ("completed", 2))   # retried
        self.assertIn(f"foo=bar in {self.work} as sh\n", self.log("ok"))
        bad = self.job("bad")
        self.assertEqual((bad["state"], bad["exit_code"], bad["last_error"]),
                         ("dead", 3, "exit code 3: no"))
        self.assertEqual((self.job("ok")["launcher"], self.job("ok")["from"]["launcher"]),
                         (f"{srun} --", "queue"))
        self.assertEqual(self.job("here")["from"]["launcher"], "job")
        self.assertIn("local", self.log("here"))
        self.assertIn("(measured locally: the launcher's", self.ok("show", "ok"))
        self.assertNotIn("measured locally", self.ok("show", "here"))
        with open(self.path("me")) as f:
            pid, ppid = map(int, f.read().split())
        self.assertNotEqual(ppid, self.job("ok")["pid"])     # under the launcher

    def test_timeout_and_cancel_reach_the_job_through_the_launcher(self):
        srun = self.launcher("srun", FAKE_SRUN)
        self.ok("config", "set", "launcher", f"{srun} --")
        self.ok("config", "set", "kill_grace", "1")
        self.enqueue("--id", "slow", "--timeout", "1", "--max-retries", "0",
                     "echo $$ > slow.pid; sleep 30")
        self.drained(1)
        self.assertIn("timed out after 1s", self.job("slow")["last_error"])
        self.assertFalse(pid_alive(self.read_pid("slow.pid")))
        self.enqueue("--id", "gate", "echo $$ > gate.pid; " + self.gate_cmd())
        self.start_worker()
        self.wait_running("gate")
        self.wait_for(lambda: os.path.exists(self.path("gate.pid")), what="the gate's pid")
        self.assertEqual(self.ok("cancel", "gate"), "gate\n")
        self.assertEqual(self.state("gate"), "cancelled")
        self.assertFalse(pid_alive(self.read_pid("gate.pid")))

    def test_a_launcher_that_dies_on_term_leaves_nothing_behind(self):
        broken = self.launcher("broken", BROKEN_LAUNCHER)
        self.ok("config", "set", "launcher", f"{broken} --")
        self.ok("config", "set", "kill_grace", "1")
        self.enqueue("--id", "stuck", "--timeout", "1", "--max-retries", "0",
                     "trap '' TERM; echo $$ > stuck.pid; sleep 30")
        self.drained(1)
        self.assertIn("timed out after 1s", self.job("stuck")["last_error"])
        self.assertFalse(pid_alive(self.read_pid("stuck.pid")))   # KILLed

    def test_slots_and_hosts_spread_the_jobs(self):
        slow = self.launcher("slow", SLOW_LAUNCHER)
        self.ok("config", "set", "launcher", f"env SLOT={{slot}} HOST={{host}} {slow} --")
        self.ok("config", "set", "launcher_hosts", "build1, build2")
        for i in range(2):
            self.enqueue("--id", f"g{i}", 'echo "$SLOT $HOST" >> where; ' + self.gate_cmd())
        self.start_worker("--count", "2")
        self.wait_for(lambda: len(self.lines("where")) == 4, what="both jobs to start")
        self.go()
        self.wait_for(lambda: all(self.state(f"g{i}") == "completed" for i in range(2)),
                      what="both jobs to complete")
        with open(self.path("where")) as f:
            self.assertEqual(sorted(f.read().split("\n")[:2]), ["0 build1", "1 build2"])

    def test_a_launcher_that_is_not_there_is_not_retried(self):
        self.enqueue("--id", "j", "--launcher", "no-such-srun --ntasks=1 --", "true")
        self.drained(1)
        job = self.job("j")
        self.assertEqual((job["state"], job["attempts"], job["exit_code"]), ("dead", 1, 127))
        self.assertTrue(job["last_error"].startswith("launcher not found: no-such-srun; "
                                                     "not retried"), job["last_error"])
        self.assertIn("invalid --launcher", self.fails(2, "enqueue", "--launcher", "a 'b",
                                                       "true").err)

    def test_a_launched_job_is_adopted_when_its_worker_dies(self):
        srun = self.launcher("srun", FAKE_SRUN)
        self.ok("config", "set", "launcher", f"{srun} --")
        self.enqueue("--id", "long", self.gate_cmd())
        self.kill_worker_running("long")
        old = self.job("long")["worker"]
        b = self.start_worker()
        self.wait_for(lambda: self.job("long")["worker"] != old, what="worker B to adopt it")
        self.assertEqual(self.state("long"), "processing")       # adopted, not re-run
        self.release_and_check_it_ran_once("long")
        self.assertIsNone(b.poll())

    def test_a_real_launcher_where_this_machine_has_one(self):
        import shutil
        real = []
        if shutil.which("systemd-run") and subprocess.run(
                ["systemd-run", "--scope", "--quiet", "true"], capture_output=True,
                timeout=30).returncode == 0:
            real.append("systemd-run --scope --quiet --")
        if shutil.which("ssh") and subprocess.run(
                ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=3", "localhost", "true"],
                capture_output=True, timeout=30).returncode == 0:
            real.append("ssh -o BatchMode=yes localhost --")
        if not real:
            self.skipTest("no working systemd-run --scope and no passwordless ssh localhost")
        for i, launcher in enumerate(real):
            self.enqueue("--id", f"r{i}", "--launcher", launcher, "echo launched; exit 4")
        self.drained(1)
        for i in range(len(real)):
            self.assertEqual(self.job(f"r{i}")["last_error"], "exit code 4: launched")

    def test_ssh_gets_the_command_quoted_once_more(self):
        self.assertEqual(queuectl.launch_line("srun --", "echo 'a b'"),
                         "srun -- sh -c 'echo '\"'\"'a b'\"'\"''")
        line = queuectl.launch_line("ssh -o BatchMode=yes build1 --", "echo 'a b'")
        import shlex
        words = shlex.split(line)
        self.assertEqual(words[:4], ["ssh", "-o", "BatchMode=yes", "build1"])
        self.assertEqual(shlex.split(words[-1]), ["sh", "-c", "echo 'a b'"])   # remote

class TestHookHome(QueueTest):
    def test_a_hooks_queuectl_home_is_not_the_reported_jobs_env(self):
        self.enqueue("--id", "j", "--env", "QUEUECTL_HOME=/nonexistent",
                     "--on-success", 'echo "$QUEUECTL_HOME" > hookhome.txt',
                     'echo "$QUEUECTL_HOME" > jobhome.txt')
        self.assertEqual(self.drain_within(30).code, 0)
        if not self.lines("hookhome.txt"):
            self.assertEqual(self.drain_within(30).code, 0)    # the _hooks job
        self.assertEqual(self.lines("jobhome.txt"), [self.home])
        self.assertEqual(self.lines("hookhome.txt"), [self.home])

class TestScheduleRmDropsItsEnvironment(QueueTest):
    def secrets(self, value):
        rows = self.db().execute("SELECT vars FROM envs").fetchall()
        return [r for (r,) in rows if value in bytes(r)]

    def test_schedule_rm_drops_an_environment_no_job_uses(self):
        self.ok("schedule", "add", "s", "0 3 * * *", "--", "true",
                env=dict(self.env, SECRET_X="hunter2"))
        self.assertEqual(len(self.secrets(b"SECRET_X=hunter2")), 1)
        self.ok("schedule", "rm", "s")
        self.assertEqual(len(self.secrets(b"SECRET_X=hunter2")), 0,
                         "schedule rm left its environment row")
        # One that a job of the schedule still uses stays, for that job.
        self.ok("schedule", "add", "u", "0 3 * * *", "--", "true",
                env=dict(self.env, SECRET_Y="kept"))
        job_id = self.ok("schedule", "run", "u").strip()
        self.ok("schedule", "rm", "u")
        self.assertEqual(len(self.secrets(b"SECRET_Y=kept")), 1)
        self.assertEqual(self.show_env(job_id).get("SECRET_Y"), "kept")

class TestConfigOnAFullDisk(QueueTest):
    def test_config_set_on_a_full_disk_fails_with_exit_1(self):
        self.mount_tmpfs(self.home, "256k")
        self.ok("config", "set", "max_retries", "3")         # the home exists
        self.fill(os.path.join(self.home, "filler"))
        r = self.fails(1, "config", "set", "max_retries", "7")
        self.assertEqual(len(r.err.strip().splitlines()), 1, r)
        self.assertIn("No space left on device", r.err)
        self.assertEqual(self.ok("config", "get", "max_retries"), "3\n")

class TestInstallUnderUmask077(QueueTest):
    def test_make_install_under_umask_077_installs_files_every_user_can_read(self):
        import shutil
        import stat
        if not shutil.which("make"):
            self.skipTest("no make")
        prefix = os.path.join(self.tmp, "p")
        r = subprocess.run(["sh", "-c", 'umask 077; exec make -s install PREFIX="$1" '
                            'PYTHON="$2"', "sh", prefix, PY], cwd=HERE,
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr)
        lib = os.path.join(prefix, "lib", "queuectl")
        seen, wrong = [], []
        for root, _, files in os.walk(lib):
            for name in [root] + [os.path.join(root, f) for f in files]:
                mode = os.stat(name).st_mode
                need = 0o005 if stat.S_ISDIR(mode) else 0o004
                seen.append(os.path.relpath(name, lib))
                if mode & need != need:
                    wrong.append(f"{os.path.relpath(name, lib)} {oct(mode & 0o777)}")
        self.assertTrue(any(n.startswith("__pycache__/queuectl.") and n.endswith(".pyc")
                            for n in seen), seen)
        self.assertEqual(wrong, [], "not readable by every user")
        exe = os.stat(os.path.join(prefix, "bin", "queuectl")).st_mode
        self.assertEqual(exe & 0o005, 0o005)


# Workers: scheduling, stopping, live changes #################################

class TestScheduling(QueueTest):
    def test_priority_then_fifo(self):
        for job_id, pri in (("a", 0), ("b", 5), ("c", 0), ("d", 5), ("e", 1), ("f", -1)):
            self.enqueue("--id", job_id, "--priority", str(pri), RECORD)
        self.drained(0, "--count", "1")
        self.assertEqual(self.order(), ["b", "d", "e", "a", "c", "f"])

    def test_delayed_job_is_not_run_by_drain(self):
        t0 = time.time()
        self.enqueue("--id", "later", "--delay", "30", RECORD)
        t1 = time.time()
        self.enqueue("--id", "now", RECORD)
        started = time.monotonic()
        r = self.drain()
        self.assertEqual(r.code, 0, r)
        self.assertLess(time.monotonic() - started, 20)   # not the 30s of the delay
        self.assertEqual(self.order(), ["now"])
        self.assertEqual(self.state("later"), "pending")
        line = [ln for ln in self.ok("list").splitlines() if ln.startswith("later ")][0]
        self.assertRegex(line, r"due (\w{3} )?\d\d:\d\d \(in \d+s\)")   # "Mon " past midnight
        run_at = queuectl.epoch(self.db().execute(          # 30s after its enqueue, in us
            "SELECT run_at FROM jobs WHERE id = 'later'").fetchone()[0])
        self.assertTrue(t0 + 29.99 <= run_at <= t1 + 30.01, (t0, run_at, t1))

    def test_delay_that_has_passed_is_run(self):
        self.enqueue("--id", "soon", "--delay", "1", RECORD)
        time.sleep(1.1)
        self.drained(0)
        self.assertEqual(self.order(), ["soon"])

    def test_run_at_past_runs_and_future_waits(self):
        import datetime
        self.enqueue("--id", "past", "--run-at", "2000-01-01T00:00:00Z", RECORD)
        self.enqueue("--id", "future", "--run-at", "2099-01-01T00:00:00Z", RECORD)
        self.enqueue("--id", "local", "--run-at", "2099-06-01 12:00", RECORD)
        self.drained(0)
        self.assertEqual(self.order(), ["past"])
        self.assertEqual(self.job("future")["run_at"], "2099-01-01T00:00:00Z")
        self.assertEqual(self.state("future"), "pending")
        expected = datetime.datetime(2099, 6, 1, 12, 0).astimezone(datetime.timezone.utc)
        self.assertEqual(self.job("local")["run_at"], expected.strftime("%Y-%m-%dT%H:%M:%SZ"))

    def test_dependencies_win_over_priority(self):
        a = self.enqueue("--id", "a", RECORD)
        b = self.enqueue("--id", "b", "--after", a, RECORD)
        self.enqueue("--id", "c", "--after", b, "--priority", "10", RECORD)
        self.enqueue("--id", "d", "--after", "a", "--after", "c", "--priority", "20", RECORD)
        self.drained(0, "--count", "3")
        self.assertEqual(self.order(), ["a", "b", "c", "d"])

    def test_dependency_on_a_completed_job_is_met(self):
        self.enqueue("--id", "a", RECORD)
        self.drained(0)
        self.enqueue("--id", "b", "--after", "a", RECORD)
        self.assertEqual(self.job("b")["depends_on"], ["a"])
        self.drained(0)
        self.assertEqual(self.order(), ["a", "b"])

    def test_job_blocked_on_a_dead_dependency_runs_after_dlq_retry(self):
        self.enqueue("--id", "dep", "--max-retries", "0", MARKER_JOB + "; " + RECORD)
        self.enqueue("--id", "child", "--after", "dep", RECORD)
        r = self.drain()
        self.assertEqual(r.code, 1, r)
        self.assertEqual(self.state("dep"), "dead")
        self.assertEqual(self.state("child"), "pending")
        self.assertEqual(self.order(), [])
        line = [ln for ln in self.ok("list").splitlines() if ln.startswith("child ")][0]
        self.assertIn("blocked on dep", line)
        self.assertIn("dead", line)
        self.assertEqual(self.job("child")["blocked_on"], ["dep"])
        self.assertIn("dep", self.ok("show", "child"))
        self.ok("dlq", "retry", "dep")
        self.drained(0)
        self.assertEqual(self.order(), ["dep", "child"])
        self.assertEqual(self.state("child"), "completed")
        self.assertEqual(self.job("child")["blocked_on"], [])

    def test_worker_for_a_queue_runs_only_that_queue(self):
        self.enqueue("--id", "ja", "--queue", "a", RECORD)
        self.enqueue("--id", "jb", "--queue", "b", RECORD)
        self.enqueue("--id", "jd", RECORD)
        self.drained(0, "--queue", "a")
        self.assertEqual(self.order(), ["ja"])
        self.assertEqual(self.state("jb"), "pending")
        self.drained(0, "--queue", "b", "--queue", "default")
        self.assertEqual(sorted(self.order()), ["ja", "jb", "jd"])

    def test_pause_and_resume_a_queue(self):
        self.enqueue("--id", "ja", "--queue", "a", RECORD)
        self.enqueue("--id", "jb", "--queue", "b", RECORD)
        self.assertIn("a", self.ok("pause", "a"))
        self.assertIn("paused: a", self.ok("status"))
        self.assertEqual(json.loads(self.ok("status", "--json"))["paused"], ["a"])
        self.drained(0)
        self.assertEqual(self.order(), ["jb"])
        self.assertEqual(self.state("ja"), "pending")
        self.ok("resume", "a")
        self.assertNotIn("paused", self.ok("status"))
        self.drained(0)
        self.assertEqual(self.order(), ["jb", "ja"])

    def test_pause_all_queues(self):
        self.enqueue("--id", "ja", "--queue", "a", RECORD)
        self.enqueue("--id", "jd", RECORD)
        self.ok("pause")
        self.assertIn("paused: all queues", self.ok("status"))
        r = self.drain_within(15)
        self.assertEqual(r.code, 0, r)
        self.assertNotIn("error", r.out + r.err)
        self.assertEqual(self.order(), [])
        self.ok("resume")
        self.assertEqual(self.drain_within(15).code, 0)
        self.assertEqual(sorted(self.order()), ["ja", "jd"])

    def test_idle_worker_picks_up_a_new_job(self):
        worker = self.start_worker()
        job_id = self.enqueue(RECORD)
        try:
            self.wait_state(job_id, "completed", timeout=10)
        except AssertionError:
            state = self.state(job_id)
            worker.kill()
            out, err = worker.communicate(timeout=10)
            self.fail(f"{job_id} is {state} 10 s after its enqueue; worker output:\n"
                      f"{out}{err}")
        self.assertEqual(self.order(), [job_id])

class TestWorkerShutdown(QueueTest):
    def test_worker_stop_lets_running_job_finish(self):
        self.enqueue("--id", "two", f"sleep 2; echo done > {self.path('done')}")
        w = self.start_worker()
        self.wait_running("two")
        self.ok("worker", "stop", "--wait", "--timeout", "20")
        self.assertEqual(w.wait(timeout=10), 0)
        self.assertEqual(self.state("two"), "completed")
        self.assertEqual(self.lines("done"), ["done"])

    def test_sigterm_lets_running_job_finish(self):
        self.enqueue("--id", "two", f"sleep 2; echo done > {self.path('done')}")
        w = self.start_worker()
        self.wait_running("two")
        w.send_signal(signal.SIGTERM)
        self.assertEqual(w.wait(timeout=20), 0)
        self.assertEqual(self.state("two"), "completed")

    def test_stop_now_puts_job_back_to_pending(self):
        self.enqueue("--id", "long", f"sleep 304 & echo $! > {self.path('pid')}; wait")
        w = self.start_worker()
        self.wait_running("long")
        child = self.read_pid("pid")
        self.ok("worker", "stop", "--now", "--wait", "--timeout", "20")
        self.assertEqual(w.wait(timeout=10), 0)
        job = self.job("long")
        self.assertEqual((job["state"], job["attempts"]), ("pending", 0))
        self.assertFalse(pid_alive(child))

    def test_second_sigint_stops_running_jobs(self):
        self.enqueue("--id", "long", "sleep 305")
        w = self.start_worker()
        self.wait_running("long")
        w.send_signal(signal.SIGINT)
        self.wait_for(lambda: "stopping" in self.worker_output(w), 10,
                      "the worker to handle the first SIGINT")
        self.assertIsNone(w.poll())                  # first SIGINT: finishing
        w.send_signal(signal.SIGINT)
        self.assertEqual(w.wait(timeout=20), 0)
        self.assertEqual(self.state("long"), "pending")

    def test_detach_runs_in_background_and_logs(self):
        out = self.ok("worker", "start", "--detach").strip()
        pid = int(out)
        self.addCleanup(lambda: pid_alive(pid) and os.kill(pid, signal.SIGKILL))
        self.wait_for(lambda: self.live_workers() == 1, 10, "detached worker")
        job = self.enqueue("true")
        self.ok("wait", job, "--timeout", "10")
        self.ok("worker", "stop", "--wait", "--timeout", "10")
        self.assertFalse(pid_alive(pid))
        with open(os.path.join(self.home, "worker.log")) as f:
            self.assertIn(f"{job} completed", f.read())

class TestStopNow(QueueTest):
    def test_job_that_exits_0_on_sigterm_is_recorded_completed(self):
        ready = self.path("ready")
        self.enqueue("--id", "t", f"trap 'exit 0' TERM; echo x > {ready}; "
                     f"while :; do [ -d {self.work} ] || exit 3; sleep 0.05; done")
        w = self.bg()
        self.wait_running("t")
        self.wait_for(lambda: self.lines("ready") == ["x"], 10, "the trap to be set")
        self.stop_workers("--now")
        self.assertEqual(w.wait(timeout=10), 0, self.err(w))
        job = self.job("t")
        self.assertEqual((job["state"], job["attempts"], job["exit_code"]),
                         ("completed", 1, 0))

    def test_job_killed_by_sigterm_goes_back_to_pending_uncounted(self):
        self.enqueue("--id", "s", "sleep 30")
        w = self.bg()
        pid = self.wait_running("s")
        self.stop_workers("--now")
        self.assertEqual(w.wait(timeout=10), 0, self.err(w))
        job = self.job("s")
        self.assertEqual((job["state"], job["attempts"]), ("pending", 0))
        self.assertFalse(pid_alive(pid))

class TestSighup(QueueTest):
    def test_sighup_stops_gracefully_after_the_running_job(self):
        self.enqueue("--id", "g", self.gate_cmd())
        w = self.bg()
        self.wait_running("g")
        w.send_signal(signal.SIGHUP)
        self.wait_for(lambda: "stopping" in self.out(w) or w.poll() is not None, 20,
                      "the worker to react to SIGHUP")
        self.assertIsNone(w.poll(), f"SIGHUP ended the worker at once: {w.returncode}")
        self.assertEqual(self.state("g"), "processing")
        self.go()
        try:
            code = w.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.fail(f"worker still running after SIGHUP; out={self.out(w)!r}")
        self.assertEqual(code, 0, self.err(w))
        self.assertIn("stopping", self.out(w))
        job = self.job("g")
        self.assertEqual((job["state"], job["attempts"], job["exit_code"]),
                         ("completed", 1, 0))
        self.assertEqual(self.lines("runs"), ["start", "done"])
        self.assertEqual(self.run_files((".lock", ".wake")), [])
        self.assertEqual(json.loads(self.ok("worker", "status", "--json")), [])

class TestLiveWorkerBehaviour(QueueTest):
    def test_logs_follow_streams_until_the_job_ends(self):
        self.enqueue("--id", "f", "echo one; sleep 1; echo two")
        self.start_worker()
        out = self.ok("logs", "f", "--follow", timeout=30)
        self.assertIn("one\ntwo\n", out)
        self.assertIn("[queuectl] attempt 1 ended: exit 0", out)

    def test_running_worker_picks_up_a_config_change(self):
        w = self.start_worker()
        self.ok("config", "set", "max-retries", "0")
        self.wait_for(lambda: "config reloaded" in self.worker_output(w), 10,
                      "the worker to reload its config")
        self.enqueue("--id", "once", "false")
        self.wait_state("once", "dead")
        self.assertEqual(self.job("once")["attempts"], 1)


# Output and read commands ####################################################

class TestReadCommands(QueueTest):
    def test_show_json_has_every_field(self):
        self.enqueue("--id", "dep", "true")
        self.drained(0)
        self.enqueue("--id", "j", "--priority", "3", "--max-retries", "1", "--timeout", "5",
                     "--queue", "q1", "--env", "A=b", "--after", "dep", "echo hi")
        pending = self.job("j")
        for k in SPEC_JOB_FIELDS:
            self.assertIn(k, pending)
        self.assertEqual((pending["state"], pending["started_at"], pending["finished_at"],
                          pending["exit_code"], pending["worker"], pending["attempts"]),
                         ("pending", None, None, None, None, 0))
        self.drained(0)
        job = self.job("j")
        for k in SPEC_JOB_FIELDS:
            self.assertIn(k, job)
        self.assertEqual(job["id"], "j")
        self.assertEqual(job["command"], "echo hi")
        self.assertEqual(job["state"], "completed")
        self.assertEqual(job["queue"], "q1")
        self.assertEqual(job["priority"], 3)
        self.assertEqual(job["attempts"], 1)
        self.assertEqual(job["max_retries"], 1)
        self.assertEqual(job["timeout"], 5)
        self.assertEqual(job["depends_on"], ["dep"])
        self.assertEqual(os.path.realpath(job["cwd"]), os.path.realpath(self.work))
        self.assertEqual(job["env"], ["A"])
        umask = os.umask(0o022)
        os.umask(umask)
        self.assertEqual((job["env_from"], job["umask"]), ("enqueuer", f"{umask:04o}"))
        self.assertEqual(job["exit_code"], 0)
        self.assertIsNone(job["last_error"])
        self.assertIsInstance(job["worker"], str)
        self.assertTrue(job["worker"])
        for k in ("run_at", "created_at", "updated_at", "started_at", "finished_at"):
            self.assertRegex(job[k], "^" + TIME_RE + "$", k)
        self.assertLessEqual(job["created_at"], job["started_at"])
        self.assertLessEqual(job["started_at"], job["finished_at"])
        self.assertLess(abs(queuectl.epoch(job["finished_at"]) - time.time()), 60)

    def test_show_text_and_status_id(self):
        self.enqueue("--id", "j", "echo hi")
        out = self.ok("show", "j")
        self.assertRegex(out, r"(?m)^id\s+j$")
        self.assertRegex(out, r"(?m)^state\s+pending$")
        self.assertIn(os.path.join(self.home, "logs", "j.log"), out)
        self.assertEqual(self.ok("status", "j", "--json"), self.ok("show", "j", "--json"))

    def test_show_unknown_and_invalid_ids(self):
        self.enqueue("--id", "j", "true")
        r = self.fails(1, "show", "nope")
        self.assertIn("nope", self.error_line(r))
        self.fails(2, "show", "../x")
        self.fails(1, "logs", "nope")

    def test_status_counts_and_json(self):
        self.enqueue("--id", "c1", "true")
        self.enqueue("--id", "c2", "true")
        self.enqueue("--id", "d", "--max-retries", "0", "exit 1")
        self.drained(1)
        self.enqueue("--id", "p", "--delay", "1h", "true")
        out = self.ok("status")
        self.assertIn("1 pending", out)
        self.assertIn("2 completed", out)
        self.assertIn("1 dead", out)
        self.assertIn("0 live", out)
        self.assertIn("next scheduled: p", out)
        info = json.loads(self.ok("status", "--json"))
        self.assertEqual(info["counts"], {"pending": 1, "processing": 0, "failed": 0,
                                          "completed": 2, "dead": 1, "cancelled": 0})
        self.assertEqual(info["next_scheduled"]["id"], "p")
        self.assertRegex(info["next_scheduled"]["run_at"], "^" + TIME_RE + "$")
        self.assertIsNone(info["oldest_pending"])       # p is not due: nothing waits
        self.assertEqual(info["workers"]["live"], 0)
        self.assertEqual(info["paused"], [])

    def test_list_filters_limit_and_json(self):
        for i in range(4):
            self.enqueue("--id", f"j{i}", "true")
        self.enqueue("--id", "x", "--queue", "other", "--max-retries", "0", "exit 1")
        self.drained(1)
        self.enqueue("--id", "late", "true")
        out = self.ok("list")
        self.assertEqual(out.splitlines()[0].split()[:3], ["ID", "#", "STATE"])
        self.assertEqual([ln.split()[0] for ln in out.splitlines()[1:]],
                         ["j0", "j1", "j2", "j3", "x", "late"])
        rows = json.loads(self.ok("list", "--json"))
        self.assertEqual([j["id"] for j in rows], ["j0", "j1", "j2", "j3", "x", "late"])
        for row in rows:
            for k in SPEC_JOB_FIELDS:
                self.assertIn(k, row)
        rows = json.loads(self.ok("list", "--state", "completed", "--json"))
        self.assertEqual([j["id"] for j in rows], ["j0", "j1", "j2", "j3"])
        rows = json.loads(self.ok("list", "--queue", "other", "--json"))
        self.assertEqual([j["id"] for j in rows], ["x"])
        out = self.ok("list", "--limit", "2")
        self.assertEqual([ln.split()[0] for ln in out.splitlines()[1:3]], ["x", "late"])
        self.assertIn("4 older jobs not shown", out)
        self.assertEqual(len(json.loads(self.ok("list", "--limit", "2", "--json"))), 2)
        self.assertIn("no jobs", self.ok("list", "--state", "cancelled"))

    def test_logs_tail(self):
        self.enqueue("--id", "j", "for i in 1 2 3 4 5; do echo line$i; done")
        self.drained(0)
        full = self.log("j").splitlines(keepends=True)
        self.assertEqual(len(full), 7)
        tail = self.ok("logs", "j", "--tail", "2")
        self.assertEqual(tail, "".join(full[-2:]))
        self.assertTrue(tail.startswith("line5\n"))
        self.assertEqual(self.ok("logs", "j", "--tail", "0"), "")
        self.assertEqual(self.ok("logs", "j", "--tail", "100"), "".join(full))
        self.fails(2, "logs", "j", "--tail=-1")

    def test_logs_of_a_job_that_has_not_run(self):
        self.enqueue("--id", "j", "true")
        r = self.q("logs", "j")
        self.assertEqual((r.code, r.out), (0, ""))
        self.assertEqual(r.err, "queuectl: note: job j has not started yet (no worker); "
                                "its log is empty\n")

    def test_json_outputs_are_only_json(self):
        self.enqueue("--id", "j", "--max-retries", "0", "exit 1")
        self.drained(1)
        for args in (("status", "--json"), ("list", "--json"), ("show", "j", "--json"),
                     ("dlq", "list", "--json"), ("config", "list", "--json"),
                     ("worker", "status", "--json"), ("config", "get", "max_retries",
                                                      "--json")):
            with self.subTest(args=args):
                r = self.q(*args)
                self.assertEqual(r.code, 0, r)
                json.loads(r.out)

    def test_read_commands_on_a_fresh_home(self):
        out = self.ok("status")
        self.assertIn("jobs: 0 pending, 0 processing, 0 failed, 0 completed, 0 dead, "
                      "0 cancelled", out)
        self.assertEqual(self.ok("list", "--json"), "[]\n")
        self.assertIn("no jobs", self.ok("list"))
        self.enqueue("true")
        self.assertEqual(os.stat(self.home).st_mode & 0o777, 0o700)

class TestWait(QueueTest):
    def test_wait_returns_zero_when_all_completed(self):
        self.enqueue("--id", "a", "true")
        self.enqueue("--id", "b", "true")
        self.drained(0)
        r = self.q("wait", "a", "b", "--timeout", "5")
        self.assertEqual((r.code, r.err), (0, ""), r)

    def test_wait_blocks_until_the_job_ends(self):
        self.start_worker()
        self.enqueue("--id", "j", "sleep 0.5; echo done > done.txt")
        r = self.q("wait", "j", "--timeout", "15")
        self.assertEqual(r.code, 0, r)
        self.assertTrue(os.path.exists(self.path("done.txt")))
        self.assertEqual(self.state("j"), "completed")

    def test_wait_returns_one_when_a_job_is_dead(self):
        self.enqueue("--id", "good", "true")
        self.enqueue("--id", "bad", "--max-retries", "0", "exit 1")
        self.drained(1)
        r = self.fails(1, "wait", "good", "bad", "--timeout", "5")
        self.assertIn("bad", self.error_line(r))
        self.assertNotIn("good", self.error_line(r))

    def test_wait_times_out_on_a_pending_job(self):
        self.enqueue("--id", "j", "true")
        started = time.monotonic()
        r = self.fails(124, "wait", "j", "--timeout", "0.3")
        self.assertLess(time.monotonic() - started, 10)
        self.assertIn("j", self.error_line(r))
        self.assertEqual(self.state("j"), "pending")

    def test_wait_bad_ids(self):
        self.enqueue("--id", "j", "true")
        self.fails(2, "wait", "../x", "--timeout", "1")
        r = self.fails(2, "wait", "nope", "--timeout", "1")
        self.assertIn("nope", self.error_line(r))

class TestScriptsCanRelyOnWait(QueueTest):
    """wait and logs --follow return as soon as the answer is known, with an
    exit status a script can act on: 0, 1, 2, 3 (stuck) or 124 (timeout)."""

    def test_wait_returns_at_once_on_a_job_whose_dependency_is_dead(self):
        self.enqueue("--id", "a", "--max-retries", "0", "exit 1")
        self.enqueue("--id", "b", "--after", "a", "true")
        self.enqueue("--id", "c", "--after", "b", "true")      # stuck through b
        self.drained(1)
        for args in (("c",), ("b", "c"), ()):
            with self.subTest(args=args):
                started = time.monotonic()
                # Without ids, the dead job a counts too: exit 1.
                r = self.fails(3 if args else 1, "wait", *args, "--timeout", "30")
                self.assertLess(time.monotonic() - started, 10)
                self.assertIn("c waits on a, which is dead", r.err)
        self.ok("cancel", "b")
        r = self.fails(3, "wait", "c", "--timeout", "30")
        self.assertIn("c waits on", r.err)
        self.fails(1, "wait", "b", "--timeout", "30")

    def test_wait_with_no_id_or_a_queue_waits_for_what_was_enqueued(self):
        self.enqueue("--id", "a", "--queue", "q1", "true")
        self.enqueue("--id", "b", "--queue", "q2", "true")
        self.drained(0, "--queue", "q1")
        self.ok("wait", "--queue", "q1", "--timeout", "10")
        r = self.fails(124, "wait", "--timeout", "0.3")
        self.assertIn("b (pending)", r.err)
        r = self.fails(124, "wait", "--queue", "q1,q2", "--timeout", "0.3")
        self.fails(2, "wait", "a", "--queue", "q1")
        self.drained(0)
        self.ok("wait", "--timeout", "10")
        # A job that fails while wait waits: wait stops itself once it has
        # taken stock (a fault point), so the job surely ends after that.
        self.enqueue("--id", "late", "--max-retries", "0", "exit 1")
        w = subprocess.Popen([*QUEUECTL, "wait", "--timeout", "30"], stderr=subprocess.PIPE,
                             env=self.fault_env("wait-began:stop"), text=True)
        self.procs.append(w)
        self.wait_stopped(w)
        self.drained(1)
        os.kill(w.pid, signal.SIGCONT)
        self.assertEqual(w.wait(timeout=30), 1)
        self.assertIn("late dead", w.stderr.read())
        # The answer does not depend on when wait starts: the dead job still
        # counts later, until it is retried, removed or pruned.
        r = self.fails(1, "wait", "--timeout", "10")
        self.assertIn("late dead", r.err)
        self.ok("wait", "--queue", "q1,q2", "--timeout", "10")
        self.ok("remove", "late")
        self.ok("wait", "--timeout", "10")

    def test_exit_statuses(self):
        self.set_fast_retries()
        self.enqueue("--id", "ok", "true")
        self.enqueue("--id", "bad", "--max-retries", "0", "exit 1")
        self.enqueue("--id", "later", "--delay", "1h", "true")
        self.drain()
        self.ok("wait", "ok")
        self.fails(1, "wait", "ok", "bad")
        self.fails(2, "wait", "ok", "nope")
        self.fails(124, "wait", "later", "--timeout", "0.2")

    def test_logs_follow_ends_with_the_jobs_outcome(self):
        self.enqueue("--id", "ok", "echo fine")
        self.enqueue("--id", "bad", "--max-retries", "0", "echo oops; exit 3")
        self.enqueue("--id", "gone", "--delay", "1h", "true")
        self.enqueue("--id", "dep", "--after", "bad", "true")
        self.drain()
        r = self.q("logs", "ok", "--follow", timeout=30)
        self.assertEqual(r.code, 0, r)
        self.assertIn("fine", r.out)
        r = self.fails(1, "logs", "bad", "--follow", timeout=30)
        self.assertIn("oops", r.out)
        self.assertIn("job bad is dead", r.err)
        self.ok("cancel", "gone")
        self.fails(1, "logs", "gone", "-f", timeout=30)
        r = self.fails(3, "logs", "dep", "-f", timeout=30)
        self.assertIn("dep waits on bad, which is dead", r.err)

    def test_after_a_dead_or_cancelled_job_is_accepted_with_a_warning(self):
        self.enqueue("--id", "bad", "--max-retries", "0", "exit 1")
        self.enqueue("--id", "off", "true")
        self.ok("cancel", "off")
        self.drain()
        for dep, state in (("bad", "dead"), ("off", "cancelled")):
            with self.subTest(dep=dep):
                r = self.q("enqueue", "--after", dep, "true")
                self.assertEqual(r.code, 0, r)
                self.assertRegex(r.out, r"^[0-9a-z]{6}\n$")
                self.assertIn(f"waits on {dep}, which is {state}", r.err)
        r = self.q("enqueue", "--id", "both", "--after", "off", "--after", "bad", "true")
        self.assertEqual(len(r.err.splitlines()), 1, r)        # one line per job
        # Through a job that is itself stuck: the warning names the cause.
        r = self.q("enqueue", "--after", "both", "true")
        self.assertEqual(r.code, 0, r)
        self.assertRegex(r.err, r"waits on (bad, which is dead|off, which is cancelled)")
        r = self.q("enqueue", "--id", "fine", "true")
        self.assertEqual(r.err, "")

class TestActingOnManyJobs(QueueTest):
    """cancel, retry and dlq retry by selector; remove; retry of a failed
    job; edit; prune that keeps the DLQ; cancel that lets a job clean up."""

    def states(self):
        return {j["id"]: j["state"] for j in json.loads(self.ok("list", "--json"))}

    def test_cancel_by_queue_state_or_all_prints_a_count(self):
        for i, q in (("a", "q1"), ("b", "q1"), ("c", "q2"), ("d", "q3")):
            self.enqueue("--id", i, "--queue", q, "true")
        before = self.db_dump()
        self.fails(2, "cancel", "a", "--all")
        self.fails(2, "cancel")
        self.fails(2, "cancel", "--state", "dead")
        self.assertEqual(self.db_dump(), before)
        self.assertEqual(self.ok("cancel", "--queue", "q1"), "cancelled 2 jobs\n")
        self.assertEqual(self.ok("cancel", "--state", "pending", "--queue", "q2"),
                         "cancelled 1 job\n")
        self.assertEqual(self.ok("cancel", "--all"), "cancelled 1 job\n")
        self.assertEqual(set(self.states().values()), {"cancelled"})
        self.assertEqual(self.ok("retry", "--queue", "q1"), "retried 2 jobs\n")
        self.assertEqual(self.states(), {"a": "pending", "b": "pending", "c": "cancelled",
                                         "d": "cancelled"})
        self.assertEqual(self.ok("retry", "--all"), "retried 2 jobs\n")
        self.assertEqual(self.ok("retry", "--all"), "retried 0 jobs\n")

    def test_dlq_retry_and_purge_by_queue(self):
        for i, q in (("a", "q1"), ("b", "q2")):
            self.enqueue("--id", i, "--queue", q, "--max-retries", "0", "exit 1")
        self.drain()
        self.assertEqual(self.ok("dlq", "retry", "--queue", "q1"), "retried 1 job\n")
        self.assertEqual(self.states(), {"a": "pending", "b": "dead"})
        self.assertEqual(self.ok("dlq", "purge", "--queue", "q2"), "purged 1 job\n")
        self.assertEqual(self.states(), {"a": "pending"})

    def test_retry_of_a_failed_job_runs_it_now_keeping_its_attempts(self):
        self.ok("config", "set", "max_backoff", "1h")
        self.ok("config", "set", "backoff_base", "1000")
        self.enqueue("--id", "f", "--max-retries", "3", "echo x >> runs.txt; exit 1")
        self.start_worker()
        self.wait_for(lambda: self.job("f")["attempts"] == 1, what="the first attempt")
        self.assertEqual(self.state("f"), "failed")       # for the next 1000 s
        self.assertEqual(self.ok("retry", "f"), "f\n")
        self.wait_for(lambda: self.job("f")["attempts"] == 2, what="the retry, now")
        self.assertEqual(self.lines("runs.txt"), ["x", "x"])
        self.assertEqual(self.state("f"), "failed")

    def test_remove_deletes_a_job_that_is_not_running_and_its_log(self):
        self.enqueue("--id", "done", "echo hi")
        self.drain()
        log = os.path.join(self.home, "logs", "done.log")
        self.assertTrue(os.path.exists(log))
        self.enqueue("--id", "p", "true")
        self.enqueue("--id", "after", "--after", "p", "true")
        before = self.db_dump()
        r = self.fails(1, "remove", "p")
        self.assertIn("after waits on it", r.err)
        self.fails(1, "remove", "nope", "done")
        self.assertEqual(self.db_dump(), before)
        self.assertEqual(self.ok("remove", "done", "p", "after").split(),
                         ["done", "p", "after"])
        self.assertFalse(os.path.exists(log))
        self.assertEqual(self.states(), {})
        self.enqueue("--id", "run", self.gate_cmd("go"))
        self.start_worker()
        self.wait_state("run", "processing")
        r = self.fails(1, "remove", "run")
        self.assertIn("cancel it first", r.err)
        self.touch("go")

    def test_edit_with_flags_goes_through_enqueues_checks(self):
        self.enqueue("--id", "e", "--queue", "q1", "echo old")
        self.assertEqual(self.ok("edit", "e", "--priority", "7", "--queue", "q2",
                                 "--env", "A=1", "--", "echo", "new"), "e\n")
        job = self.job("e")
        self.assertEqual((job["command"], job["priority"], job["queue"], job["env"]),
                         ("echo new", 7, "q2", ["A"]))
        before = self.db_dump()
        for args in (("--priority", "x"), ("--queue", "a b"), ("--run-at", "soonish"),
                     ("--cwd", "/nonexistent"), ("-c", " ")):
            with self.subTest(args=args):
                self.fails(2, "edit", "e", *args)
        self.assertEqual(self.db_dump(), before)
        self.fails(2, "edit", "e", "--queue", "")
        self.ok("edit", "e", "-p", "1", "--", "echo", "", "new")
        self.ok("edit", "e", "--run-at", "+1h", "--unset-env", "A")
        self.assertGreater(queuectl.epoch(self.job("e")["run_at"]), time.time() + 3000)
        self.assertEqual(self.job("e")["env"], [])
        self.drain()
        self.ok("edit", "e", "--delay", "0")
        self.drain()
        self.assertIn("new", self.log("e"))
        r = self.fails(1, "edit", "e", "--priority", "1")
        self.assertIn("it is completed", r.err)

    def test_edit_in_the_editor(self):
        self.enqueue("--id", "e", "echo old")
        env = dict(self.env, EDITOR="sed -i 's/echo old/echo edited/'", VISUAL="")
        r = self.q_tty("edit", "e", env=env)
        self.assertEqual((r.code, r.out), (0, "e\n"), r)
        self.assertEqual(self.job("e")["command"], "echo edited")
        before = self.db_dump()
        for editor, code, why in (
                ("sed -i 's/\"command\"/\"cmd\"/'", 2, "unknown job field"),
                ("sed -i 's/{/[/'", 2, "not valid JSON"),
                ("sed -i 's/\"priority\"/\"depends_on\": [], \"priority\"/'", 2,
                 "depends_on cannot be edited"),
                ("false", 1, "exited 1"), ("true", 1, "no change")):
            with self.subTest(editor=editor):
                r = self.q_tty("edit", "e", env=dict(self.env, EDITOR=editor, VISUAL=""))
                self.assertEqual(r.code, code, r)
                self.assertIn(why, r.err)
        # Not at a terminal (cron, a script): no editor to wait for.
        r = self.fails(2, "edit", "e", env=dict(self.env, EDITOR="sed -i s/old/new/"))
        self.assertIn("or a terminal", r.err)
        self.assertEqual(self.db_dump(), before)
        self.assertEqual(os.listdir(os.path.join(self.home, "run")), [])

    def test_remove_and_prune_wait_for_a_cancelled_attempt_to_end(self):
        # The job ignores the cancel's TERM until the test lets it go: its id
        # must not be freed (and reused) while that attempt still runs.
        self.enqueue("--id", "r", "trap 'while [ ! -f go ]; do sleep 0.05; done; "
                     "echo ended > ended.txt; exit 0' TERM; echo $$ > pid.txt; "
                     "while :; do sleep 0.05; done")
        self.start_worker()
        self.read_pid("pid.txt")
        self.wait_running("r")
        c = subprocess.Popen([*QUEUECTL, "cancel", "r", "--grace", "60"], env=self.env,
                             cwd=self.work, stdout=subprocess.DEVNULL)
        self.procs.append(c)
        self.wait_state("r", "cancelled")
        self.assertEqual(self.ok("prune", "--older-than", "0"), "pruned 0 jobs\n")
        rm = subprocess.Popen([*QUEUECTL, "remove", "r"], env=self.env, cwd=self.work,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(rm)
        self.assertIsNone(rm.poll())
        self.touch("go")
        out, err = rm.communicate(timeout=30)
        self.assertEqual((rm.returncode, out), (0, "r\n"), err)
        self.assertEqual(self.lines("ended.txt"), ["ended"])   # it had ended first
        self.assertEqual(c.wait(timeout=30), 0)

    def test_edit_keeps_a_cwd_that_has_gone(self):
        gone = self.path("gone")
        os.mkdir(gone)
        self.enqueue("--id", "e", "--cwd", gone, "true")
        os.rmdir(gone)
        self.ok("edit", "e", "-p", "5")
        self.assertEqual((self.job("e")["priority"], self.job("e")["cwd"]), (5, gone))
        self.fails(2, "edit", "e", "--cwd", gone)

    def test_prune_keeps_dead_jobs_unless_asked_and_dry_run_deletes_nothing(self):
        self.enqueue("--id", "ok", "true")
        self.enqueue("--id", "bad", "--max-retries", "0", "exit 1")
        self.drain()
        before = self.db_dump()
        r = self.q("prune", "--older-than", "0", "--dry-run")
        self.assertEqual((r.code, r.out, r.err), (0, "ok\n", "would prune 1 job\n"))
        r = self.q("prune", "--older-than", "0", "--state", "dead", "--dry-run")
        self.assertEqual(r.out, "bad\n")
        self.assertEqual(self.db_dump(), before)
        self.assertEqual(self.ok("prune", "--older-than", "0"), "pruned 1 job\n")
        self.assertEqual(self.states(), {"bad": "dead"})

    def test_prune_older_than_0_on_a_busy_home_asks_on_a_terminal(self):
        self.enqueue("--id", "ok", "true")
        self.drain()
        self.enqueue("--id", "waiting", "--delay", "1h", "true")
        r = self.q_tty("prune", "--older-than", "0", answer="n\n")
        self.assertEqual(r.code, 1, r)
        self.assertIn("Delete them? [y/N]", r.err)
        self.assertEqual(self.state("ok"), "completed")
        r = self.q_tty("prune", "--older-than", "0", answer="y\n")
        self.assertEqual((r.code, r.out), (0, "pruned 1 job\n"), r)
        self.enqueue("--id", "ok2", "true")
        self.ok("cancel", "ok2")
        r = self.q_tty("prune", "--older-than", "0", "--yes", answer="")
        self.assertEqual((r.code, r.out), (0, "pruned 1 job\n"), r)
        self.assertNotIn("[y/N]", r.err)

    def test_cancel_gives_kill_grace_to_a_job_that_cleans_up(self):
        # The job traps TERM and takes 1.5 s to clean up: more than the old
        # fixed 1 s, less than kill_grace.
        self.ok("config", "set", "kill_grace", "20")
        self.enqueue("--id", "c", "trap 'sleep 1.5; echo cleaned > clean.txt; exit 0' TERM; "
                     "echo $$ > pid.txt; while :; do sleep 0.05; done")
        self.enqueue("--id", "i", "trap 'echo int > int.txt; exit 0' INT; "
                     "while :; do sleep 0.05; done")
        w = self.start_worker("--count", "2")
        self.read_pid("pid.txt")
        self.wait_running("c")
        self.wait_running("i")
        self.assertEqual(self.ok("cancel", "c"), "c\n")
        self.assertEqual(self.lines("clean.txt"), ["cleaned"])
        self.ok("cancel", "--signal", "INT", "i")
        self.assertEqual(self.lines("int.txt"), ["int"])
        self.wait_for(lambda: "attempt 1 ended" in self.log("c"), what="c's footer")
        self.assertIn("ended: cancelled; exit 0", self.log("c"))
        self.assertNotIn("result not recorded", self.log("c"))
        self.fails(2, "cancel", "--signal", "NOPE", "c")
        del w

    def test_cancel_grace_then_kill(self):
        self.enqueue("--id", "stubborn",
                     "trap '' TERM; touch trapped; while :; do sleep 0.05; done")
        self.start_worker()
        self.wait_for(lambda: os.path.exists(self.path("trapped")), what="the trap to be set")
        started = time.monotonic()
        self.ok("cancel", "stubborn", "--grace", "0.3")
        self.assertLess(time.monotonic() - started, 8)
        self.wait_for(lambda: "cancelled; killed by SIGKILL" in self.log("stubborn"),
                      what="the footer of a killed job")

class TestPrune(QueueTest):
    def test_prune_removes_old_finished_jobs_and_logs_keeps_pending(self):
        self.enqueue("--id", "done", "echo hi")
        self.enqueue("--id", "bad", "--max-retries", "0", "exit 1")
        self.enqueue("--id", "keep", "--delay", "1h", "true")
        self.enqueue("--id", "blocked", "--after", "bad", "true")
        self.drained(1)
        logs = os.path.join(self.home, "logs")
        self.assertTrue(os.path.exists(os.path.join(logs, "done.log")))
        self.assertEqual(self.ok("prune", "--older-than", "1h"), "pruned 0 jobs\n")
        self.assertEqual(self.state("done"), "completed")
        time.sleep(0.05)
        self.assertEqual(self.ok("prune", "--older-than", "0"), "pruned 1 job\n")
        self.assertEqual(self.state("bad"), "dead")      # the DLQ is for a person
        self.assertEqual(self.ok("prune", "--older-than", "0", "--state", "dead"),
                         "pruned 1 job\n")
        self.fails(1, "show", "done")
        self.fails(1, "show", "bad")
        self.assertFalse(os.path.exists(os.path.join(logs, "done.log")))
        self.assertFalse(os.path.exists(os.path.join(logs, "bad.log")))
        self.assertEqual(self.state("keep"), "pending")
        self.assertEqual(self.state("blocked"), "pending")
        self.integrity_ok()

    def test_prune_by_state(self):
        self.enqueue("--id", "done", "true")
        self.enqueue("--id", "bad", "--max-retries", "0", "exit 1")
        self.drained(1)
        time.sleep(0.05)
        self.assertEqual(self.ok("prune", "--older-than", "0s", "--state", "dead"),
                         "pruned 1 job\n")
        self.fails(1, "show", "bad")
        self.assertEqual(self.state("done"), "completed")

class TestDoctor(QueueTest):
    def test_healthy_queue(self):
        self.enqueue("true")
        self.drain()
        out = self.ok("doctor")
        self.assertIn("ok", out.splitlines()[-1])

    def test_reports_orphans_and_dead_dependencies(self):
        self.enqueue("--id", "dep", "--max-retries", "0", "false")
        self.enqueue("--id", "child", "--after", "dep", "true")
        self.drain()
        r = self.q("doctor")
        self.assertEqual(r.code, 1, r)
        self.assertIn("job child waits on dep, which is dead", r.out)
        self.enqueue("--id", "orphan", "sleep 30")
        w = self.start_worker()
        self.wait_running("orphan")
        os.kill(w.pid, signal.SIGKILL)
        w.wait(timeout=10)
        info = json.loads(self.q("doctor", "--json").out)
        self.assertFalse(info["ok"])
        self.assertTrue(any("orphan" in p and "gone" in p for p in info["problems"]))

class TestHumanOutput(QueueTest):
    def fixed_jobs(self):
        self.enqueue("--id", "build-1", "make -C /srv/app all && echo " + "x" * 120)
        self.enqueue("--id", "later", "--delay", "2h", "--queue", "reports", "./report.sh")
        self.enqueue("--id", "after", "--after", "build-1", "true")

    def test_list_table_fits_80_columns_and_cuts_commands(self):
        self.fixed_jobs()
        out = self.ok("list")
        lines = out.splitlines()
        # PRI and TRIES say the same on every row: they go first, so the
        # command keeps more of itself.
        self.assertEqual(lines[0].split(), ["ID", "#", "STATE", "QUEUE", "WHEN", "OUTCOME",
                                            "COMMAND"])
        self.assertTrue(all(len(line) <= 80 for line in lines), out)
        self.assertTrue(lines[1].endswith("…"), lines[1])
        self.assertEqual(lines[1].split()[:6], ["build-1", "1", "pending", "default", "no",
                                                "worker"])
        self.assertIn("PRI", self.ok("list", env=dict(self.env, COLUMNS="1000")))
        self.assertIn("(in 2h)", lines[2])
        self.assertIn("blocked on build-1", lines[3])
        self.assertNotIn("\x1b[", out)                   # not a terminal: no colour

    def test_not_a_tty_without_columns_keeps_whole_commands(self):
        self.fixed_jobs()
        env = dict(self.env)
        env.pop("COLUMNS")
        out = self.ok("list", env=env)
        self.assertIn("x" * 120, out)

    def test_status_counts_in_stable_order(self):
        self.fixed_jobs()
        out = self.ok("status")
        self.assertEqual(out.splitlines()[0], "jobs: 3 pending, 0 processing, 0 failed, "
                                              "0 completed, 0 dead, 0 cancelled")
        self.assertIn("reports", out)                     # per-queue breakdown
        self.assertIn("next scheduled: later in 2h", out)

    def test_colour_only_on_a_terminal_and_never_with_no_color(self):
        import pty
        self.fixed_jobs()

        def run_in_pty(extra_env):
            env = dict(self.env, **extra_env)
            pid, fd = pty.fork()
            if pid == 0:
                os.execve(PY, [*QUEUECTL, "status"], env)
            out = b""
            while True:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                out += chunk
            os.waitpid(pid, 0)
            os.close(fd)
            return out.decode()

        self.assertIn("\x1b[", run_in_pty({}))
        self.assertNotIn("\x1b[", run_in_pty({"NO_COLOR": "1"}))
        self.assertIn("\x1b[", run_in_pty({"NO_COLOR": ""}))    # empty: not set

class TestListsShowTheNewestAndTheirOutcome(QueueTest):
    """list and dlq list, as tsp -l and pueue status: the newest jobs next to
    the prompt, what came of each, and complete machine output."""

    def test_the_newest_at_the_bottom_a_footer_and_complete_json(self):
        self.ok("enqueue", "--stdin", input="".join(f"echo {i}\n" for i in range(305)))
        newest = self.enqueue("--id", "newest", "true")
        lines = self.ok("list").splitlines()
        self.assertEqual(len(lines), 1 + 100 + 1, lines[:3])
        self.assertEqual(lines[-2].split()[0], newest)              # next to the prompt
        self.assertEqual(lines[-1], "… 206 older jobs not shown (--all for every one, "
                                    "--limit N for the newest N)")
        self.assertEqual(len(self.ok("list", "--all").splitlines()), 1 + 306)
        self.assertEqual(len(self.ok("list", "--limit", "0").splitlines()), 1 + 306)
        rows = json.loads(self.ok("list", "--json"))
        self.assertEqual(len(rows), 306)                            # never cut silently
        self.assertEqual(rows[-1]["id"], "newest")
        rows = json.loads(self.ok("list", "--json", "--limit", "5"))
        self.assertEqual([r["id"] for r in rows][-1], "newest")
        self.assertEqual(len(rows), 5)

    def test_each_job_shows_what_came_of_it(self):
        self.ok("config", "set", "max_backoff", "0.01")
        self.enqueue("--id", "ok", "true")
        self.enqueue("--id", "bad", "--max-retries", "1", "exit 3")
        self.enqueue("--id", "sig", "--max-retries", "0", "kill -TERM $$")
        self.enqueue("--id", "off", "true")
        self.ok("cancel", "off")
        self.assertIn("ok completed (attempt 1, ran ", self.drain().out)
        self.enqueue("--id", "run", self.gate_cmd())
        self.start_worker()
        pid = self.wait_running("run")
        env = {k: v for k, v in self.env.items() if k != "COLUMNS"}   # piped: not cut
        rows = {line.split()[0]: line for line in self.ok("list", env=env).splitlines()[1:]}
        self.assertRegex(rows["ok"], r"completed +default +0 +1 +(\S+ ago|now) +exit 0, "
                         r"ran [0-9.]+m?s")
        self.assertRegex(rows["bad"], r"dead .* 2 .* exit code 3, ran [0-9.]+m?s")
        self.assertIn("killed by SIGTERM", rows["sig"])
        self.assertRegex(rows["off"], r"cancelled .* cancelled")
        # A running job: its attempt number (not the attempts that ended) and pid.
        self.assertRegex(rows["run"], rf"processing +default +0 +1 +running \S+ +pid {pid} ")
        self.touch("go")
        out = self.ok("dlq", "list", env=env).splitlines()
        self.assertEqual(out[0].split(), ["ID", "QUEUE", "TRIES", "DIED", "LAST", "ERROR",
                                          "COMMAND"])
        dlq = {line.split()[0]: line for line in out[1:]}
        self.assertRegex(dlq["bad"], r"^bad +default +2/2 +(\S+ ago|now) +exit code 3 +exit 3$")
        self.assertRegex(dlq["sig"], r"^sig +default +1/1 +(\S+ ago|now) +killed by SIGTERM ")

    def test_a_narrow_terminal_cuts_the_command_never_the_id_or_state(self):
        self.enqueue("--id", "a-long-job-id-that-stays", "--max-retries", "0",
                     "echo " + "x" * 100 + "; exit 7")
        self.drain()
        for cols in ("60", "80", "100"):
            with self.subTest(cols=cols):
                out = self.ok("list", env=dict(self.env, COLUMNS=cols))
                lines = out.splitlines()
                self.assertTrue(all(len(line) <= int(cols) for line in lines), out)
                self.assertEqual(lines[1].split()[:3], ["a-long-job-id-that-stays", "1", "dead"])
                self.assertIn("…", lines[1])

    def test_logs_without_an_id_and_of_a_job_that_has_not_started(self):
        r = self.fails(1, "logs")
        self.assertIn("no job has started yet", r.err)
        self.enqueue("--id", "a", "echo from a")
        self.enqueue("--id", "b", "echo from b")
        self.enqueue("--id", "later", "--delay", "1h", "true")
        r = self.q("logs", "b")
        self.assertEqual((r.code, r.out), (0, ""), r)
        self.assertIn("job b has not started yet (no worker); its log is empty", r.err)
        self.assertIn("has not started yet (due ", self.q("logs", "later").err)
        self.drain()
        out = self.ok("logs")                     # like tsp -c: the latest job's
        self.assertIn("from b", out)
        self.assertNotIn("from a", out)

    def test_status_wording(self):
        self.start_worker()
        self.assertIn("workers: 1 job thread in 1 live worker process", self.ok("status"))

class TestMachineOutput(QueueTest):
    def test_json_shapes(self):
        job = self.enqueue("--id", "a", "echo hi")
        self.drain()
        status = json.loads(self.ok("status", "--json"))
        self.assertEqual(set(status), {"counts", "queues", "workers", "oldest_pending",
                                       "next_scheduled", "paused", "schedules"})
        self.assertEqual(list(status["counts"]), list(queuectl.STATES))
        listed = json.loads(self.ok("list", "--json"))
        self.assertEqual([j["id"] for j in listed], [job])
        self.assertEqual(set(listed[0]), set(queuectl.JOB_FIELDS) | {"log", "env_from", "number",
                                                                     "umask", "from"})
        self.assertEqual(json.loads(self.ok("dlq", "list", "--json")), [])
        self.assertEqual(json.loads(self.ok("worker", "status", "--json")), [])
        cfg = json.loads(self.ok("config", "list", "--json"))
        self.assertEqual(cfg, queuectl.CONFIG_DEFAULTS)

    def test_enqueue_prints_only_the_id(self):
        out = self.ok("enqueue", "true")
        self.assertRegex(out, r"^[0-9a-z]{6}\n$")

    def test_the_script_form_runs_too(self):
        def script(*args):
            return subprocess.run([PY, PROG, *args], capture_output=True, text=True,
                                  env=self.env, cwd=self.work, timeout=60)
        job_id = script("enqueue", "echo", "hi").stdout.strip()
        r = script("worker", "start", "--drain")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn(f"{job_id} completed (attempt 1", r.stdout)
        self.assertEqual(script("logs", job_id).stdout.splitlines()[1], "hi")

class TestServe(QueueTest):
    """Issue 29: serve's pages, /metrics and /api, through a real server on
    an ephemeral loopback port, read with http.client as a client would."""

    def serve(self, *args, code=None):
        """A serve process; (the process, its base URL). With code: it
        must exit with that code at once; (the process, its stderr)."""
        p = subprocess.Popen([*QUEUECTL, "serve", *args], env=self.env, cwd=self.work,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        if code is not None:
            _, err = p.communicate(timeout=30)
            self.assertEqual(p.returncode, code, err)
            self.assertNotIn("Traceback", err)
            self.assertTrue(err.strip().startswith("queuectl: error: "), err)
            return p, err
        line = []
        t = threading.Thread(target=lambda: line.append(p.stdout.readline()), daemon=True)
        t.start()
        t.join(30)
        self.assertTrue(line and "serving" in line[0], f"serve did not start: {line}")
        p.said = line[0]
        return p, re.search(r"http://\S+/", line[0]).group()

    def get(self, url, path, method="GET", headers=None):
        """(status, headers, body) of one request."""
        import http.client
        import urllib.parse
        u = urllib.parse.urlsplit(url)
        c = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        try:
            c.request(method, path, headers=headers or {})
            r = c.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, \
                r.read().decode("utf-8")
        finally:
            c.close()

    def stop(self, p, sig=signal.SIGTERM):
        p.send_signal(sig)
        out, err = p.communicate(timeout=30)
        self.assertEqual(p.returncode, 0, err)
        self.assertIn("serve stopped", out)

    def hostile_queue(self):
        """A completed job, a dead one whose command, label and log hold
        markup, a pending one, a schedule."""
        self.ok("config", "set", "max_retries", "0")
        self.enqueue("--id", "fine", "echo hello")
        self.enqueue("--id", "evil", "--label", "<script>label()</script>",
                     "echo '<script>alert(1)</script>'; exit 3")
        self.drained(1)                             # a job died
        self.enqueue("--id", "later", "--delay", "1h", "echo later")
        self.ok("schedule", "add", "nightly", "0 3 * * *", "--", "echo nightly")

    def test_the_sparkline_sums_an_hours_quarters(self):
        # The history is kept by the quarter hour; the overview's line has
        # a point per hour, the sum of its four.
        hour = int(time.time() // 3600 * 3600)
        store = queuectl.Store(self.home)
        self.addCleanup(store.close)
        with store.tx():
            for minute, failed in ((1, False), (20, True), (50, False), (-70, False)):
                store.add_history("default", hour - 3600 + minute * 60, failed, 0.01,
                                  UNMEASURED)
        page = queuectl.serve_overview(store, self.home, hour + 60, "n")
        self.assertIn("4 ended, 1 failed", page)
        points = re.search(r'class="ok" points="([^"]+)"', page)[1].split()
        self.assertEqual([float(p.split(",")[1]) for p in points[-4:]],   # of 3 at most:
                         [13.3, 19.0, 2.0, 19.0])      # 1, none, 3, none this hour

    def test_every_page_shows_what_the_cli_shows(self):
        self.hostile_queue()
        p, url = self.serve("--bind", "127.0.0.1:0")
        code, head, page = self.get(url, "/")
        self.assertEqual(code, 200)
        self.assertTrue(head["content-type"].startswith("text/html"))
        for text in ('<a href="/job/fine">fine</a>', '<a href="/job/evil">evil</a>',
                     "Dead letter queue (1)", "nightly", "0 3 * * *",
                     '<span class="st-dead">dead</span>', "exit 0", "Newest jobs (3)"):
            self.assertIn(text, page)
        self.assertNotIn("<script>alert", page)
        self.assertNotIn("<script>label", page)
        self.assertIn("&lt;script&gt;label()&lt;/script&gt;", page)
        # the one script is the page's own, allowed by the nonce the CSP names
        nonce = re.search(r"script-src 'nonce-([\w-]+)'", head["content-security-policy"])
        self.assertEqual(re.findall(r"<script[^>]*>", page), [f'<script nonce="{nonce[1]}">'])
        code, _, page = self.get(url, "/job/evil")
        self.assertEqual(code, 200)
        self.assertIn("exit code 3: &lt;script&gt;alert(1)&lt;/script&gt;", page)
        self.assertIn('<pre id="log">', page)
        self.assertNotIn("<script>alert", page)
        self.assertNotIn("<script", page)           # finished: nothing to refresh
        show = self.ok("show", "evil")
        for line in show.splitlines()[:5]:          # show's fields, as show says them
            field, value = line.split(None, 1)
            self.assertIn(f"<td>{field}</td>", page)
        self.assertIn(">1</td><td><span class=\"st-dead\">dead</span></td><td>exit 3</td>",
                      page)
        _, _, later = self.get(url, "/job/later")
        self.assertIn("Why it is not running", later)
        self.assertIn(self.ok("why", "later").split(": ", 1)[1].split(" (")[0], later)
        # the API is the CLI's JSON
        for path, args in (("/api/jobs", ("list", "--json")),
                           ("/api/jobs?state=dead", ("list", "--json", "--state", "dead")),
                           ("/api/jobs/evil", ("show", "evil", "--json"))):
            code, head, body = self.get(url, path)
            self.assertEqual((code, head["content-type"]), (200, "application/json"))
            self.assertEqual(json.loads(body), json.loads(self.ok(*args)), path)
        code, _, body = self.get(url, "/api/status")
        self.assertEqual(json.loads(body)["counts"],
                         json.loads(self.ok("status", "--json"))["counts"])
        code, head, body = self.get(url, "/metrics")
        self.assertEqual(code, 200)
        self.assertTrue(head["content-type"].startswith("text/plain; version=0.0.4"))
        self.assertEqual(set(parse_exposition(body)),
                         set(parse_exposition(self.ok("metrics"))))
        self.stop(p)

    def test_what_is_refused(self):
        self.hostile_queue()
        p, url = self.serve("--bind", "127.0.0.1:0")
        self.assertEqual(self.get(url, "/job/nosuchjob")[0], 404)
        self.assertEqual(self.get(url, "/api/jobs/nosuchjob")[0], 404)
        self.assertEqual(self.get(url, "/job/%3Cscript%3E")[0], 400)
        self.assertEqual(self.get(url, "/nothing")[0], 404)
        self.assertEqual(self.get(url, "/api/jobs?state=nonsense")[0], 400)
        self.assertEqual(self.get(url, "/api/jobs?limit=-1")[0], 400)
        for method in ("POST", "PUT", "DELETE"):
            code, head, _ = self.get(url, "/job/fine", method)
            self.assertEqual((code, head.get("allow")), (405, "GET, HEAD"), method)
        self.assertEqual(self.state("fine"), "completed")
        code, head, body = self.get(url, "/", "HEAD")
        self.assertEqual((code, body), (200, ""))
        self.assertEqual(self.get(url, "/" + "x" * 70000)[0], 414)
        self.stop(p, signal.SIGINT)

    def test_a_token_guards_every_page_when_set(self):
        self.hostile_queue()
        token_file = os.path.join(self.tmp, "token")
        with open(token_file, "w") as f:
            f.write("s3cret-s3cret-s3cret\n")
        os.chmod(token_file, 0o644)
        _, err = self.serve("--token-file", token_file, "--bind", "127.0.0.1:0", code=2)
        self.assertIn("chmod 600", err)
        _, err = self.serve("--bind", "0.0.0.0:0", code=2)     # not loopback, no token
        self.assertIn("ssh -L 8765:127.0.0.1:8765", err)
        self.serve("--bind", "nonsense", code=2)
        os.chmod(token_file, 0o600)
        p, url = self.serve("--bind", "0.0.0.0:0", "--token-file", token_file)
        self.assertIn("(a token is required)", p.said)
        url = url.replace("0.0.0.0", "127.0.0.1")
        for path in ("/", "/job/fine", "/metrics", "/api/status", "/api/jobs/fine"):
            self.assertEqual(self.get(url, path)[0], 401, path)
            self.assertEqual(self.get(url, path, headers={
                "Authorization": "Bearer s3cret-s3cret-wrong"})[0], 401, path)
            self.assertEqual(self.get(url, path, headers={
                "Authorization": "Bearer s3cret-s3cret-s3cret"})[0], 200, path)
        code, head, _ = self.get(url, "/job/fine?token=s3cret-s3cret-s3cret")
        self.assertEqual((code, head["location"]), (303, "/job/fine"))
        cookie = head["set-cookie"].split(";")[0]
        self.assertIn("HttpOnly", head["set-cookie"])
        self.assertIn("SameSite=Lax", head["set-cookie"])   # a link from a chat works
        self.assertEqual(self.get(url, "/job/fine", headers={"Cookie": cookie})[0], 200)
        self.assertEqual(self.get(url, "/?token=wrong")[0], 401)
        self.assertEqual(self.get(url, "/", headers={"Cookie": "queuectl_token=x"})[0], 401)
        self.assertEqual(self.get(url, "/?token=s3cret-s3cret-s3creT")[0], 401)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=30)
        self.assertIn("GET / 401", err)
        self.assertNotIn("s3creT", err)                     # a near miss is never logged

    def test_logs_are_tailed_in_bytes_and_never_through_a_symlink(self):
        self.enqueue("--id", "big", "yes 0123456789abcdef | head -c 300000; echo; echo LAST")
        self.enqueue("--id", "linked", "echo mine")
        self.drained(0)
        p, url = self.serve("--bind", "127.0.0.1:0")
        _, _, page = self.get(url, "/job/big")
        log = page.split('<pre id="log">', 1)[1].split("</pre>", 1)[0]
        self.assertLessEqual(len(log.encode()), queuectl.SERVE_LOG_TAIL)
        self.assertIn("LAST", log)
        self.assertIn("the last", page)
        secret = os.path.join(self.tmp, "secret")
        with open(secret, "w") as f:
            f.write("TOP-SECRET\n")
        path = os.path.join(self.home, "logs", "linked.log")
        os.unlink(path)
        os.symlink(secret, path)
        code, _, page = self.get(url, "/job/linked")
        self.assertEqual(code, 200)
        self.assertNotIn("TOP-SECRET", page)
        self.assertIn("not a regular file", page)
        self.stop(p)

    def test_a_stalled_client_never_holds_up_workers_or_other_clients(self):
        import socket
        p, url = self.serve("--bind", "127.0.0.1:0")
        port = int(url.rsplit(":", 1)[1].strip("/"))
        stalled = []
        for _ in range(3):                          # half a request, then nothing
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
            stalled.append(s)
        self.addCleanup(lambda: [s.close() for s in stalled])
        self.enqueue("--id", "meanwhile", "echo meanwhile")
        self.drained(0)                                 # its writes go through
        code, _, page = self.get(url, "/job/meanwhile")
        self.assertEqual(code, 200)
        self.assertIn("completed", page)
        self.stop(p)

    def test_a_running_jobs_page_follows_its_log(self):
        self.enqueue("--id", "slowly", "echo first; sleep 0.5; echo second; sleep 30")
        w = self.start_worker()
        p, url = self.serve("--bind", "127.0.0.1:0")
        self.wait_for(lambda: "second" in self.get(url, "/job/slowly")[2], what="log line")
        _, _, page = self.get(url, "/job/slowly")
        self.assertIn('<span class="st-processing">processing</span>', page)
        self.assertIn("every=2000", page)          # refreshed while it runs
        _, _, overview = self.get(url, "/")
        self.assertIn("Running (1)", overview)
        self.assertRegex(overview, rf"<td[^>]*>{self.job('slowly')['pid']}</td>")
        self.ok("cancel", "slowly")
        w.send_signal(signal.SIGTERM)
        w.wait(timeout=30)
        self.stop(p)

    def test_a_client_that_hangs_up_or_resets_never_ends_the_server(self):
        import socket
        import struct
        self.ok("enqueue", "--stdin", input="true\n" * 300)
        p, url = self.serve("--bind", "127.0.0.1:0")
        port = int(url.rsplit(":", 1)[1].strip("/"))
        for path, reset in (("/api/jobs?limit=300", False), ("/", True)) * 3:
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            s.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
            if reset:                                   # a reset, not a goodbye
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()                   # gone before the answer: it writes to no one
        time.sleep(0.3)
        self.assertIsNone(p.poll(), "serve ended when a client went away")
        self.assertEqual(self.get(url, "/")[0], 200)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=30)
        self.assertEqual(p.returncode, 0, err)
        self.assertNotIn("Traceback", err)

    def test_a_home_it_cannot_use_is_refused_at_start(self):
        import pwd
        self.enqueue("true")
        os.chown(self.home, pwd.getpwnam("nobody").pw_uid, -1)
        _, err = self.serve("--bind", "127.0.0.1:0", code=2)
        self.assertIn("belongs to nobody", err)
        os.chown(self.home, os.getuid(), -1)
        self.env["QUEUECTL_HOME"] = os.path.join(self.tmp, "afile")
        with open(self.env["QUEUECTL_HOME"], "w"):
            pass
        _, err = self.serve("--bind", "127.0.0.1:0", code=2)
        self.assertIn("is not a directory", err)

    def test_it_never_writes_not_even_a_migration(self):
        self.enqueue("--id", "j", "true")
        p, url = self.serve("--bind", "127.0.0.1:0")
        con = sqlite3.connect(os.path.join(self.home, "queue.db"))
        con.execute("PRAGMA user_version = 4")          # as if an older queuectl made it
        code, _, body = self.get(url, "/")
        self.assertEqual(code, 500)
        self.assertIn("run queuectl status once", body)
        self.assertEqual(con.execute("PRAGMA user_version").fetchone()[0], 4)
        con.execute(f"PRAGMA user_version = {queuectl.SCHEMA_VERSION}")
        con.close()
        self.stop(p)

    def test_a_locked_database_is_a_503_to_retry(self):
        self.enqueue("--id", "j", "true")
        self.env["QUEUECTL_BUSY_TIMEOUT"] = "0.5"
        p, url = self.serve("--bind", "127.0.0.1:0")
        con = sqlite3.connect(os.path.join(self.home, "queue.db"), isolation_level=None)
        con.execute("PRAGMA locking_mode = EXCLUSIVE")
        con.execute("BEGIN EXCLUSIVE")
        con.execute("UPDATE jobs SET priority = 1")
        con.execute("COMMIT")                           # the lock stays: exclusive mode
        code, head, body = self.get(url, "/metrics")
        self.assertEqual((code, head.get("retry-after")), (503, "5"), body)
        con.close()
        self.assertEqual(self.get(url, "/metrics")[0], 200)
        self.stop(p)

    def test_more_clients_than_threads_get_a_503_and_stop_still_stops(self):
        import socket
        p, url = self.serve("--bind", "127.0.0.1:0")
        port = int(url.rsplit(":", 1)[1].strip("/"))
        slow = []
        for _ in range(queuectl.SERVE_THREADS):       # each holds a thread
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            s.sendall(b"GET / HTTP/1.1\r\n")
            slow.append(s)
        self.addCleanup(lambda: [s.close() for s in slow])
        self.wait_for(lambda: self.get(url, "/")[0] == 503, what="a 503")
        started = time.monotonic()
        self.stop(p)
        self.assertLess(time.monotonic() - started, 10)

    def test_a_request_has_one_deadline_for_all_of_it(self):
        import socket
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        f = queuectl.Deadline(a.makefile("rb"), a, 0.3)
        b.sendall(b"GET / HTTP/1.1\r\n")
        self.assertEqual(f.readline(), b"GET / HTTP/1.1\r\n")
        b.sendall(b"X-a: 1\r\n")                        # one header, in time
        self.assertEqual(f.readline(), b"X-a: 1\r\n")
        time.sleep(0.35)
        b.sendall(b"X-b: 2\r\n")                        # the next, too late
        with self.assertRaises(TimeoutError):
            f.readline()

    def test_odd_requests_and_options_get_a_clear_answer(self):
        self.enqueue("--id", "j", "true")
        for bind in ("127.0.0.1:\u0663", "127.0.0.1:\u00b9", "127.0.0.1:99999"):
            self.serve("--bind", bind, code=2)
        fifo = os.path.join(self.tmp, "fifo")
        os.mkfifo(fifo, 0o600)
        for path, text in ((fifo, "regular file"), (self.tmp, "regular file")):
            self.assertIn(text, self.serve("--token-file", path, code=2)[1])
        bad = os.path.join(self.tmp, "bad-token")
        with open(bad, "w") as f:
            f.write("abcdefghijklmnop;q=1")
        os.chmod(bad, 0o600)
        self.assertIn("letters, digits", self.serve("--token-file", bad, code=2)[1])
        self.ok("enqueue", "--stdin", input="true\n" * 120)
        p, url = self.serve("--bind", "127.0.0.1:0")
        self.assertEqual(len(json.loads(self.get(url, "/api/jobs")[2])), 100)
        self.assertEqual(len(json.loads(self.get(url, "/api/jobs?limit=121")[2])), 121)
        for path in ("/job/%ff", "/api/jobs?state=", "/api/jobs?queue=", "/api/jobs?limit=0",
                     "/api/jobs?limit=99999999999999999999", "/api/jobs?label="):
            self.assertEqual(self.get(url, path)[0], 400, path)
        self.assertEqual(self.get(url, "/favicon.ico")[0], 204)
        self.assertEqual(self.get(url, "/", "TRACE")[0], 405)
        self.assertEqual(self.get(url, "/job/%231")[0], 200)      # #1: job number 1
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=30)
        self.assertNotIn("Traceback", err)

    def test_log_tails_show_what_a_terminal_would(self):
        self.enqueue("--id", "long", "head -c 200000 /dev/zero | tr '\\0' x; echo; "
                     "printf '\\033[31mred\\033[0m\\000 50%%\\r100%%\\n'")
        self.enqueue("--id", "dead", "exit 3")
        self.ok("config", "set", "max_retries", "0")
        self.drained(1)
        p, url = self.serve("--bind", "127.0.0.1:0")
        _, _, page = self.get(url, "/job/long")
        log = page.split('<pre id="log">', 1)[1].split("</pre>", 1)[0]
        self.assertGreater(log.count("x"), 60000)       # one line longer than the tail
        self.assertIn("red\ufffd 50%\n100%", log)
        self.assertNotIn("\x1b", log)
        self.assertIn('<div class="tail">', page)       # anchored at its newest line
        _, _, page = self.get(url, "/job/dead")
        self.assertIn("How it ended", page)
        self.assertIn("exit code 3", page.split("How it ended", 1)[1])
        self.stop(p)

    def test_in_a_real_browser(self):
        """Where chromium is installed: what the browser builds from the
        overview and a job page, the refresh script's work included, and
        screenshots at desktop and phone widths (kept in
        QUEUECTL_SCREENSHOTS=DIR when set)."""
        import shutil
        browser = next(filter(None, map(shutil.which, (
            "chromium", "chromium-browser", "google-chrome"))), None)
        if browser is None:
            self.skipTest("no chromium installed")
        self.hostile_queue()
        self.enqueue("--id", "running", "sleep 30")
        self.start_worker()
        self.wait_for(lambda: self.state("running") == "processing", what="job to start")
        p, url = self.serve("--bind", "127.0.0.1:0")
        shots = os.environ.get("QUEUECTL_SCREENSHOTS") or self.tmp
        os.makedirs(shots, exist_ok=True)
        profile = os.path.join(self.tmp, "chromium")

        def chromium(*args):
            r = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                                "--no-first-run", f"--user-data-dir={profile}", *args],
                               capture_output=True, text=True, timeout=90)
            return r.stdout

        dom = chromium("--virtual-time-budget=12000", "--dump-dom", url)
        self.assertIn('<a href="/job/evil">evil</a>', dom)
        self.assertIn("Running (1)", dom)
        refreshed = re.search(r'id="updated" data-refreshed="(\d+)"', dom)
        self.assertTrue(refreshed and int(refreshed[1]) >= 1,
                        "the refresh script did not run: " + dom[:300])
        self.assertNotIn("<script>alert", dom)
        dom = chromium("--dump-dom", url + "job/evil")
        self.assertIn("&lt;script&gt;alert(1)&lt;/script&gt;", dom)
        dark = ("--force-dark-mode", "--blink-settings=preferredColorScheme=0")
        for name, size, flags in (("desktop", "1280,900", ()), ("phone", "390,844", ()),
                                  ("dark", "1280,900", dark)):
            for page in ("", "job/evil"):
                path = os.path.join(shots, f"{name}-{page.replace('/', '-') or 'overview'}.png")
                chromium(f"--screenshot={path}", f"--window-size={size}",
                         "--hide-scrollbars", *flags, url + page)
                with open(path, "rb") as f:
                    self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
                self.assertGreater(os.path.getsize(path), 5000)
        self.stop(p)

class TestMetrics(QueueTest):
    def test_the_whole_output_follows_the_exposition_format(self):
        self.set_fast_retries()
        self.enqueue("--queue", "q1", "true")
        self.enqueue("--queue", "q1", "sleep 0.3")
        self.enqueue("--max-retries", "1", "false")
        self.drain()
        fams = parse_exposition(self.ok("metrics"))
        kind, samples = fams["queuectl_job_duration_seconds"]
        self.assertEqual(kind, "histogram")
        q1 = {(n, lb.get("le")): v for n, lb, v in samples if lb["queue"] == "q1"}
        self.assertEqual(q1[("queuectl_job_duration_seconds_count", None)], 2)
        # The sleep ran 0.3 s or more, however loaded the machine: never in
        # a bucket up to 0.25; both ran less than 6 h.
        self.assertLessEqual(q1[("queuectl_job_duration_seconds_bucket", "0.25")], 1)
        self.assertEqual(q1[("queuectl_job_duration_seconds_bucket", "21600")], 2)
        self.assertGreater(q1[("queuectl_job_duration_seconds_sum", None)], 0.29)
        les = [lb["le"] for n, lb, _ in samples if n.endswith("_bucket")
               and lb["queue"] == "q1"]
        self.assertEqual((les[0], les[-2], les[-1]), ("0.01", "21600", "+Inf"))
        self.assertEqual(fams["queuectl_attempts_total"][0], "counter")
        values = {(n, tuple(sorted(lb.items()))): v for _, (_, s) in fams.items()
                  for n, lb, v in s}
        self.assertEqual(values[("queuectl_jobs", (("queue", "q1"), ("state", "completed")))],
                         2)
        self.assertEqual(values[("queuectl_failures_total", (("queue", "default"),))], 2)
        # The parser itself refuses what the format forbids.
        for bad in ("x 1",                                   # no newline at the end
                    "# TYPE x gauge\n# TYPE x gauge\nx 1\n",  # two TYPEs
                    "x 1\n# TYPE x gauge\n",                  # TYPE after a sample
                    "x 1\ny 1\nx 2\n",                        # a split family
                    'x{a="1",a="2"} 1\n', 'x{a="\\q"} 1\n',   # labels
                    "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\n"
                    "h_sum 1\nh_count 1\n"):                 # not cumulative
            with self.subTest(bad=bad):
                with self.assertRaises((AssertionError, ValueError)):
                    parse_exposition(bad)

    def test_oldest_pending_counts_only_jobs_that_could_run_now(self):
        self.enqueue("--id", "later", "--delay", "1h", "true")
        self.enqueue("--id", "dead", "--max-retries", "0", "false")
        self.drain()
        self.enqueue("--id", "blocked", "--after", "dead", "true")
        self.enqueue("--queue", "held", "true")
        self.ok("pause", "held")
        time.sleep(0.2)

        def gauges():
            fams = parse_exposition(self.ok("metrics"))
            return {(n, lb.get("queue")): v for name in (
                "queuectl_oldest_pending_seconds", "queuectl_delayed_jobs",
                "queuectl_blocked_jobs") for n, lb, v in fams[name][1]}
        g = gauges()
        self.assertEqual(g[("queuectl_oldest_pending_seconds", None)], 0)
        self.assertEqual(g[("queuectl_delayed_jobs", "default")], 1)
        self.assertEqual(g[("queuectl_blocked_jobs", "default")], 1)
        self.ok("resume", "held")
        self.assertGreater(gauges()[("queuectl_oldest_pending_seconds", None)], 0.1)

class TestLiveView(QueueTest):
    def test_top_refreshes_in_a_pty_and_quits_on_q(self):
        import pty
        import select
        import termios
        self.enqueue("--id", "long-job", "sleep 30")
        self.start_worker()
        self.wait_running("long-job")
        pid, fd = pty.fork()
        if pid == 0:
            os.execve(PY, [*QUEUECTL, "top", "--interval", "0.2"], self.env)
        self.addCleanup(lambda: pid_alive(pid) and os.kill(pid, signal.SIGKILL))
        out = b""
        deadline = time.monotonic() + 15
        while b"long-job" not in out and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.5)[0]:
                out += os.read(fd, 65536)
        self.assertIn(b"long-job", out)                   # running jobs shown
        self.assertIn(b"\x1b[?1049h", out)                # alternate screen
        attrs = termios.tcgetattr(fd)
        self.assertFalse(attrs[3] & termios.ICANON)       # cbreak while running
        os.write(fd, b"q")
        while time.monotonic() < deadline:
            if not select.select([fd], [], [], 0.5)[0]:
                continue
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        _, status = os.waitpid(pid, 0)
        os.close(fd)
        self.assertEqual(os.waitstatus_to_exitcode(status), 0)
        self.assertTrue(out.endswith(b"\x1b[?25h\x1b[?1049l"), out[-40:])   # restored

    def test_top_once_without_a_terminal(self):
        self.enqueue("true")
        out = self.ok("top", "--once")
        self.assertIn("jobs: 1 pending", out)
        self.assertNotIn("q to quit", out)                 # nothing to quit
        self.fails(2, "top")                               # no terminal

    def test_top_puts_the_terminal_back_on_sigterm_and_sighup(self):
        import pty
        import select
        for sig in (signal.SIGTERM, signal.SIGHUP):
            with self.subTest(sig=sig.name):
                pid, fd = pty.fork()
                if pid == 0:
                    os.execve(PY, [*QUEUECTL, "top", "--interval", "0.2"], self.env)
                self.addCleanup(lambda p=pid: pid_alive(p) and os.kill(p, signal.SIGKILL))
                out, deadline = b"", time.monotonic() + 15
                while b"running (" not in out and time.monotonic() < deadline:
                    if select.select([fd], [], [], 0.5)[0]:
                        out += os.read(fd, 65536)
                self.assertNotIn(b"\x1b[2J", out)            # redrawn, never cleared
                os.kill(pid, sig)                            # from another shell
                while time.monotonic() < deadline:
                    if not select.select([fd], [], [], 0.5)[0]:
                        continue
                    try:
                        chunk = os.read(fd, 65536)
                    except OSError:
                        break
                    if not chunk:
                        break
                    out += chunk
                _, status = os.waitpid(pid, 0)
                os.close(fd)
                self.assertEqual(os.waitstatus_to_exitcode(status), 0)
                self.assertTrue(out.endswith(b"\x1b[?25h\x1b[?1049l"), out[-40:])

    def test_top_on_a_short_terminal_keeps_the_running_jobs(self):
        for i in range(3):
            self.enqueue("--id", f"run{i}", "--queue", f"r{i}", self.gate_cmd())
        for i in range(12):
            self.enqueue("--queue", f"idle{i:02}", "true")
        self.start_worker("--count", "3", "--queue", "r0,r1,r2")
        for i in range(3):
            self.wait_running(f"run{i}")
        store = queuectl.Store(self.home)
        self.addCleanup(store.close)
        frame = queuectl.render_top(store, self.home, 80, 12).splitlines()
        self.assertEqual(len(frame), 12)
        self.assertIn("running (3):", frame)
        ids = [ln.split()[0] for ln in frame[frame.index("running (3):") + 2:][:3]]
        self.assertEqual(sorted(ids), ["run0", "run1", "run2"])
        self.assertRegex("\n".join(frame), r"run0 +r0 +\d+ +\S+ +- ")   # pid, ran, usual
        self.go()


# Command line ################################################################

class TestServiceAndPipes(QueueTest):
    def test_read_commands_end_quietly_on_a_closed_pipe_under_load(self):
        # As `queuectl list --limit 0 | head -1` does: read one line, close
        # the pipe. 20 runs of each command, 4 at a time, on 1,000 jobs.
        self.enqueue("--id", "big", "seq 1 200000")
        self.drain()
        self.ok("enqueue", "--stdin", input="".join(f"echo {i}\n" for i in range(1000)))
        commands = [("list", "--limit", "0"), ("list", "--json"), ("metrics",),
                    ("status", "--json"), ("show", "big"), ("logs", "big")]
        results = []

        def one(args):
            p = subprocess.Popen([*QUEUECTL, *args], env=self.env, cwd=self.work,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            p.stdout.readline()
            p.stdout.close()
            err = p.stderr.read()
            p.stderr.close()
            results.append((args, p.wait(timeout=60), err))
        import concurrent.futures
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(one, [c for c in commands for _ in range(20)]))
        self.assertEqual(len(results), 20 * len(commands))
        for args, code, err in results:
            self.assertIn(code, (0, -signal.SIGPIPE), (args, code, err))
            self.assertEqual(err, b"", (args, code))

    def test_a_detached_workers_log_is_rotated(self):
        env = dict(self.env, QUEUECTL_WORKER_LOG_MAX="2000")
        self.ok("enqueue", "--stdin", input="true\n" * 200)
        r = self.q("worker", "start", "--detach", env=env)
        self.assertEqual(r.code, 0, r)
        pid = int(r.out)
        self.addCleanup(lambda: proc_state(pid) and os.kill(pid, signal.SIGKILL))
        self.wait_for(lambda: not json.loads(self.ok("list", "--json", "--state",
                                                     "pending")), what="the jobs to run")
        self.ok("worker", "stop", "--wait", "--timeout", "20")
        log = os.path.join(self.home, "worker.log")
        names = sorted(n for n in os.listdir(self.home) if n.startswith("worker.log"))
        self.assertEqual(names, ["worker.log", "worker.log.1"])
        for name in names:
            size = os.path.getsize(os.path.join(self.home, name))
            self.assertLess(size, 2000 + 200, name)          # bounded: max + one line
        with open(log) as f:
            self.assertIn("stopped: ", f.read())             # the newest lines are kept

class TestInstallAndHelp(QueueTest):
    def test_make_install_into_a_temp_prefix(self):
        prefix = os.path.join(self.tmp, "prefix")
        r = subprocess.run(["make", "-s", "-C", os.path.dirname(PROG), "install",
                            f"PREFIX={prefix}", f"PYTHON={PY}"], capture_output=True,
                           text=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr)
        exe = os.path.join(prefix, "bin", "queuectl")
        out = subprocess.run([exe, "enqueue", "echo installed"], env=self.env,
                             capture_output=True, text=True, timeout=30)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.drained(0)
        self.assertIn("installed", self.log(out.stdout.strip()))
        pyc = os.listdir(os.path.join(prefix, "lib", "queuectl", "__pycache__"))
        self.assertTrue(any(p.startswith("queuectl.") for p in pyc), pyc)

    @unittest.skipUnless(os.geteuid() == 0, "needs root to run as another user")
    def test_an_installed_queuectl_works_for_an_unprivileged_user(self):
        import shutil
        nobody = self.nobody()
        if not shutil.which("setpriv"):
            self.skipTest("no setpriv")
        # A prefix every user can reach; make run with this interpreter
        # (root's own, maybe in a directory only root can enter).
        base = tempfile.mkdtemp(prefix="queuectl-install-")
        self.addCleanup(shutil.rmtree, base, True)
        os.chmod(base, 0o755)
        prefix, home = os.path.join(base, "prefix"), os.path.join(base, "home")
        r = subprocess.run(["make", "-s", "-C", os.path.dirname(PROG), "install",
                            f"PREFIX={prefix}", f"PYTHON={PY}"], capture_output=True,
                           text=True, timeout=60)
        if "no Python 3.10+ that every user can run" in r.stderr:
            self.skipTest(r.stderr.strip())
        self.assertEqual(r.returncode, 0, r.stderr)
        os.mkdir(home, 0o700)
        os.chown(home, nobody.pw_uid, nobody.pw_gid)
        exe = os.path.join(prefix, "bin", "queuectl")

        def as_nobody(*args):
            return subprocess.run(
                ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
                 "--clear-groups", exe, *args], cwd="/", capture_output=True, text=True,
                timeout=60, env={"PATH": "/usr/bin:/bin", "QUEUECTL_HOME": home})
        r = as_nobody("enqueue", "--id", "j", "id -un")
        self.assertEqual((r.returncode, r.stdout), (0, "j\n"), r.stderr)
        r = as_nobody("worker", "start", "--drain")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("nobody", as_nobody("logs", "j").stdout)

    def test_the_readmes_systemd_unit_passes_systemd_analyze_verify(self):
        import re
        import shutil
        if not shutil.which("systemd-analyze"):
            self.skipTest("no systemd-analyze")
        with open(os.path.join(os.path.dirname(PROG), "README.md")) as f:
            readme = f.read()
        unit = re.search(r"`/etc/systemd/system/queuectl.service`:\n\n```ini\n(.*?)```",
                         readme, re.S).group(1)
        for line in ("Wants=network-online.target", "After=network-online.target",
                     "StateDirectory=queuectl", "OOMPolicy=continue", "KillMode=mixed"):
            self.assertIn(line + "\n", unit)
        users = set(re.findall(r"User=(\w+)", readme)) | set(
            re.findall(r"sudo -u (\w+) queuectl", readme))
        self.assertEqual(users - {"OWNER"}, {"queuectl"})     # one name throughout
        # verify needs ExecStart's program to exist: point it at an installed one.
        prefix = os.path.join(self.tmp, "prefix")
        subprocess.run(["make", "-s", "-C", os.path.dirname(PROG), "install",
                        f"PREFIX={prefix}", f"PYTHON={PY}"], check=True,
                       capture_output=True, timeout=60)
        serve = re.search(r"`/etc/systemd/system/queuectl-serve.service`,.*?```ini\n(.*?)```",
                          readme, re.S).group(1)
        for name, text in (("queuectl.service", unit), ("queuectl-serve.service", serve)):
            path = os.path.join(self.tmp, name)
            with open(path, "w") as f:
                f.write(text.replace("/usr/local/bin/queuectl",
                                     os.path.join(prefix, "bin", "queuectl")))
            r = subprocess.run(["systemd-analyze", "verify", path], capture_output=True,
                               text=True, timeout=60)
            self.assertEqual((r.returncode, r.stdout, r.stderr), (0, "", ""), name)

    def test_direct_execution_of_the_file(self):
        env = dict(self.env, QUEUECTL_PYTHON=PY)
        r = subprocess.run([PROG, "--version"], env=env, capture_output=True, text=True,
                           timeout=30)
        self.assertEqual((r.returncode, r.stdout.strip()),
                         (0, f"queuectl {queuectl.__version__}"))

    def test_every_command_has_help_with_examples(self):
        for cmd in (["enqueue"], ["worker", "start"], ["worker", "stop"], ["status"],
                    ["list"], ["logs"], ["wait"], ["cancel"], ["dlq", "retry"], ["prune"],
                    ["config", "set"], ["metrics"], ["doctor"], ["top"]):
            examples = self.ok(*cmd, "--help").partition("\nexamples:\n")[2]
            self.assertIn(f"queuectl {' '.join(cmd)}", examples, cmd)

    def test_no_arguments_prints_short_usage(self):
        out = self.ok()
        self.assertIn("Common commands:", out)

    def completing(self, shell, script, words):
        """What the shell's completion offers after words (the last one
        being typed), with this home; a list of words."""
        # A loaded machine may start Python slower than the 0.1 s a person
        # waits: here the point is the words, not the bound (tested below).
        env = dict(self.env, QUEUECTL_PYTHON=PY, QUEUECTL_COMPLETE_TIMEOUT="10",
                   PATH=os.path.dirname(PROG) + ":" + self.env.get("PATH", ""))
        if shell == "fish":
            code = f"source {script}; complete -C {json.dumps(' '.join(words))}"
        else:
            code = (f"source {script}; COMP_WORDS=({' '.join(json.dumps(w) for w in words)});"
                    f" COMP_CWORD={len(words) - 1}; _queuectl; echo \"${{COMPREPLY[*]}}\"")
        r = subprocess.run([shell, "-c", code], capture_output=True, text=True, env=env,
                           timeout=30)
        self.assertEqual(r.stderr, "", r)
        return sorted(r.stdout.split())

    def test_completion_offers_live_ids_queues_and_keys(self):
        import shutil
        os.symlink(PROG, os.path.join(self.tmp, "queuectl"))   # as installed, on PATH
        self.enqueue("--id", "gone", "true")
        self.ok("cancel", "gone")
        self.enqueue("--id", "abc1", "true")
        self.enqueue("--id", "abd2", "--queue", "reports", "true")
        self.ok("schedule", "add", "nightly", "@daily", "--", "true")
        for shell in ("bash", "zsh", "fish"):
            if not shutil.which(shell):
                continue                     # CI may lack zsh and fish
            with self.subTest(shell=shell):
                script = os.path.join(self.tmp, f"completion.{shell}")
                with open(script, "w") as f:
                    f.write(self.ok("completion", shell))
                env_path = dict(self.env, PATH=self.tmp + ":" + self.env.get("PATH", ""))
                self.env = env_path
                self.assertEqual(self.completing(shell, script, ["queuectl", "show", "ab"]),
                                 ["abc1", "abd2"])
                self.assertEqual(self.completing(shell, script,
                                                 ["queuectl", "list", "--queue", ""]),
                                 ["default", "reports"])
                # prune --state offers only what prune takes.
                self.assertEqual(self.completing(shell, script,
                                                 ["queuectl", "prune", "--state", ""]),
                                 ["cancelled", "completed", "dead"])
                self.assertIn("max_retries", self.completing(
                    shell, script, ["queuectl", "config", "get", ""]))
                self.assertIn("scheduling_mode", self.completing(
                    shell, script, ["queuectl", "config", "set", ""]))
                self.assertEqual(self.completing(shell, script,
                                                 ["queuectl", "schedule", "rm", ""]), ["nightly"])
                # cancel offers what can be cancelled, retry what can be retried
                self.assertEqual(self.completing(shell, script, ["queuectl", "cancel", ""]),
                                 ["abc1", "abd2"])
                self.assertEqual(self.completing(shell, script, ["queuectl", "retry", ""]),
                                 ["gone"])
                self.assertEqual(self.completing(shell, script,
                                                 ["queuectl", "dlq", "retry", ""]), [])
                if shell != "zsh":           # zsh itself filters by what is typed
                    self.assertEqual(self.completing(shell, script,
                                                     ["queuectl", "worker", "st"]),
                                     ["start", "status", "stop"])

    def test_bash_completes_an_id_with_a_colon_as_a_person_types_it(self):
        import pty
        import select
        import shutil
        if not shutil.which("bash"):
            self.skipTest("no bash")
        os.symlink(PROG, os.path.join(self.tmp, "queuectl"))
        self.enqueue("--id", "tick@2026-12-06T11:45", "true")
        self.enqueue("--id", "tick@2026-12-06T12:00", "true")
        script = os.path.join(self.tmp, "completion.bash")
        with open(script, "w") as f:
            f.write(self.ok("completion", "bash"))
        env = dict(self.env, QUEUECTL_PYTHON=PY, QUEUECTL_COMPLETE_TIMEOUT="10", PS1="$ ",
                   PATH=self.tmp + ":" + os.path.dirname(PROG) + ":" + self.env["PATH"],
                   TERM="dumb", INPUTRC="/dev/null")
        pid, fd = pty.fork()
        if pid == 0:
            os.execve(shutil.which("bash"), ["bash", "--norc", "--noprofile", "-i"], env)
        self.addCleanup(lambda: pid_alive(pid) and os.kill(pid, signal.SIGKILL))

        def read_until(text, timeout=20):
            out, deadline = b"", time.monotonic() + timeout
            while text not in out and time.monotonic() < deadline:
                if select.select([fd], [], [], 0.2)[0]:
                    try:
                        out += os.read(fd, 65536)
                    except OSError:
                        break
            return out
        os.write(fd, f"source {script}; echo ready$((40 + 2))\n".encode())
        read_until(b"ready42")               # what it prints, not what was typed
        os.write(fd, b"queuectl logs tick@2026-12-06T11:4\t")
        out = read_until(b"T11:45 ")
        os.kill(pid, signal.SIGKILL)         # whatever readline does with the line
        os.waitpid(pid, 0)
        os.close(fd)
        self.assertIn(b"tick@2026-12-06T11:45 ", out)

    def test_live_completion_is_bounded_in_time(self):
        import contextlib
        import io
        self.enqueue("true")
        home_words = io.StringIO()
        with contextlib.redirect_stdout(home_words):
            queuectl.complete_values(["ids", self.home])
        self.assertEqual(len(home_words.getvalue().split()), 1)
        # Out of time (a budget of 0): the query is interrupted, no words.
        self.addCleanup(setattr, queuectl, "COMPLETE_BUDGET", queuectl.COMPLETE_BUDGET)
        queuectl.COMPLETE_BUDGET = 0
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertEqual(queuectl.complete_values(["queues", self.home]), 0)
        self.assertEqual(out.getvalue(), "")
        r = self.q("__complete", "ids", os.path.join(self.tmp, "nowhere"))
        self.assertEqual((r.code, r.out, r.err), (0, "", ""))

class TestFuzz(QueueTest):
    """Seeded random CLI invocations, in-process: never a traceback, never an
    exit code outside 0/1/2, and the database stays intact."""

    SEED = 20261123

    def test_random_invocations(self):
        import contextlib
        import io
        import random
        rnd = random.Random(self.SEED)
        os.environ["QUEUECTL_HOME"] = self.home
        self.addCleanup(os.environ.pop, "QUEUECTL_HOME", None)
        cmds = [["enqueue"], ["status"], ["show"], ["list"], ["logs"], ["wait"],
                ["retry"], ["pause"], ["resume"], ["cancel"], ["dlq", "list"],
                ["dlq", "retry"], ["dlq", "purge"], ["prune"], ["config", "get"],
                ["config", "set"], ["config", "list"], ["metrics"], ["doctor"],
                ["worker", "status"], ["worker", "stop"], ["worker"], ["dlq"], ["bogus"]]
        flags = ["--id", "--priority", "-p", "--max-retries", "--timeout", "--run-at",
                 "--delay", "--queue", "--after", "--cwd", "--env", "--unique", "--json",
                 "--state", "--limit", "--tail", "--all", "--older-than", "--now",
                 "-c", "--command", "--bogus", "-x", "--"]
        values = ["0", "-1", "1", "99999999999999999999", "1.5", "nan", "inf", "-inf",
                  "", " ", "a", "../x", "a/b", "-x", "é", "日本", "\x01", "x" * 5000,
                  "{", "{}", '{"command": 1}', '{"command": "true", "priority": "high"}',
                  '{"command": "true", "env": {"A": 1}}', "[1, 2]", "null", "true",
                  "2026-11-23T09:30:00Z", "tomorrowish", "5x", "1h30m", "pending", "dead",
                  "max_retries", "backoff-base", "kill_grace", "NaN", "1e308", "k=v", "=v",
                  "default", "q1", "processing", "completed"]
        ids = []
        for n in range(300):
            argv = list(rnd.choice(cmds))
            for _ in range(rnd.randint(0, 4)):
                r = rnd.random()
                if r < 0.4:
                    argv.append(rnd.choice(flags))
                if r < 0.9:
                    argv.append(rnd.choice(values + ids))
            if argv[0] == "wait":
                argv += ["--timeout", "0"]
            stdin = io.StringIO(rnd.choice(["true\n", "{\n", "", "echo a\n\n{}\n"]))
            out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
            err = io.StringIO()
            saved_stdin = sys.stdin
            sys.stdin = stdin
            try:
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                    try:
                        code = queuectl.main(argv)
                    except SystemExit as e:          # --help / --version
                        code = e.code or 0
            finally:
                sys.stdin = saved_stdin
            with self.subTest(n=n, argv=argv):
                self.assertIn(code, (0, 1, 2, 3, 124), err.getvalue())
                self.assertNotIn("Traceback", err.getvalue())
                self.assertNotIn("unexpected", err.getvalue())
            if argv[0] == "enqueue" and code == 0:
                out.flush()
                ids += out.buffer.getvalue().decode().split()[:1]
        self.integrity_ok()


# Concurrency keys, hooks, retry policy, why ##################################

def intervals(lines):
    """'START END' lines (date +%s%N) -> [(start, end)] sorted by start."""
    return sorted(tuple(int(x) for x in line.split()) for line in lines if line.strip())

def most_at_once(spans):
    """The most spans [(start, end)] that overlap at one moment."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    now = best = 0
    for _, d in events:
        now += d
        best = max(best, now)
    return best

# A job that appends "START END" (in ns) to a file of the work directory.
def timed(name, secs):
    return f's=$(date +%s%N); sleep {secs}; echo "$s $(date +%s%N)" >> {name}'

class TestConcurrencyKeys(QueueTest):
    def spans(self, name):
        try:
            with open(self.path(name)) as f:
                return intervals(f.read().splitlines())
        except FileNotFoundError:
            return []

    def test_one_key_never_runs_twice_at_once_across_two_processes_of_four_threads(self):
        lines = [json.dumps({"command": timed("keyed", 0.01), "keys": ["db-main"]})
                 for _ in range(40)]
        lines += [json.dumps({"command": timed("other", 0.3), "keys": [f"other-{i}"]})
                  for i in range(12)]
        self.ok("enqueue", "--stdin", input="\n".join(lines) + "\n")
        self.drain_in_processes(2, 4)
        keyed = self.spans("keyed")
        self.assertEqual(len(keyed), 40)
        for (_, end), (start, _) in zip(keyed, keyed[1:]):
            self.assertGreaterEqual(start, end, "two jobs with key db-main overlapped")
        # Jobs on other keys ran side by side meanwhile: 12 x 0.3 s on the 7
        # threads the keyed jobs leave free, not one after another.
        other = self.spans("other")
        self.assertEqual(len(other), 12)
        self.assertGreaterEqual(most_at_once(other), 4)
        self.assertEqual(json.loads(self.ok("status", "--json"))["counts"]["completed"], 52)

    def test_a_queue_limit_caps_its_parallelism_without_a_dedicated_worker(self):
        self.assertEqual(self.ok("limit", "set", "queue:reports", "2"),
                         "queue:reports: at most 2 running\n")
        for _ in range(6):
            self.enqueue("--queue", "reports", timed("reports", 0.3))
        for _ in range(3):
            self.enqueue(timed("default", 0.3))
        r = self.drain_within(60, "--count", "4")
        self.assertEqual(r.code, 0, r)
        reports, default = self.spans("reports"), self.spans("default")
        self.assertEqual((len(reports), most_at_once(reports)), (6, 2))
        self.assertGreaterEqual(most_at_once(reports + default), 3)
        listed = json.loads(self.ok("limit", "list", "--json"))
        self.assertEqual(listed, [{"key": "queue:reports", "limit": 2, "set": True,
                                   "running": 0, "waiting": 0}])
        self.assertEqual(self.ok("limit", "rm", "queue:reports"),
                         "queue:reports: no limit\n")
        self.fails(1, "limit", "rm", "queue:reports")
        for bad in (("limit", "set", "db", "0"), ("limit", "set", "a/b", "1"),
                    ("limit", "set", "queue:", "1"), ("limit", "set", "db", "x")):
            self.assertIn("queuectl: error: ", self.fails(2, *bad).err)

    def test_a_job_whose_key_is_full_is_passed_over_and_order_holds_for_the_rest(self):
        self.enqueue("--id", "a", "--key", "k", "-p", "20",
                     f"echo a >> {self.path('order.txt')}; " + self.gate_cmd())
        self.enqueue("--id", "b", "--key", "k", "-p", "10", "echo b >> order.txt")
        self.enqueue("--id", "c", "-p", "5", "echo c >> order.txt")
        self.enqueue("--id", "d", "echo d >> order.txt")
        w = self.bg("--count", "2", "--drain")
        self.wait_state("d", "completed")
        # a is claimed first and holds k; b is passed over, c then d run on
        # the other thread. a's own line may come at any point among them (a
        # loaded machine may start its shell late), so its place in the
        # claims is read from when it was claimed.
        self.wait_for(lambda: "a" in self.order(), what="a to start")
        claimed = dict(self.db().execute("SELECT id, started_at FROM jobs"))   # in us
        self.assertLess(claimed["a"], claimed["c"])
        self.assertEqual([x for x in self.order() if x != "a"], ["c", "d"])
        self.assertEqual(self.state("b"), "pending")
        r = self.ok("why", "b")
        self.assertEqual(r, "b: key k is full: 1 of 1 running (a)\n")
        listed = {j.split()[0]: j for j in self.ok("list").splitlines()[1:]}
        self.assertIn("key k full", listed["b"])
        running = parse_exposition(self.ok("metrics"))["queuectl_key_running"][1]
        self.assertIn(("queuectl_key_running", {"key": "k"}, 1), running)
        self.assertIn("1 due job waits: key k is full: 1 of 1 running (a)",
                      self.ok("doctor"))
        self.go()
        self.assertEqual(w.wait(timeout=30), 0, self.err(w))
        self.assertEqual(self.order()[3:], ["b"])

    def test_if_busy_skip_prints_the_job_that_holds_the_key_and_adds_nothing(self):
        first = self.enqueue("--key", "db-main", "--if-busy", "skip", "./backup.sh")
        r = self.q("enqueue", "--key", "db-main", "--if-busy", "skip", "./backup.sh")
        self.assertEqual((r.code, r.out, r.err), (0, first + "\n", ""))
        other = self.enqueue("--key", "other", "--if-busy", "skip", "true")
        self.assertNotEqual(other, first)
        self.assertEqual(json.loads(self.ok("status", "--json"))["counts"]["pending"], 2)
        self.ok("cancel", first)
        again = self.enqueue("--key", "db-main", "--if-busy", "skip", "true")
        self.assertNotIn(again, (first, other))
        self.assertIn("needs a --key", self.fails(2, "enqueue", "--if-busy", "skip",
                                                  "true").err)
        self.assertIn("queue:NAME is the queue's own key",
                      self.fails(2, "enqueue", "--key", "queue:x", "true").err)
        self.fails(2, "enqueue", "--if-busy", "never", "--key", "k", "true")
        self.fails(2, "enqueue", '{"command": "true", "keys": [["x"]]}')
        job = json.loads(self.ok("enqueue", "--json", "--key", "b",
                                 '{"command": "true", "keys": "a"}'))
        self.assertEqual(job["keys"], ["a", "b"])

    def test_an_adopted_job_keeps_holding_its_key(self):
        self.enqueue("--id", "g", "--key", "k", self.gate_cmd())
        a = self.bg(fault="after-spawn:stop")
        self.resume_in_cleanup(a)
        self.wait_stopped(a)
        self.wait_for(lambda: self.lines("runs") == ["start"], 10, "g to start")
        self.adopt_from(a, "g")
        self.enqueue("--id", "n", "--key", "k", "-p", "5", f"echo n >> {self.path('runs')}")
        self.enqueue("--id", "m", "true")           # claimed after n was passed over
        self.wait_state("m", "completed")
        self.assertEqual(self.state("n"), "pending")
        self.assertIn("key k is full: 1 of 1 running (g)", self.ok("why", "n"))
        self.go()
        self.wait_state("n", "completed")
        self.assertEqual(self.lines("runs"), ["start", "done", "n"])

    def test_a_cancelled_job_holds_its_keys_until_its_processes_are_gone(self):
        order = self.path("order.txt")
        self.enqueue("--id", "a", "--key", "k", "--on-cancel",
                     f"echo hook-$QUEUECTL_ATTEMPT >> {order}",
                     f"trap 'sleep 1; echo a-end >> {order}; exit 0' TERM; "
                     f"echo a-start >> {order}; while :; do sleep 0.05; done")
        self.enqueue("--id", "b", "--key", "k", f"echo b >> {order}")
        self.bg("--count", "2")
        self.wait_for(lambda: self.order() == ["a-start"], 20, "a to start")
        self.ok("cancel", "a", "--grace", "10")
        self.wait_state("b", "completed")
        self.wait_for(lambda: len(self.order()) == 4, 20, "the hook to run")
        self.assertEqual(self.order()[:2], ["a-start", "a-end"])
        self.assertEqual(sorted(self.order()[2:]), ["b", "hook-1"])
        self.assertEqual(self.job("a")["attempts"], 1)

    def test_a_job_waiting_for_a_key_does_not_hold_back_a_delayed_one(self):
        self.enqueue("--key", "k", self.gate_cmd())
        self.enqueue("--key", "k", "true")
        self.bg("--count", "2")
        self.wait_for(lambda: self.lines("runs") == ["start"], 20, "the holder")
        self.enqueue("--id", "later", "--delay", "1", "true")
        # Idle threads once slept HEARTBEAT (5 s) past it behind the key's waiter:
        # when it was claimed says so, however slowly this machine reports it.
        self.wait_state("later", "completed", timeout=20)
        due, claimed = (queuectl.epoch(v) for v in self.db().execute(
            "SELECT run_at, started_at FROM jobs WHERE id = 'later'").fetchone())
        self.assertLess(claimed - due, 2.5)
        self.go()

    def test_a_frozen_workers_cancelled_job_lets_go_of_its_key(self):
        self.enqueue("--id", "a", "--key", "k", self.gate_cmd())
        a = self.bg()
        self.resume_in_cleanup(a)
        self.wait_for(lambda: self.lines("runs") == ["start"], 20, "a to start")
        self.freeze(a)
        self.ok("cancel", "a", "--grace", "1")     # its processes end; A never sees it
        self.enqueue("--id", "b", "--key", "k", "true")
        self.age(a)
        self.bg()                                  # B's recovery lets go of a's key
        self.wait_state("b", "completed")
        self.assertEqual((self.state("a"), self.job("a")["attempts"]), ("cancelled", 1))

    def test_a_worker_frozen_while_it_waits_for_a_cancelled_group(self):
        # A's job leaves a TERM-proof child in its group. A, waiting for it
        # after the cancel, is frozen past its lease: B's sweep keeps the key
        # while the child lives and lets go once it ends; A, woken, records
        # the attempt's end no second time.
        self.enqueue("--id", "a", "--key", "k",
                     "sh -c 'trap \"\" TERM; echo $$ > child.pid; "
                     f"while [ ! -f {self.path('go')} ]; do sleep 0.05; done' & echo bg")
        a = self.bg()
        self.resume_in_cleanup(a)
        child = self.read_pid("child.pid")
        self.addCleanup(kill_group_quietly, child)
        self.wait_out(a, "left in its group", "A to wait for the group")
        cancel = subprocess.Popen([*QUEUECTL, "cancel", "a", "--grace", "60"], env=self.env,
                                  cwd=self.work, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        self.procs.append(cancel)
        self.wait_state("a", "cancelled")
        self.freeze(a)
        self.enqueue("--id", "b", "--key", "k", "true")
        self.age(a)
        b = self.bg()
        self.wait_for(lambda: self.live_workers() == 2, 20, "B to start")
        reasons = json.loads(self.ok("why", "b", "--json"))["reasons"]
        self.assertIn("key_full", [x["code"] for x in reasons])
        self.assertTrue(pid_alive(child))
        self.go()                                  # the child ends: so does the attempt
        self.wait_state("b", "completed")
        self.assertEqual(cancel.wait(timeout=20), 0)
        os.kill(a.pid, signal.SIGCONT)
        self.wait_out(b, "b completed", "B to run b")
        self.stop_workers()
        job = self.job("a")
        self.assertEqual((job["state"], job["attempts"], len(job["attempts_recorded"])),
                         ("cancelled", 1, 1), self.out(a))

    def test_limit_list_counts_the_jobs_waiting_for_a_queue(self):
        self.ok("limit", "set", "queue:qq", "1")
        for _ in range(3):
            self.enqueue("--queue", "qq", "true")
        self.assertEqual(json.loads(self.ok("limit", "list", "--json")),
                         [{"key": "queue:qq", "limit": 1, "set": True, "running": 0,
                           "waiting": 3}])

class TestHooks(QueueTest):
    def env_file(self, name):
        with open(self.path(name)) as f:
            return dict(line.split("=", 1) for line in f.read().splitlines() if "=" in line)

    def test_hooks_run_as_jobs_of_their_own_with_the_jobs_variables(self):
        self.set_fast_retries()
        self.enqueue("--id", "ok", "--on-success", "env | grep ^QUEUECTL_ > success.env",
                     "echo fine")
        self.enqueue("--id", "f", "--max-retries", "1",
                     "--on-failure", "echo $QUEUECTL_ATTEMPT >> failure.txt",
                     "--on-dead", "echo $QUEUECTL_JOB_ID $QUEUECTL_JOB_STATE "
                     "$QUEUECTL_EXIT_CODE >> dead.txt", "exit 3")
        self.drained(1)          # f died
        env = self.env_file("success.env")
        self.assertEqual({k: env[k] for k in ("QUEUECTL_JOB_ID", "QUEUECTL_JOB_STATE",
                                              "QUEUECTL_EXIT_CODE", "QUEUECTL_ATTEMPT",
                                              "QUEUECTL_COMMAND", "QUEUECTL_HOOK")},
                         {"QUEUECTL_JOB_ID": "ok", "QUEUECTL_JOB_STATE": "completed",
                          "QUEUECTL_EXIT_CODE": "0", "QUEUECTL_ATTEMPT": "1",
                          "QUEUECTL_COMMAND": "echo fine", "QUEUECTL_HOOK": "on_success"})
        with open(env["QUEUECTL_LOG"]) as f:
            self.assertIn("fine", f.read())
        self.assertEqual(self.lines("failure.txt"), ["1"])
        self.assertEqual(self.lines("dead.txt"), ["f", "dead", "3"])
        hooks = json.loads(self.ok("list", "--queue", "_hooks", "--json"))
        self.assertEqual(sorted((h["hook_of"], h["state"]) for h in hooks),
                         [("f", "completed"), ("f", "completed"), ("ok", "completed")])
        self.assertEqual([h["event"] for h in self.job("f")["hook_jobs"]],
                         ["on_failure", "on_dead"])
        self.assertIn("[on_dead of f]", self.ok("list", "--queue", "_hooks"))

    def test_defaults_for_the_home_and_per_queue_and_a_hook_fires_no_hooks(self):
        self.ok("config", "set", "max_retries", "0")
        self.ok("config", "set", "on_dead", "echo home $QUEUECTL_JOB_ID >> dead.txt; exit 1")
        self.ok("config", "set", "queue.reports.on_dead",
                "echo reports $QUEUECTL_JOB_ID >> dead.txt")
        self.enqueue("--id", "a", "exit 1")
        self.enqueue("--id", "b", "--queue", "reports", "exit 1")
        self.enqueue("--id", "c", "--on-dead", "echo own $QUEUECTL_JOB_ID >> dead.txt",
                     "exit 1")
        self.assertEqual(self.drain_within(30).code, 1)         # jobs died
        got = sorted(" ".join(p) for p in zip(*[iter(self.lines("dead.txt"))] * 2))
        self.assertEqual(got, ["home a", "own c", "reports b"])
        # The home's hook died (exit 1) and fired nothing: three hook jobs.
        hooks = json.loads(self.ok("list", "--queue", "_hooks", "--json"))
        self.assertEqual(sorted(h["state"] for h in hooks), ["completed", "completed", "dead"])
        self.assertEqual(self.ok("config", "get", "queue.reports.on-dead"),
                         "echo reports $QUEUECTL_JOB_ID >> dead.txt\n")
        self.assertEqual(self.ok("config", "get", "queue.other.max_retries"), "0\n")
        self.fails(2, "config", "set", "queue.reports.kill_grace", "1")
        self.fails(2, "config", "set", "no_retry_on", "x")

    def test_on_cancel_runs_and_a_worker_of_other_queues_runs_hooks_too(self):
        self.enqueue("--id", "later", "--queue", "q", "--delay", "1h",
                     "--on-cancel", "echo $QUEUECTL_JOB_STATE > cancel.txt", "true")
        self.ok("cancel", "later")
        self.assertEqual(self.drain_within(30, "--queue", "other").code, 0)
        self.assertEqual(self.lines("cancel.txt"), ["cancelled"])

    def test_unsetting_a_default_and_opting_out_of_it(self):
        self.ok("config", "set", "max_retries", "0")
        self.ok("config", "set", "on_dead", "echo home >> dead.txt")
        self.enqueue("--id", "quiet", "--on-dead", "", "exit 1")
        self.enqueue("--id", "loud", "exit 1")
        self.drain_within(30)
        self.assertEqual(self.lines("dead.txt"), ["home"])
        self.assertEqual(self.ok("config", "set", "on_dead", ""), "on_dead = \n")
        self.enqueue("--id", "after", "exit 1")
        self.drain_within(30)
        self.assertEqual(self.lines("dead.txt"), ["home"])

    def test_hook_timeout_0_is_no_timeout_and_a_dead_hook_can_be_edited(self):
        self.ok("config", "set", "job_timeout", "0.5")
        self.ok("config", "set", "hook_timeout", "0")
        self.ok("config", "set", "max_retries", "0")
        self.enqueue("--id", "j", "--timeout", "0", "--on-success", "sleep 1; exit 9", "true")
        self.assertEqual(self.drain_within(30).code, 0)     # a dead hook: still 0
        self.assertEqual(self.q("wait", "--timeout", "5").code, 0)   # and for wait
        self.assertEqual(self.q("wait", "--queue", "_hooks", "--timeout", "5").code, 1)
        (hook,) = json.loads(self.ok("list", "--queue", "_hooks", "--json"))
        self.assertEqual((hook["state"], hook["exit_code"]), ("dead", 9))
        self.ok("edit", hook["id"], "--", "echo fixed > fixed.txt")
        self.ok("retry", hook["id"])
        self.drain_within(30)
        self.assertEqual(self.lines("fixed.txt"), ["fixed"])
        self.assertEqual(self.job(hook["id"])["queue"], "_hooks")
        self.fails(2, "enqueue", "--queue", "_hooks", "true")

class TestRetryPolicy(QueueTest):
    def outcome(self, *args):
        job_id = self.enqueue(*args)
        self.drain_within(30)
        job = self.job(job_id)
        return job["state"], job["attempts"], job["last_error"]

    def test_exit_codes_decide_whether_an_attempt_is_retried(self):
        self.set_fast_retries()
        self.assertEqual(self.outcome("--max-retries", "3", "--no-retry-on", "2,64-78",
                                      "exit 65"),
                         ("dead", 1, "exit code 65; not retried (no_retry_on 2,64-78)"))
        self.assertEqual(self.outcome("--max-retries", "3", "--no-retry-on", "2,64-78",
                                      "exit 1")[:2], ("dead", 4))
        self.assertEqual(self.outcome("--max-retries", "3", "--retry-on", "75", "exit 1"),
                         ("dead", 1, "exit code 1; not retried (retry_on 75)"))
        self.assertEqual(self.outcome("--max-retries", "1", "--retry-on", "75",
                                      "exit 75")[:2], ("dead", 2))

    def test_timeouts_and_signals_are_retried_unless_the_job_says_otherwise(self):
        self.set_fast_retries()
        self.assertEqual(self.outcome("--max-retries", "1", "--retry-on", "75",
                                      "--timeout", "0.2", "sleep 5")[:2], ("dead", 2))
        self.assertEqual(self.outcome("--max-retries", "1", "--no-retry-on", "timeout",
                                      "--timeout", "0.2", "sleep 5"),
                         ("dead", 1, "timed out after 0.2s; not retried "
                                     "(no_retry_on timeout)"))
        self.assertEqual(self.outcome("--max-retries", "1", "kill -TERM $$")[:2],
                         ("dead", 2))
        self.assertEqual(self.outcome("--max-retries", "1", "--no-retry-on", "signal",
                                      "kill -TERM $$")[:2], ("dead", 1))

    def test_config_defaults_and_bad_lists(self):
        self.set_fast_retries()
        self.ok("config", "set", "no_retry_on", "3")
        self.ok("config", "set", "queue.strict.retry_on", "75")
        self.assertEqual(self.outcome("--max-retries", "2", "exit 3")[:2], ("dead", 1))
        self.assertEqual(self.outcome("--max-retries", "2", "--queue", "strict",
                                      "exit 4")[:2], ("dead", 1))
        self.assertEqual(self.outcome("--max-retries", "2", "exit 4")[:2], ("dead", 3))
        # A job's own list is the whole policy: config's no_retry_on 3 is not added.
        self.assertEqual(self.outcome("--max-retries", "1", "--retry-on", "3",
                                      "exit 3")[:2], ("dead", 2))
        for bad in ("x", "300", "5-2", "", "1,,2", "-1"):
            with self.subTest(bad=bad):
                r = self.fails(2, "enqueue", f"--retry-on={bad}", "true")
                self.assertIn("--retry-on", r.err)

    def test_codes_are_parsed_and_matched(self):
        self.assertEqual(queuectl.parse_codes(" 2, 64-78 ,TIMEOUT,2"), "2,64-78,timeout")
        self.assertTrue(queuectl.codes_match("2,64-78", 70))
        self.assertFalse(queuectl.codes_match("2,64-78", 79))
        self.assertFalse(queuectl.codes_match("2,64-78", "signal"))
        self.assertTrue(queuectl.codes_match("1,signal", "signal"))

class TestWhy(QueueTest):
    def why(self, job_id):
        return [(r["code"], r["text"]) for r in
                json.loads(self.ok("why", job_id, "--json"))["reasons"]]

    def test_why_names_every_reason_a_job_waits(self):
        self.enqueue("--id", "later", "--delay", "1h", "true")
        self.enqueue("--id", "dep", "--after", "later", "true")
        self.enqueue("--id", "held", "--queue", "held", "true")
        self.ok("pause", "held")
        self.assertEqual([c for c, _ in self.why("later")], ["scheduled", "no_worker"])
        self.assertEqual(self.why("dep")[0], ("dependencies", "waits for later (pending)"))
        self.assertEqual([c for c, _ in self.why("held")], ["paused", "no_worker"])
        self.assertEqual(self.ok("why", "held"), "held: queue held is paused\n"
                         "held: no live worker serves queue held\n")
        # A failed job waits out its backoff; a busy worker has no free thread.
        self.ok("config", "set", "backoff_base", "1000")
        self.enqueue("--id", "flaky", "exit 1")
        self.enqueue("--id", "busy", "-p", "-1", self.gate_cmd())
        self.bg()
        self.wait_state("flaky", "failed")
        self.wait_for(lambda: self.lines("runs") == ["start"], 20, "busy to start")
        self.enqueue("--id", "next", "-p", "-2", "true")
        codes = [c for c, _ in self.why("flaky")]
        self.assertEqual(codes, ["backoff", "workers_busy"])
        self.assertIn("after attempt 1 failed: exit code 1", self.why("flaky")[0][1])
        self.assertEqual(self.why("next"), [("workers_busy", "all 1 thread of the 1 "
                                             "worker that serve queue default are busy")])
        self.assertEqual([c for c, _ in self.why("busy")], ["running"])
        self.go()
        self.wait_state("next", "completed")
        self.assertRegex(self.ok("why", "next"), r"^next: completed .*, after 1 attempt\n$")
        r = self.fails(1, "why", "nosuch")
        self.assertIn("nosuch", r.err)

# Resource accounting, per-job limits, recurring schedules ####################

# A Python job that allocates and keeps MB megabytes and burns CPU seconds.
def hog(mb, cpu=0.0):
    return (f"{PY} -I -S -c \"import time; x = bytearray({mb} * 2**20); t = time.process_time()\n"
            f"while time.process_time() - t < {cpu}: pass\"")

class TestAccounting(QueueTest):
    def test_an_attempt_records_its_cpu_time_and_peak_rss(self):
        self.enqueue("--id", "big", hog(150, 0.3))
        self.drain_within(60)
        job = self.job("big")
        use = job["usage"]
        self.assertGreaterEqual(use["cpu_user"] + use["cpu_sys"], 0.25)
        self.assertGreater(use["max_rss"], 150 * 2**20)
        self.assertLess(use["max_rss"], 400 * 2**20)
        self.assertNotIn("max_rss_bound", use)
        self.assertGreater(use["wall"], 0.25)
        (attempt,) = job["attempts_recorded"]
        self.assertEqual((attempt["attempt"], attempt["state"], attempt["exit_code"]),
                         (1, "completed", 0))
        self.assertEqual(attempt["max_rss"], use["max_rss"])
        out = self.ok("show", "big")
        self.assertRegex(out, r"usage +ran \d+\.\d+s, user \d+\.\d+s, sys \d+\.\d+s, "
                              r"max RSS 1\d\d(\.\d)?M")
        self.assertRegex(out, r"attempts:\n  1  completed  exit 0 ")
        listed = json.loads(self.ok("list", "--json"))
        self.assertEqual(listed[0]["usage"], use)

    def test_an_adopted_job_is_not_measured_and_says_so(self):
        self.enqueue("--id", "long", self.gate_cmd())
        a = self.bg(fault="after-spawn:stop")
        self.resume_in_cleanup(a)
        self.wait_stopped(a)
        self.wait_for(lambda: self.lines("runs") == ["start"], 10, "long to start")
        self.adopt_from(a, "long")
        self.go()
        self.wait_state("long", "completed")
        use = self.job("long")["usage"]
        self.assertEqual((use["cpu_user"], use["cpu_sys"], use["max_rss"]), (None, None, None))
        self.assertIsNotNone(use["wall"])
        self.assertIn("CPU and memory not measured (adopted or recovered: its worker died)",
                      self.ok("show", "long"))

    def test_stats_per_queue_from_the_recorded_attempts(self):
        self.ok("config", "set", "max_retries", "0")
        for cmd in ("true", "true", "exit 1"):
            self.enqueue("--queue", "q1", cmd)
        self.enqueue("--queue", "q2", hog(60))
        self.drain_within(60)
        rows = {r["queue"]: r for r in json.loads(self.ok("stats", "--json"))}
        self.assertEqual((rows["q1"]["attempts"], rows["q1"]["success_rate"]), (3, 0.6667))
        self.assertGreater(rows["q2"]["max_rss_p95"], 60 * 2**20)
        self.assertLessEqual(rows["q1"]["run_p50"], rows["q1"]["run_p95"])
        self.assertEqual([r["queue"] for r in json.loads(self.ok(
            "stats", "--queue", "q2", "--json"))], ["q2"])
        con = self.db()                     # q1's hour, moved two days back
        con.execute("UPDATE history SET start = start - 172800 WHERE queue = 'q1'")
        con.commit()
        self.enqueue("--queue", "q1", "true")
        self.drain_within(60)
        recent = {r["queue"]: r for r in json.loads(self.ok("stats", "--since", "1d",
                                                            "--json"))}
        self.assertEqual(recent["q1"]["attempts"], 1)
        text = self.ok("stats")
        self.assertRegex(text, r"q1 +4 +75\.0%")
        fams = parse_exposition(self.ok("metrics"))
        cpu = {(lb["queue"], lb["mode"]) for _, lb, _ in fams["queuectl_cpu_seconds_total"][1]}
        self.assertIn(("q2", "user"), cpu)
        rss = {(n, lb["queue"], lb.get("le")): v
               for n, lb, v in fams["queuectl_job_max_rss_bytes"][1]}
        self.assertEqual(rss[("queuectl_job_max_rss_bytes_count", "q1", None)], 4)
        self.assertEqual(self.fails(2, "stats", "--since", "soon").code, 2)

class TestHistory(QueueTest):
    """Issue 25: the history per queue and quarter hour, which prune keeps; stats
    and metrics both read it."""

    def metric(self, name, **labels):
        fams = parse_exposition(self.ok("metrics"))
        family = name.rsplit("_", 1)[0] if name.endswith(("_count", "_sum", "_bucket")) \
            else name
        for n, lb, v in fams[family][1]:
            if n == name and all(lb.get(k) == v2 for k, v2 in labels.items()):
                return v
        return None

    def test_stats_survive_prune_and_agree_with_metrics(self):
        self.ok("config", "set", "max_retries", "0")
        for cmd in ("true",) * 9 + ("exit 1",):
            self.enqueue(cmd)
        self.drained(1)
        before = json.loads(self.ok("stats", "--json"))
        self.assertEqual((before[0]["attempts"], before[0]["success_rate"]), (10, 0.9))
        self.assertIn("pruned 10 jobs", self.ok("prune", "--older-than", "0", "--state",
                                                 "completed,dead", "--yes"))
        self.assertEqual(json.loads(self.ok("stats", "--json")), before)
        self.assertEqual(json.loads(self.ok("stats", "--since", "1h", "--json")), before)
        self.assertEqual(self.metric("queuectl_attempts_total", queue="default"), 10)
        self.assertEqual(self.metric("queuectl_failures_total", queue="default"), 1)
        self.assertEqual(self.metric("queuectl_job_duration_seconds_count",
                                     queue="default"), 10)

    def test_stats_by_hour_and_by_day_with_a_bar(self):
        env = dict(self.env, TZ="UTC0")
        for _ in range(4):
            self.enqueue("true")
        self.drained(0)
        con = self.db()                 # and 2 attempts three hours before them
        hour = con.execute("SELECT max(start) FROM history").fetchone()[0] // 3600 * 3600
        con.execute("INSERT INTO history (queue, start, span, attempts, failures, "
                    "run_count, run_b3) VALUES ('default', ?, 3600, 2, 1, 2, 2)",
                    (hour - 3 * 3600,))
        con.commit()
        rows = json.loads(self.ok("stats", "--by", "hour", "--json", env=env))
        self.assertEqual(len(rows), 25)                 # the last 24 hours and this one
        # The attempts' hour is the last row, or the one before if an hour
        # has begun since.
        at = [queuectl.epoch(r["start"]) for r in rows].index(hour)
        self.assertGreaterEqual(at, 23)
        self.assertEqual([r["attempts"] for r in rows[at - 3:]], [2, 0, 0, 4] + [0] * (24 - at))
        self.assertEqual(rows[at - 3]["failures"], 1)
        self.assertAlmostEqual(rows[at - 3]["run_p50"], 0.075)   # in (0.05, 0.1]: interpolated
        out = self.ok("stats", "--by", "hour", env=env).splitlines()
        self.assertEqual(out[0].split(), ["HOUR", "JOBS", "FAILED", "RUN", "p50", "RUN", "p95"])
        at = [line[:16] for line in out].index(time.strftime("%Y-%m-%d %H:%M",
                                                              time.gmtime(hour)))
        self.assertTrue(out[at].endswith("█" * 20), out[at])            # the busiest hour
        self.assertTrue(out[at - 3].endswith("█" * 10), out[at - 3])    # half of it
        days = json.loads(self.ok("stats", "--by", "day", "--json", env=env))
        self.assertEqual(sum(d["attempts"] for d in days), 6)
        self.fails(2, "stats", "--by", "week")

    def test_local_hours_and_days_are_whole_in_a_zone_off_the_hour(self):
        # India is UTC+5:30, Nepal +5:45, Newfoundland -3:30: an attempt that
        # ended 40 minutes past a UTC hour is in the row of the local hour
        # (and day) it ended in, not in the one its UTC hour began in.
        ended = int(time.time() // 3600 * 3600) - 2 * 3600 + 40 * 60
        store = queuectl.Store(self.home)
        self.addCleanup(store.close)
        with store.tx():
            store.add_history("default", ended, False, 0.01, UNMEASURED)
        for tz in ("IST-5:30", "NPT-5:45", "NST+3:30", "UTC0"):
            for by in ("hour", "day"):
                with self.subTest(tz=tz, by=by):
                    rows = json.loads(self.ok("stats", "--by", by, "--json",
                                              env=dict(self.env, TZ=tz)))
                    starts = [queuectl.epoch(r["start"]) for r in rows] + [time.time()]
                    row = [i for i, r in enumerate(rows) if r["attempts"]]
                    self.assertEqual(len(row), 1, rows)
                    self.assertEqual(rows[row[0]]["attempts"], 1)
                    self.assertTrue(starts[row[0]] <= ended < starts[row[0] + 1],
                                    (rows[row[0]]["start"], ended))

    def test_local_days_and_hours_across_a_change_of_daylight_time(self):
        # Berlin: summer time began on 2026-03-29 (a 23-hour day) and ended
        # on 2026-10-25, when 02:00-03:00 came twice. Each row is a local day
        # or hour by the offset of its own instants, not of "now".
        code = ("import sys, io, json, argparse, contextlib, time; "
                "sys.path.insert(0, sys.argv[1]); import queuectl as q\n"
                "store = q.Store(sys.argv[2])\n"
                "use = {'max_rss': None, 'cpu_user': None, 'cpu_sys': None}\n"
                "with store.tx():\n"
                "    for t in json.loads(sys.argv[3]):\n"
                "        store.add_history('default', q.epoch(t), False, 0.01, use)\n"
                "out = []\n"
                "for by, now, since in json.loads(sys.argv[4]):\n"
                "    buf = io.StringIO()\n"
                "    with contextlib.redirect_stdout(buf):\n"
                "        q.stats_by(store, argparse.Namespace(by=by, json=True, queue=None),\n"
                "                   q.epoch(now), q.epoch(since))\n"
                "    out.append([[time.strftime('%m-%d %H:%M', time.localtime(q.epoch(\n"
                "        r['start']))), r['attempts']] for r in json.loads(buf.getvalue())])\n"
                "print(json.dumps(out))\n")
        ended = ["2026-03-19T23:30:00Z",           # Fri 00:30 CET
                 "2026-03-29T12:00:00Z",           # Sun 14:00 CEST
                 "2026-10-25T00:30:00Z",           # 02:30 CEST
                 "2026-10-25T01:30:00Z"]           # 02:30 CET, an hour later
        asks = [("day", "2026-04-05T10:00:00Z", "2026-03-18T12:00:00Z"),
                ("hour", "2026-10-25T02:10:00Z", "2026-10-24T22:10:00Z")]
        r = subprocess.run([PY, "-c", code, os.path.dirname(PROG), self.home,
                            json.dumps(ended), json.dumps(asks)], capture_output=True,
                           text=True, env=dict(self.env, TZ="Europe/Berlin"), timeout=30)
        self.assertEqual(r.returncode, 0, r.stderr)
        days, hours = json.loads(r.stdout)
        self.assertEqual([d for d, _ in days], [f"03-{n:02} 00:00" for n in range(18, 32)]
                         + [f"04-{n:02} 00:00" for n in range(1, 6)])
        self.assertEqual([d for d, n in days if n], ["03-20 00:00", "03-29 00:00"])
        self.assertEqual(hours, [["10-25 00:00", 0], ["10-25 01:00", 0], ["10-25 02:00", 1],
                                 ["10-25 02:00", 1], ["10-25 03:00", 0]])

    def test_old_hours_roll_up_into_days_and_totals_stay(self):
        self.enqueue("true")
        self.drained(0)
        con = self.db()
        day = int((time.time() - 120 * 86400) // 86400 * 86400)
        for h in range(5):              # hours, as earlier homes hold, and a quarter
            con.execute("INSERT INTO history (queue, start, span, attempts, run_count, "
                        "run_b0, rss_max) VALUES ('default', ?, ?, 3, 3, 3, ?)",
                        (day + h * 3600, 900 if h == 4 else 3600, 1000 * h))
        con.commit()
        total = self.metric("queuectl_attempts_total", queue="default")
        self.assertEqual(total, 16)
        self.ok("prune", "--older-than", "30d")
        rows = con.execute("SELECT start, span, attempts, run_b0, rss_max FROM history "
                           "WHERE start < ? ORDER BY start", (day + 86400,)).fetchall()
        self.assertEqual(rows, [(day, 86400, 15, 15, 4000)])
        self.assertEqual(self.metric("queuectl_attempts_total", queue="default"), total)

    def test_an_upgrade_keeps_what_12_counted(self):
        # A 1.2 home: 3 attempts still in its attempts table, 5 counted
        # before a prune took theirs.
        self.enqueue("true")
        con = self.db()
        con.execute("DELETE FROM history")
        ended = time.time() - 7200
        for n, (state, wall) in enumerate((("completed", 0.02), ("completed", 0.2),
                                           ("dead", 3.0))):
            con.execute("INSERT INTO attempts (job, attempt, queue, state, ended_at, wall, "
                        "max_rss) VALUES (?, 1, 'default', ?, ?, ?, 5000000)",
                        (f"j{n}", state, ended, wall))
        con.execute("INSERT INTO stats (queue, attempts, failures, duration_sum, "
                    "duration_count) VALUES ('default', 8, 2, 10.0, 8)")
        con.execute("INSERT INTO durations (queue, le, n) VALUES ('default', 0.025, 4)")
        for sql in ("DROP TABLE history", "DROP INDEX jobs_label",
                    "ALTER TABLE jobs DROP COLUMN label", "ALTER TABLE jobs DROP COLUMN launcher",
                    "PRAGMA user_version = 4"):
            con.execute(sql)
        con.commit()
        self.ok("status")                                    # migrates
        self.assertEqual(self.metric("queuectl_attempts_total", queue="default"), 8)
        self.assertEqual(self.metric("queuectl_failures_total", queue="default"), 2)
        self.assertEqual(self.metric("queuectl_job_duration_seconds_bucket",
                                     queue="default", le="0.025"), 4)
        recent = json.loads(self.ok("stats", "--since", "1d", "--json"))
        self.assertEqual((recent[0]["attempts"], recent[0]["failures"]), (3, 1))

class TestSeeingTheWork(QueueTest):
    """Issue 25: slow jobs marked, retries by hand visible."""

    def test_a_job_far_slower_than_its_queue_is_marked(self):
        self.ok("enqueue", "--stdin", input="true\n" * 20)
        self.drained(0)
        self.enqueue("--id", "long", self.gate_cmd())
        self.bg()
        self.wait_running("long")
        # The queue's p95 is at most 10 ms: 3 × that has long passed.
        self.wait_for(lambda: "slow" in self.ok("why", "long"), what="the slow mark")
        self.assertRegex(self.ok("why", "long"), r"slow: over 3 × its queue's p95 run "
                                                  r"time \(\d+ms\)")
        self.assertRegex(self.ok("list"), r"running \S+, slow")
        fams = parse_exposition(self.ok("metrics"))
        self.assertEqual([v for _, lb, v in fams["queuectl_slow_jobs"][1]
                          if lb["queue"] == "default"], [1])
        self.ok("config", "set", "slow_factor", "0")           # never
        self.assertNotIn("slow", self.ok("why", "long"))
        self.go()

    def test_too_little_history_marks_nothing(self):
        self.enqueue("true")
        self.drained(0)
        self.enqueue("--id", "long", self.gate_cmd())
        self.bg()
        self.wait_running("long")
        self.assertNotIn("slow", self.ok("why", "long"))
        self.go()

    def test_wait_at_a_terminal_keeps_one_progress_line(self):
        self.ok("config", "set", "max_retries", "0")
        for cmd in ("true", "true", "exit 1"):
            self.enqueue(cmd)
        self.start_worker()
        code, piped, shown = self.on_pty("wait", "--timeout", "30")
        self.assertEqual(code, 1, shown)
        self.assertRegex(shown, r"\r\x1b\[K\d/3 done · \d running · \d waiting · \d dead · ")
        self.assertIn("queuectl: error: 1 job did not complete", shown)
        self.assertNotIn("done ·", self.q("wait").err)          # not a terminal: nothing

    def test_a_batch_at_a_terminal_is_summed_up_and_ids_go_to_scripts(self):
        code, _, shown = self.on_pty("enqueue", "--stdin", "--label", "b-1",
                                     streams=("stdout",), input="true\ntrue\ntrue\n")
        self.assertEqual(code, 0, shown)
        ids = [j["id"] for j in json.loads(self.ok("list", "--json"))]
        self.assertEqual(shown, f"enqueued 3 jobs: {ids[0]} … {ids[2]}, label b-1 "
                                "(queuectl wait --label b-1)\n")
        out = self.ok("enqueue", "--stdin", input="true\ntrue\n")
        self.assertEqual(len(out.split()), 2)                 # a pipe: the ids

    def test_cancel_and_prune_show_progress_at_a_terminal_and_a_count(self):
        self.ok("enqueue", "--stdin", input="true\n" * 1200)
        code, piped, shown = self.on_pty("cancel", "--all")
        self.assertEqual((code, piped), (0, "cancelled 1200 jobs\n"), shown)
        self.assertIn("cancelling: 0/1200 jobs", shown)
        self.assertTrue(shown.endswith("\r\x1b[K"), repr(shown[-40:]))
        code, piped, shown = self.on_pty("prune", "--older-than", "0", "--yes")
        self.assertEqual((code, piped), (0, "pruned 1200 jobs\n"), shown)
        self.assertIn("deleting: 0/1200 jobs", shown)

    def test_a_draining_worker_at_a_terminal_shows_the_progress_line(self):
        self.enqueue("sleep 1.5")
        self.enqueue("true")
        code, piped, shown = self.on_pty("worker", "start", "--drain")
        self.assertEqual(code, 0, piped + shown)
        self.assertIn("/2 done · ", shown)
        self.assertIn("completed (attempt 1", piped)              # its lines: stdout
        self.assertTrue(shown.endswith("\r\x1b[K"), repr(shown[-60:]))

    def test_one_clock_local_for_people_and_utc_for_machines(self):
        tz = "EST5EDT,M3.2.0,M11.1.0"                # New York's rule, no tzdata needed
        env = dict(self.env, TZ=tz)
        zone = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d E[SD]T"
        self.enqueue("--id", "now", "echo hi", env=env)
        self.enqueue("--id", "later", "--delay", "2h", "true", env=env)
        r = self.q("worker", "start", "--drain", env=env)
        self.assertRegex(r.out.splitlines()[0], rf"^{zone} worker \S+ started")
        self.assertRegex(self.log("now"), rf"\[queuectl\] attempt 1 started {zone} on worker")
        self.assertRegex(self.ok("status", env=env), rf"next scheduled: later in \S+ \({zone}\)")
        self.assertRegex(self.ok("show", "later", env=env), rf"(?m)^run_at +{zone} \(in ")
        self.assertRegex(self.job("later")["run_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        utc = dict(env, QUEUECTL_UTC="1")
        self.assertRegex(self.ok("show", "later", env=utc),
                         r"(?m)^run_at +\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(in ")
        # status's oldest pending is the job the metric times: due, runnable.
        self.enqueue("--id", "waits", "true")
        self.assertIn("oldest pending: waits, could run since", self.ok("status"))
        fams = parse_exposition(self.ok("metrics"))
        age = fams["queuectl_oldest_pending_seconds"][1][0][2]
        status = json.loads(self.ok("status", "--json"))["oldest_pending"]
        self.assertEqual(status["id"], "waits")
        self.assertLess(abs(status["age_seconds"] - age), 5)

    def test_a_retry_by_hand_shows_in_the_log_and_in_show(self):
        self.ok("config", "set", "max_backoff", "0")
        self.enqueue("--id", "flaky", "--max-retries", "1", "echo try; exit 3")
        self.drained(1)
        self.assertEqual(self.ok("dlq", "retry", "flaky"), "flaky\n")
        self.drained(1)
        log = self.log("flaky")
        self.assertRegex(log, r"attempt 2 ended.*now dead\n\[queuectl\] retried by hand "
                              r"\(dlq retry\) at [^;]+; attempts start again at 1\n"
                              r"\[queuectl\] attempt 1 started")
        attempts = self.ok("show", "flaky").split("attempts:\n")[1].splitlines()
        self.assertEqual([a.split()[0] for a in attempts], ["1", "2", "(retried", "1", "2"])

class TestLimits(QueueTest):
    def test_a_job_that_allocates_past_its_memory_limit_fails_naming_it(self):
        self.enqueue("--id", "m", "--mem", "100M", "--max-retries", "0", hog(300))
        self.enqueue("--id", "ok", "--mem", "200M", hog(50))
        self.drain_within(60)
        job = self.job("m")
        self.assertEqual(job["state"], "dead")
        self.assertIn("(it may have hit its memory limit 100M)", job["last_error"])
        self.assertEqual(job["mem"], 100 * 2**20)
        self.assertEqual(self.state("ok"), "completed")

    def test_a_busy_loop_past_its_cpu_time_is_killed(self):
        self.enqueue("--id", "spin", "--cpu-time", "1", "--max-retries", "0",
                     "while :; do :; done")
        self.drain_within(60)
        job = self.job("spin")
        self.assertEqual((job["state"], job["last_error"]),
                         ("dead", "killed: CPU time limit 1s"))
        self.assertLess(job["usage"]["wall"], 10)
        # Its own exit 152 (128 + SIGXCPU) under a CPU limit is just an exit.
        self.enqueue("--id", "own", "--cpu-time", "5", "--max-retries", "0", "exit 152")
        self.drain_within(60)
        self.assertEqual(self.job("own")["last_error"], "exit code 152")

    def test_nice_and_limits_apply_to_the_job_and_its_children(self):
        self.ok("config", "set", "queue.slow.nice", "5")
        self.enqueue("--nice", "10", "--nofile", "64", "--mem", "512M", "--cpu-time", "1h",
                     "nice > limits.txt; sh -c 'ulimit -n; ulimit -v; ulimit -t' >> limits.txt")
        self.enqueue("--queue", "slow", "nice > slow.txt")
        self.enqueue("nice > plain.txt")
        self.drain_within(60)
        self.assertEqual(self.lines("limits.txt"), ["10", "64", "524288", "3600"])
        self.assertEqual((self.lines("slow.txt"), self.lines("plain.txt")), (["5"], ["0"]))
        for bad in (("--mem", "12Q"), ("--nice", "30"), ("--cpu-time", "-1"),
                    ("--nofile", "x")):
            with self.subTest(bad=bad):
                self.assertIn(bad[0], self.fails(2, "enqueue", *bad, "true").err)

class TestSchedules(QueueTest):
    def test_cron_expressions_and_their_next_times(self):
        # From crontab(5) (cronie), in Europe/Berlin: DST began 2027-03-28
        # 02:00 (to 03:00) and ends 2027-10-31 03:00 (to 02:00).
        table = [
            ("0 3 * * *", "2026-12-06T10:00", ["2026-12-07T02:00Z", "2026-12-08T02:00Z"]),
            ("*/15 * * * *", "2026-12-06T10:07", ["2026-12-06T09:15Z", "2026-12-06T09:30Z"]),
            # 04:30 on the 1st and 15th, and every Friday (both fields restricted)
            ("30 4 1,15 * 5", "2026-12-06T00:00", ["2026-12-11T03:30Z", "2026-12-15T03:30Z",
                                                   "2026-12-18T03:30Z"]),
            ("0 22 * * 1-5", "2026-12-05T23:00", ["2026-12-07T21:00Z"]),
            ("23 0-23/2 * * *", "2026-12-06T10:30", ["2026-12-06T11:23Z", "2026-12-06T13:23Z"]),
            ("5 4 * * sun", "2026-12-06T04:06", ["2026-12-13T03:05Z"]),
            ("0 0 29 feb *", "2026-01-01T00:00", ["2028-02-28T23:00Z"]),
            ("@monthly", "2026-12-06T10:00", ["2026-12-31T23:00Z"]),
            ("0 12 * * 7", "2026-12-06T12:00", ["2026-12-13T11:00Z"]),
            # a step in a day field still picks days (it only makes the rule AND)
            ("0 12 */2 * *", "2026-12-06T13:00", ["2026-12-07T11:00Z", "2026-12-09T11:00Z"]),
            ("0 0 * * */2", "2026-12-06T10:00", ["2026-12-07T23:00Z", "2026-12-09T23:00Z"]),
            ("0 0 */10 * 1", "2026-12-06T10:00", ["2026-12-20T23:00Z"]),   # the 21st, a Monday
            # a time the clock skips runs when it jumps; one it repeats, once
            ("30 2 * * *", "2027-03-27T12:00", ["2027-03-28T01:00Z", "2027-03-29T00:30Z"]),
            ("30 2 * * *", "2027-10-30T12:00", ["2027-10-31T00:30Z", "2027-11-01T01:30Z"]),
            ("*/30 2 * * *", "2027-10-31T02:00", ["2027-10-31T00:30Z", "2027-11-01T01:00Z"]),
        ]
        code = ("import sys, json, datetime as dt; sys.path.insert(0, sys.argv[1]); "
                "import queuectl as q\n"
                "out = []\n"
                "for expr, start, n in json.loads(sys.argv[2]):\n"
                "    it = q.Cron(expr).slots_after(dt.datetime.fromisoformat(start))\n"
                "    out.append([dt.datetime.fromtimestamp(q.local_instant(next(it)), "
                "dt.timezone.utc).strftime('%Y-%m-%dT%H:%MZ') for _ in range(n)])\n"
                "print(json.dumps(out))\n")
        r = subprocess.run([PY, "-c", code, os.path.dirname(PROG), json.dumps(
            [(e, s, len(want)) for e, s, want in table])], capture_output=True, text=True,
            env=dict(self.env, TZ="Europe/Berlin"), timeout=30)
        self.assertEqual(r.returncode, 0, r.stderr)
        for (expr, start, want), got in zip(table, json.loads(r.stdout)):
            self.assertEqual(got, want, f"{expr} after {start}")
        for bad in ("* * *", "60 * * * *", "@reboot", "1-0 * * * *", "*/0 * * * *",
                    "0 0 31 2 *", "*/1_5 * * * *", "0 0 * * \u0663"):
            with self.subTest(bad=bad):
                self.assertIn("schedule", self.fails(2, "schedule", "add", "x", bad,
                                                     "true").err)

    def move_back(self, name, minutes, **cols):
        """As if the schedule's last handled slot was minutes ago (downtime)."""
        import datetime as dt
        label = (dt.datetime.now() - dt.timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M")
        con = self.db()
        con.execute("UPDATE schedules SET last_slot = ?, next_at = 0" + "".join(
            f", {k} = ?" for k in cols) + " WHERE name = ?",
            (label, *cols.values(), name))
        con.commit()

    def doctor_finds(self, sql, problem):
        """After sql on the database, doctor exits 1 naming problem."""
        con = self.db()
        con.execute(sql)
        con.commit()
        r = self.q("doctor")
        self.assertEqual(r.code, 1, r)
        self.assertIn(problem, r.out)

    def schedule(self, name):
        return next(s for s in json.loads(self.ok("schedule", "list", "--json"))
                    if s["name"] == name)

    def test_how_schedule_add_reads_its_words_and_what_it_refuses(self):
        self.ok("schedule", "add", "a", "@daily", "--", "--queue", "q5", "echo", "a")
        self.ok("schedule", "add", "b", "@daily", "echo hi", "--queue", "q1")
        self.ok("schedule", "add", "--nice", "3", "c", "@daily", "echo", "c")
        self.ok("schedule", "add", "e", "--home", self.home, "@daily", "echo", "e")
        got = {s["name"]: s["command"] for s in json.loads(self.ok("schedule", "list",
                                                                    "--json"))}
        self.assertEqual(got, {"a": "--queue q5 echo a", "b": "echo hi", "c": "echo c",
                               "e": "echo e"})
        self.assertEqual(self.job(self.ok("schedule", "run", "b").strip())["queue"], "q1")
        self.assertEqual(self.job(self.ok("schedule", "run", "c").strip())["nice"], 3)
        self.assertIn("cannot have depends_on", self.fails(
            2, "schedule", "add", "d", "@daily", '{"command": "x", "depends_on": ["a"]}').err)
        self.assertIn("use 1-100 of", self.fails(2, "schedule", "add", "x" * 101, "@daily",
                                                 "true").err)
        self.assertIn("16 or more", self.fails(2, "enqueue", "--nofile", "3", "true").err)
        self.assertIn("not both", self.fails(2, "schedule", "add", "m", "@daily", "echo hi",
                                             "--queue", "q", "second").err)

    def test_a_schedule_that_cannot_fire_holds_up_no_other(self):
        self.ok("schedule", "add", "good", "* * * * *", "echo", "good")
        self.ok("schedule", "add", "bad", "* * * * *", "echo", "bad")
        con = self.db()                      # as if a broken spec had got in
        con.execute("""UPDATE schedules SET spec = json_set(spec, '$.depends_on',
                       json('["gone"]')) WHERE name = 'bad'""")
        con.commit()
        self.move_back("good", 1)
        self.move_back("bad", 1)
        minute = time.time() // 60
        self.drain_within(30)
        turned = time.time() // 60 != minute        # then the next slot may fire too
        fired = [j["schedule"] for j in json.loads(self.ok("list", "--json"))]
        self.assertIn(fired, (["good"], ["good"] * 2) if turned else (["good"],))
        self.assertIn("cannot fire: unknown job 'gone'", self.schedule("bad")["last_skip"])
        self.doctor_finds("UPDATE schedules SET cron = 'bogus cron' WHERE name = 'bad'",
                          "problem: schedule bad cannot fire: invalid schedule 'bogus cron'")
        self.assertIn("bogus cron", self.ok("schedule", "list"))

    def test_a_slot_whose_id_is_taken_is_skipped_saying_so(self):
        import datetime as dt
        # --catch-up 5: the taken slot is due even if the minute turns meanwhile
        self.ok("schedule", "add", "c", "* * * * *", "--catch-up", "5", "echo", "c")
        self.move_back("c", 1)                  # then this minute's slot is due
        label = dt.datetime.now().strftime("%Y-%m-%dT%H:%M")
        self.enqueue("--id", f"c@{label}", "--delay", "1h", "echo", "manual")
        self.drain_within(30)
        sch = self.schedule("c")
        self.assertIn(f"a job with id c@{label} exists already", sch["last_skip"])
        self.assertEqual(self.job(f"c@{label}")["command"], "echo manual")

    def test_a_schedule_keeps_its_environment_when_jobs_are_removed(self):
        env = dict(self.env, FOO="bar")
        self.ok("schedule", "add", "envs", "0 3 * * *", "--", "echo $FOO > foo.txt", env=env)
        self.enqueue("--id", "other", "true", env=env)
        self.ok("remove", "other")
        self.ok("schedule", "run", "envs")
        self.drain_within(30)
        self.assertEqual(self.lines("foo.txt"), ["bar"])

    def test_the_dead_mans_switch_counts_slots_not_a_period(self):
        import datetime as dt
        now = dt.datetime(2026, 12, 6, 12, 0).timestamp()          # a Sunday
        friday = dt.datetime(2026, 12, 4, 9, 0, 3).timestamp()
        sch = {"name": "w", "cron": "0 9 * * 1-5", "paused": 0, "last_success": friday,
               "created_at": "2026-01-01T00:00:00Z", "last_job": "w@2026-12-04T09:00"}
        self.assertIsNone(queuectl.schedule_overdue(sch, now))
        tuesday = dt.datetime(2026, 12, 8, 9, 30).timestamp()        # Mon and Tue passed
        self.assertIn("its last two slots passed without a success",
                      queuectl.schedule_overdue(sch, tuesday))

    def test_a_worker_frozen_while_firing_lets_another_fire_each_slot_once(self):
        self.ok("schedule", "add", "tick", "* * * * *", "--catch-up", "5", "--",
                f"echo $QUEUECTL_JOB_ID >> {self.path('ticks')}")
        self.move_back("tick", 2)
        a = self.bg(fault="fire:stop")        # decided to fire, then frozen
        self.resume_in_cleanup(a)
        self.wait_stopped(a)
        self.age(a)
        self.assertEqual(self.drain_within(30).code, 0)    # B fires and runs them
        fired = self.lines("ticks")
        self.assertIn(len(fired), (2, 3))
        os.kill(a.pid, signal.SIGCONT)       # A wakes and fires again: nothing is due
        self.enqueue("--id", "after", "true")
        self.wait_state("after", "completed")
        self.assertEqual(self.lines("ticks"), fired)
        self.assertEqual(self.schedule("tick")["skips"], 0)

    def test_a_database_error_while_firing_is_retried(self):
        self.ok("schedule", "add", "tick", "* * * * *", "--",
                f"echo $QUEUECTL_JOB_ID >> {self.path('ticks')}")
        self.move_back("tick", 1)
        a = self.bg(fault="fire:fail")
        self.wait_for(lambda: len(self.lines("ticks")) == 1, 20, "the slot after a retry")
        self.wait_out(a, "cannot fire schedules yet, will retry: database error",
                      "the failed try")
        # 1 if a minute began while the failed try waited (5 s) to retry:
        # two slots were then due, and --catch-up 1 fires the later one.
        self.assertLessEqual(self.schedule("tick")["skips"], 1)

    def test_two_workers_fire_each_slot_once(self):
        self.ok("schedule", "add", "tick", "* * * * *", "--catch-up", "12", "--",
                f"echo $QUEUECTL_JOB_ID >> {self.path('ticks')}")
        self.move_back("tick", 10)
        self.drain_in_processes(2, 2)
        ticks = self.lines("ticks")
        self.assertIn(len(ticks), (10, 11))        # 11 if a minute began meanwhile
        self.assertEqual(len(set(ticks)), len(ticks))
        self.assertTrue(all(t.startswith("tick@") for t in ticks), ticks)
        self.assertEqual(self.schedule("tick")["skips"], 0)

    def test_catch_up_enqueues_only_the_latest_missed_slots(self):
        self.ok("schedule", "add", "sync", "* * * * *", "--catch-up", "3", "echo", "hi")
        self.move_back("sync", 30)
        minute = time.time() // 60
        self.assertEqual(self.drain_within(30).code, 0)
        turned = time.time() // 60 != minute        # then the next slot may fire too
        jobs = json.loads(self.ok("list", "--json"))
        self.assertIn(len(jobs), (3, 4) if turned else (3,))
        sch = self.schedule("sync")
        self.assertIn(sch["skips"], (27, 28))
        self.assertIn("slots missed while no worker ran", sch["last_skip"])
        self.assertEqual((sch["last_job"], sch["last_state"]), (jobs[-1]["id"], "completed"))
        self.assertIsNotNone(sch["last_success"])

    def test_overlap_skip_while_the_last_run_is_going(self):
        self.ok("schedule", "add", "slow", "* * * * *", "--", self.gate_cmd())
        self.move_back("slow", 1)
        self.bg()
        self.wait_for(lambda: self.lines("runs") == ["start"], 20, "the first run")
        self.move_back("slow", 1)
        self.enqueue("true")                 # wakes the worker, which fires
        self.wait_for(lambda: self.schedule("slow")["skips"] == 1, 20, "a skip")
        sch = self.schedule("slow")
        self.assertRegex(sch["last_skip"], r"\(slow@\S+ still pending or running\)")
        self.assertEqual(len(json.loads(self.ok("list", "--queue", "default", "--json"))), 2)
        self.go()
        self.wait_for(lambda: self.schedule("slow")["last_state"] == "completed", 20,
                      "the run to complete")

    def test_list_pause_resume_run_rm_and_the_dead_mans_switch(self):
        out = self.ok("schedule", "add", "nightly", "0 3 * * *", "--mem", "2G", "--nice",
                      "10", "--key", "db-main", "--on-dead", "echo dead", "--",
                      "./backup.sh", "--full")
        self.assertRegex(out, r"^schedule nightly: next run .*03:00 \(in .*\)\n$")
        self.fails(1, "schedule", "add", "nightly", "@daily", "true")
        job_id = self.ok("schedule", "run", "nightly").strip()
        self.assertTrue(job_id.startswith("nightly@run-"), job_id)
        job = self.job(job_id)
        self.assertEqual((job["command"], job["keys"], job["mem"], job["nice"],
                          job["hooks"], job["schedule"]),
                         ("./backup.sh --full", ["db-main", "schedule:nightly"], 2 * 2**30, 10,
                          {"on_dead": "echo dead"}, "nightly"))
        self.ok("schedule", "pause", "nightly")
        self.move_back("nightly", 2 * 24 * 60)
        self.assertIn("paused", self.ok("schedule", "list"))
        self.drain_within(30, "--queue", "nothing")
        self.assertEqual(len(json.loads(self.ok("list", "--json"))), 1)   # run's only
        self.assertRegex(self.ok("schedule", "resume", "nightly"),
                         r"^schedule nightly resumed; next run ")
        # The dead man's switch: no success within two periods.
        self.doctor_finds("UPDATE schedules SET created_at = '2026-01-01T00:00:00Z'",
                          "schedule nightly (0 3 * * *) has not succeeded since it was added")
        fams = parse_exposition(self.ok("metrics"))
        self.assertEqual(fams["queuectl_schedule_last_success_timestamp_seconds"][1],
                         [("queuectl_schedule_last_success_timestamp_seconds",
                           {"schedule": "nightly"}, 0)])
        self.assertEqual(self.ok("schedule", "rm", "nightly"),
                         "schedule nightly removed (its jobs stay)\n")
        self.assertEqual(self.ok("schedule", "list"), "no schedules\n")
        self.job(job_id)
        self.fails(1, "schedule", "run", "nightly")


# Benchmark ###################################################################

class TestBenchSmoke(unittest.TestCase):
    def test_quick_bench_runs_and_prints_json(self):
        bench = os.path.join(HERE, "bench_queuectl.py")
        r = subprocess.run([PY, bench, "--quick", "--json"], capture_output=True,
                           text=True, timeout=240)
        self.assertEqual(r.returncode, 0, r.stderr[-2000:])
        report = json.loads(r.stdout)
        text = json.dumps(report)
        for key in ("throughput", "enqueue", "bulk", "pickup", "status", "claim",
                    "idle", "rss"):
            self.assertIn(key, text)
        # What group commit could save, measured: two CPU figures per job.
        batched = report["figures"]["record_batched"]
        self.assertEqual(batched["baseline_is"], "1 per transaction")
        self.assertGreater(batched["value"], 0)
        self.assertGreater(batched["baseline"], 0)
        self.assertTrue(any(n.startswith("group commit: recording 8 ends per transaction "
                                         "would save") for n in report["notes"]), report["notes"])

    def test_profile_splits_a_jobs_cpu_by_step(self):
        # Its steps name queuectl's functions: a rename must not break it.
        bench = os.path.join(HERE, "bench_queuectl.py")
        r = subprocess.run([PY, bench, "--profile", "60"], capture_output=True,
                           text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr[-2000:])
        self.assertRegex(r.stdout, r"CPU per job, not under the profiler \(\d+ jobs/s\): "
                                   r"the job threads \d+ us, the jobs' shells \d+ us")
        sys.path.insert(0, HERE)
        try:
            import bench_queuectl
        finally:
            sys.path.remove(HERE)
        for label, _where, _name in bench_queuectl.STEPS:
            self.assertRegex(r.stdout, "\n  " + re.escape(label) + r" +\d+\.\d +\d+\.\d\n")


# Runner ######################################################################

def _flatten(suite):
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            yield from _flatten(item)
        else:
            yield item

# The slowest tests (seconds, measured), started first so that the shards
# end together; the rest follow in file order.
SLOW_TESTS = {"test_quick_bench_runs_and_prints_json": 18,
              "test_a_child_that_outlives_its_shell_holds_off_retry_and_the_key": 14,
              "test_the_readmes_examples_1_of_3": 14, "test_in_a_real_browser": 10}

class ClaimedTests(unittest.TestSuite):
    """The tests this process claims, one at a time, from a counter that
    every shard shares (a file under flock): a shard that drew quick tests
    takes more of them, so none waits on another."""

    def __init__(self, tests, counter):
        super().__init__()
        self.all, self.counter = tests, counter
        self._cleanup = False

    def __iter__(self):
        import fcntl
        while True:
            with open(self.counter, "r+") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                n = int(f.read() or 0)
                f.seek(0)
                f.write(str(n + 1))
            if n >= len(self.all):
                return
            yield self.all[n]

def all_tests():
    suite = unittest.defaultTestLoader.loadTestsFromModule(sys.modules[__name__])
    tests = list(_flatten(suite))
    return sorted(tests, key=lambda t: -SLOW_TESTS.get(t._testMethodName, 0))

def run_shard(shard, shards, verbosity, counter=None):
    """Run this shard's tests (every shards-th from the shard-th on, or
    those claimed from counter); (passed, failed, skipped)."""
    tests = all_tests()
    suite = ClaimedTests(tests, counter) if counter else \
        unittest.TestSuite(tests[shard::shards])
    result = unittest.TextTestRunner(verbosity=verbosity).run(suite)
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    skipped = len(result.skipped)
    return result.testsRun - failed - skipped, failed, skipped

def run_all():
    """Run every test; close with 'N passed, N failed, N skipped'. Most tests
    wait on workers rather than use the CPU, so the tests are shared out over
    QUEUECTL_TEST_JOBS processes (default 4: on 2 cores, 88 s against 114 s
    with 3; 1 runs them all in this one);
    each one's output is printed whole once it is done."""
    verbosity = 2 if "-v" in sys.argv else 1
    shard = os.environ.get("QUEUECTL_TEST_SHARD")
    if shard:
        n, k = map(int, shard.split("/"))
        counts = run_shard(n, k, verbosity, os.environ.get("QUEUECTL_TEST_COUNTER"))
        print("shard: %d passed, %d failed, %d skipped" % counts)
        return 0
    jobs = int(os.environ.get("QUEUECTL_TEST_JOBS", "4"))
    if jobs <= 1:
        passed, failed, skipped = run_shard(0, 1, verbosity)
    else:
        procs = []
        fd, counter = tempfile.mkstemp(prefix="queuectl-tests-")
        os.close(fd)
        for n in range(jobs):
            out = tempfile.TemporaryFile()
            env = dict(os.environ, QUEUECTL_TEST_SHARD=f"{n}/{jobs}",
                       QUEUECTL_TEST_COUNTER=counter)
            procs.append((subprocess.Popen([PY, os.path.abspath(__file__), *sys.argv[1:]],
                                           env=env, stdout=out, stderr=subprocess.STDOUT),
                          out))
        passed = failed = skipped = 0
        for n, (p, out) in enumerate(procs):
            code = p.wait()
            out.seek(0)
            text = out.read().decode("utf-8", "replace")
            out.close()
            sys.stdout.write(f"--- test shard {n + 1} of {jobs} ---\n{text}")
            last = [ln for ln in text.splitlines() if ln.startswith("shard: ")]
            if code != 0 or not last:
                failed += 1                  # a shard that crashed fails the run
                continue
            p_, f_, s_ = (int(w) for w in last[-1].split()[1::2])
            passed, failed, skipped = passed + p_, failed + f_, skipped + s_
        os.unlink(counter)
        total = len(all_tests())
        if passed + failed + skipped != total:
            print(f"unittest: {total - passed - failed - skipped} of {total} tests did not run")
            failed += 1
    print(f"unittest: {passed} passed, {failed} failed, {skipped} skipped")
    return 0 if failed == 0 and passed + skipped > 0 else 1

if __name__ == "__main__":
    sys.exit(run_all())
