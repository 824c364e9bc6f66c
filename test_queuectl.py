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

    def lines(self, name):
        """Words of a file a job wrote in self.work ([] if there is none)."""
        try:
            with open(self.path(name)) as f:
                return f.read().split()
        except FileNotFoundError:
            return []


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


# Tests #######################################################################

TIME_RE = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"
SPEC_JOB_FIELDS = ("id", "command", "state", "queue", "priority", "attempts",
                   "max_retries", "timeout", "run_at", "depends_on", "cwd", "env",
                   "created_at", "updated_at", "started_at", "finished_at",
                   "exit_code", "last_error", "worker")
MARKER_JOB = "test -f marker || { touch marker; exit 1; }"
RECORD = 'echo "$QUEUECTL_JOB_ID" >> order.txt'


class RecordingTest(QueueTest):
    """Helpers for jobs that record what they did in files of self.work."""

    def order(self):
        return self.lines("order.txt")

    def error_line(self, r):
        return r.err.strip().splitlines()[-1]

    def drain_within(self, seconds, *args):
        """worker start --drain that must exit within seconds; the Result."""
        try:
            return self.drain(*args, timeout=seconds)
        except subprocess.TimeoutExpired:
            self.fail(f"worker start --drain {' '.join(args)} still running "
                      f"after {seconds}s")


class TestPureHelpers(unittest.TestCase):
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


class TestEnqueue(RecordingTest):
    def test_plain_command_prints_only_the_id(self):
        r = self.q("enqueue", "echo hi")
        self.assertEqual(r.code, 0, r)
        self.assertEqual(r.err, "")
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
                         ("echo hi", 2, 5, "q1", 7, {"K": "v"}))

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
                self.assertIn("invalid job id", r.err)
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
        self.assertEqual(self.drain().code, 0)
        with open(os.path.join(sub, "out.txt")) as f:
            self.assertEqual(os.path.realpath(f.read().strip()), os.path.realpath(sub))

    def test_cwd_option(self):
        other = self.path("other")
        os.mkdir(other)
        self.enqueue("--id", "j", "--cwd", other, "pwd > out.txt")
        self.assertEqual(self.drain().code, 0)
        self.assertTrue(os.path.exists(os.path.join(other, "out.txt")))
        self.assertFalse(os.path.exists(self.path("out.txt")))

    def test_env_and_job_variables_reach_the_job(self):
        self.enqueue("--id", "envjob", "--env", "FOO=bar baz", "--env", "X=1=2",
                     'printf "%s|%s|%s|%s\\n" "$FOO" "$X" "$QUEUECTL_JOB_ID" '
                     '"$QUEUECTL_ATTEMPT" > env.txt')
        self.assertEqual(self.job("envjob")["env"], {"FOO": "bar baz", "X": "1=2"})
        self.assertEqual(self.drain().code, 0)
        with open(self.path("env.txt")) as f:
            self.assertEqual(f.read(), "bar baz|1=2|envjob|1\n")

    def test_attempt_number_counts_up(self):
        self.set_fast_retries()
        self.enqueue("--id", "j", "--max-retries", "2",
                     'echo "$QUEUECTL_ATTEMPT" >> attempts.txt; exit 1')
        self.assertEqual(self.drain().code, 1)
        self.assertEqual(self.lines("attempts.txt"), ["1", "2", "3"])


class TestWorkerBasics(RecordingTest):
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
        self.assertRegex(log.splitlines()[0], r"attempt 1 started " + TIME_RE)
        with open(os.path.join(self.home, "logs", "j.log")) as f:
            self.assertEqual(f.read(), log)

    def test_log_of_a_retried_job_has_every_attempt(self):
        self.set_fast_retries()
        self.enqueue("--id", "j", "--max-retries", "1", "echo try $QUEUECTL_ATTEMPT; exit 4")
        self.assertEqual(self.drain().code, 1)
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
        self.assertEqual(self.drain().code, 0)

    def test_drain_with_nothing_to_do(self):
        r = self.drain()
        self.assertEqual(r.code, 0, r)

    def test_state_survives_a_worker_restart(self):
        self.enqueue("--id", "j", "echo run >> runs.txt")
        self.assertEqual(self.drain().code, 0)
        self.assertEqual(self.drain().code, 0)
        self.assertEqual(self.lines("runs.txt"), ["run"])
        job = self.job("j")
        self.assertEqual((job["state"], job["attempts"], job["exit_code"]),
                         ("completed", 1, 0))

    def test_home_and_files_are_private(self):
        old = os.umask(0)
        try:
            self.enqueue("--id", "j", "echo hi")
            self.set_fast_retries()
            self.assertEqual(self.drain().code, 0)
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


