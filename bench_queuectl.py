#!/usr/bin/env python3
"""Benchmark for queuectl: throughput, enqueue cost, bulk enqueue, pickup
latency, scale and worker resources.

Run: python3 bench_queuectl.py [--quick] [--json]   (or: make bench)

The machine this runs on may be small, shared and noisy, so every figure is
measured side by side with a baseline in the same run and reported as a
ratio too. Each figure uses its own temporary QUEUECTL_HOME, removed at the
end; every process started here is killed in a finally block; every wait has
a timeout. Children run with sys.executable, never `python3` from PATH.

The output is a report, not a test: a missed target still exits 0. The exit
code is 1 only when a figure could not be measured at all (an error, not a
skip), so `--quick` doubles as a smoke test.
"""

import argparse
import contextlib
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PROG = os.path.join(HERE, "queuectl.py")
PY = sys.executable
HAVE_PROC = os.path.exists(f"/proc/{os.getpid()}/stat")
CHILD_TIMEOUT = 60.0          # one CLI command
MB = 1024 * 1024

# Sizes: (full, quick).
SIZES = {
    "throughput_jobs": (2000, 100),
    "throughput_rounds": (3, 1),
    "enqueue_runs": (100, 5),
    "bulk_lines": (100_000, 2_000),
    "pickup_runs": (50, 5),
    "scale_small": (1_000, 1_000),
    "scale_big": (1_000_000, 20_000),
    "scale_repeats": (5, 3),
    "claim_repeats": (7, 3),
    "idle_seconds": (10.0, 1.0),
    "rss_bytes_per_job": (50 * MB, 2 * MB),
}

QUIET = False


def progress(text):
    if not QUIET:
        sys.stderr.write(f"bench: {text}\n")
        sys.stderr.flush()


# The interpreter every child runs on ########################################

SITE_SLOW_MS = 5.0        # site start-up beyond this is a hook, not Python itself

SITE_HOOKS = r"""
import site, os
dirs = site.getsitepackages() + [site.getusersitepackages()]
for d in dirs:
    try:
        names = sorted(os.listdir(d))
    except OSError:
        continue
    for n in names:
        if n.endswith(".pth"):
            with open(os.path.join(d, n), errors="replace") as f:
                if any(l.startswith(("import ", "import\t")) for l in f):
                    print(os.path.join(d, n))
"""


def start_ms(python, *flags, runs=15):
    """Median milliseconds of `python FLAGS -c pass`."""
    times = []
    for _ in range(runs):
        t, _p = timed(subprocess.run, [python, *flags, "-c", "pass"], check=True,
                      timeout=CHILD_TIMEOUT)
        times.append(t * 1000)
    return median(times)


def site_cost(python):
    """(ms that site adds to `python -I`, the .pth files that run code)."""
    hooks = subprocess.run([python, "-I", "-c", SITE_HOOKS], stdout=subprocess.PIPE,
                           text=True, timeout=CHILD_TIMEOUT).stdout.split()
    return start_ms(python, "-I") - start_ms(python, "-I", "-S"), hooks


def clean_interpreter(rep, root):
    """The interpreter to measure with. A floor must be taken on the same
    interpreter, flags and site configuration as what it is compared with;
    a site-packages .pth hook that runs code at every start (20-50 ms on
    some machines) would inflate `python -c pass` and flatter every ratio.
    When this one has such hooks, a venv of it without pip (an empty
    site-packages) is made under root and used for every child instead."""
    global PY
    cost, hooks = site_cost(PY)
    rep.extra["site"] = {"python": PY, "site_ms": round(cost, 1), "pth_hooks": hooks}
    if cost < SITE_SLOW_MS and not hooks:
        rep.note(f"interpreter: {PY}; its site start-up costs {cost:.1f} ms, no .pth "
                 "hook runs code: measured on it as it is")
        return
    rep.note(f"interpreter: {PY} runs {len(hooks)} .pth hook(s) at every start "
             f"({', '.join(hooks) or 'none found'}); site costs it {cost:.1f} ms. "
             "Figures on it would compare against an inflated floor")
    venv = os.path.join(root, "venv")
    # From the real path: a venv made through a symlink (a shim's, a
    # /usr/local/bin link) may look for the standard library beside the link.
    p = subprocess.run([os.path.realpath(PY), "-m", "venv", "--without-pip", venv],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=120)
    clean = os.path.join(venv, "bin", "python")
    if p.returncode == 0:
        p = subprocess.run([clean, "-I", "-c", "import sqlite3, select, fcntl"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=CHILD_TIMEOUT)
    if p.returncode != 0 or not os.access(clean, os.X_OK):
        rep.note(f"interpreter: could not make a clean venv ({p.stdout.strip()[-200:]}); "
                 f"measuring on {PY} as it is: ratios against its floor are flattered")
        return
    clean_cost, clean_hooks = site_cost(clean)
    rep.extra["site"]["clean_venv_site_ms"] = round(clean_cost, 1)
    rep.note(f"interpreter: every child runs on a clean venv of it ({clean}: "
             f"{len(clean_hooks)} hooks, site {clean_cost:.1f} ms)")
    PY = clean


# Timing and statistics helpers ###############################################


def timed(fn, *args, **kwargs):
    """(seconds, result) of one call, on the monotonic high-resolution clock."""
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - t0, result


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def mean(xs):
    return statistics.fmean(xs) if xs else float("nan")


def percentile(xs, p):
    """Nearest-rank percentile (p in 0..100)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(round(p / 100 * len(s) + 0.5)) - 1))
    return s[k]


def ratio(a, b):
    if a is None or b is None or b == 0 or a != a or b != b:
        return None
    return a / b


def wait_until(pred, timeout, interval=0.01, what="condition"):
    """Poll pred() until it returns a true value (returned); TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


# A temporary home and the processes started in it ############################


class Sandbox:
    """A temp dir with QUEUECTL_HOME inside; runs the CLI; cleans up.

    `with Sandbox("name") as sb:` every process sb.spawn() started is killed
    on exit, job process groups left behind too, and the dir is removed."""

    def __init__(self, name):
        self.root = tempfile.mkdtemp(prefix=f"queuectl-bench-{name}-")
        self.home = os.path.join(self.root, "home")
        self.db = os.path.join(self.home, "queue.db")
        self.env = dict(os.environ)
        self.env["QUEUECTL_HOME"] = self.home
        self.env.pop("QUEUECTL_DEBUG", None)
        self.env["COLUMNS"] = "120"
        self.procs = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def argv(self, *args, launcher=None):
        return list(launcher or [PY, PROG]) + [str(a) for a in args]

    def cli(self, *args, input=None, launcher=None, timeout=CHILD_TIMEOUT, check=True):
        """Run one queuectl command to its end; (seconds, CompletedProcess)."""
        t0 = time.perf_counter()
        p = subprocess.run(self.argv(*args, launcher=launcher), input=input,
                           env=self.env, cwd=self.root, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, timeout=timeout)
        took = time.perf_counter() - t0
        if check and p.returncode != 0:
            raise RuntimeError(f"queuectl {' '.join(map(str, args))} exited "
                               f"{p.returncode}: {p.stderr.strip()[-500:]}")
        return took, p

    def spawn(self, argv, **kwargs):
        """Start a process that this sandbox kills on exit."""
        kwargs.setdefault("env", self.env)
        kwargs.setdefault("cwd", self.root)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        kwargs.setdefault("stderr", subprocess.DEVNULL)
        p = subprocess.Popen(argv, **kwargs)
        self.procs.append(p)
        return p

    def stop(self, p, timeout=10.0):
        """SIGTERM (= worker stop), wait, then SIGKILL."""
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=timeout)
            except ProcessLookupError:
                pass

    def close(self):
        for p in self.procs:
            if p.returncode is None and p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        # Jobs run in their own sessions: kill any a killed worker left behind.
        for pgid in self._job_pgids():
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        shutil.rmtree(self.root, ignore_errors=True)

    def _job_pgids(self):
        if not os.path.exists(self.db):
            return []
        try:
            con = sqlite3.connect(self.db, timeout=5)
            try:
                return [r[0] for r in con.execute(
                    "SELECT pid FROM jobs WHERE state = 'processing' AND pid > 1")]
            finally:
                con.close()
        except sqlite3.Error:
            return []

    def count(self, state):
        con = sqlite3.connect(self.db, timeout=30)
        try:
            return con.execute("SELECT count(*) FROM jobs WHERE state = ?",
                               (state,)).fetchone()[0]
        finally:
            con.close()

    def worker_up(self, timeout=15.0):
        """Wait until a worker of this home listens on its wake-up FIFO."""
        run = os.path.join(self.home, "run")

        def listening():
            try:
                return any(n.endswith(".wake") for n in os.listdir(run))
            except OSError:
                return False
        wait_until(listening, timeout, what="the worker to start")