class TestRetriesAndDLQ(RecordingTest):
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
        self.assertEqual(self.drain().code, 1)
        self.assertEqual(len(self.lines("runs.txt")), 2)
        self.assertEqual(self.state("j"), "dead")

    def test_default_max_retries_is_three(self):
        self.set_fast_retries()
        self.enqueue("--id", "j", "echo run >> runs.txt; exit 1")
        self.assertEqual(self.drain().code, 1)
        self.assertEqual(len(self.lines("runs.txt")), 4)

    def test_max_retries_zero_is_dead_after_the_first_failure(self):
        self.enqueue("--id", "j", "--max-retries", "0", "echo run >> runs.txt; exit 1")
        self.assertEqual(self.drain().code, 1)
        self.assertEqual(self.lines("runs.txt"), ["run"])
        job = self.job("j")
        self.assertEqual((job["state"], job["attempts"]), ("dead", 1))

    def test_success_on_a_retry_completes(self):
        self.set_fast_retries()
        self.enqueue("--id", "j", "--max-retries", "2", MARKER_JOB)
        self.assertEqual(self.drain().code, 0)
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
        self.assertEqual(self.drain().code, 1)
        self.assertEqual(self.state("j"), "dead")
        self.assertEqual(self.ok("dlq", "retry", "j"), "j\n")
        job = self.job("j")
        self.assertEqual((job["state"], job["attempts"], job["exit_code"],
                          job["last_error"], job["finished_at"]),
                         ("pending", 0, None, None, None))
        self.assertEqual(json.loads(self.ok("dlq", "list", "--json")), [])
        self.assertEqual(self.drain().code, 0)
        job = self.job("j")
        self.assertEqual((job["state"], job["attempts"]), ("completed", 1))

    def test_dlq_retry_all(self):
        for i in ("a", "b"):
            self.enqueue("--id", i, "--max-retries", "0", "exit 1")
        self.enqueue("--id", "ok", "true")
        self.assertEqual(self.drain().code, 1)
        self.assertEqual(sorted(self.ok("dlq", "retry", "--all").split()), ["a", "b"])
        self.assertEqual(self.state("a"), "pending")
        self.assertEqual(self.state("b"), "pending")
        self.assertEqual(self.state("ok"), "completed")

    def test_dlq_retry_of_a_job_that_is_not_dead(self):
        self.enqueue("--id", "j", "true")
        self.assertEqual(self.drain().code, 0)
        before = self.db_dump()
        r = self.fails(1, "dlq", "retry", "j")
        self.assertIn("completed", self.error_line(r))
        self.fails(1, "dlq", "retry", "nope")
        self.assertEqual(self.db_dump(), before)

    def test_dlq_purge_one_removes_job_and_log(self):
        self.enqueue("--id", "a", "--max-retries", "0", "echo bye; exit 1")
        self.enqueue("--id", "b", "--max-retries", "0", "exit 1")
        self.assertEqual(self.drain().code, 1)
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
        self.assertEqual(self.drain().code, 1)
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
        self.assertEqual(self.drain().code, 0)
        self.assertEqual(self.ok("retry", "j"), "j\n")
        job = self.job("j")
        self.assertEqual((job["state"], job["attempts"]), ("pending", 0))
        self.assertEqual(self.drain().code, 0)
        self.assertEqual(self.lines("runs.txt"), ["run", "run"])
        job = self.job("j")
        self.assertEqual((job["state"], job["attempts"]), ("completed", 1))

    def test_retry_of_a_dead_job(self):
        self.enqueue("--id", "j", "--max-retries", "0", MARKER_JOB)
        self.assertEqual(self.drain().code, 1)
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