def wait_proc(p, timeout, what):
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"{what} did not end within {timeout:g}s") from None


# /proc readers ###############################################################


def proc_cpu_seconds(pid):
    """utime + stime of a process, seconds (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status_kb(pid, key):
    """A kB field of /proc/<pid>/status (VmHWM, VmRSS), or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


# Results #####################################################################


class Report:
    def __init__(self, quick):
        self.quick = quick
        self.rows = []
        self.notes = []
        self.extra = {}
        self.errors = []

    def add(self, key, figure, value, unit, baseline=None, base_label="",
            target=None, ok=None, ratio_value=None, digits=1, show_ratio=True):
        """One table row. target: text; ok: True/False/None (no target)."""
        r = ratio_value if ratio_value is not None else ratio(value, baseline)
        r = r if show_ratio else None
        self.rows.append({
            "key": key, "figure": figure, "value": value, "unit": unit,
            "baseline": baseline, "baseline_is": base_label, "ratio": r,
            "target": target, "ok": ok, "digits": digits,
        })

    def note(self, text):
        self.notes.append(text)

    def skip(self, figure, why):
        self.note(f"{figure}: skipped ({why})")

    def error(self, figure, exc):
        self.errors.append(f"{figure}: {type(exc).__name__}: {exc}")

    def as_json(self, elapsed):
        return {
            "quick": self.quick,
            "python": PY,
            "python_version": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "elapsed_s": round(elapsed, 2),
            "figures": {r["key"]: {k: v for k, v in r.items()
                                   if k not in ("key", "digits")}
                        for r in self.rows},
            "notes": self.notes,
            "errors": self.errors,
            **self.extra,
        }

    def table(self, elapsed):
        def num(v, digits):
            if v is None or v != v:
                return "-"
            if abs(v) >= 10000:
                return f"{v:,.0f}"
            return f"{v:.{digits}f}"

        head = ["figure", "value", "baseline", "ratio", "target", "ok?"]
        lines = []
        for r in self.rows:
            unit = f" {r['unit']}" if r["unit"] else ""
            base = num(r["baseline"], r["digits"])
            if base != "-":
                base += unit + (f" ({r['baseline_is']})" if r["baseline_is"] else "")
            ok = {True: "ok", False: "MISS", None: "-"}[r["ok"]]
            lines.append([r["figure"], num(r["value"], r["digits"]) + unit, base,
                          "-" if r["ratio"] is None else f"{r['ratio']:.2f}x",
                          r["target"] or "-", ok])
        widths = [max(len(x[i]) for x in lines + [head]) for i in range(len(head))]
        out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip(),
               "  ".join("-" * w for w in widths)]
        out += ["  ".join(c.ljust(w) for c, w in zip(x, widths)).rstrip() for x in lines]
        mode = "quick" if self.quick else "full"
        out.append("")
        out.append(f"{mode} run, {elapsed:.1f}s, Python {platform.python_version()} "
                   f"({PY}), {os.cpu_count()} cpus, {platform.platform()}")
        if self.notes:
            out.append("")
            out.append("notes:")
            out += [f"  - {n}" for n in self.notes]
        plan = self.extra.get("claim_query_plan")
        if plan:
            out.append("")
            out.append("EXPLAIN QUERY PLAN of the claim query "
                       "(SQL_CLAIMABLE, no queue filter):")
            for size, details in plan.items():
                out.append(f"  {size} jobs:")
                out += [f"    {d}" for d in details]
        if self.errors:
            out.append("")
            out.append("errors (figures that could not be measured):")
            out += [f"  - {e}" for e in self.errors]
        return "\n".join(out)


# 1. Throughput ###############################################################