class TestReadCommands(RecordingTest):
    def test_show_json_has_every_field(self):
        self.enqueue("--id", "dep", "true")
        self.assertEqual(self.drain().code, 0)
        self.enqueue("--id", "j", "--priority", "3", "--max-retries", "1", "--timeout", "5",
                     "--queue", "q1", "--env", "A=b", "--after", "dep", "echo hi")
        pending = self.job("j")
        for k in SPEC_JOB_FIELDS:
            self.assertIn(k, pending)
        self.assertEqual((pending["state"], pending["started_at"], pending["finished_at"],
                          pending["exit_code"], pending["worker"], pending["attempts"]),
                         ("pending", None, None, None, None, 0))
        self.assertEqual(self.drain().code, 0)
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
        self.assertEqual(job["env"], {"A": "b"})
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
        self.assertEqual(self.drain().code, 1)
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
        self.assertEqual(info["oldest_pending"]["id"], "p")
        self.assertEqual(info["workers"]["live"], 0)
        self.assertEqual(info["paused"], [])

    def test_list_filters_limit_and_json(self):
        for i in range(4):
            self.enqueue("--id", f"j{i}", "true")
        self.enqueue("--id", "x", "--queue", "other", "--max-retries", "0", "exit 1")
        self.assertEqual(self.drain().code, 1)
        self.enqueue("--id", "late", "true")
        out = self.ok("list")
        self.assertEqual(out.splitlines()[0].split()[:2], ["ID", "STATE"])
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
        self.assertIn("4 more", out)
        self.assertEqual(len(json.loads(self.ok("list", "--limit", "2", "--json"))), 2)
        self.assertIn("no jobs", self.ok("list", "--state", "cancelled"))

    def test_logs_tail(self):
        self.enqueue("--id", "j", "for i in 1 2 3 4 5; do echo line$i; done")
        self.assertEqual(self.drain().code, 0)
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
        self.assertEqual((r.code, r.out, r.err), (0, "", ""))

    def test_json_outputs_are_only_json(self):
        self.enqueue("--id", "j", "--max-retries", "0", "exit 1")
        self.assertEqual(self.drain().code, 1)
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
        self.assertEqual(os.stat(self.home).st_mode & 0o777, 0o700)


class TestConfig(RecordingTest):
    def test_defaults(self):
        out = self.ok("config", "list")
        for line in ("max_retries = 3", "backoff_base = 2", "max_backoff = 3600",
                     "job_timeout = 0", "kill_grace = 10"):
            self.assertIn(line, out)
        self.assertEqual(json.loads(self.ok("config", "list", "--json")),
                         {"max_retries": 3, "backoff_base": 2, "max_backoff": 3600,
                          "job_timeout": 0, "kill_grace": 10})
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


class TestBadInput(RecordingTest):
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


class TestScheduling(RecordingTest):
    def test_priority_then_fifo(self):
        for job_id, pri in (("a", 0), ("b", 5), ("c", 0), ("d", 5), ("e", 1), ("f", -1)):
            self.enqueue("--id", job_id, "--priority", str(pri), RECORD)
        self.assertEqual(self.drain("--count", "1").code, 0)
        self.assertEqual(self.order(), ["b", "d", "e", "a", "c", "f"])

    def test_delayed_job_is_not_run_by_drain(self):
        self.enqueue("--id", "later", "--delay", "30", RECORD)
        self.enqueue("--id", "now", RECORD)
        started = time.monotonic()
        r = self.drain()
        self.assertEqual(r.code, 0, r)
        self.assertLess(time.monotonic() - started, 10)
        self.assertEqual(self.order(), ["now"])
        self.assertEqual(self.state("later"), "pending")
        line = [ln for ln in self.ok("list").splitlines() if ln.startswith("later ")][0]
        self.assertIn("due in", line)
        run_at = queuectl.epoch(self.job("later")["run_at"])
        self.assertAlmostEqual(run_at - time.time(), 30, delta=5)

    def test_delay_that_has_passed_is_run(self):
        self.enqueue("--id", "soon", "--delay", "1", RECORD)
        time.sleep(1.1)
        self.assertEqual(self.drain().code, 0)
        self.assertEqual(self.order(), ["soon"])

    def test_run_at_past_runs_and_future_waits(self):
        import datetime
        self.enqueue("--id", "past", "--run-at", "2000-01-01T00:00:00Z", RECORD)
        self.enqueue("--id", "future", "--run-at", "2099-01-01T00:00:00Z", RECORD)
        self.enqueue("--id", "local", "--run-at", "2099-06-01 12:00", RECORD)
        self.assertEqual(self.drain().code, 0)
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
        self.assertEqual(self.drain("--count", "3").code, 0)
        self.assertEqual(self.order(), ["a", "b", "c", "d"])

    def test_dependency_on_a_completed_job_is_met(self):
        self.enqueue("--id", "a", RECORD)
        self.assertEqual(self.drain().code, 0)
        self.enqueue("--id", "b", "--after", "a", RECORD)
        self.assertEqual(self.job("b")["depends_on"], ["a"])
        self.assertEqual(self.drain().code, 0)
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
        self.assertEqual(self.drain().code, 0)
        self.assertEqual(self.order(), ["dep", "child"])
        self.assertEqual(self.state("child"), "completed")
        self.assertEqual(self.job("child")["blocked_on"], [])

    def test_worker_for_a_queue_runs_only_that_queue(self):
        self.enqueue("--id", "ja", "--queue", "a", RECORD)
        self.enqueue("--id", "jb", "--queue", "b", RECORD)
        self.enqueue("--id", "jd", RECORD)
        self.assertEqual(self.drain("--queue", "a").code, 0)
        self.assertEqual(self.order(), ["ja"])
        self.assertEqual(self.state("jb"), "pending")
        self.assertEqual(self.drain("--queue", "b", "--queue", "default").code, 0)
        self.assertEqual(sorted(self.order()), ["ja", "jb", "jd"])

    def test_pause_and_resume_a_queue(self):
        self.enqueue("--id", "ja", "--queue", "a", RECORD)
        self.enqueue("--id", "jb", "--queue", "b", RECORD)
        self.assertIn("a", self.ok("pause", "a"))
        self.assertIn("paused: a", self.ok("status"))
        self.assertEqual(json.loads(self.ok("status", "--json"))["paused"], ["a"])
        self.assertEqual(self.drain().code, 0)
        self.assertEqual(self.order(), ["jb"])
        self.assertEqual(self.state("ja"), "pending")
        self.ok("resume", "a")
        self.assertNotIn("paused", self.ok("status"))
        self.assertEqual(self.drain().code, 0)
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


class TestWait(RecordingTest):
    def test_wait_returns_zero_when_all_completed(self):
        self.enqueue("--id", "a", "true")
        self.enqueue("--id", "b", "true")
        self.assertEqual(self.drain().code, 0)
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
        self.assertEqual(self.drain().code, 1)
        r = self.fails(1, "wait", "good", "bad", "--timeout", "5")
        self.assertIn("bad", self.error_line(r))
        self.assertNotIn("good", self.error_line(r))

    def test_wait_times_out_on_a_pending_job(self):
        self.enqueue("--id", "j", "true")
        started = time.monotonic()
        r = self.fails(1, "wait", "j", "--timeout", "0.3")
        self.assertLess(time.monotonic() - started, 10)
        self.assertIn("j", self.error_line(r))
        self.assertEqual(self.state("j"), "pending")

    def test_wait_bad_ids(self):
        self.enqueue("--id", "j", "true")
        self.fails(2, "wait", "../x", "--timeout", "1")
        r = self.fails(1, "wait", "nope", "--timeout", "1")
        self.assertIn("nope", self.error_line(r))