def bench_throughput(rep, n, rounds):
    """N `true` jobs drained by `worker start --count 2 --drain`, against two
    threads here running `/bin/sh -c true` over N/2 jobs each; `rounds`
    times, interleaved, medians. The drained homes are removed only at the
    end: deleting thousands of files just before a round slows the next
    file creations on some filesystems (ext4 skips recently freed inodes),
    which would measure the cleanup, not the queue."""

    def cpu(who):
        ru = resource.getrusage(who)
        return ru.ru_utime + ru.ru_stime

    def baseline():
        def loop(k):
            for _ in range(k):
                subprocess.run(["/bin/sh", "-c", "true"], check=False)
        threads = [threading.Thread(target=loop, args=(k,))
                   for k in (n // 2, n - n // 2)]
        t0, c0 = time.perf_counter(), cpu(resource.RUSAGE_SELF) + cpu(resource.RUSAGE_CHILDREN)
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        took = time.perf_counter() - t0
        base_cpu.append((cpu(resource.RUSAGE_SELF) + cpu(resource.RUSAGE_CHILDREN) - c0) / n)
        return n / took

    def startup_cpu():
        """The CPU of a worker --drain of an empty queue (its start and
        exit), once: not a job's."""
        if not startup:
            sb = Sandbox("throughput-empty")
            boxes.append(sb)
            sb.cli("status")
            c0 = cpu(resource.RUSAGE_CHILDREN)
            wait_proc(sb.spawn([PY, PROG, "worker", "start", "--count", "2", "--drain"]),
                      60, "worker --drain")
            startup.append(cpu(resource.RUSAGE_CHILDREN) - c0)
        return startup[0]

    def drain(name, lines, cpus=None):
        sb = Sandbox(name)
        boxes.append(sb)
        sb.cli("enqueue", "--stdin", input=lines, timeout=120)
        c0 = cpu(resource.RUSAGE_CHILDREN)
        p = sb.spawn([PY, PROG, "worker", "start", "--count", "2", "--drain"])
        took, code = timed(wait_proc, p, 60 + n * 0.1, "worker --drain")
        used = cpu(resource.RUSAGE_CHILDREN) - c0   # the worker's, and its jobs' (it reaped them)
        if cpus is not None:
            cpus.append((used - startup_cpu()) / n)
        done = sb.count("completed")
        if done != n:
            raise RuntimeError(f"only {done} of {n} jobs completed (exit {code})")
        return n / took

    def gated(name, k):
        """As the peers are timed: k jobs queued while the queue is paused,
        a worker already up; from `resume` until the last has ended. The
        resume runs in this process, as task-spooler's gate is a C command
        and Huey's clock starts with its consumer: an interpreter start and
        the compile of queuectl.py (160 ms) are not the queue's throughput."""
        q = _import_queuectl()
        sb = Sandbox(name)
        boxes.append(sb)
        sb.cli("pause")
        sb.cli("enqueue", "--stdin", input="true\n" * k, timeout=120)
        p = sb.spawn([PY, PROG, "worker", "start", "--count", "2"])
        sb.worker_up()
        # One connection polls, as Huey's waiter polls its own (a new one
        # each time cost 0.3 ms of a core that the worker needs).
        con = sqlite3.connect(sb.db, timeout=30)
        try:
            t0 = time.perf_counter()
            with open(os.devnull, "w") as out, contextlib.redirect_stdout(out):
                if q.main(["resume", "--home", sb.home]) != 0:
                    raise RuntimeError("queuectl resume failed")
            wait_until(lambda: con.execute("SELECT count(*) FROM jobs WHERE state = "
                                           "'completed'").fetchone()[0] == k,
                       60 + k * 0.1, 0.005, "the jobs to complete")
            took = time.perf_counter() - t0
        finally:
            con.close()
        sb.stop(p)
        return k / took

    missing = {name: how() for name, how in PEERS.items()}
    peers = {name: [] for name, why in missing.items() if why is None}
    same = []                        # queuectl timed as the peers are
    for name, why in missing.items():
        if why is not None:
            rep.skip(f"throughput of {name}", why)
    rates, keyed, bases, boxes, base_cpu, drain_cpu, startup = [], [], [], [], [], [], []
    try:
        for i in range(rounds):
            bases.append(baseline())
            rates.append(drain(f"throughput{i}", "true\n" * n, drain_cpu))
            keyed.append(drain(f"throughput-keys{i}", keyed_lines(n, 4, 8)))
            if peers:
                same.append(gated(f"throughput-gated{i}", min(n, PEER_JOBS)))
            for name in peers:
                with tempfile.TemporaryDirectory(prefix=f"queuectl-bench-{name}-") as root:
                    peers[name].append(PEER_DRAINS[name](min(n, PEER_JOBS), root))
    finally:
        for sb in boxes:
            sb.close()
    rate, base = median(rates), median(bases)
    r = rate / base
    rep.add("throughput", f"throughput ({n} true jobs, 2 threads, median of {rounds})",
            rate, "jobs/s", base, "2 threads sh -c true", ">= 0.8x", r >= 0.8)
    rep.add("throughput_keys", f"throughput, 1 in 4 jobs holding 1 of 8 keys "
            f"(median of {rounds})", median(keyed), "jobs/s", rate, "no keys (above)")
    for name, got in peers.items():
        peer, ours = median(got), median(same)
        rep.add(f"throughput_vs_{name}", f"throughput against {name} ({min(n, PEER_JOBS)} true "
                f"jobs queued, then 2 at a time; median of {rounds})", ours, "jobs/s", peer,
                f"{name}", ">= 1.1x", ours / peer >= 1.1)
        rep.note(f"throughput of {name}: " + ", ".join(f"{x:.0f}" for x in got) + " jobs/s")
    if same:
        rep.note("throughput of queuectl timed as the peers are (queued while paused, "
                 "a worker up, from resume): " + ", ".join(f"{x:.0f}" for x in same)
                 + " jobs/s")
    rep.note(f"throughput: CPU per job (user + system, the process and its children; a "
             f"worker's start and exit, {startup_cpu() * 1000:.0f} ms, not counted): "
             f"queuectl's worker and its jobs {median(drain_cpu) * 1000:.2f} ms, "
             f"the baseline's threads and shells {median(base_cpu) * 1000:.2f} ms; "
             f"{os.cpu_count()} cores at full use run at most "
             f"{os.cpu_count() / median(drain_cpu):.0f} queuectl jobs/s")
    rep.note("throughput: drains " + ", ".join(f"{x:.0f}" for x in rates)
             + " jobs/s (worker start to exit); with keys " + ", ".join(
                 f"{x:.0f}" for x in keyed) + "; baseline " + ", ".join(
                 f"{x:.0f}" for x in bases) + " jobs/s")
    bench_group_commit(rep, n, rounds)


def record_cpu(home, per_tx):
    """CPU seconds per job of recording ends and claiming the next jobs,
    per_tx of each in one transaction (Store.finish and Store.claim in this
    thread, as a job thread calls them, with no process run), until the
    home's jobs are all completed."""
    q = _import_queuectl()
    store = q.Store(home, durable=False)
    try:
        cfg, ok, held, done = q.queue_config(q.CONFIG_DEFAULTS, q.DEFAULT_QUEUE), \
            q.Outcome.of_exit(0), [], 0
        with store.tx():
            for _ in range(per_tx):
                held.append(store.claim("bench", None, time.time()))
        t0 = time.thread_time()
        while held:
            with store.tx():
                nxt = []
                for job in held:
                    store.finish(job, "bench", job["claim"], ok, cfg, 0.001)
                    done += 1
                    job = store.claim("bench", None, time.time())
                    if job is not None:
                        nxt.append(job)
            held = nxt
        return (time.thread_time() - t0) / done
    finally:
        store.close()


def bench_group_commit(rep, n, rounds):
    """What group commit could save: the CPU of a job thread's transaction
    (record one end, claim the next) against the same work for 8 jobs in one
    transaction. With 2 job threads the ends rarely meet (a prototype that
    recorded every end waiting in one transaction found 3,000 of 3,000 alone),
    so this bounds what a recorder that batches them could save (32 and 128
    per transaction measured no lower than 8)."""
    one, eight, boxes = [], [], []
    try:
        for i in range(rounds):
            for per_tx, out in ((1, one), (8, eight)):
                sb = Sandbox(f"record{per_tx}-{i}")
                boxes.append(sb)
                sb.cli("enqueue", "--stdin", input="true\n" * n, timeout=120)
                out.append(record_cpu(sb.home, per_tx))
    finally:
        for sb in boxes:
            sb.close()
    a, b = median(eight), median(one)
    rep.add("record_batched", f"record an end and claim the next, 8 per transaction "
            f"(CPU per job, median of {rounds})", a * 1000, "ms", b * 1000,
            "1 per transaction", digits=3)
    rep.note(f"group commit: recording 8 ends per transaction would save "
             f"{(b - a) * 1000:.3f} ms of CPU per job, the most a batching recorder could")


# Peers, measured in the same run on the same workload: their jobs queued
# first, then timed from the moment two may run until the last has ended.
PEER_JOBS = 900                  # task-spooler holds a socket per queued job

def tsp_drain(n, root):
    """n `true` jobs through task-spooler with 2 slots: queued behind a
    gate job on 1 slot, timed from opening the gate and 2 slots."""
    exe = shutil.which("tsp")      # Debian's name (moreutils has another ts)
    env = dict(os.environ, TS_SOCKET=os.path.join(root, "tsp.sock"), TMPDIR=root,
               TS_MAXFINISHED="2000")

    def tsp(*args):
        return subprocess.run([exe, *args], env=env, capture_output=True, text=True,
                              timeout=CHILD_TIMEOUT, check=True).stdout.strip()
    go = os.path.join(root, "go")
    try:
        tsp("-S", "1")
        tsp("sh", "-c", f"while [ ! -f {go} ]; do sleep 0.005; done")
        ids = [tsp("true") for _ in range(n)]
        t0 = time.perf_counter()
        with open(go, "w"):
            pass
        tsp("-S", "2")
        for job in ids[-2:]:
            tsp("-w", job)
        return n / (time.perf_counter() - t0)
    finally:
        subprocess.run([exe, "-K"], env=env, capture_output=True, timeout=CHILD_TIMEOUT)

# Run by the interpreter HUEY_PYTHON names (one that has huey): no
# third-party import enters this file.
HUEY_DRAIN = r"""
import os, subprocess, sys, threading, time
from huey import SqliteHuey
n, path = int(sys.argv[1]), sys.argv[2]
huey = SqliteHuey(filename=path)
@huey.task()
def run(cmd):
    return subprocess.run(["/bin/sh", "-c", cmd]).returncode
for _ in range(n):
    run("true")                  # queued: no consumer runs yet
began = []
def waiter():
    while huey.result_count() < n:
        time.sleep(0.005)
    print(n / (time.perf_counter() - began[0]), flush=True)
    os._exit(0)
consumer = huey.create_consumer(workers=2, worker_type="thread", periodic=False,
                                initial_delay=0.001, max_delay=0.01, backoff=1.0)
threading.Thread(target=waiter, daemon=True).start()
began.append(time.perf_counter())
consumer.run()
"""

def huey_drain(n, root):
    """n `true` jobs through Huey (SQLite storage, 2 worker threads)."""
    r = subprocess.run([os.environ["HUEY_PYTHON"], "-c", HUEY_DRAIN, str(n),
                        os.path.join(root, "huey.db")], capture_output=True, text=True,
                       timeout=300, check=True)
    return float(r.stdout.split()[-1])

PEER_DRAINS = {"task-spooler": tsp_drain, "Huey": huey_drain}

def _huey_missing():
    py = os.environ.get("HUEY_PYTHON")
    if not py:
        return "set HUEY_PYTHON to an interpreter that has huey"
    r = subprocess.run([py, "-c", "import huey"], capture_output=True, timeout=CHILD_TIMEOUT)
    return None if r.returncode == 0 else f"{py} cannot import huey"

# Each peer: None when it can run here, else why not (it is listed as skipped).
PEERS = {"task-spooler": lambda: None if shutil.which("tsp") else
         "not installed (apt-get install task-spooler)", "Huey": _huey_missing}

def keyed_lines(n, every, keys, command="true"):
    """n --stdin lines of command; one in every holds one of keys keys."""
    return "".join(json.dumps({"command": command, "keys": [f"k{i % keys}"]}) + "\n"
                   if i % every == 0 else command + "\n" for i in range(n))


# 2. Enqueue cost #############################################################


def install_launcher(prefix):
    """`make install` into prefix; the launcher's path, or a reason to skip."""
    make = shutil.which("make")
    if make is None:
        return None, "make not found"
    p = subprocess.run([make, "-s", "install", f"PREFIX={prefix}", f"PYTHON={PY}"],
                       cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=120)
    launcher = os.path.join(prefix, "bin", "queuectl")
    if p.returncode != 0 or not os.access(launcher, os.X_OK):
        return None, f"make install failed ({p.returncode}): {p.stdout.strip()[-300:]}"
    return launcher, None


def bench_enqueue(rep, n):
    """n sequential `queuectl enqueue true` processes per launcher, against
    the bare interpreter (`python -c pass`), round-robin so noise is shared.
    The ratio is the median of each round's own ratio (a pair measured
    side by side), not a ratio of medians: a slow minute then moves both
    halves of a pair, never one of them."""
    with Sandbox("enqueue") as sb:
        launchers = {"python queuectl.py": [PY, PROG]}
        direct_ok = os.access(PROG, os.X_OK)
        if direct_ok:
            # Its sh header runs ${QUEUECTL_PYTHON:-python3}: make that this
            # interpreter, not a version-manager shim found on PATH.
            sb.env["QUEUECTL_PYTHON"] = PY
            launchers["./queuectl.py"] = [PROG]
        else:
            rep.skip("enqueue ./queuectl.py", "queuectl.py is not executable")
        launcher, why = install_launcher(os.path.join(sb.root, "prefix"))
        if launcher:
            launchers["installed queuectl"] = [launcher]
        else:
            rep.skip("enqueue installed", why)
        # Warm up: create the db and fill the page cache / bytecode cache.
        for argv in launchers.values():
            sb.cli("enqueue", "true", launcher=argv)
        subprocess.run([PY, "-c", "pass"], check=True, timeout=CHILD_TIMEOUT)

        times = {name: [] for name in ["bare", "bare -I", "no env capture"]
                 + list(launchers)}
        # The cost of capturing the caller's environment: the same launcher
        # with --worker-env (no capture, no envs row read or written).
        plain = launchers.get("installed queuectl") or launchers["python queuectl.py"]
        for _ in range(n):
            t, _p = timed(subprocess.run, [PY, "-c", "pass"], env=sb.env,
                          cwd=sb.root, timeout=CHILD_TIMEOUT, check=True)
            times["bare"].append(t)
            # ./queuectl.py and the installed launcher run python -I (no
            # site hooks): compare them with an interpreter that does too.
            t, _p = timed(subprocess.run, [PY, "-I", "-c", "pass"], env=sb.env,
                          cwd=sb.root, timeout=CHILD_TIMEOUT, check=True)
            times["bare -I"].append(t)
            for name, argv in launchers.items():
                t, _p = sb.cli("enqueue", "true", launcher=argv)
                times[name].append(t)
            t, _p = sb.cli("enqueue", "--worker-env", "true", launcher=plain)
            times["no env capture"].append(t)

    # The cached forms (bytecode from __pycache__) are what cron should run;
    # the script form compiles the whole file at every start: reported only.
    targets = {"./queuectl.py": 2.0, "installed queuectl": 2.0}
    for name in launchers:
        isolated = name != "python queuectl.py"
        bare = times["bare -I" if isolated else "bare"]
        ms = [t * 1000 for t in times[name]]
        base_ms = [t * 1000 for t in bare]
        limit = targets.get(name)
        r = median([a / b for a, b in zip(ms, base_ms)])
        rep.add(f"enqueue_{name.replace(' ', '_').replace('./', 'direct_')}",
                f"enqueue cost: {name} (median)", median(ms), "ms",
                median(base_ms), "python -I -c pass" if isolated else "python -c pass",
                f"<= {limit}x" if limit else None,
                (r <= limit) if limit else None, ratio_value=r)
        rep.note(f"enqueue {name}: mean {mean(ms):.1f} ms, median {median(ms):.1f} ms, "
                 f"p95 {percentile(ms, 95):.1f} ms; bare interpreter mean "
                 f"{mean(base_ms):.1f} ms, median {median(base_ms):.1f} ms "
                 f"(n={len(ms)}); median of the {len(ms)} pairs' ratios {r:.2f}x, "
                 f"ratio of the medians {ratio(median(ms), median(base_ms)):.2f}x")
    with_env = times["installed queuectl" if "installed queuectl" in launchers
                     else "python queuectl.py"]
    rep.add("enqueue_env_capture", "enqueue cost of capturing the environment (median)",
            (median(with_env) - median(times["no env capture"])) * 1000, "ms",
            median(times["no env capture"]) * 1000, "enqueue --worker-env", digits=2)
    if "./queuectl.py" in launchers:
        rep.note(f"./queuectl.py: its sh header imports queuectl with QUEUECTL_PYTHON={PY} "
                 "-I, loading cached bytecode from __pycache__ beside it")


# 3. Bulk enqueue #############################################################

BULK_BASELINE = r"""
import sqlite3, sys, time
sys.path.insert(0, sys.argv[2])
import queuectl
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("PRAGMA journal_mode = WAL")
con.execute("PRAGMA synchronous = FULL")
for ddl in queuectl.SCHEMA:
    con.execute(ddl)
lines = [l for l in sys.stdin.read().splitlines() if l.strip()]
stamp = queuectl.iso(time.time())
con.execute("BEGIN IMMEDIATE")
blank = dict.fromkeys(queuectl.job_columns("e"))
con.executemany(queuectl.SQL_INSERT, (
    {**blank, "id": queuectl.new_id() + str(i), "command": l, "state": "pending",
     "queue": "default", "priority": 0, "run_at": stamp, "blocked": 0, "cwd": "/",
     "created_at": stamp, "updated_at": stamp}
    for i, l in enumerate(lines)))
con.execute("COMMIT")
"""


def db_bytes(home):
    """The size of home's database once its WAL is checkpointed into it."""
    import sqlite3
    path = os.path.join(home, "queue.db")
    con = sqlite3.connect(path)
    try:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    finally:
        con.close()
    return sum(os.path.getsize(path + ext) for ext in ("", "-wal")
               if os.path.exists(path + ext))


def bench_bulk(rep, n):
    """`enqueue --stdin` of n lines, against the same rows inserted into the
    same schema by a minimal sqlite3 script (also a child process)."""
    data = "true\n" * n
    with Sandbox("bulk") as sb:
        base_db = os.path.join(sb.root, "baseline.db")
        base_t, _p = timed(subprocess.run, [PY, "-c", BULK_BASELINE, base_db, HERE],
                           input=data, text=True, check=True, timeout=300)
        took, _p = sb.cli("enqueue", "--stdin", input=data, timeout=300)
        stored = sb.count("pending")
        size = db_bytes(sb.home)
        claim_big, plan = time_claims(sb.home, 5)
    with Sandbox("bulk-worker-env") as sb:
        sb.cli("enqueue", "--stdin", "--worker-env", input=data, timeout=300)
        size_plain = db_bytes(sb.home)
    with Sandbox("bulk-small") as sb:
        sb.cli("enqueue", "--stdin", input="true\n" * 100)
        claim_small, _plan = time_claims(sb.home, 5)
    with Sandbox("bulk-keys") as sb:
        # One in 10 jobs holds one of 10 keys, each held by a running job.
        sb.cli("enqueue", "--stdin", input=keyed_lines(n, 10, 10), timeout=300)
        hold_keys(sb.db, 10)
        claim_keys, _plan = time_claims(sb.home, 5)
    with Sandbox("bulk-one-key") as sb:
        # The worst case: the first 10,000 jobs in claim order all wait for
        # one full key, and the claim passes over every one of them.
        over = min(10_000, n // 10)
        sb.cli("enqueue", "--stdin", input="".join(
            json.dumps({"command": "true", "keys": ["k0"], "priority": 1}) + "\n"
            for _ in range(over)) + "true\n" * (n - over), timeout=300)
        hold_keys(sb.db, 1)
        claim_over, _plan = time_claims(sb.home, 5)
    rate, base = n / took, n / base_t
    rep.add("bulk_enqueue", f"bulk enqueue --stdin ({n:,} lines)", rate, "jobs/s",
            base, "raw sqlite3 script", ">= 20,000/s", rate >= 20000, digits=0)
    rep.add("db_bytes_per_job", f"database size per job, {n:,} --stdin jobs", size / n,
            "bytes", size_plain / n, "with --worker-env", digits=1)
    rep.note(f"database after {n:,} --stdin jobs: {size / 1e6:.1f} MB with the "
             f"environment captured (one envs row), {size_plain / 1e6:.1f} MB with "
             "--worker-env")
    rep.add("claim_backlog", f"one claim with {n:,} jobs pending (median of 5)",
            median(claim_big) * 1000, "ms", median(claim_small) * 1000, "100 pending",
            digits=2)
    rep.add("claim_backlog_keys", f"one claim with {n:,} pending, 1 in 10 on a full "
            "key (median of 5)", median(claim_keys) * 1000, "ms",
            median(claim_big) * 1000, "no keys", digits=2)
    rep.add("claim_over_full_key", f"one claim passing over {over:,} jobs on a full key "
            "(median of 5)", median(claim_over) * 1000, "ms", median(claim_big) * 1000,
            "no keys", digits=2)
    rep.extra["claim_query_plan_backlog"] = plan
    rep.note(f"claim with a backlog: plan {' / '.join(plan)}")
    rep.note(f"bulk enqueue: {took:.2f}s for {n:,} lines ({stored:,} stored); "
             f"baseline script {base_t:.2f}s")
    if stored != n:
        raise RuntimeError(f"bulk enqueue stored {stored} of {n} jobs")


# 4. Pickup latency ###########################################################


def date_command():
    """A cheap shell command printing epoch seconds with sub-ms resolution."""
    try:
        out = subprocess.run(["date", "+%s.%N"], stdout=subprocess.PIPE, text=True,
                             timeout=10).stdout.strip()
        float(out)
        if "." in out and len(out.split(".")[1]) >= 6:
            return "date +%s.%N"
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    return None


def read_stamp(path):
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    return float(text) if text.endswith("\n") else None


def bench_pickup(rep, n):
    """Enqueue a timestamp-writing job to an idle worker, n times: how long
    from the start of the enqueue (and from its return) to the job running.
    Baseline: this process running the same shell command itself."""
    cmd = date_command()
    if cmd is None:
        rep.skip("pickup latency", "`date +%s.%N` has no sub-second resolution here")
        return
    with Sandbox("pickup") as sb:
        out_dir = os.path.join(sb.root, "stamps")
        os.mkdir(out_dir)
        sb.cli("enqueue", "true")                 # create the db
        w = sb.spawn([PY, PROG, "worker", "start"])
        sb.worker_up()
        wait_until(lambda: sb.count("completed") == 1, 15, what="the first job")
        time.sleep(1.0)
        pickup, enq, after, spawn, ids = [], [], [], [], []
        for i in range(n):
            # Baseline: run the same command from here (fork/exec floor).
            f = os.path.join(out_dir, f"base{i}")
            t0 = time.time()
            subprocess.run(["/bin/sh", "-c", f"{cmd} > {shlex.quote(f)}"],
                           check=True, timeout=CHILD_TIMEOUT)
            spawn.append(wait_until(lambda f=f: read_stamp(f), 10) - t0)
            # The queue: enqueue, wait for the job's stamp.
            f = os.path.join(out_dir, f"job{i}")
            t0 = time.time()
            took, p = sb.cli("enqueue", f"{cmd} > {shlex.quote(f)}")
            stamp = wait_until(lambda f=f: read_stamp(f), 10, interval=0.0005,
                               what=f"job {i} to run")
            pickup.append(stamp - t0)
            enq.append(took)
            after.append(stamp - t0 - took)
            ids.append((p.stdout.strip(), stamp))
            # Let the worker record the job and go idle again.
            wait_until(lambda i=i: sb.count("completed") == i + 2, 15,
                       what=f"job {i} to be recorded")
            time.sleep(0.05)
        sb.stop(w)
        # created_at is stamped by the enqueue just before its insert and
        # commit: created_at -> job runs bounds commit -> job runs from above.
        q = _import_queuectl()
        con = sqlite3.connect(sb.db, timeout=30)
        try:
            since_insert = [stamp - q.epoch(con.execute(
                "SELECT created_at FROM jobs WHERE id = ?", (job_id,)).fetchone()[0])
                for job_id, stamp in ids]
        finally:
            con.close()
    ms = lambda xs: [x * 1000 for x in xs]          # noqa: E731
    since_insert = ms(since_insert)
    pickup, enq, after, spawn = ms(pickup), ms(enq), ms(after), ms(spawn)
    rep.add("pickup_median", "pickup: enqueue start -> job runs (median)",
            median(pickup), "ms", median(enq), "enqueue process alone")
    rep.add("pickup_p95", "pickup: enqueue start -> job runs (p95)",
            percentile(pickup, 95), "ms", percentile(enq, 95), "enqueue process alone")
    m = median(after)
    rep.add("pickup_after_return", "pickup after the enqueue returned (median)",
            m, "ms", median(spawn), "sh -c date from here", "<= 10 ms", m <= 10.0,
            show_ratio=m > 0)
    rep.add("pickup_after_insert", "pickup after the enqueue's insert (median)",
            median(since_insert), "ms", median(spawn), "sh -c date from here")
    rep.note(f"pickup (n={n}): 'after the enqueue's insert' is job start minus the "
             f"job's created_at (stamped just before the insert and its fsynced "
             f"commit), an upper bound of commit -> start; p95 "
             f"{percentile(since_insert, 95):.1f} ms")
    rep.note(f"pickup (n={n}): after-return p95 {percentile(after, 95):.1f} ms, "
             f"min {min(after):.1f} ms (negative: the job started before the "
             f"enqueue process had exited); enqueue median {median(enq):.1f} ms")


# 5. Scale ####################################################################


def _import_queuectl():
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import queuectl
    return queuectl


SQL_FILL = """INSERT INTO jobs (id, command, state, queue, priority, attempts,
    max_retries, timeout, run_at, depends_on, blocked, cwd, env, created_at,
    updated_at, started_at, finished_at, exit_code, worker)
    VALUES (?, 'true', ?, 'default', 0, ?, NULL, NULL, ?, NULL, 0, ?, NULL, ?,
            ?, ?, ?, ?, ?)"""


def fast_iso(q):
    """queuectl.iso, memoizing the seconds part (1M rows: 2 calls each)."""
    cache = {}

    def iso(ts):
        whole = int(ts // 1)
        us = int(round((ts - whole) * 1_000_000))
        if us >= 1_000_000:
            whole, us = whole + 1, us - 1_000_000
        head = cache.get(whole)
        if head is None:
            head = cache[whole] = q.iso(whole)[:-8]
        return f"{head}.{us:06d}Z"
    for t in (0.0, 1.5, 1732355400.123456, 1732355400.9999996, time.time()):
        assert iso(t) == q.iso(t), (iso(t), q.iso(t))
    return iso


def build_scale_db(q, sb, total, pending=100):
    """A db of `total` jobs: all completed but the last `pending` ones.
    queuectl creates the schema; the rows go in directly with sqlite3."""
    sb.cli("enqueue", "--stdin", input="true\ntrue\ntrue\n")
    iso = fast_iso(q)
    now = time.time()
    step = 0.01
    base = now - total * step - 60
    worker = "bench-host-1-abcd"
    con = sqlite3.connect(sb.db, isolation_level=None)
    try:
        con.execute("PRAGMA synchronous = OFF")
        con.execute("BEGIN IMMEDIATE")
        con.execute("UPDATE jobs SET state = 'completed', attempts = 1, "
                    "started_at = created_at, finished_at = updated_at, "
                    "exit_code = 0, worker = ?", (worker,))

        def rows():
            for i in range(total - 3):
                t = base + i * step
                created, finished = iso(t), iso(t + 0.004)
                if i < total - 3 - pending:
                    yield (f"s{i:07d}", "completed", 1, created, sb.root, created,
                           finished, created, finished, 0, worker)
                else:
                    yield (f"s{i:07d}", "pending", 0, created, sb.root, created,
                           created, None, None, None, None)
        con.executemany(SQL_FILL, rows())
        con.execute("COMMIT")
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        counts = dict(con.execute("SELECT state, count(*) FROM jobs GROUP BY state"))
    finally:
        con.close()
    assert sum(counts.values()) == total, counts
    return counts


def hold_keys(db, keys):
    """Make keys k0..k{keys-1} full: the first pending job holding each is
    marked running (as a worker's claim would)."""
    import sqlite3
    con = sqlite3.connect(db)
    try:
        for i in range(keys):
            con.execute("UPDATE jobs SET state = 'processing', claim = 'bench', "
                        "worker = 'bench', started_at = run_at WHERE id = (SELECT job "
                        "FROM job_keys WHERE key = ? LIMIT 1)", (f"k{i}",))
        con.commit()
    finally:
        con.close()


def time_claims(home, repeats):
    """Seconds of `repeats` claims (Worker.claim in this process, each claimed
    job put back to pending), and the claim query's plan."""
    q = _import_queuectl()
    store = q.Store(home, durable=False)
    try:
        worker = q.Worker(home)
        plan = [r[3] for r in store.db.execute(
            "EXPLAIN QUERY PLAN "
            + q.SQL_CLAIMABLE.format(where="", order=q.order_by("-priority")),
            [q.iso(time.time())])]
        times = []
        for _ in range(repeats):
            t, job = timed(worker.claim, store)
            if job is None:
                raise RuntimeError(f"nothing to claim in {home}")
            times.append(t)
            store.db.execute("UPDATE jobs SET state = 'pending', claim = NULL, "
                             "worker = NULL, started_at = NULL WHERE seq = ?",
                             (job["seq"],))
    finally:
        store.close()
    return times, plan


def bench_scale(rep, small, big, repeats, claim_repeats):
    """status, list --limit 50, serve's overview and one claim on a small
    and a big db (the overview also at 10,000 jobs, its target's size)."""
    q = _import_queuectl()
    mid = 10_000
    with Sandbox("scale-small") as s1, Sandbox("scale-big") as s2, \
            Sandbox("scale-mid") as s3:
        sizes = {small: s1, big: s2}
        for size, sb in sizes.items():
            t, counts = timed(build_scale_db, q, sb, size)
            rep.note(f"scale: built the {size:,}-job db in {t:.1f}s "
                     f"({os.path.getsize(sb.db) / MB:.0f} MB; {counts})")
        # Warm up each (page cache, __pycache__ of nothing: the script compiles).
        for sb in sizes.values():
            sb.cli("status")
            sb.cli("list", "--limit", "50")
        cli = {("status", n): [] for n in sizes}
        cli.update({("list", n): [] for n in sizes})
        for _ in range(repeats):
            for size, sb in sizes.items():
                cli[("status", size)].append(sb.cli("status")[0])
                cli[("list", size)].append(sb.cli("list", "--limit", "50")[0])
        claims, plans = {}, {}
        for size, sb in sizes.items():
            claims[size], plans[f"{size:,}"] = time_claims(sb.home, claim_repeats)
        build_scale_db(q, s3, mid)
        renders = {}
        for size, sb in ((mid, s3), (big, s2)):     # in-process, as serve renders
            q.serve_route(sb.home, "/", {}, "nonce")
            renders[size] = [timed(q.serve_route, sb.home, "/", {}, "nonce")[0]
                             for _ in range(repeats)]
    rep.extra["claim_query_plan"] = plans
    for what, label in (("status", "status"), ("list", "list --limit 50")):
        s, b = median(cli[(what, small)]) * 1000, median(cli[(what, big)]) * 1000
        target, ok = None, None
        if what == "status" and big >= 1_000_000:
            target, ok = "<= 500 ms at 1M", b <= 500
        rep.add(f"scale_{what}", f"{label} at {big:,} jobs (median of {repeats})", b, "ms",
                s, f"{small:,} jobs", target, ok)
    m, b = median(renders[mid]) * 1000, median(renders[big]) * 1000
    full = big >= 1_000_000
    rep.add("serve_overview", f"serve's overview page at {big:,} jobs (median of "
            f"{repeats})", b, "ms", m, f"{mid:,} jobs",
            "<= 50 ms at 10k, <= 300 ms at 1M" if full else "<= 50 ms at 10k",
            m <= 50 and (b <= 300 or not full))
    s, b = median(claims[small]) * 1000, median(claims[big]) * 1000
    r = ratio(b, s)
    rep.add("scale_claim", f"one claim at {big:,} jobs (median of {claim_repeats})", b,
            "ms", s, f"{small:,} jobs", "~1x (flat)", r is not None and r <= 1.5,
            digits=2)
    if big < 1_000_000:
        rep.note("scale: the status target (<= 500 ms at 1M jobs) applies to the "
                 "full run only")


# 6. Worker resources #########################################################


IDLE_BASELINE = "import time\nwhile True:\n    time.sleep(1)\n"


def wait_rusage(p, timeout, pid_poll=None):
    """Reap p with os.wait4 (peak RSS of the child, kB on Linux) while
    calling pid_poll() every few ms; (exit code, ru_maxrss in kB)."""
    deadline = time.monotonic() + timeout
    while True:
        if pid_poll:
            pid_poll()
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid == p.pid:
            p.returncode = os.waitstatus_to_exitcode(status)
            maxrss = ru.ru_maxrss // 1024 if sys.platform == "darwin" else ru.ru_maxrss
            return p.returncode, maxrss
        if time.monotonic() >= deadline:
            raise TimeoutError(f"worker did not end within {timeout:g}s")
        time.sleep(0.01)


def bench_resources(rep, idle_seconds, nbytes):
    """Idle worker CPU (against an idle Python sleeping 1 s at a time) and
    peak RSS of `worker start --count 8 --drain` running 8 jobs that each
    print nbytes (against the idle worker's peak RSS)."""
    idle_hwm = None
    if not HAVE_PROC:
        rep.skip("idle worker CPU", "no /proc on this system")
    else:
        with Sandbox("idle") as sb:
            sb.cli("enqueue", "true")
            w = sb.spawn([PY, PROG, "worker", "start"])
            b = sb.spawn([PY, "-c", IDLE_BASELINE])
            sb.worker_up()
            wait_until(lambda: sb.count("completed") == 1, 15, what="the first job")
            time.sleep(min(1.0, idle_seconds / 4))      # let it settle
            t0 = time.monotonic()
            w0, b0 = proc_cpu_seconds(w.pid), proc_cpu_seconds(b.pid)
            time.sleep(idle_seconds)
            w1, b1 = proc_cpu_seconds(w.pid), proc_cpu_seconds(b.pid)
            wall = time.monotonic() - t0
            idle_hwm = proc_status_kb(w.pid, "VmHWM")
            sb.stop(w)
        cpu, base = (w1 - w0) / wall * 100, (b1 - b0) / wall * 100
        rep.add("idle_cpu", f"idle worker CPU over {idle_seconds:g}s", cpu, "% core",
                base, "python sleep(1) loop", "< 1%", cpu < 1.0, digits=2)
        rep.note(f"idle CPU: worker {w1 - w0:.2f}s, baseline {b1 - b0:.2f}s of CPU "
                 f"in {wall:.1f}s (clock tick {1 / os.sysconf('SC_CLK_TCK'):.3f}s)")
        with Sandbox("idle-keys") as sb:
            # 4 threads, one running a job that holds key k, one job waiting for k:
            # the other threads must sleep, not poll the claim.
            sb.cli("enqueue", "--key", "k", "sleep 600")
            sb.cli("enqueue", "--key", "k", "true")
            w = sb.spawn([PY, PROG, "worker", "start", "--count", "4"])
            sb.worker_up()
            wait_until(lambda: sb.count("processing") == 1, 15, what="the key's holder")
            time.sleep(min(1.0, idle_seconds / 4))
            t0 = time.monotonic()
            w0 = proc_cpu_seconds(w.pid)
            time.sleep(idle_seconds)
            keyed = (proc_cpu_seconds(w.pid) - w0) / (time.monotonic() - t0) * 100
            w.kill()             # not stop: it would wait for the sleep 600
            w.wait(timeout=10)
        rep.add("idle_cpu_keys", "idle worker CPU, 4 threads, a job waiting on a full key",
                keyed, "% core", cpu, "idle worker (above)", "< 1%", keyed < 1.0, digits=2)

    with Sandbox("rss") as sb:
        jobs = "".join(f"head -c {nbytes} /dev/zero\n" for _ in range(8))
        sb.cli("enqueue", "--stdin", input=jobs)
        w = sb.spawn([PY, PROG, "worker", "start", "--count", "8", "--drain"])
        seen = [0]

        def poll():
            if HAVE_PROC:
                kb = proc_status_kb(w.pid, "VmHWM")
                if kb:
                    seen[0] = max(seen[0], kb)
        code, maxrss = wait_rusage(w, 120 + nbytes / MB, poll)
        done = sb.count("completed")
        logs = os.path.join(sb.home, "logs")
        logged = sum(os.path.getsize(os.path.join(logs, f)) for f in os.listdir(logs)
                     if f.endswith(".log"))
    peak = max(seen[0], maxrss) / 1024
    rep.add("worker_peak_rss", f"worker peak RSS, 8 threads x {nbytes // MB} MB output",
            peak, "MB", idle_hwm / 1024 if idle_hwm else None,
            "idle worker" if idle_hwm else "", "<= 40 MB", peak <= 40)
    rep.note(f"peak RSS: VmHWM seen {seen[0] / 1024:.1f} MB, wait4 ru_maxrss "
             f"{maxrss / 1024:.1f} MB; worker exit {code}, {done}/8 completed, "
             f"{logged / MB:.0f} MB in the logs")
    if done != 8:
        raise RuntimeError(f"only {done} of 8 jobs completed")


# Main ########################################################################


def main(argv=None):
    global QUIET
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="small sizes (a smoke test, well under 20 s)")
    ap.add_argument("--json", action="store_true",
                    help="print only a JSON object with the numbers")
    ap.add_argument("--as-is", action="store_true",
                    help="measure on this interpreter even if its site start-up "
                         "runs .pth hooks (default: a clean venv of it)")
    ap.add_argument("--profile", type=int, metavar="N", nargs="?", const=3000,
                    help="only profile a worker's two job threads draining N "
                         "true jobs (cProfile, in this process) and print it, "
                         "then the CPU of each step of a job in a second drain")
    args = ap.parse_args(argv)
    QUIET = args.json
    if args.profile:
        return profile_worker(args.profile)
    size = {k: v[1 if args.quick else 0] for k, v in SIZES.items()}
    rep = Report(args.quick)
    started = time.perf_counter()
    scratch = tempfile.mkdtemp(prefix="queuectl-bench-python-")
    try:
        if not args.as_is:
            clean_interpreter(rep, scratch)
        return _run(args, rep, size, started)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run(args, rep, size, started):
    figures = [
        ("throughput", lambda: bench_throughput(rep, size["throughput_jobs"],
                                                size["throughput_rounds"])),
        ("enqueue cost", lambda: bench_enqueue(rep, size["enqueue_runs"])),
        ("bulk enqueue", lambda: bench_bulk(rep, size["bulk_lines"])),
        ("pickup latency", lambda: bench_pickup(rep, size["pickup_runs"])),
        ("scale", lambda: bench_scale(rep, size["scale_small"], size["scale_big"],
                                      size["scale_repeats"], size["claim_repeats"])),
        ("worker resources", lambda: bench_resources(rep, size["idle_seconds"],
                                                     size["rss_bytes_per_job"])),
    ]
    for name, fn in figures:
        progress(f"{name} ...")
        t, _r = timed(_guarded, rep, name, fn)
        progress(f"{name}: {t:.1f}s")
    elapsed = time.perf_counter() - started
    if args.json:
        print(json.dumps(rep.as_json(elapsed), indent=2))
    else:
        print(rep.table(elapsed))
    return 1 if rep.errors else 0


def profile_worker(n):
    """Where a worker's job threads spend their time: a Worker of queuectl
    runs here, two job threads each under its own cProfile, draining n
    `true` jobs; the merged profile, by own time. Wall-clock time: a call
    that releases the GIL also counts the wait to take it back. From
    Python 3.12 one profiler watches every thread (sys.monitoring allows
    one at a time), so the worker's main thread is in it too. Then
    step_cpu: the CPU of each step of a job."""
    import cProfile
    import pstats
    q = _import_queuectl()
    whole = sys.version_info >= (3, 12)
    with Sandbox("profile") as sb:
        sb.cli("enqueue", "--stdin", input="true\n" * n, timeout=120)
        profiles = [cProfile.Profile()] if whole else []
        run_thread = q.Worker._job_thread

        def profiled(self):
            prof = cProfile.Profile()
            profiles.append(prof)
            prof.enable()
            try:
                run_thread(self)
            finally:
                prof.disable()
        if not whole:
            q.Worker._job_thread = profiled
        try:
            with open(os.devnull, "w") as out:
                worker = q.Worker(sb.home, count=2, drain=True, out=out)
                if whole:
                    profiles[0].enable()
                try:
                    took, _code = timed(worker.run)
                finally:
                    if whole:
                        profiles[0].disable()
        finally:
            q.Worker._job_thread = run_thread
        done = sb.count("completed")
    print(f"{done} of {n} jobs in {took:.2f}s under the profiler ({done / took:.0f} jobs/s), "
          f"Python {platform.python_version()} ({PY}); "
          + ("every thread" if whole else "the job threads"))
    stats = pstats.Stats(profiles[0])
    for prof in profiles[1:]:
        stats.add(prof)
    stats.sort_stats("tottime").print_stats(30)
    step_cpu(q, n)
    return 0

# The steps of a job in a worker's job thread that step_cpu times: (label,
# where it is, its name there). Nested steps are timed inside their callers.
STEPS = (("one attempt: claim to end (execute)", "Attempts", "execute"),
         ("  open the log", "", "open_private"),
         ("  the environment", "Attempts", "_job_env"),
         ("  posix_spawn", "", "spawn"),
         ("  wait for its end", "", "wait_exit"),
         ("record the end, claim the next (_record)", "Attempts", "_record"),
         ("  BEGIN", "_Transaction", "__enter__"),
         ("  the statements of the record", "Store", "finish"),
         ("  the claim", "Store", "claim"),
         ("  COMMIT", "_Transaction", "__exit__"),
         ("  the footer", "Attempts", "_footer"),
         ("  remove the status file", "", "remove_file"),
         ("  the worker's line (say)", "WorkerState", "say"),
         ("log lines (header, footer)", "", "log_line"),
         ("human_time", "", "human_time"))

def step_cpu(q, n):
    """A second drain of n `true` jobs, not under cProfile: the CPU time
    (time.thread_time) of each job thread, split by STEPS, per job; and the
    CPU of the jobs' shells (the children this process reaped)."""
    import collections
    spent, calls, saved = collections.Counter(), collections.Counter(), []

    def timing(label, fn):
        def timed_step(*args, **kwargs):
            t = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[label] += time.thread_time() - t
                calls[label] += 1
        return timed_step
    for label, where, name in STEPS:
        owner = getattr(q, where) if where else q
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, timing(label, getattr(owner, name)))
    run_thread, total = q.Worker._job_thread, [0.0]

    def measured(self):
        t = time.thread_time()
        try:
            run_thread(self)
        finally:
            total[0] += time.thread_time() - t
    q.Worker._job_thread = measured
    try:
        with Sandbox("profile-steps") as sb:
            sb.cli("enqueue", "--stdin", input="true\n" * n, timeout=120)
            c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            with open(os.devnull, "w") as out:
                took, _code = timed(q.Worker(sb.home, count=2, drain=True, out=out).run)
            c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    finally:
        q.Worker._job_thread = run_thread
        for owner, name, fn in reversed(saved):
            setattr(owner, name, fn)
    shells = (c1.ru_utime - c0.ru_utime + c1.ru_stime - c0.ru_stime) / n
    print(f"\nCPU per job, not under the profiler ({n / took:.0f} jobs/s): the job threads "
          f"{total[0] / n * 1e6:.0f} us, the jobs' shells {shells * 1e6:.0f} us")
    print(f"  {'step':44} {'us/job':>7} {'calls/job':>9}")
    for label, _where, _name in STEPS:
        print(f"  {label:44} {spent[label] / n * 1e6:7.1f} {calls[label] / n:9.1f}")


def _guarded(rep, name, fn):
    try:
        fn()
    except KeyboardInterrupt:
        raise
    except Exception as e:
        rep.error(name, e)
        progress(f"{name} failed: {type(e).__name__}: {e}")


if __name__ == "__main__":
    sys.exit(main())