class TestPrune(RecordingTest):
    def test_prune_removes_old_finished_jobs_and_logs_keeps_pending(self):
        self.enqueue("--id", "done", "echo hi")
        self.enqueue("--id", "bad", "--max-retries", "0", "exit 1")
        self.enqueue("--id", "keep", "--delay", "1h", "true")
        self.enqueue("--id", "blocked", "--after", "bad", "true")
        self.assertEqual(self.drain().code, 1)
        logs = os.path.join(self.home, "logs")
        self.assertTrue(os.path.exists(os.path.join(logs, "done.log")))
        self.assertEqual(self.ok("prune", "--older-than", "1h"), "pruned 0 jobs\n")
        self.assertEqual(self.state("done"), "completed")
        time.sleep(0.05)
        self.assertEqual(self.ok("prune", "--older-than", "0"), "pruned 2 jobs\n")
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
        self.assertEqual(self.drain().code, 1)
        time.sleep(0.05)
        self.assertEqual(self.ok("prune", "--older-than", "0s", "--state", "dead"),
                         "pruned 1 job\n")
        self.fails(1, "show", "bad")
        self.assertEqual(self.state("done"), "completed")


# Robust execution ############################################################


class RobustTest(QueueTest):
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



class TestConcurrency(RobustTest):
    def test_two_processes_four_threads_run_each_job_exactly_once(self):
        ids = [f"j{i}" for i in range(300)]
        out = self.path("out")
        lines = "".join(json.dumps({"id": i, "command": f"echo {i} >> {out}"}) + "\n"
                        for i in ids)
        self.ok("enqueue", "--stdin", input=lines)
        procs = [subprocess.Popen([PY, PROG, "worker", "start", "--count", "4", "--drain"],
                                  env=self.env, cwd=self.work, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        self.procs.extend(procs)
        for p in procs:
            self.assertEqual(p.wait(timeout=90), 0, p.stderr.read())
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


class TestCrashRecovery(RobustTest):
    def test_killed_worker_running_job_is_adopted_not_rerun(self):
        self.enqueue("--id", "backup", f"echo start >> {self.path('runs')}; sleep 3; "
                     f"echo done >> {self.path('runs')}")
        w = self.start_worker()
        self.wait_running("backup")
        os.kill(w.pid, signal.SIGKILL)
        w.wait(timeout=10)
        r = self.drain()                                  # a new worker adopts it
        self.assertEqual(r.code, 0, r)
        self.assertIn("adopted", r.out)
        self.assertEqual(self.lines("runs"), ["start", "done"])   # ran exactly once
        job = self.job("backup")
        self.assertEqual((job["state"], job["attempts"], job["exit_code"]),
                         ("completed", 1, 0))
        self.integrity_ok()

    def test_job_that_ended_while_its_worker_was_dead_keeps_its_status(self):
        self.enqueue("--id", "quick", "--max-retries", "0", "sleep 1; exit 4")
        w = self.start_worker()
        self.wait_running("quick")
        os.kill(w.pid, signal.SIGKILL)
        w.wait(timeout=10)
        pid = self.job_pid("quick")
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
            self.assertEqual(queuectl.finish_attempt(store, job, worker.id, job["claim"], 0,
                                                     None, cfg, 0.1), (None, 0))
        self.assertEqual(self.state("a"), "processing")
        # The right worker and claim can.
        with store.tx():
            self.assertEqual(queuectl.finish_attempt(store, job, "other", job["claim"], 0,
                                                     None, cfg, 0.1), ("completed", 0))

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


class TestSuspendedWorker(RobustTest):
    def test_worker_past_its_lease_stays_visible_and_its_job_runs_once(self):
        runs = self.path("runs")
        self.enqueue("--id", "long", f"echo run >> {runs}; sleep 2")
        a = self.start_worker()
        self.wait_running("long")
        os.kill(a.pid, signal.SIGSTOP)                   # Ctrl-Z, a suspended VM...
        self.addCleanup(lambda: a.poll() is None and os.kill(a.pid, signal.SIGCONT))
        con = self.db()
        con.execute("UPDATE workers SET heartbeat = '2000-01-01T00:00:00.000000Z'")
        con.commit()
        info = json.loads(self.ok("worker", "status", "--json"))
        self.assertEqual([w["pid"] for w in info], [a.pid])    # alive: it holds its lock
        r = self.drain()                                  # recovers the stale worker's job
        self.assertEqual(r.code, 0, r)
        self.assertIn("adopted", r.out)
        job = self.job("long")
        self.assertEqual((job["state"], job["attempts"], job["exit_code"]),
                         ("completed", 1, 0))
        os.kill(a.pid, signal.SIGCONT)
        self.ok("worker", "stop", "--wait", "--timeout", "20")
        self.assertEqual(a.wait(timeout=10), 0)
        job = self.job("long")                            # the late worker changed nothing
        self.assertEqual((job["state"], job["attempts"]), ("completed", 1))
        self.assertEqual(self.lines("runs"), ["run"])
        self.assertEqual([n for n in os.listdir(os.path.join(self.home, "run"))
                          if n.endswith(".exit")], [])
        self.integrity_ok()


class TestMoreBadInput(RobustTest):
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
        r = subprocess.run([PY, PROG, "enqueue", b"echo \xff\xfe"], env=self.env,
                           capture_output=True, timeout=30)
        self.assertEqual(r.returncode, 2)
        self.assertEqual(r.stderr, b"queuectl: error: the command is not valid UTF-8\n")
        gone = self.path("gone")
        os.mkdir(gone)
        r = subprocess.run([PY, PROG, "enqueue", "true"], env=self.env, cwd=gone,
                           capture_output=True, text=True, timeout=30,
                           preexec_fn=lambda: os.rmdir(gone))
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertIn("current directory no longer exists", r.stderr)
        self.assertEqual(self.db_dump(), before)


class TestTimeoutsAndCancel(RobustTest):
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
        self.assertEqual(self.ok("cancel", "c").strip(), "c")
        self.assertFalse(pid_alive(child))           # gone when cancel returns
        self.assertEqual(self.state("c"), "cancelled")
        time.sleep(0.5)
        job = self.job("c")
        self.assertEqual((job["state"], job["attempts"]), ("cancelled", 0))

    def test_cancel_pending_and_refuse_finished(self):
        self.enqueue("--id", "p", "--delay", "1h", "true")
        self.ok("cancel", "p")
        self.assertEqual(self.state("p"), "cancelled")
        self.fails(1, "cancel", "p")
        self.fails(1, "cancel", "nosuchjob")


class TestWorkerShutdown(RobustTest):
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
        time.sleep(0.3)
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


# Hardening ###################################################################


class TestFilesAndPermissions(RobustTest):
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
        self.assertEqual(self.drain().code, 0)
        path = os.path.join(self.home, "logs", "big.log")
        self.assertGreater(os.path.getsize(path), 20_000_000)
        tail = subprocess.run([PY, PROG, "logs", "big", "--tail", "1"], env=self.env,
                              capture_output=True, timeout=30)
        self.assertEqual(tail.returncode, 0)
        self.assertTrue(tail.stdout.startswith(b"[queuectl] attempt 1 ended: exit 0"),
                        tail.stdout[:200])
        two = subprocess.run([PY, PROG, "logs", "big", "--tail", "2"], env=self.env,
                             capture_output=True, timeout=30).stdout
        self.assertIn(b"no newline\n[queuectl] attempt 1 ended", two)


class TestDoctor(RobustTest):
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


class TestFuzz(RobustTest):
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
                self.assertIn(code, (0, 1, 2), err.getvalue())
                self.assertNotIn("Traceback", err.getvalue())
                self.assertNotIn("unexpected", err.getvalue())
            if argv[0] == "enqueue" and code == 0:
                out.flush()
                ids += out.buffer.getvalue().decode().split()[:1]
        self.integrity_ok()


# A sysadmin's tool ###########################################################


class TestHumanOutput(RobustTest):
    def fixed_jobs(self):
        self.enqueue("--id", "build-1", "make -C /srv/app all && echo " + "x" * 120)
        self.enqueue("--id", "later", "--delay", "2h", "--queue", "reports", "./report.sh")
        self.enqueue("--id", "after", "--after", "build-1", "true")

    def test_list_table_fits_80_columns_and_cuts_commands(self):
        self.fixed_jobs()
        out = self.ok("list")
        lines = out.splitlines()
        self.assertEqual(lines[0].split(), ["ID", "STATE", "QUEUE", "PRI", "TRIES", "WHEN",
                                            "COMMAND"])
        self.assertTrue(all(len(line) <= 80 for line in lines), out)
        self.assertTrue(lines[1].endswith("…"), lines[1])
        self.assertEqual(lines[1].split()[:6], ["build-1", "pending", "default", "0", "0",
                                                "ready"])
        self.assertIn("due in 2h", lines[2])
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
                os.execve(PY, [PY, PROG, "status"], env)
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


class TestMachineOutput(RobustTest):
    def test_json_shapes(self):
        job = self.enqueue("--id", "a", "echo hi")
        self.drain()
        status = json.loads(self.ok("status", "--json"))
        self.assertEqual(set(status), {"counts", "queues", "workers", "oldest_pending",
                                       "next_scheduled", "paused"})
        self.assertEqual(list(status["counts"]), list(queuectl.STATES))
        listed = json.loads(self.ok("list", "--json"))
        self.assertEqual([j["id"] for j in listed], [job])
        self.assertEqual(set(listed[0]), set(queuectl.JOB_FIELDS) | {"log"})
        self.assertEqual(json.loads(self.ok("dlq", "list", "--json")), [])
        self.assertEqual(json.loads(self.ok("worker", "status", "--json")), [])
        cfg = json.loads(self.ok("config", "list", "--json"))
        self.assertEqual(cfg, queuectl.CONFIG_DEFAULTS)

    def test_enqueue_prints_only_the_id(self):
        out = self.ok("enqueue", "true")
        self.assertRegex(out, r"^[0-9a-z]{6}\n$")

    def test_metrics_parse_as_prometheus_text(self):
        import re
        self.set_fast_retries()
        self.enqueue("--queue", "q1", "true")
        self.enqueue("--max-retries", "1", "false")
        self.drain()
        out = self.ok("metrics")
        sample = re.compile(r'^[a-z_]+(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? '
                            r'-?[0-9.e+]+$')
        values = {}
        for line in out.splitlines():
            if line.startswith("#"):
                self.assertRegex(line, r"^# (HELP|TYPE) queuectl_[a-z_]+ .+")
                continue
            self.assertRegex(line, sample)
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
        self.assertEqual(values['queuectl_jobs{queue="q1",state="completed"}'], 1)
        self.assertEqual(values['queuectl_jobs{queue="default",state="dead"}'], 1)
        self.assertEqual(values['queuectl_attempts_total{queue="default"}'], 2)
        self.assertEqual(values['queuectl_failures_total{queue="default"}'], 2)
        self.assertEqual(values["queuectl_workers"], 0)


class TestLiveView(RobustTest):
    def test_top_refreshes_in_a_pty_and_quits_on_q(self):
        import pty
        import select
        import termios
        self.enqueue("--id", "long-job", "sleep 30")
        self.start_worker()
        self.wait_running("long-job")
        pid, fd = pty.fork()
        if pid == 0:
            os.execve(PY, [PY, PROG, "top", "--interval", "0.2"], self.env)
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
        self.fails(2, "top")                               # no terminal


class TestInstallAndHelp(RobustTest):
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
        self.assertEqual(self.drain().code, 0)
        self.assertIn("installed", self.log(out.stdout.strip()))
        pyc = os.listdir(os.path.join(prefix, "lib", "queuectl", "__pycache__"))
        self.assertTrue(any(p.startswith("queuectl.") for p in pyc), pyc)

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

    def test_bash_completion(self):
        script = self.ok("completion", "bash")
        r = subprocess.run(["bash", "-c", script + "\nCOMP_WORDS=(queuectl worker st); "
                            "COMP_CWORD=2; _queuectl; echo ${COMPREPLY[@]}\n"
                            "COMP_WORDS=(queuectl en); COMP_CWORD=1; _queuectl; "
                            "echo ${COMPREPLY[@]}"], capture_output=True, text=True,
                           timeout=30)
        self.assertEqual(r.stdout.splitlines(), ["start stop status", "enqueue"])


class TestClaimPlan(RobustTest):
    def test_claim_is_one_walk_of_the_ready_index(self):
        self.enqueue("--id", "a", "true")
        self.enqueue("--after", "a", "--queue", "q2", "true")
        con = self.db()
        for where, params in (("", []), (" AND queue IN (?,?)", ["a", "b"]),
                              (" AND queue NOT IN (?)", ["p"])):
            plan = " ".join(r[-1] for r in con.execute(
                "EXPLAIN QUERY PLAN " + queuectl.SQL_CLAIMABLE.format(where=where),
                ["2030-01-01T00:00:00.000000Z"] + params))
            self.assertIn("jobs_ready", plan)
            self.assertNotIn("TEMP B-TREE", plan)

    def test_prune_reclaims_space(self):
        lines = "".join(f"echo {'x' * 2000}\n" for _ in range(2000))
        self.ok("enqueue", "--stdin", input=lines.replace("echo", "true ||"))
        self.assertEqual(self.drain("--count", "2", timeout=120).code, 0)
        con = self.db()
        before = con.execute("PRAGMA page_count").fetchone()[0]
        self.assertIn("pruned 2000 jobs", self.ok("prune", "--older-than", "0"))
        after = con.execute("PRAGMA page_count").fetchone()[0]
        self.assertLess(after, before / 4)
        self.assertEqual(os.listdir(os.path.join(self.home, "logs")), [])


class TestOwnership(RobustTest):
    @unittest.skipUnless(os.geteuid() == 0, "needs root to give a file away")
    def test_home_owned_by_another_user_is_refused(self):
        self.enqueue("true")
        os.chown(self.home, 12345, -1)
        self.addCleanup(os.chown, self.home, 0, -1)
        before = self.db_dump()
        r = self.fails(2, "enqueue", "true")
        self.assertIn("belongs to uid 12345", r.err)
        self.assertEqual(self.db_dump(), before)

    @unittest.skipUnless(os.geteuid() == 0, "needs root to give a file away")
    def test_db_owned_by_another_user_is_refused(self):
        self.enqueue("true")
        db = os.path.join(self.home, "queue.db")
        os.chown(db, 12345, -1)
        r = self.fails(2, "list")
        self.assertIn(db, r.err)


class TestFindJobProcess(RobustTest):
    @unittest.skipUnless(os.path.isdir("/proc/self"), "needs /proc")
    def spawn_job(self, command, token, status):
        env = dict(os.environ, QUEUECTL_JOB_ID="j", QUEUECTL_ATTEMPT="2",
                   QUEUECTL_CLAIM=token, __QUEUECTL_STATUS=status,
                   __QUEUECTL_COMMAND=command, __QUEUECTL_CWD=self.work,
                   __QUEUECTL_UMASK="0022")
        with open(os.devnull, "rb") as null:
            return queuectl.spawn(["/bin/sh", "-c", queuectl.JOB_WRAPPER, "queuectl-job"],
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
        self.assertEqual(self.drain().code, 0)
        self.assertNotIn("Broken pipe", self.log("p"))


class TestLiveWorkerBehaviour(RobustTest):
    def test_logs_follow_streams_until_the_job_ends(self):
        self.enqueue("--id", "f", "echo one; sleep 1; echo two")
        self.start_worker()
        out = self.ok("logs", "f", "--follow", timeout=30)
        self.assertIn("one\ntwo\n", out)
        self.assertIn("[queuectl] attempt 1 ended: exit 0", out)

    def test_running_worker_picks_up_a_config_change(self):
        w = self.start_worker()
        self.ok("config", "set", "max-retries", "0")
        self.wait_for(lambda: "config reloaded" in self._worker_output(w), 10,
                      "the worker to reload its config")
        self.enqueue("--id", "once", "false")
        self.wait_state("once", "dead")
        self.assertEqual(self.job("once")["attempts"], 1)

    def _worker_output(self, w):
        # The worker's stdout is a pipe; read what is there without blocking.
        import select
        buf = getattr(w, "_seen", "")
        while select.select([w.stdout], [], [], 0)[0]:
            line = w.stdout.readline()
            if not line:
                break
            buf += line
        w._seen = buf
        return buf


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
