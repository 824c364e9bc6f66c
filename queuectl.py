#!/bin/sh
# queuectl: a background job queue for shell commands, in one file.
# Run it as python3 queuectl.py, as ./queuectl.py, or as the `queuectl` that
# `make install` puts on the PATH. As ./queuectl.py the shell reads the next
# line (to Python, just a string): it imports the file as a module, so Python
# reuses cached bytecode instead of compiling the whole file at every start
# (cron runs enqueue all day). A copy under another name runs as a script.
''''exec "${QUEUECTL_PYTHON:-python3}" -I -c "import os, sys; f = os.path.realpath(sys.argv.pop(1)); sys.path.insert(0, os.path.dirname(f)); m = f.endswith('/queuectl.py') and __import__('queuectl'); sys.exit(m.main()) if m else __import__('runpy').run_path(f, run_name='__main__')" "$0" "$@" # '''

__doc__ = """queuectl: a background job queue for shell commands, in one file.

Enqueue shell commands; workers run them with retries, exponential backoff,
a dead letter queue, timeouts and crash recovery. State lives in SQLite
(WAL) under one home directory, so nothing is lost across restarts.

    queuectl enqueue 'echo hello'
    queuectl worker start --drain

Stdlib only, Python 3.10+, POSIX. See README.md for the whole manual.
"""

__version__ = "1.3.0"


# Imports #####################################################################

# Only what every command needs is imported here; enqueue runs from cron
# thousands of times a day, so heavier modules are imported where used.

import os

import sys

import time


# Constants ###################################################################

EXIT_OK = 0

EXIT_FAIL = 1        # the operation failed: unknown job, bad transition

EXIT_USAGE = 2       # bad usage or invalid input

EXIT_STUCK = 3       # wait: a job can never run until a person acts

EXIT_TEMPFAIL = 75   # database busy past the wait: try again (EX_TEMPFAIL)

EXIT_TIMEOUT = 124   # wait --timeout ran out, as timeout(1) exits

PENDING, PROCESSING, FAILED = "pending", "processing", "failed"

COMPLETED, DEAD, CANCELLED = "completed", "dead", "cancelled"

STATES = (PENDING, PROCESSING, FAILED, COMPLETED, DEAD, CANCELLED)

FINISHED = (COMPLETED, DEAD, CANCELLED)

WAITING = (PENDING, FAILED)          # may run once due, unblocked and not paused

UNFINISHED = (PENDING, PROCESSING, FAILED)

# With a claim set: an attempt that may still run (it holds the job's keys).
HOLDING = (PROCESSING, CANCELLED)

# The states each command's --state takes (completion offers only these).
STATE_CHOICES = {
    "list": STATES,
    "prune": FINISHED,
    "cancel": (PENDING, FAILED, PROCESSING),
    "retry": (DEAD, CANCELLED, COMPLETED, FAILED),
}

DEFAULT_QUEUE = "default"

SCHEMA_VERSION = 5

APPLICATION_ID = 0x71756575          # "queu": marks a queuectl database

# Upper bounds (seconds) of the job duration histogram's buckets, 10 ms to 6 h.
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
                    600, 1800, 3600, 7200, 21600)

# Upper bounds (bytes) of the peak RSS histogram's buckets, 1 MiB to 64 GiB.
RSS_BUCKETS = tuple(2 ** n for n in range(20, 37, 2))

CONFIG_DEFAULTS = {
    "max_retries": 3,
    "backoff_base": 2,
    "max_backoff": 3600,
    # text: random spread of each backoff wait: "N%" (the wait times 1 +- N%),
    # "full" (anywhere from 0 to the wait), or "0" (none: exact waits)
    "backoff_jitter": "10%",
    # text: the order due jobs are claimed in: "priority" (higher first, then
    # the earlier due) or "fifo" (priority ignored: the earlier due first)
    "scheduling_mode": "priority",
    "job_timeout": 0,
    # a running job is marked slow past this many times its queue's p95 run
    # time (from the history, once 20 runs are known); 0 = never
    "slow_factor": 3,
    "kill_grace": 10,
    "hook_timeout": 300,
    # text: a hook's shell command, or a list of exit codes; "" = none
    "on_success": "",
    "on_failure": "",
    "on_dead": "",
    "on_cancel": "",
    "retry_on": "",
    "no_retry_on": "",
    # the limits of a job's processes; 0 = none
    "mem": 0,
    "cpu_time": 0,
    "nofile": 0,
    "nice": 0,
    # text: a command prefix each job runs through (srun, systemd-run, ssh:
    # LAUNCHER sh -c COMMAND); {slot} is the job thread's index, {host} its
    # pick of launcher_hosts (host1,host2,...); "" = none
    "launcher": "",
    "launcher_hosts": "",
}

# The limits of a job's processes (enqueue --mem ...; config and per queue).
LIMIT_KEYS = ("mem", "cpu_time", "nofile", "nice")

# A job's hooks: the command each event runs (a job of its own, in HOOK_QUEUE).
HOOK_EVENTS = ("on_success", "on_failure", "on_dead", "on_cancel")

# Config keys whose values are text, not numbers.
TEXT_KEYS = HOOK_EVENTS + ("retry_on", "no_retry_on", "backoff_jitter", "scheduling_mode",
                          "launcher", "launcher_hosts")

# Config keys that may also be set per queue, as queue.NAME.KEY.
QUEUE_KEYS = ("max_retries", "backoff_base", "max_backoff", "job_timeout",
              "hook_timeout", "slow_factor") + TEXT_KEYS + LIMIT_KEYS

# The internal queue hooks run in. Its name cannot be a user's queue (a
# queue name starts with a letter or digit); every worker serves it.
HOOK_QUEUE = "_hooks"

# A key named queue:NAME is queue NAME's own: every job of the queue holds it.
QUEUE_KEY = "queue:"

# Every number queuectl takes, from the command line, a JSON job or
# config.json, is checked by check_value() against this one table:
# name: (kind, minimum, maximum, meaning). Kinds: int, a whole number; num, a
# number; dur, seconds, which typed text may also give as a duration (90s,
# 5m, 2h, 1d). Maxima refuse absurd values.
VALUE_RULES = {
    # config keys (CONFIG_DEFAULTS), also job fields where they share a name
    "max_retries": ("int", 0, 10_000, "retries after the first attempt"),
    "backoff_base": ("num", 1, 1000, "backoff base, a number >= 1"),
    "max_backoff": ("dur", 0, 31_536_000, "cap on one backoff wait, seconds"),
    "job_timeout": ("dur", 0, 31_536_000, "default timeout, seconds, 0 = none"),
    "kill_grace": ("dur", 0, 3600, "seconds between SIGTERM and SIGKILL"),
    "slow_factor": ("num", 0, 1000, "times the queue's p95 run time, 0 = never"),
    "hook_timeout": ("dur", 0, 31_536_000, "a hook's timeout, seconds, 0 = none"),
    "mem": ("size", 0, 2 ** 50, "bytes of address space per process, 0 = no limit"),
    "cpu_time": ("dur", 0, 31_536_000, "CPU seconds per process, 0 = no limit"),
    "nofile": ("int", 0, 1_048_576, "open files per process, 0 = no limit"),
    "nice": ("int", -20, 19, "added to the worker's niceness, 0 = unchanged"),
    # job fields
    "timeout": ("dur", 0, 31_536_000, "seconds, 0 = none"),
    "priority": ("int", -1_000_000, 1_000_000, "higher runs first"),
    # command-line options only
    "count": ("int", 1, 256, "job threads in this process"),
    "limit": ("int", 0, 1_000_000_000, "rows, 0 = all"),
    "tail": ("int", 0, 1_000_000_000, "lines"),
    "wait": ("dur", 0, 31_536_000, "seconds to wait"),
    "interval": ("dur", 0, 86_400, "seconds between refreshes"),
    "key_limit": ("int", 1, 1_000_000, "running jobs that may hold the key at once"),
    "catch_up": ("int", 1, 1000, "missed slots enqueued after downtime"),
    "jitter": ("dur", 0, 86_400, "seconds a slot's start may be spread over"),
}

LEASE = 30.0             # a worker whose heartbeat is older is presumed gone

HEARTBEAT = 5.0          # seconds between heartbeats and recovery scans

BUSY_TIMEOUT = 30.0      # seconds a command waits for a busy database

WORKER_LOG_MAX = 10_000_000   # bytes of worker.log before it is rotated

PID_DELAY = 0.05         # a job still running after this gets its pid recorded

FDS_BASE = 32            # descriptors a worker process needs, besides its threads

FDS_PER_THREAD = 8       # a job thread's: db, WAL, shm, log, pidfd, spawn, spare

ID_CHARS = "0123456789abcdefghjkmnpqrstvwxyz"   # Crockford base32, lower case

MAX_ID = 128

O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)

O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)

# The job's own wrapper, run as `sh -c JOB_WRAPPER sh`.
# Its limits (--mem, --cpu-time, --nofile: ulimit) are set in the shell,
# before the command runs, so the command and its children never run
# without them; --nice runs the shell itself under nice(1). Its inputs
# travel in the environment (only the owner can read a process's environment;
# anyone can read its argv with ps) and are unset before the command runs.
# It first creates the status file exclusively (noclobber uses O_EXCL): that
# is the start fence. Recovery and cancel revoke a claim that has not started
# by creating the file first, so a worker that was frozen between its claim
# and its spawn can never start a job it has lost (exit 125, nothing run).
# The EXIT trap writes the exit status there, so the outcome of a job is known
# even when the worker that started it has died. The command runs as the
# body of a function, not through eval, so that what its shell says reads
# as from any sh -c (`sh: 1: rsync: not found`), without the wrapper's name.
# With a launcher, the wrapper runs LAUNCHER sh -c COMMAND instead, the whole
# line quoted by the worker (launch_line), so the fence, the trap and the
# process group are the same.
JOB_WRAPPER = (
    '__queuectl_s=$__QUEUECTL_STATUS __queuectl_c=$__QUEUECTL_COMMAND '
    '__queuectl_d=$__QUEUECTL_CWD __queuectl_u=$__QUEUECTL_UMASK '
    '__queuectl_l=$__QUEUECTL_LIMITS __queuectl_x=$__QUEUECTL_LAUNCH; '
    'unset __QUEUECTL_STATUS __QUEUECTL_COMMAND '
    '__QUEUECTL_CWD __QUEUECTL_UMASK __QUEUECTL_LIMITS __QUEUECTL_LAUNCH; '
    'umask 077; set -C; { true > "$__queuectl_s"; } 2>/dev/null || exit 125; set +C; '
    'trap \'echo $? >> "$__queuectl_s"\' EXIT; umask "$__queuectl_u"; '
    'eval "$__queuectl_l" || exit 126; '
    'cd -- "$__queuectl_d" || exit 126; if [ -n "$__queuectl_x" ]; then '
    'eval "$__queuectl_x"; else eval "__queuectl_job() { $__queuectl_c\n\n}" '
    '&& __queuectl_job; fi')

WRAPPER_REFUSED = 125        # the wrapper's exit when its start fence was taken

# A job runs in the environment of whoever enqueued it, as with at(1), but
# without these (OpenBSD at's list: a terminal and an agent that will be gone,
# and shell internals) and without QUEUECTL_* (the worker sets the job's own).
ENV_NOT_CAPTURED = (b"TERM", b"TERMCAP", b"DISPLAY", b"_", b"SHELLOPTS",
                    b"BASH_VERSINFO", b"EUID", b"GROUPS", b"PPID", b"UID",
                    b"SSH_AUTH_SOCK", b"SSH_AGENT_PID")


# Errors ######################################################################

class QueuectlError(Exception):
    """The root of every error the user is meant to see; main() prints it."""
    code = EXIT_FAIL

class UsageError(QueuectlError):
    code = EXIT_USAGE

class BusyError(QueuectlError):
    code = EXIT_TEMPFAIL

class NoSuchJob(QueuectlError):
    """A job named by id or number that does not exist (serve: a 404)."""


# Fault points ################################################################

# Tests freeze or break a worker at a named point, deterministically, instead
# of sleeping and hoping to hit a window: QUEUECTL_FAULT="after-claim:stop" or
# "record:fail*3" (points and actions are listed in test_queuectl.py). Unset,
# a point costs one list lookup.

# Every fault point, in the order a job meets them (the test module's
# docstring says what each is; a test checks both lists and every call).
FAULT_POINTS = ("after-claim", "before-spawn", "after-spawn", "read-status", "before-record",
                "record", "adopt-store", "fire", "wait-began")

FAULT_ACTIONS = ("stop", "kill", "raise", "fail")

_FAULTS = []         # [parsed QUEUECTL_FAULT]: {point: [action, job id, times]}

def fault(point, job_id=None):
    """Act as QUEUECTL_FAULT asks at this point, if it names it."""
    if not _FAULTS:
        _FAULTS.append(_parse_faults(os.environ.get("QUEUECTL_FAULT", "")))
    armed = _FAULTS[0].get(point)
    if not armed or armed[2] <= 0 or armed[1] not in (None, job_id):
        return
    armed[2] -= 1
    import signal
    import threading
    if armed[0] in ("stop", "kill"):
        # To this very thread: it cannot run on while the stop spreads to
        # the whole process (os.kill could let it take a few more steps).
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP
                            if armed[0] == "stop" else signal.SIGKILL)
    elif armed[0] == "raise":
        raise RuntimeError(f"injected fault at {point}")
    elif armed[0] == "fail":
        raise QueuectlError(f"database error: injected fault at {point}: disk I/O error")

def _parse_faults(text):
    faults = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        point, _, action = item.partition(":")
        action, _, times = action.partition("*")
        action, _, job_id = action.partition("@")
        if point not in FAULT_POINTS or action not in FAULT_ACTIONS:
            raise ValueError(f"QUEUECTL_FAULT: no fault point {point!r} or action "
                             f"{action!r}")          # a test's typo, loud
        faults[point] = [action, job_id or None, int(times or 1)]
    return faults


# Text and time: ids, timestamps, durations ###################################

def valid_name(s, more=""):
    """True when s is a valid queue name, key or schedule name (it may name
    a file); a job id may also hold @ and : (more), as a schedule's jobs'
    ids do (nightly@2026-12-01T03:00)."""
    if not isinstance(s, str) or not 0 < len(s) <= MAX_ID or not s.isascii():
        return False
    if not s[0].isalnum():
        return False
    return all(c.isalnum() or c in "._-" or c in more for c in s)

ID_MORE = "@:"                   # what a job id may hold besides a name's characters

def check_name(s, what="job id", longest=MAX_ID):
    more = ID_MORE if what == "job id" else ""
    if not valid_name(s, more) or len(s) > longest:
        raise UsageError(
            f"invalid {what} {s[:40]!r}{'…' if len(s) > 40 else ''}: use 1-{longest} of "
            "A-Z a-z 0-9 . _ -" + (" @ :" if more else "") + " starting with a letter or digit")
    return s

def new_id():
    """A short random id that is easy to type: 6 chars of Crockford base32."""
    return "".join(ID_CHARS[b & 31] for b in os.urandom(6))

def _days_from_civil(y, m, d):
    # Howard Hinnant's algorithm: days since 1970-01-01 (proleptic Gregorian).
    y -= m <= 2
    era = (y if y >= 0 else y - 399) // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468

_iso_second = (None, "")     # the last second formatted and its text, swapped whole

def iso(ts):
    """Epoch seconds -> the stored form, UTC ISO-8601 with microseconds."""
    if ts is None:
        return None
    whole = int(ts // 1)
    us = round((ts - whole) * 1_000_000)
    if us >= 1_000_000:
        whole, us = whole + 1, us - 1_000_000
    global _iso_second
    second, text = _iso_second
    if second != whole:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        _iso_second = (whole, text)
    return f"{text}.{us:06d}Z"

def epoch(s):
    """The stored ISO form -> epoch seconds."""
    if s is None:
        return None
    days = _days_from_civil(int(s[0:4]), int(s[5:7]), int(s[8:10]))
    secs = days * 86400 + int(s[11:13]) * 3600 + int(s[14:16]) * 60 + int(s[17:19])
    return secs + (float("0" + s[19:-1]) if s[19] == "." else 0.0)

def show_time(s):
    """The stored ISO form -> the one JSON and metrics print: UTC, to the
    second."""
    return None if s is None else s[:19] + "Z"

def human_time(ts):
    """Epoch seconds (or the stored ISO form) -> the one clock of human
    output: local time with its zone, 2026-12-06 03:00:00 EST (UTC with
    QUEUECTL_UTC=1). Worker lines, log lines, status, show and doctor."""
    if isinstance(ts, str):
        ts = epoch(ts)
    if os.environ.get("QUEUECTL_UTC", "") not in ("", "0"):
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))
    t = time.localtime(ts)
    return time.strftime("%Y-%m-%d %H:%M:%S ", t) + (t.tm_zone or time.strftime("%z", t))

def parse_duration(text, what="duration"):
    """'90', '90s', '5m', '2h', '1d', '1w', '1h30m' -> seconds (float)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    s = str(text).strip().lower()
    total, num, seen = 0.0, "", False
    for c in s:
        if c.isdigit() or c == ".":
            num += c
        elif c in units and num:
            total += _number(num, text, what) * units[c]
            num, seen = "", True
        else:
            num = ""
            break
    else:
        if num:
            total += _number(num, text, what)
            seen = True
        if seen and total < 1e10:
            return total
    raise UsageError(f"invalid {what} {text!r}: use seconds or a number with "
                     "s, m, h, d or w (90, 90s, 5m, 2h, 1d, 1h30m)")

def parse_size(text):
    """'512M', '2G', '2GiB', '1048576' -> bytes (K, M, G, T: powers of 1024)."""
    t = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    mult = 1
    if t[-1:] in "KMGT" and t[-1:]:
        mult, t = 1024 ** ("KMGT".index(t[-1]) + 1), t[:-1]
    try:
        v = float(t)
        if v != v or v < 0 or v * mult >= 2 ** 60:
            raise ValueError
    except ValueError:
        raise UsageError(f"invalid size {text!r}: use bytes or a number with K, M, "
                         "G or T (512M, 2G)") from None
    return int(v * mult)

def human_size(n):
    """Bytes -> '512M', '2G', '1.5G' (powers of 1024), as --mem takes them."""
    for unit, size in (("T", 2 ** 40), ("G", 2 ** 30), ("M", 2 ** 20), ("K", 1024)):
        if n >= size:
            return f"{n / size:.1f}".removesuffix(".0") + unit
    return f"{n}B"

def _number(num, text, what):
    try:
        return float(num)
    except ValueError:
        raise UsageError(f"invalid {what} {text!r}") from None

def parse_time(text, now=None):
    """A time as a person types it -> epoch seconds. Local time unless an
    offset is given: '03:00' (the next 03:00), 'today 18:30', 'tomorrow
    03:00', '2026-12-01', '2026-12-01 03:00', '+90m' (from now), 'now', or
    ISO-8601 ('2026-11-23T09:30:00Z', '2026-11-23T09:30+02:00')."""
    import datetime
    s = " ".join(str(text).split())
    now = time.time() if now is None else now
    low = s.lower()
    if low == "now":
        return now
    if low.startswith("+"):
        try:
            return now + parse_duration(s[1:], "time")
        except UsageError:
            raise UsageError(f"invalid time {text!r}: after + give a duration "
                             "such as +90s, +90m, +2h or +1d") from None
    day, _, clock = low.rpartition(" ") if " " in low else ("", "", low)
    if day in ("", "today", "tomorrow") and _is_clock(clock):
        hour, minute, second = (int(x) for x in (clock + ":0").split(":")[:3])
        today = datetime.datetime.fromtimestamp(now).replace(
            hour=hour, minute=minute, second=second, microsecond=0, fold=0)
        one_day = datetime.timedelta(days=1)
        when = local_instant(today + one_day if day == "tomorrow" else today)
        if not day and when <= now:      # '03:00' is the next one
            when = local_instant(today + one_day)
        return when
    if s[-1:] in "zZ" and s:
        s = s[:-1] + "+00:00"
    try:
        dt = datetime.datetime.fromisoformat(s)
    except ValueError:
        raise UsageError(
            f"invalid time {text!r}: use 03:00, tomorrow 03:00, 2026-12-01 03:00 "
            "(local time), +90m, or ISO-8601 such as 2026-12-01T03:00:00Z or "
            "2026-12-01T03:00+02:00") from None
    try:                        # a naive one is local time, by one rule
        return dt.timestamp() if dt.tzinfo else local_instant(dt)
    except (OverflowError, OSError, ValueError):
        raise UsageError(f"time {text!r} is out of range: use a time from "
                         "1970 to 9999") from None

def local_instant(t):
    """The epoch seconds of a naive local time, by the one rule for every
    form a time is typed in and for every schedule slot: a time the clock
    shows twice (turned back) is its first instant; one it skips (turned
    forward) is the first minute after the gap."""
    import datetime as dt
    frac = t.microsecond / 1e6
    first = t = t.replace(microsecond=0, fold=0)
    for _ in range(24 * 60):
        ts = t.timestamp()
        if dt.datetime.fromtimestamp(ts) == t:
            return ts + frac
        t += dt.timedelta(minutes=1)
    return first.timestamp() + frac

def now_label(now=None):
    """The minute (a naive local time) that is now for schedules: the latest
    whose instant (local_instant) has come. While the clock repeats an hour
    it shows minutes whose first instant has passed: those are behind us."""
    import datetime as dt
    now = time.time() if now is None else now
    t = dt.datetime.fromtimestamp(now).replace(second=0, microsecond=0, fold=0)
    for _ in range(24 * 60):
        nxt = t + dt.timedelta(minutes=1)
        if local_instant(nxt) > now:
            break
        t = nxt
    return t

def _is_clock(text):
    """'3:00', '03:00' or '03:00:30': a time of day."""
    parts = text.split(":")
    return (len(parts) in (2, 3) and all(p.isdigit() and len(p) <= 2 for p in parts)
            and int(parts[0]) < 24 and all(int(p) < 60 for p in parts[1:]))

def local_time(ts, now=None, short=False):
    """Epoch seconds -> a local time for people: '03:00' today, 'tomorrow
    03:00', 'Tue 03:00' within a week, else '2026-12-01 03:00'. short (for
    tables): 'Tue 03:00' for tomorrow too, '12-01 03:00' within the year."""
    now = time.time() if now is None else now
    t, n = time.localtime(ts), time.localtime(now)
    days = (_days_from_civil(t.tm_year, t.tm_mon, t.tm_mday)
            - _days_from_civil(n.tm_year, n.tm_mon, n.tm_mday))
    clock = time.strftime("%H:%M", t)
    if days == 0:
        return clock
    if days == 1 and not short:
        return "tomorrow " + clock
    if 0 < days < 7:
        return time.strftime("%a ", t) + clock
    if short and t.tm_year == n.tm_year:
        return time.strftime("%m-%d ", t) + clock
    return time.strftime("%Y-%m-%d ", t) + clock

def plural(n, word):
    return f"{n} {word}{'' if n == 1 else 's'}"

def human_duration(secs):
    """Seconds -> '45s', '3m', '2h5m', '3d'."""
    secs = abs(secs)
    if secs < 0.9995:
        return f"{secs * 1000:.0f}ms"
    if secs < 10:
        return f"{secs:.1f}s".replace(".0s", "s")
    if secs < 59.5:
        return f"{secs:.0f}s"
    minutes = round(secs / 60)
    if minutes < 60:
        return f"{minutes}m"
    if minutes < 24 * 60:
        h, m = divmod(minutes, 60)
        return f"{h}h{m}m" if m else f"{h}h"
    return f"{round(secs / 86400)}d"

def relative(s, now=None):
    """A stored time -> '3m ago' / 'in 2h'."""
    if s is None:
        return "-"
    delta = epoch(s) - (time.time() if now is None else now)
    if abs(delta) < 1:
        return "now"
    return f"in {human_duration(delta)}" if delta > 0 else f"{human_duration(delta)} ago"


# Files: private files, atomic writes, logs and status files ##################

def ensure_private_dir(path):
    """Create path 0700 if missing; return it."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    else:
        os.chmod(path, 0o700)
    return path

def check_private(path, what):
    """Refuse a file or directory another user could write or owns."""
    st = os.stat(path)
    if st.st_uid != os.geteuid():
        import pwd
        try:
            owner = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            owner = f"#{st.st_uid}"
        home = path if what == "home directory" else os.path.dirname(path)
        user = owner if owner[0] != "#" else f"'{owner}'"     # # starts a comment
        raise UsageError(f"{what} {path} belongs to {owner} (uid {st.st_uid}), not to "
                         f"you (uid {os.geteuid()}): refusing to use it; run queuectl "
                         f"as its owner: sudo -u {user} queuectl --home {home} …")
    if st.st_mode & 0o022:
        raise UsageError(
            f"{what} {path} is writable by group or others (mode "
            f"{st.st_mode & 0o777:o}); whoever can write it can run commands as "
            f"you. Fix it with: chmod go-w {path}")

def open_private(path, flags):
    """Open a file 0600 without following a symlink at its name."""
    fd = os.open(path, flags | os.O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o777 != 0o600:      # a umask such as 0277
            os.fchmod(fd, 0o600)
    except OSError:
        os.close(fd)
        raise
    return fd

def write_atomic(path, text):
    """Write a file whole or not at all: temp file, fsync, rename."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = open_private(tmp, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)

def remove_file(path):
    try:
        os.unlink(path)
    except OSError:
        pass

def log_path(home, job_id):
    return os.path.join(home, "logs", job_id + ".log")

def status_path(home, job_id, token):
    return os.path.join(home, "run", f"{job_id}.{token}.exit")

def read_status(path):
    """What the job's wrapper left at path, as (kind, value):
    ('absent', None)     the attempt has not started (its fence is free);
    ('revoked', worker)  the claim of worker was revoked before it started;
    ('running', None)    it started and has no exit status yet (or died
                         without writing one);
    ('exit', status)     it ended with this exit status;
    ('unknown', error)   the file cannot be read now (EMFILE, EIO...):
                         uncertainty, on which nothing may be decided."""
    try:
        fd = os.open(path, os.O_RDONLY | O_NOFOLLOW | O_CLOEXEC)
    except FileNotFoundError:
        return "absent", None
    except OSError as e:
        return "unknown", e.strerror
    try:
        data = os.read(fd, 256)
    except OSError as e:
        return "unknown", e.strerror
    finally:
        os.close(fd)
    if data.startswith(b"revoked "):
        return "revoked", data[8:].decode("ascii", "replace").strip()
    try:
        return ("exit", int(data)) if data.endswith(b"\n") else ("running", None)
    except ValueError:
        return "running", None

def revoke(path, worker):
    """Take the start fence of worker's claim: True when taken (its shell can
    never run the command now), False when the attempt started first.
    OSError when it could not be taken (a full disk, EMFILE...): then
    nothing changed. The marker is written whole to a temporary file and
    linked into place, so the fence never exists without saying "revoked"
    (an empty one would read as "started")."""
    tmp = f"{path}.{os.getpid()}.{new_id()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW
                 | O_CLOEXEC, 0o600)
    try:
        data = f"revoked {worker}\n".encode()
        if os.write(fd, data) != len(data):
            raise OSError(28, "short write")
        os.close(fd)
        fd = None
        try:
            os.link(tmp, path)              # EEXIST: the attempt started first
        except FileExistsError:
            return False
        return True
    finally:
        if fd is not None:
            os.close(fd)
        remove_file(tmp)

def log_line(fd, text):
    """Append a queuectl line to an open log, on a line of its own."""
    size = os.fstat(fd).st_size
    if size and os.pread(fd, 1, size - 1) != b"\n":
        text = "\n" + text
    os.write(fd, text.encode("utf-8", "replace"))

def append_log(home, job_id, text):
    fd = open_private(log_path(home, job_id), os.O_RDWR | os.O_APPEND)
    try:
        log_line(fd, text)
    finally:
        os.close(fd)

def stat_isdir(path):
    """Whether path is a directory (False if there is none); PermissionError
    when a directory on the way cannot be searched."""
    import stat
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False

def _safe_append(home, job_id, text):
    try:
        append_log(home, job_id, text)
    except OSError:
        pass

def open_log(path):
    """A job's log opened for reading, never through a planted symlink or
    anything but a regular file; None when it does not exist (yet)."""
    import errno
    import stat
    try:
        fd = os.open(path, os.O_RDONLY | O_NOFOLLOW | O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise QueuectlError(f"the log {path} is not a regular file; refusing "
                                "to read it") from None
        raise QueuectlError(f"cannot read the log {path}: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise QueuectlError(f"the log {path} is not a regular file; refusing to read it")
    return os.fdopen(fd, "rb")


# Processes: /proc, process groups, waiting, spawning #########################

def poll_until(cond, timeout=None, first=0.001, cap=0.1):
    """Call cond() until it is true (True) or timeout seconds have passed
    (False; None: no limit), sleeping first, then twice as long each time,
    up to cap. The one polling loop: every wait that has no event to block
    on goes through here, and every one has a limit or says why not."""
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = first
    while not cond():
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            delay = min(delay, left)
        time.sleep(delay)
        delay = min(delay * 2, cap)
    return True

def proc_stat(pid):
    """The fields of /proc/<pid>/stat after the command name (state first,
    then ppid, pgrp, ...; start time at index 19); None when the process is
    gone. OSError when /proc cannot tell (none here, EMFILE...)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    return data[data.rfind(b")") + 2:].split()

def proc_start(pid):
    """(alive, start time) of a process; start time from /proc where the OS
    has it (guards against pid reuse), else None. Zombies are not alive."""
    try:
        fields = proc_stat(pid)
    except OSError:
        fields = False
    if fields is None:
        return False, None
    if fields:
        if fields[0] in (b"Z", b"X"):
            return False, None
        return True, fields[19].decode()
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False, None
    except PermissionError:
        pass
    return True, None

def find_job_process(token, tries=3):
    """(pid, start) of the live leader of the attempt whose claim token is
    token, found through /proc (Linux) by the QUEUECTL_CLAIM in its
    environment (which an `exec` in the command keeps, and which no other
    attempt or home shares); (None, None) elsewhere or when none. A process
    still inside execve shows an empty environment: look again briefly.
    OSError when /proc cannot be read: that is not evidence of an end."""
    found, left = [], [tries]

    def look():
        found[:] = claim_processes(token, leader_only=True)
        left[0] -= 1
        return bool(found) or left[0] <= 0
    poll_until(look, first=0.01, cap=0.02)
    return found[0] if found else (None, None)

def claim_processes(token, leader_only=False):
    """[(pid, start)] of the live processes whose environment carries the
    claim token (only process group leaders with leader_only). Raises
    OSError when /proc cannot be listed (EMFILE...); [] without /proc."""
    if not os.path.isdir("/proc/self"):
        return []
    needle = f"\0QUEUECTL_CLAIM={token}\0".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = b"\0" + f.read()
            if needle not in env:
                continue
            if leader_only and os.getpgid(pid) != pid:   # a child of the job
                continue
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue                        # gone, or not ours
        alive, start = proc_start(pid)
        if alive:
            found.append((pid, start))
    return found

def live_claims():
    """The claim tokens of every live process that carries one (one pass
    over /proc). Raises OSError when /proc cannot be listed; empty without
    /proc."""
    if not os.path.isdir("/proc/self"):
        return set()
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = b"\0" + f.read()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        at = env.find(b"\0QUEUECTL_CLAIM=")
        if at >= 0:
            end = env.find(b"\0", at + 1)
            found.add(env[at + 16:end if end >= 0 else None].decode("ascii", "replace"))
    return found

def same_process(pid, start):
    """True while the process pid (started at start, if known) still runs."""
    if not pid:
        return False
    alive, now_start = proc_start(pid)
    return alive and (start is None or now_start is None or start == now_start)

def group_alive(pgid):
    """True while a process of the group runs. Zombies do not count: an
    init that reaps orphans slowly must not make a kill wait for nothing."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        names = os.listdir("/proc")
    except OSError:
        return True                         # no /proc: trust kill(0)
    for name in names:
        if not name.isdigit():
            continue
        try:
            fields = proc_stat(name)
        except OSError:
            continue
        if fields and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False

def attempt_alive(token, pgid=None, start=None):
    """True while a process of an attempt may be left: one of its process
    group (pgid, when known; its leader started at start) or one that
    carries its claim token. Its shell's end is not the attempt's end (a
    child may run on), and a look that failed (EMFILE...) is no evidence of
    an end."""
    try:
        return bool(pgid and our_group(pgid, start) or claim_processes(token))
    except OSError:
        return True

def our_group(pgid, start=None):
    """True while the process group pgid, whose leader started at start (if
    known), has a member. The kernel never reuses a pid while a group has
    it as its pgid: a live process of that pid that started at another
    time means the group we knew is gone."""
    alive, now_start = proc_start(pgid)
    if alive and start is not None and now_start is not None and now_start != start:
        return False
    return group_alive(pgid)

def kill_claim(token, sig, but_group=None):
    """Signal every process that carries the claim token (unique to one
    attempt of one home, so never another's), but those of the process
    group but_group (signalled as a group: once is enough)."""
    try:
        found = claim_processes(token)
    except OSError:
        return
    for pid, _ in found:
        try:
            if but_group is None or os.getpgid(pid) != but_group:
                os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

def signal_group(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass

def kill_group(pgid, grace, leader_gone=lambda: True, send=None):
    """SIGTERM the process group, SIGKILL it after grace seconds if any
    member is left; returns once no member is left (or after 5 s more).
    send(sig), when given, sends each signal (a worker checks there that the
    job is still its own)."""
    import signal
    send = send or (lambda sig: signal_group(pgid, sig))
    def ended():
        return leader_gone() and not group_alive(pgid)
    send(signal.SIGTERM)
    if poll_until(ended, grace, first=0.005):
        return
    send(signal.SIGKILL)
    poll_until(ended, 5, first=0.005)

def readable(fds, timeout=None):
    """The descriptors of fds that are readable (or at EOF, or hung up)
    within timeout seconds (None: no limit). poll(), not select(): select()
    fails for a descriptor above 1023, which a worker with many threads
    reaches."""
    import select
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:          # in slices of a day at most: poll() takes an int of ms
        left = 86400.0 if deadline is None else min(deadline - time.monotonic(), 86400.0)
        ready = poller.poll(max(int(left * 1000 + 0.999), 0))
        if ready or (deadline is not None and time.monotonic() >= deadline):
            return [fd for fd, _ in ready]

def wait_exit(pid, timeout, proc=None, start=None):
    """Wait up to timeout seconds (None: forever) for a process to end; True
    if it did. proc: our own child (reaped here); else any process, by pid
    and, against pid reuse, its start time."""
    fd = None
    if hasattr(os, "pidfd_open"):
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            fd = None
        if fd is not None and proc is None and not same_process(pid, start):
            return True          # it ended before the pidfd; the pid is another's now
    try:
        if fd is not None:
            # A pidfd is readable once the process has ended, reaped or not.
            ready = readable([fd], timeout)
            if ready and proc is not None and proc.poll() is None:
                proc.wait()              # ended, so not reaped a moment later
            return bool(ready) or (proc is not None and proc.poll() is not None)
        if proc is not None:
            return poll_until(lambda: proc.poll() is not None, timeout)
        return poll_until(lambda: not same_process(pid, start), timeout)
    finally:
        if fd is not None:
            os.close(fd)

class Child:
    """A job shell started by spawn(): the part of Popen the worker uses."""

    def __init__(self, pid):
        import threading
        self.pid = pid
        self.returncode = None
        self.rusage = None       # what it used (and its children it waited for)
        # One waitpid at a time, and never a blocking one under the lock:
        # poll() from another thread (stop --now) must not wait for the end.
        self._lock = threading.Lock()

    def poll(self):
        with self._lock:
            if self.returncode is None:
                try:
                    pid, status, usage = os.wait4(self.pid, os.WNOHANG)
                except ChildProcessError:
                    pid, status, usage = self.pid, 255 << 8, None
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
                    if usage is not None:
                        self.rusage = {"cpu_user": round(usage.ru_utime, 6),
                                       "cpu_sys": round(usage.ru_stime, 6),
                                       "max_rss": usage.ru_maxrss * 1024}
            return self.returncode

    def wait(self):
        try:
            fd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):   # no pidfd here, or already reaped
            poll_until(lambda: self.poll() is not None, cap=0.05)
            return self.returncode
        try:
            readable([fd])                  # readable once it has ended
        finally:
            os.close(fd)
        poll_until(lambda: self.poll() is not None)
        return self.returncode

def nice_path():
    """nice(1), which --nice runs the job's shell under."""
    for path in ("/usr/bin/nice", "/bin/nice"):
        if os.access(path, os.X_OK):
            return path
    raise QueuectlError("--nice needs nice(1), and there is none in /usr/bin or /bin")

def spawn(argv, cwd, env, stdin, out):
    """Start argv in a new session with stdin/stdout/stderr set; a Child.
    posix_spawn (vfork-fast, little Python) where it can set the session,
    else subprocess.Popen. JOB_WRAPPER's cd applies cwd either way."""
    import signal
    if hasattr(os, "POSIX_SPAWN_DUP2"):
        try:
            # Python ignores SIGPIPE and SIGXFSZ; a shell cannot undo an
            # ignore it inherits, so jobs get the defaults back here (Popen's
            # restore_signals does the same).
            return Child(os.posix_spawn(argv[0], argv, env, setsid=True, file_actions=[
                (os.POSIX_SPAWN_DUP2, stdin, 0), (os.POSIX_SPAWN_DUP2, out, 1),
                (os.POSIX_SPAWN_DUP2, out, 2)],
                setsigdef=(signal.SIGPIPE, signal.SIGXFSZ)))
        except NotImplementedError:
            pass                            # no POSIX_SPAWN_SETSID here
    import subprocess
    return subprocess.Popen(argv, cwd=cwd, env=env, stdin=stdin, stdout=out,
                            stderr=out, start_new_session=True)

def _drain_fd(fd):
    try:
        while os.read(fd, 4096):
            pass
    except (BlockingIOError, OSError):
        pass


# Values, home and config #####################################################

def check_value(name, value, source=None, text=False):
    """Check one value for name against VALUE_RULES -> int or float. With
    text (typed on the command line or given to config set), a string is
    parsed, and a dur may be a duration such as 2h; otherwise (JSON) it must
    already be a number. A UsageError names what is allowed."""
    kind, lo, hi, meaning = VALUE_RULES[name]
    what = {"int": "a whole number", "num": "a number",
            "dur": "seconds or a duration (90s, 5m, 2h)" if text
            else "a number of seconds",
            "size": "bytes or a size (512M, 2G)" if text else "a number of bytes"}[kind]
    allowed = f"{name} takes {what} from {lo} to {hi} ({meaning})"
    v = value
    if text and isinstance(value, str):
        t = value.strip()
        try:
            v = int(t)
        except ValueError:
            try:
                v = float(t)
            except ValueError:
                v = None
                try:
                    if kind == "dur":
                        v = parse_duration(t)
                    elif kind == "size":
                        v = parse_size(t)
                except UsageError:
                    pass
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v \
            or v in (float("inf"), float("-inf")) \
            or (kind in ("int", "size") and v != int(v)) \
            or not lo <= v <= hi:
        raise UsageError(f"invalid {source or name} {value!r}: {allowed}")
    return int(v) if kind in ("int", "size") or v == int(v) else float(v)

def check_nofile(n, source="--nofile"):
    """0 (none), or enough descriptors for the job's own shell to write its
    status file: 16 or more."""
    if 0 < n < 16:
        raise UsageError(f"invalid {source} {n}: give 0 (no limit) or 16 or more "
                         "(the job's shell needs a few descriptors of its own)")
    return n

def check_config_value(key, value, source="value"):
    """One value of config.json (a JSON number, or text for TEXT_KEYS) ->
    the value as stored; key may be a queue's (queue.NAME.KEY)."""
    base = key.rpartition(".")[2]
    if base == "nofile":
        return check_nofile(check_value(base, value, source), key)
    if base not in TEXT_KEYS:
        return check_value(base, value, source)
    if not isinstance(value, str):
        raise UsageError(f"invalid {source} {value!r} for {key}: give text")
    if base in ("retry_on", "no_retry_on"):
        return parse_codes(value, base) if value.strip() else ""
    if base == "backoff_jitter":
        return parse_jitter(value, source)
    if base == "launcher":
        return check_launcher(value, source)
    if base == "launcher_hosts":
        hosts = [h.strip() for h in value.split(",") if h.strip()]
        if any(not h.isprintable() or " " in h for h in hosts):
            raise UsageError(f"invalid {source} {value!r} for launcher_hosts: give host "
                             "names, comma-separated (build1,build2)")
        return ",".join(hosts)
    if base == "scheduling_mode":
        if value.strip().lower() not in ("priority", "fifo"):
            raise UsageError(f"invalid {source} {value!r} for scheduling_mode: give priority "
                             "(higher priority first) or fifo (priority ignored)")
        return value.strip().lower()
    return check_hook(value, base)

def check_launcher(text, source="--launcher"):
    """A launcher: shell words, a command prefix ("" = none)."""
    import shlex
    if not isinstance(text, str) or "\0" in text or not _utf8(text):
        raise UsageError(f"invalid {source} {text!r}: give a command prefix such as "
                         "'srun --ntasks=1 --quiet --'")
    try:
        shlex.split(text)
    except ValueError as e:
        raise UsageError(f"invalid {source} {text!r}: {e}") from None
    return text.strip()

def parse_jitter(text, source="value"):
    """backoff_jitter as typed -> as stored: "N%" (1-100), "full" or "0"."""
    word = text.strip().lower()
    if word in ("0", "0%", "off", "none", "no"):
        return "0"
    if word == "full":
        return word
    n = word.removesuffix("%")
    if n.isdigit() and 1 <= int(n) <= 100:
        return f"{int(n)}%"
    raise UsageError(f"invalid {source} {text!r} for backoff_jitter: give N% (1-100: "
                     "each wait is spread by up to N% either way), full (anywhere from "
                     "0 to the wait) or 0 (exact waits)")

def parse_config_text(key, text):
    """A value typed on the command line for a config key -> a checked value."""
    if key.rpartition(".")[2] == "nofile":
        return check_nofile(check_value("nofile", text, "value", text=True), key)
    if key.rpartition(".")[2] in TEXT_KEYS:
        return check_config_value(key, text)
    return check_value(key.rpartition(".")[2], text, "value", text=True)

def check_hook(text, what):
    """A hook's command (text for sh -c); "" means none."""
    if not isinstance(text, str) or "\0" in text or not _utf8(text):
        raise UsageError(f"invalid {what} {text!r}: give a shell command")
    return text if text.strip() else ""

# Exit-code lists of the retry policy: codes and ranges (2,64-78), and the
# words timeout and signal for an attempt that timed out or was killed.
CODE_WORDS = ("timeout", "signal")

def parse_codes(text, what="--retry-on"):
    """'2, 64-78,timeout' -> its canonical text '2,64-78,timeout'; what:
    where it was given (--retry-on, retry_on)."""
    flag = what
    items = []
    for part in str(text).split(","):
        part = part.strip().lower()
        lo, dash, hi = part.partition("-")
        try:
            if part in CODE_WORDS:
                items.append(part)
                continue
            a, b = int(lo), int(hi) if dash else int(lo)
            if not (0 <= a <= b <= 255) or not lo.isdigit() or dash and not hi.isdigit():
                raise ValueError
        except ValueError:
            raise UsageError(f"invalid {flag} {text!r}: give exit codes 0-255 and "
                             "ranges, comma-separated (2,64-78), and timeout or "
                             "signal") from None
        items.append(str(a) if a == b else f"{a}-{b}")
    return ",".join(dict.fromkeys(items))

def codes_match(codes, outcome):
    """Whether outcome (an exit code, 'timeout' or 'signal') is in codes,
    the canonical text of parse_codes."""
    for part in codes.split(","):
        if part in CODE_WORDS or isinstance(outcome, str):
            if part == outcome:
                return True
            continue
        lo, _, hi = part.partition("-")
        if int(lo) <= outcome <= int(hi or lo):
            return True
    return False

def retry_verdict(job, cfg, ended):
    """None when an attempt that ended so (an Outcome) may be retried, else
    the reason it may not: the job's retry_on/no_retry_on, or config's."""
    outcome = ended.retry_class()
    if outcome is None:
        return None          # it succeeded, never ran, or its end is unknown
    policy = effective_values(job, cfg, ("retry_on", "no_retry_on"))
    retry_on, no_retry = policy["retry_on"], policy["no_retry_on"]
    if outcome in (126, 127) and not (retry_on and codes_match(retry_on, outcome)):
        return f"not retried: it cannot run (retry_on {outcome} retries it)"
    if no_retry and codes_match(no_retry, outcome):
        return f"not retried (no_retry_on {no_retry})"
    if retry_on and isinstance(outcome, int) and not codes_match(retry_on, outcome):
        return f"not retried (retry_on {retry_on})"
    return None

# The values that apply to a job, each its own (a column of the job), else
# its queue's config (queue.NAME.KEY), else the home's: (name, config key,
# the job's column or None when only config sets it).
EFFECTIVE = (("max_retries", "max_retries", "max_retries"),
             ("timeout", "job_timeout", "timeout"),
             ("backoff_base", "backoff_base", None), ("max_backoff", "max_backoff", None),
             ("backoff_jitter", "backoff_jitter", None),
             ("kill_grace", "kill_grace", None), ("hook_timeout", "hook_timeout", None),
             *((k, k, k) for k in LIMIT_KEYS), ("retry_on", "retry_on", "retry_on"),
             ("no_retry_on", "no_retry_on", "no_retry_on"), *((k, k, None) for k in HOOK_EVENTS),
             ("launcher", "launcher", "launcher"), ("launcher_hosts", "launcher_hosts", None))

def effective(job, cfg, names=None):
    """{name: (value, source)} of the values that apply to job (all of
    EFFECTIVE, or names): source is "job", "queue" or "home". cfg: the
    home's config, or its queue_config (the same answers). The one place a
    default is resolved: a job that sets retry_on or no_retry_on sets the
    pair; a hook the job sets to "" is none (not the default)."""
    prefix = f"queue.{job['queue']}."
    own_policy = job["retry_on"] is not None or job["no_retry_on"] is not None
    hooks = None
    out = {}
    for name, key, column in EFFECTIVE:
        if names is not None and name not in names:
            continue
        if name in HOOK_EVENTS:
            if hooks is None:
                hooks = _loads(job["hooks"], {}) if job["hooks"] else {}
            if name in hooks:
                out[name] = (hooks[name], "job")
                continue
        elif column is not None and (own_policy if name in ("retry_on", "no_retry_on")
                                     else job[column] is not None):
            out[name] = (job[column] or "" if name.endswith("retry_on") else job[column],
                         "job")
            continue
        out[name] = (cfg[prefix + key], "queue") if prefix + key in cfg else \
            (cfg[key], "home")
    return out

def effective_values(job, cfg, names):
    """effective()'s values alone: {name: value}."""
    return {k: v for k, (v, _) in effective(job, cfg, names).items()}

def queue_config(cfg, queue):
    """cfg as it applies to a job of queue: its queue.NAME.KEY values win."""
    prefix = f"queue.{queue}."
    own = {k[len(prefix):]: v for k, v in cfg.items() if k.startswith(prefix)}
    return {**cfg, **own} if own else cfg

def resolve_home(arg=None):
    if arg is not None and not arg.strip():
        raise UsageError("--home needs a directory")
    home = arg or os.environ.get("QUEUECTL_HOME") or os.path.join(
        os.path.expanduser("~"), ".queuectl")
    return os.path.abspath(home)

def normalize_key(key):
    """A config key as typed (max-retries) -> as stored (max_retries); a
    queue's own value is queue.NAME.KEY."""
    text = str(key).strip()
    if text.startswith("queue."):
        queue, _, base = text[6:].rpartition(".")
        base = base.lower().replace("-", "_")
        if base not in QUEUE_KEYS or not valid_name(queue):
            raise UsageError(f"unknown config key {key!r}; a queue's own key is "
                             "queue.NAME.KEY with KEY one of " + ", ".join(QUEUE_KEYS))
        return f"queue.{queue}.{base}"
    k = text.lower().replace("-", "_")
    if k not in CONFIG_DEFAULTS:
        raise UsageError(f"unknown config key {key!r}; allowed: "
                         + ", ".join(CONFIG_DEFAULTS) + ", and queue.NAME.KEY")
    return k

class Config:
    """config.json: only the keys that were set; defaults fill the rest."""

    def __init__(self, home):
        self.path = os.path.join(home, "config.json")

    def read_set(self):
        """The keys set in the file, validated; {} when there is no file."""
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read config file {self.path}: {e}") from None
        data = json_object(text, f"config file {self.path}",
                           "; fix it or remove it to use the defaults")
        out = {}
        for key, value in data.items():
            try:
                k = normalize_key(key)
                out[k] = check_config_value(k, value)
            except UsageError as e:
                raise UsageError(f"config file {self.path}: {e}") from None
        return out

    def load(self):
        return {**CONFIG_DEFAULTS, **self.read_set()}

    def set(self, key, value):
        import json
        data = self.read_set()
        data[key] = value
        write_atomic(self.path, json.dumps(data, indent=2, sort_keys=True) + "\n")

def json_object(text, what, then=""):
    """Text that must be a JSON object (NaN and Infinity refused) -> a dict;
    a UsageError naming what (and then, what follows) otherwise."""
    import json
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except ValueError as e:
        raise UsageError(f"{what} is not valid JSON ({e}){then}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{what} must hold a JSON object{then}")
    return data

def _refuse_constant(name):
    raise ValueError(f"{name} is not allowed")

class ClaimOrder:
    """The order claims take due jobs in, from scheduling_mode (the home's
    and each queue's): by a key, then run_at, then seq. The key is
    -priority for a job of a "priority" queue and 0 for one of a "fifo"
    queue. key (SQL) and params say it in one expression (why counts by
    it); fifo and prio (None, or an SQL condition and its parameters)
    say which jobs are of fifo queues and which of priority ones, so that
    a claim walks the jobs_ready index instead of sorting every due job.
    Claims and why read this one rule."""

    __slots__ = ("key", "params", "fifo", "prio")

    def __init__(self, cfg):
        home = cfg.get("scheduling_mode", "priority")
        other = sorted({k[6:].rpartition(".")[0] for k, v in cfg.items()
                        if k.startswith("queue.") and k.endswith(".scheduling_mode")
                        and v != home})
        marks = _marks(other)
        if not other:
            self.key, self.params = ("-priority" if home == "priority" else "0"), []
            self.fifo = None if home == "priority" else ("1", [])
            self.prio = ("1", []) if home == "priority" else None
            return
        inner, outer = ("0", "-priority") if home == "priority" else ("-priority", "0")
        self.key = f"CASE WHEN queue IN ({marks}) THEN {inner} ELSE {outer} END"
        self.params = other
        named, rest = (f"queue IN ({marks})", other), (f"queue NOT IN ({marks})", other)
        self.fifo, self.prio = (named, rest) if home == "priority" else (rest, named)

def order_by(key):
    """A ClaimOrder's key as an ORDER BY (priority DESC: the index's order;
    a bare 0 would name a column)."""
    if key == "0":
        return "run_at, seq"
    return ("priority DESC" if key == "-priority" else key) + ", run_at, seq"

def backoff_delay(attempts, cfg, spread=None):
    """Seconds to wait before the retry that follows attempt number n:
    min(backoff_base ** n, max_backoff), spread by backoff_jitter so that
    jobs that failed together do not retry in lockstep. spread: a number
    from 0 to 1 (random when None; tests give one)."""
    try:
        wait = min(cfg["backoff_base"] ** attempts, cfg["max_backoff"])
    except OverflowError:
        wait = cfg["max_backoff"]
    jitter = cfg.get("backoff_jitter", "0")
    if jitter == "0" or not wait:
        return wait
    if spread is None:
        import random
        spread = random.random()
    if jitter == "full":                 # AWS's "full jitter", as Celery's
        return wait * spread
    return min(wait * (1 + (2 * spread - 1) * int(jitter[:-1]) / 100), cfg["max_backoff"])


# The job record ##############################################################

# Every column of the jobs table, declared once: (name, SQL type, the schema
# version that added it, how its value is kept, what it is for). The table's
# CREATE, the migrations' ALTERs, JOB_FIELDS and ROW_FIELDS, the INSERT,
# the spec fields enqueue takes, reset's clearing, job_public's decoding and
# the times show formats are all read off this table; a new column is one
# row here (and, with a schema bump, SCHEMA_VERSION).
#   kept: "" as is; "time" an ISO-8601 UTC text; "json" JSON text, shown
#         decoded (JSON_SHOWN: what NULL shows as); "names" JSON of an
#         object, shown as its sorted keys (never the values)
#   flags: p public (show --json, list --json); s a job spec sets it;
#          e written by enqueue's INSERT; r cleared by reset
JOB_TABLE = (
    ("seq", "INTEGER PRIMARY KEY", 1, "", ""),
    ("id", "TEXT NOT NULL UNIQUE", 1, "", "pse"),
    ("command", "TEXT NOT NULL", 1, "", "pse"),
    ("state", "TEXT NOT NULL", 1, "", "pe"),
    ("queue", "TEXT NOT NULL DEFAULT 'default'", 1, "", "pse"),
    ("priority", "INTEGER NOT NULL DEFAULT 0", 1, "", "pse"),
    ("attempts", "INTEGER NOT NULL DEFAULT 0", 1, "", "p"),
    ("max_retries", "INTEGER", 1, "", "pse"),
    ("timeout", "REAL", 1, "", "pse"),
    ("run_at", "TEXT NOT NULL", 1, "time", "pse"),
    ("depends_on", "TEXT", 1, "json", "pse"),
    ("blocked", "INTEGER NOT NULL DEFAULT 0", 1, "", "e"),
    ("cwd", "TEXT NOT NULL", 1, "", "pse"),
    ("env", "TEXT", 1, "names", "pse"),
    ("created_at", "TEXT NOT NULL", 1, "time", "pe"),
    ("updated_at", "TEXT NOT NULL", 1, "time", "pe"),
    ("started_at", "TEXT", 1, "time", "pr"),
    ("finished_at", "TEXT", 1, "time", "pr"),
    ("exit_code", "INTEGER", 1, "", "pr"),
    ("last_error", "TEXT", 1, "", "pr"),
    ("worker", "TEXT", 1, "", "pr"),
    ("claim", "TEXT", 1, "", "r"),
    ("pid", "INTEGER", 1, "", "pr"),
    ("pid_start", "TEXT", 1, "", "r"),
    ("env_id", "INTEGER", 2, "", "e"),
    ("umask", "INTEGER", 2, "", "e"),
    ("keys", "TEXT", 3, "json", "pse"),
    ("hooks", "TEXT", 3, "json", "pe"),
    ("retry_on", "TEXT", 3, "", "pse"),
    ("no_retry_on", "TEXT", 3, "", "pse"),
    ("hook_of", "TEXT", 3, "", "pe"),
    ("mem", "INTEGER", 4, "", "pse"),
    ("cpu_time", "REAL", 4, "", "pse"),
    ("nofile", "INTEGER", 4, "", "pse"),
    ("nice", "INTEGER", 4, "", "pse"),
    ("schedule", "TEXT", 4, "", "pe"),
    ("usage", "TEXT", 4, "json", "pr"),
    ("label", "TEXT", 5, "", "pse"),
    ("launcher", "TEXT", 5, "", "pse"),
)

# What a NULL JSON column shows as.
JSON_SHOWN = {"depends_on": [], "keys": [], "hooks": {}, "usage": None}

def job_columns(flag=None, since=None):
    """The names of JOB_TABLE's columns that have flag (all: None) and, with
    since, were added in that schema version."""
    return tuple(c[0] for c in JOB_TABLE if (flag is None or flag in c[4])
                 and (since is None or c[2] == since))

def job_alters(version):
    """The ALTERs that add the columns of schema version to an older jobs table."""
    return [f"ALTER TABLE jobs ADD COLUMN {c[0]} {c[1]}" for c in JOB_TABLE
            if c[2] == version]

JOB_FIELDS = job_columns("p")

ROW_FIELDS = JOB_FIELDS + tuple(c for c in job_columns() if c not in JOB_FIELDS)

JOB_TIMES = tuple(c[0] for c in JOB_TABLE if c[3] == "time")


# Job specs (validation of what enqueue takes) ################################

# A spec's fields: the columns it sets, and what it says of the job otherwise
# (delay: run_at from now; unique, if_busy: whether to add it; its hooks).
SPEC_FIELDS = {*job_columns("s"), "delay", "unique", "if_busy", *HOOK_EVENTS}

def check_key(key):
    """A concurrency key a job holds (--key): a name, not a queue's own."""
    if isinstance(key, str) and key.startswith(QUEUE_KEY):
        raise UsageError(f"invalid key {key!r}: queue:NAME is the queue's own key, "
                         "held by every job of the queue; use --queue NAME")
    if not valid_name(key):
        raise UsageError(f"invalid key {key!r}: use 1-128 of A-Z a-z 0-9 . _ - "
                         "starting with a letter or digit")
    return key

def check_limit_key(key):
    """The key of limit set/rm: a key, or queue:NAME."""
    if key.startswith(QUEUE_KEY):
        check_name(key[len(QUEUE_KEY):], "queue name")
        return key
    return check_key(key)

def check_job_name(text):
    """A job as a person names it (Store.resolve): an id, or #N."""
    if isinstance(text, str) and text[:1] == "#" and text[1:].isdigit() and text.isascii():
        return text
    return check_name(text)

def check_label(text):
    """A label (enqueue --label): any printable text, 1-100 characters."""
    if not isinstance(text, str) or not text or len(text) > 100 or not _utf8(text) or \
            not text.isprintable() or text != text.strip():
        raise UsageError(f"invalid label {text!r}: give 1-100 printable characters, "
                         "with no space at either end")
    return text

def check_if_busy(text):
    if text not in ("skip", "queue"):
        raise UsageError(f"invalid --if-busy {text!r}: use skip (enqueue nothing "
                         "while a job with the key waits or runs) or queue")
    return text

def _utf8(text):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:           # undecodable bytes from argv or a file
        return False
    return True

def _is_num(v):
    return (isinstance(v, (int, float)) and not isinstance(v, bool)
            and v == v and abs(v) != float("inf"))

def check_spec(spec):
    """Validate and normalise one job spec (a dict) in place; returns it."""
    unknown = set(spec) - SPEC_FIELDS
    if unknown:
        raise UsageError(f"unknown job field(s) {', '.join(sorted(unknown))}; "
                         f"allowed: {', '.join(sorted(SPEC_FIELDS))}")
    cmd = spec.get("command")
    if not isinstance(cmd, str) or not cmd.strip():
        raise UsageError("a job needs a non-empty command string")
    for field in ("command", "cwd"):
        if isinstance(spec.get(field), str) and not _utf8(spec[field]):
            raise UsageError(f"the {field} is not valid UTF-8")
    if "\0" in cmd:
        raise UsageError("the command contains a NUL byte")
    if spec.get("id") is not None:
        if not isinstance(spec["id"], str):
            raise UsageError(f"invalid job id {spec['id']!r}: an id is a string")
        check_name(spec["id"])
    if spec.get("queue") is not None:
        check_name(spec["queue"], "queue name")
    if spec.get("label") is not None:
        spec["label"] = check_label(spec["label"])
    if spec.get("launcher") is not None:
        spec["launcher"] = check_launcher(spec["launcher"])
    for name in ("priority", "max_retries", "timeout") + LIMIT_KEYS:
        if spec.get(name) is not None:
            spec[name] = check_value(name, spec[name],
                                     text=name in LIMIT_KEYS and isinstance(spec[name], str))
    if spec.get("nofile"):
        check_nofile(spec["nofile"])
    if spec.get("run_at") is not None and not isinstance(spec["run_at"], str):
        raise UsageError(f"invalid run_at {spec['run_at']!r}: use an ISO-8601 "
                         "string such as 2026-11-23T09:30:00Z")
    if spec.get("delay") is not None:
        d = spec.pop("delay")
        if _is_num(d):
            d = str(d)
        if not isinstance(d, str):
            raise UsageError(f"invalid delay {d!r}")
        spec["run_at"] = time.time() + parse_duration(d, "delay")
    elif spec.get("run_at") is not None:
        text = spec["run_at"]
        spec["run_at"] = parse_time(text)
        if not 0 <= spec["run_at"] < 253402300800:     # 1970 to 9999
            raise UsageError(f"run_at {text!r} is out of range: use a time "
                             "from 1970 to 9999")
    if spec.get("depends_on") is not None:
        spec["depends_on"] = _names(spec["depends_on"], "depends_on must be a list of "
                                    "job ids", check_job_name)
    env = spec.get("env")
    if env is not None:
        if not isinstance(env, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise UsageError("env must be an object of strings")
        for k, v in env.items():
            if not k.isascii() or not shell_name(k.encode()) or "\0" in v:
                raise UsageError(f"invalid environment variable name {k!r}: use "
                                 "letters, digits and _, not starting with a digit")
            if not _utf8(k) or not _utf8(v):
                raise UsageError(f"env {k!r} is not valid UTF-8")
    cwd = spec.get("cwd")
    if cwd is None:
        try:
            spec["cwd"] = os.getcwd()
        except OSError:
            raise UsageError("the current directory no longer exists; "
                             "give the job a --cwd") from None
    elif not isinstance(cwd, str) or not cwd:
        raise UsageError("cwd must be a directory path")
    else:
        spec["cwd"] = os.path.abspath(cwd)
        if not os.path.isdir(spec["cwd"]):
            raise UsageError(f"cwd {cwd!r} is not a directory")
    if not isinstance(spec.get("unique", False), bool):
        raise UsageError("unique must be true or false")
    if spec.get("keys") is not None:
        spec["keys"] = _names(spec["keys"], "keys must be a list of key names", check_key)
    if spec.get("if_busy") is not None:
        check_if_busy(spec["if_busy"])
        if spec["if_busy"] == "skip" and not spec.get("keys"):
            raise UsageError("--if-busy skip needs a --key to look for")
    for name in HOOK_EVENTS:
        if spec.get(name) is not None:
            spec[name] = check_hook(spec[name], name.replace("_", "-"))
    for name in ("retry_on", "no_retry_on"):
        if spec.get(name) is not None:
            if not isinstance(spec[name], str):
                raise UsageError(f"{name} must be text such as \"2,64-78\"")
            spec[name] = parse_codes(spec[name], name)
    if spec.get("unique") and spec.get("id") is None:
        raise UsageError("--unique needs an id (--id or \"id\")")
    return spec

def _names(value, wrong, check):
    """A JSON job's list of names (or one name) -> each checked, once, in
    order; wrong: the error for anything else."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsageError(wrong)
    return [check(v) for v in dict.fromkeys(value)]

def spec_from_text(text):
    """One enqueue argument or --stdin line -> a spec dict (not yet checked).
    A { followed by a blank starts a shell brace group ('{ date; uptime; }
    > f': a command); followed by anything else it can only be a JSON job,
    and broken JSON is an error, never a command."""
    body = text.lstrip()
    if body.startswith("{"):
        import json
        try:
            obj = json.loads(text, parse_constant=_refuse_constant)
        except ValueError as e:
            if body[1:2].isspace() and not body[1:].lstrip().startswith('"'):
                return {"command": text}         # a brace group
            raise UsageError(f"invalid JSON job ({e}): a JSON job is an object such as "
                             '{"command": "echo hi"}; a shell command that starts with { '
                             "goes after -c") from None
        if isinstance(obj, dict):
            return obj
        raise UsageError("invalid JSON job: it must be an object such as "
                         '{"command": "echo hi"}')
    return {"command": text}

def shell_name(name):
    """Whether name (bytes) can be a variable of the job's shell: others
    never reach its command, so they are neither captured nor accepted.
    [A-Za-z_][A-Za-z0-9_]*: an ASCII identifier."""
    return name.isascii() and name.decode("ascii").isidentifier()

def captured_env():
    """The caller's environment as stored for its jobs: NAME=VALUE byte
    strings joined by NUL, sorted (one blob per distinct environment), less
    ENV_NOT_CAPTURED, QUEUECTL_* and names no shell variable can have. Read
    from /proc/self/environ, the environment this process was started with:
    os.environ also holds what Python's start-up added (LC_CTYPE=C.UTF-8 by
    locale coercion)."""
    try:
        with open("/proc/self/environ", "rb") as f:
            items = f.read().split(b"\0")
    except OSError:
        items = [k + b"=" + v for k, v in os.environb.items()]
    env = {}
    for item in items:
        k, sep, _ = item.partition(b"=")
        if sep and k not in env and shell_name(k) and k not in ENV_NOT_CAPTURED \
                and not k.startswith((b"QUEUECTL_", b"__QUEUECTL_")):
            env[k] = item
    return b"\0".join(sorted(env.values()))

def env_from_blob(blob):
    """A stored environment -> {name: value} as os.environ has it."""
    env = {}
    for item in bytes(blob).split(b"\0"):
        k, _, v = item.partition(b"=")
        if k:
            env[os.fsdecode(k)] = os.fsdecode(v)
    return env

def env_key(blob):
    """A 63-bit content hash of a stored environment, to find its row (rows
    whose hashes collide are told apart by their content)."""
    try:
        from _blake2 import blake2b      # built in, unlike hashlib's OpenSSL
        digest = blake2b(blob, digest_size=8).digest()
    except ImportError:
        import binascii
        digest = binascii.crc32(blob).to_bytes(8, "big")
    return int.from_bytes(digest, "big") >> 1

def current_umask():
    mask = os.umask(0o077)
    os.umask(mask)
    return mask

def usage_json(use):
    """An attempt's usage (numbers, None, a bool) as JSON, without the json
    module's cost: it is written with every attempt."""
    return "{" + ",".join(
        f'"{k}":' + ("null" if v is None else "true" if v is True else repr(v))
        for k, v in sorted(use.items())) + "}"

def _json_or_none(value):
    if not value:
        return None
    import json
    return json.dumps(value, separators=(",", ":"), sort_keys=True)

def _loads(text, default):
    if not text:
        return default
    import json
    return json.loads(text)


# Recurring schedules: cron expressions ########################################

CRON_MACROS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *",
               "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
               "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *"}

CRON_NAMES = {3: ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct",
                  "nov", "dec"],
              4: ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]}

# (name, lowest, highest) of the five fields
CRON_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31),
               ("month", 1, 12), ("day of week", 0, 7))

class Cron:
    """A crontab(5) time: five fields (minute hour day-of-month month
    day-of-week) of *, values, ranges (a-b), steps (*/n, a-b/n, a/n) and
    lists, with month and day names, or an @ macro (@daily, @hourly...).
    As in cron, when both day fields are restricted (neither starts with
    *), a day matches either. Times are the host's local time."""

    def __init__(self, text):
        self.text = " ".join(str(text).split())
        expr = CRON_MACROS.get(self.text.lower(), self.text)
        if expr.startswith("@"):
            raise UsageError(f"invalid schedule {text!r}: {expr} is not supported; "
                             "use " + ", ".join(CRON_MACROS) + " or five fields")
        fields = expr.split()
        if len(fields) != 5:
            raise UsageError(f"invalid schedule {text!r}: give five fields (minute hour "
                             "day-of-month month day-of-week, e.g. '0 3 * * *') or a "
                             "macro such as @daily")
        sets = [self._field(f, i, text) for i, f in enumerate(fields)]
        self.minutes, self.hours = sorted(sets[0]), sorted(sets[1])
        self.doms, self.months = sets[2], sets[3]
        self.dows = {d % 7 for d in sets[4]}            # 7 is Sunday too
        self.dom_star, self.dow_star = fields[2].startswith("*"), fields[4].startswith("*")

    @staticmethod
    def _field(text, i, whole):
        name, lo, hi = CRON_FIELDS[i]
        names = CRON_NAMES.get(i, [])
        first = 1 if i == 3 else 0

        def value(v):
            v = v.lower()
            if v in names:
                return names.index(v) + first
            if not (v.isascii() and v.isdigit()) or not lo <= int(v) <= hi:
                raise ValueError
            return int(v)
        out = set()
        try:
            for part in text.split(","):
                rng, slash, step = part.partition("/")
                if slash and not (step.isascii() and step.isdigit()):
                    raise ValueError
                step = int(step) if slash else 1
                if step < 1:
                    raise ValueError
                if rng == "*":
                    a, b = lo, hi
                elif "-" in rng:
                    a, b = (value(x) for x in rng.split("-", 1))
                else:
                    a = value(rng)
                    b = hi if slash else a
                if a > b:
                    raise ValueError
                out.update(range(a, b + 1, step))
        except ValueError:
            raise UsageError(f"invalid schedule {whole!r}: bad {name} field {text!r} "
                             f"({lo}-{hi}" + (f", or {names[0]}-{names[-1]}" if names else "")
                             + "; *, a-b, */n, a-b/n and lists)") from None
        return out

    def day_matches(self, day):
        if day.month not in self.months:
            return False
        dom = day.day in self.doms
        dow = (day.weekday() + 1) % 7 in self.dows
        if self.dom_star or self.dow_star:          # */2 still picks days
            return dom and dow
        return dom or dow

    def slots_after(self, label):
        """The slots after label (a naive local datetime, or None for
        now), in order, as naive local datetimes: each minute that matches,
        whether or not it exists on the clock (see local_instant)."""
        import datetime as dt
        start = (label or now_label()).replace(second=0, microsecond=0) \
            + dt.timedelta(minutes=1)
        day, first = start.date(), True
        for _ in range(366 * 8 + 1):                   # Feb 29 on a given weekday
            if self.day_matches(day):
                for h in self.hours:
                    for m in self.minutes:
                        t = dt.datetime(day.year, day.month, day.day, h, m)
                        if not first or t >= start:
                            yield t
            day += dt.timedelta(days=1)
            first = False
        if label is None:
            raise UsageError(f"schedule {self.text!r} never fires (no such date)")

def slot_label(label):
    return label.strftime("%Y-%m-%dT%H:%M")

def parse_slot_label(text):
    import datetime as dt
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M")

def next_slot(cron, label=None, now=None):
    """(label, epoch) of the first slot after label (None: now_label(now))."""
    t = next(iter(cron.slots_after(now_label(now) if label is None else label)), None)
    if t is None:
        raise UsageError(f"schedule {cron.text!r} never fires (no such date)")
    return t, local_instant(t)

def schedule_spec(sch):
    """The job spec a schedule's slots become. With overlap skip its jobs
    hold the key schedule:NAME, so that even caught-up slots and schedule
    run never run two at once."""
    spec = _loads(sch["spec"], {})
    if sch["overlap"] == "skip":
        spec["keys"] = list(spec.get("keys") or []) + [f"schedule:{sch['name']}"]
    return spec


# Schema and SQL ##############################################################

def sql_states(states):
    """A state set as SQL: ('pending', 'failed')."""
    return "(" + ", ".join(f"'{s}'" for s in states) + ")"

IN_WAITING, IN_UNFINISHED, IN_HOLDING = map(sql_states, (WAITING, UNFINISHED, HOLDING))

# The one predicate of a job that may run now (but for its run_at, paused
# queues and keys): the partial index jobs_ready's, and so every query that
# says INDEXED BY jobs_ready must say it too.
READY = f"state IN {IN_WAITING} AND blocked = 0"

# One connection per thread; each Store owns one. Every write goes through
# Store.tx(), which owns BEGIN IMMEDIATE, commit, rollback and the mapping of
# sqlite3 errors to QueuectlError.

# The environments jobs run in, stored once each (content-addressed: found
# by a hash of vars, see env_key) and shared by every job that names it. An
# id is never reused (AUTOINCREMENT), so a row, once read, never changes:
# workers cache them.
ENVS_TABLE = """CREATE TABLE envs (id INTEGER PRIMARY KEY AUTOINCREMENT,
    hash INTEGER NOT NULL, vars BLOB NOT NULL)"""

ENVS_HASH_INDEX = "CREATE INDEX envs_hash ON envs (hash)"

ENVS_INDEX = "CREATE INDEX jobs_env ON jobs (env_id) WHERE env_id IS NOT NULL"

# 1.1's run-time histogram per queue (n: attempts with DURATION_BUCKETS[i-1]
# < t <= le), and 1.2's stats table of counters: read only by the migration
# to the history, and written only by 1.2 workers that still run after an
# upgrade (their attempts are missing from the history).
DURATIONS_TABLE = """CREATE TABLE durations (
    queue TEXT NOT NULL,
    le REAL NOT NULL,
    n INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (queue, le)) WITHOUT ROWID"""

# The concurrency keys of jobs (enqueue --key), a row per job and key, kept
# while the job exists. A job holds its keys while it is processing, so a
# key's holders are read off the jobs' state, never kept apart from it.
JOB_KEYS_TABLE = """CREATE TABLE job_keys (
    key TEXT NOT NULL,
    job TEXT NOT NULL,
    PRIMARY KEY (key, job)) WITHOUT ROWID"""

JOB_KEYS_INDEX = "CREATE INDEX job_keys_job ON job_keys (job)"

# limit set KEY N: at most n running jobs hold key (a key with no row: 1;
# queue:NAME with no row: no limit).
LIMITS_TABLE = """CREATE TABLE limits (
    key TEXT PRIMARY KEY,
    n INTEGER NOT NULL) WITHOUT ROWID"""

HOOKS_INDEX = "CREATE INDEX jobs_hook_of ON jobs (hook_of) WHERE hook_of IS NOT NULL"

# Every ended attempt that a worker recorded, with what it cost: wall time,
# CPU seconds (user, system) and the peak RSS of its largest process, from
# wait4() when the worker reaped the job's shell; NULL when nobody could
# (the job was adopted, or recovered, after its worker died). Kept while
# its job exists; stats reads it.
ATTEMPTS_TABLE = """CREATE TABLE attempts (
    job TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    queue TEXT NOT NULL,
    state TEXT NOT NULL,
    started_at TEXT,
    ended_at REAL NOT NULL,
    wall REAL,
    cpu_user REAL,
    cpu_sys REAL,
    max_rss INTEGER,
    max_rss_bound INTEGER,
    exit_code INTEGER,
    signal INTEGER,
    error TEXT,
    PRIMARY KEY (job, attempt, ended_at)) WITHOUT ROWID"""

# Peak RSS of measured attempts per queue, by RSS_BUCKETS (not cumulative,
# as durations), in the queue's stats row: one write per attempt, not two.
RSS_COLUMNS = tuple(f"rss_b{i}" for i in range(len(RSS_BUCKETS)))

# What ended attempts cost, per queue and quarter hour: the one source of
# stats, metrics and the slow-job mark. prune never touches it. A row covers
# span seconds from start (epoch): HISTORY_SLOT, a quarter hour, so that the
# local hours and days of every zone (UTC+5:30 and +5:45 too) are whole
# numbers of rows (earlier homes may hold hours, 3600); a UTC day (86400)
# once older than HISTORY_FINE_DAYS (rolled up by prune, and by workers
# every hour; 35 days: past stats --by day's 30, and quarter hours then take
# at most 1.6 times the rows that hours kept for 90 days took); span 0
# (start 0) holds what 1.2's counters had counted before the history began.
# Each attempt adds 1 to one bucket column of run time (RUN_COLUMNS, by
# DURATION_BUCKETS; longer ones only in run_count, the +Inf bucket) and of
# peak RSS (RSS_COLUMNS), as Prometheus histograms count (not cumulative).
RUN_COLUMNS = tuple(f"run_b{i}" for i in range(len(DURATION_BUCKETS)))

HISTORY_SUMS = (("attempts", "INTEGER"), ("failures", "INTEGER"), ("run_sum", "REAL"),
                ("run_count", "INTEGER"), ("cpu_user", "REAL"), ("cpu_sys", "REAL"),
                ("rss_sum", "REAL"), ("rss_count", "INTEGER"),
                *((c, "INTEGER") for c in RUN_COLUMNS + RSS_COLUMNS))

HISTORY_SLOT = 900
HISTORY_FINE_DAYS = 35

HISTORY_TABLE = ("CREATE TABLE history (\n    queue TEXT NOT NULL,\n    start INTEGER NOT NULL,"
                 "\n    span INTEGER NOT NULL,\n" + "".join(
                     f"    {c} {t} NOT NULL DEFAULT 0,\n" for c, t in HISTORY_SUMS)
                 + "    rss_max INTEGER NOT NULL DEFAULT 0,\n"
                 "    PRIMARY KEY (queue, start, span)) WITHOUT ROWID")

_HISTORY_NAMES = ", ".join(c for c, _ in HISTORY_SUMS)

_HISTORY_MERGE = ("ON CONFLICT (queue, start, span) DO UPDATE SET " + ", ".join(
    f"{c} = {c} + excluded.{c}" for c, _ in HISTORY_SUMS)
    + ", rss_max = max(rss_max, excluded.rss_max)")

SQL_HISTORY_ADD = (f"INSERT INTO history (queue, start, span, {_HISTORY_NAMES}, rss_max) "
                   f"VALUES ({', '.join('?' * (len(HISTORY_SUMS) + 4))}) " + _HISTORY_MERGE)

def _bucket_sums(column, bounds):
    """SQL: per bucket of bounds, how many rows have column in it."""
    return [f"sum(coalesce({column} > {lo} AND {column} <= {hi}, 0))"
            for lo, hi in zip((-1,) + bounds[:-1], bounds)]

# Slots older than HISTORY_FINE_DAYS (whole UTC days before ?) become days.
SQL_HISTORY_ROLLUP = [
    f"""INSERT INTO history (queue, start, span, {_HISTORY_NAMES}, rss_max)
    SELECT queue, start - start % 86400, 86400, {', '.join(f'sum({c})' for c, _ in HISTORY_SUMS)},
    max(rss_max) FROM history WHERE span > 0 AND span < 86400 AND start < ?
    GROUP BY queue, start - start % 86400 """ + _HISTORY_MERGE,
    "DELETE FROM history WHERE span > 0 AND span < 86400 AND start < ?"]

SQL_HISTORY_TOTALS = (f"SELECT queue, {', '.join(f'sum({c})' for c, _ in HISTORY_SUMS)}, "
                      "max(rss_max) FROM history WHERE start >= ?{where} GROUP BY queue "
                      "ORDER BY queue")

SQL_HISTORY_SERIES = ("SELECT start, " + ", ".join(f"sum({c})" for c, _ in HISTORY_SUMS)
                      + ", max(rss_max) FROM history WHERE start >= ?{where} "
                      "GROUP BY start ORDER BY start")

# 1.3's migration: the history, from 1.2's attempts (by the slot they ended
# in) and, for what they no longer hold (pruned), its counters (start 0).
_HISTORY_FROM_ATTEMPTS = f"""INSERT INTO history (queue, start, span, {_HISTORY_NAMES}, rss_max)
    SELECT queue, CAST(ended_at / {HISTORY_SLOT} AS INTEGER) * {HISTORY_SLOT}, {HISTORY_SLOT},
    count(*), sum(state != 'completed'), coalesce(sum(wall), 0), count(wall),
    coalesce(sum(cpu_user), 0), coalesce(sum(cpu_sys), 0), coalesce(sum(max_rss), 0),
    count(max_rss), {', '.join(_bucket_sums('wall', DURATION_BUCKETS))},
    {', '.join(_bucket_sums('max_rss', RSS_BUCKETS))}, coalesce(max(max_rss), 0)
    FROM attempts GROUP BY queue, CAST(ended_at / {HISTORY_SLOT} AS INTEGER)"""

_HISTORY_BEFORE = f"""INSERT INTO history (queue, start, span, {_HISTORY_NAMES}, rss_max)
    SELECT s.queue, 0, 0, {', '.join(
        f"max(s.{c} - coalesce(h.{c}, 0), 0)" for c in (
            "attempts", "failures", "duration_sum", "duration_count", "cpu_user", "cpu_sys",
            "rss_sum", "rss_count"))},
    {', '.join(f"max(coalesce((SELECT n FROM durations d WHERE d.queue = s.queue "
               f"AND d.le = {le}), 0) - coalesce(h.run_b{i}, 0), 0)"
               for i, le in enumerate(DURATION_BUCKETS))},
    {', '.join(f"max(s.{c} - coalesce(h.{c}, 0), 0)" for c in RSS_COLUMNS)}, 0
    FROM stats s LEFT JOIN (SELECT queue, sum(attempts) AS attempts, sum(failures) AS failures,
    sum(run_sum) AS duration_sum, sum(run_count) AS duration_count, sum(cpu_user) AS cpu_user,
    sum(cpu_sys) AS cpu_sys, sum(rss_sum) AS rss_sum, sum(rss_count) AS rss_count,
    {', '.join(f"sum({c}) AS {c}" for c in RUN_COLUMNS + RSS_COLUMNS)}
    FROM history GROUP BY queue) h ON h.queue = s.queue
    WHERE s.attempts > coalesce(h.attempts, 0)"""

# Recurring schedules: a cron expression and the job each slot becomes.
# last_slot is the last slot handled (fired or skipped), next_at the next
# one's time (epoch seconds): the worker that fires a slot moves both in
# the transaction that enqueues its job, so each slot fires once.
SCHEDULES_TABLE = """CREATE TABLE schedules (
    name TEXT PRIMARY KEY,
    cron TEXT NOT NULL,
    spec TEXT NOT NULL,
    env_id INTEGER,
    umask INTEGER,
    overlap TEXT NOT NULL,
    catch_up INTEGER NOT NULL,
    jitter REAL NOT NULL,
    paused INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    last_slot REAL NOT NULL,
    next_at REAL NOT NULL,
    last_job TEXT,
    skips INTEGER NOT NULL DEFAULT 0,
    last_skip TEXT,
    last_success REAL) WITHOUT ROWID"""

SCHEDULE_INDEX = "CREATE INDEX jobs_schedule ON jobs (schedule) WHERE schedule IS NOT NULL"

# The jobs whose attempt may still run: processing ones, and cancelled ones
# until their attempt's processes are gone (cancel ended clears the claim).
CLAIMED_INDEX = "CREATE INDEX jobs_claimed ON jobs (state, queue) WHERE claim IS NOT NULL"

# A label selects work as a queue does (list, wait, cancel, retry --label L).
LABEL_INDEX = "CREATE INDEX jobs_label ON jobs (label) WHERE label IS NOT NULL"

SCHEMA = [
    "CREATE TABLE jobs (\n        " + ",\n        ".join(
        f"{c[0]} {c[1]}" for c in JOB_TABLE) + ")",
    # The claim is one walk of this partial index, in selection order.
    f"""CREATE INDEX jobs_ready ON jobs (priority DESC, run_at, seq)
        WHERE {READY}""",
    "CREATE INDEX jobs_state ON jobs (state, queue, finished_at)",
    ENVS_TABLE,
    ENVS_HASH_INDEX,
    ENVS_INDEX,
    DURATIONS_TABLE,
    """CREATE TABLE deps (
        job TEXT NOT NULL,
        dep TEXT NOT NULL,
        PRIMARY KEY (job, dep)) WITHOUT ROWID""",
    "CREATE INDEX deps_dep ON deps (dep)",
    """CREATE TABLE workers (
        id TEXT PRIMARY KEY,
        pid INTEGER NOT NULL,
        host TEXT NOT NULL,
        threads INTEGER NOT NULL,
        queues TEXT,
        started_at TEXT NOT NULL,
        heartbeat TEXT NOT NULL)""",
    "CREATE TABLE paused (queue TEXT PRIMARY KEY)",
    JOB_KEYS_TABLE,
    JOB_KEYS_INDEX,
    LIMITS_TABLE,
    HOOKS_INDEX,
    """CREATE TABLE stats (
        queue TEXT PRIMARY KEY,
        attempts INTEGER NOT NULL DEFAULT 0,
        failures INTEGER NOT NULL DEFAULT 0,
        duration_sum REAL NOT NULL DEFAULT 0,
        duration_count INTEGER NOT NULL DEFAULT 0,
        cpu_user REAL NOT NULL DEFAULT 0,
        cpu_sys REAL NOT NULL DEFAULT 0,
        rss_sum REAL NOT NULL DEFAULT 0,
        rss_count INTEGER NOT NULL DEFAULT 0,
        """ + ",\n        ".join(f"{c} INTEGER NOT NULL DEFAULT 0" for c in RSS_COLUMNS)
    + ") WITHOUT ROWID",
    ATTEMPTS_TABLE,
    SCHEDULES_TABLE,
    SCHEDULE_INDEX,
    CLAIMED_INDEX,
    LABEL_INDEX,
    HISTORY_TABLE,
]

# Migrations: MIGRATIONS[n] takes a db from version n to n + 1, adding
# MIGRATION_WHAT[n] (a worker of an older version runs jobs without it).
MIGRATION_WHAT = {1: "the enqueuer's environment", 2: "keys, limits, hooks, retry policy",
                  3: "resource accounting and limits, schedules",
                  4: "labels, history (its attempts are missing from stats and metrics)"}

MIGRATIONS = {
    # 1.1: jobs run in their enqueuer's environment and umask
    1: [*job_alters(2), ENVS_TABLE, ENVS_HASH_INDEX, ENVS_INDEX, DURATIONS_TABLE],
    # 1.2: concurrency keys and limits, hooks, retry policy by exit code
    2: [*job_alters(3), JOB_KEYS_TABLE, JOB_KEYS_INDEX, LIMITS_TABLE, HOOKS_INDEX],
    # 1.2: resource accounting, per-job limits, recurring schedules
    3: [*job_alters(4),
        *(f"ALTER TABLE stats ADD COLUMN {c} NOT NULL DEFAULT 0" for c in (
            "cpu_user REAL", "cpu_sys REAL", "rss_sum REAL", "rss_count INTEGER")),
        *(f"ALTER TABLE stats ADD COLUMN {c} INTEGER NOT NULL DEFAULT 0"
          for c in RSS_COLUMNS),
        ATTEMPTS_TABLE,
        SCHEDULES_TABLE, SCHEDULE_INDEX, CLAIMED_INDEX,
        # A cancelled job's claim now lasts only while its attempt runs; older
        # versions kept it for good.
        "UPDATE jobs SET claim = NULL, pid = NULL, pid_start = NULL "
        "WHERE state = 'cancelled'"],
    # 1.3: labels; the history that stats and metrics read, which prune keeps
    4: [*job_alters(5), LABEL_INDEX, HISTORY_TABLE, _HISTORY_FROM_ATTEMPTS, _HISTORY_BEFORE],
}

JOB_COLUMNS = ", ".join(ROW_FIELDS)

# The transitions of a job. Each is one statement below, the one place that
# writes its columns; every write to a claimed job is fenced on its worker,
# claim token and state (FENCE), so a stale worker cannot overwrite another's.
#
#   transition  from                         to          sets / clears
#   enqueue     -                            pending     every column given
#   claim       pending, failed              processing  claim worker started_at / pid pid_start
#   record pid  processing (fenced)          processing  pid pid_start
#   take        processing (fenced)          processing  worker (adoption, recovery)
#   complete    processing (fenced)          completed   attempts exit_code finished_at /
#                                                        last_error claim pid pid_start
#   fail        processing (fenced)          failed/dead attempts exit_code last_error run_at
#                                                        finished_at / claim pid pid_start
#   requeue     processing (fenced)          pending     / claim worker pid pid_start started_at
#   cancel      pending, failed, processing  cancelled   finished_at last_error, run_at
#                                                        (processing: when its processes
#                                                        are killed); keeps claim and pid:
#                                                        they name the cancelled attempt's
#                                                        processes until they end
#   cancel      cancelled (claim set)        cancelled   attempts / claim pid pid_start: no
#     ended                                              process of its group or claim is
#                                                        left (keys let go)
#   reset       completed, dead, cancelled   pending     attempts=0 run_at blocked / worker
#                                                        claim pid pid_start started_at
#                                                        finished_at exit_code last_error
# updated_at is set by all but record pid; blocked changes with dependencies.

FENCE = " WHERE id = ? AND worker = ? AND claim = ? AND state = 'processing'"

SQL_INSERT = (f"INSERT INTO jobs ({', '.join(job_columns('e'))}) VALUES "
              f"({', '.join(':' + c for c in job_columns('e'))})")

SQL_INSERT_KEY = "INSERT OR IGNORE INTO job_keys (key, job) VALUES (?, ?)"

SQL_DELETE_KEYS = "DELETE FROM job_keys WHERE job IN ({marks})"

# The keys running jobs hold, and how many hold each.
# (A cancelled job whose attempt still runs holds its keys too.)
SQL_HELD = f"""SELECT k.key, count(*) FROM jobs j INDEXED BY jobs_claimed
    JOIN job_keys k ON k.job = j.id
    WHERE j.claim IS NOT NULL AND j.state IN {IN_HOLDING} GROUP BY k.key"""

SQL_RUNNING_PER_QUEUE = f"""SELECT queue, count(*) FROM jobs INDEXED BY jobs_claimed
    WHERE claim IS NOT NULL AND state IN {IN_HOLDING} GROUP BY queue"""

SQL_HOLDERS = f"""SELECT j.id FROM job_keys k JOIN jobs j ON j.id = k.job
    WHERE k.key = ? AND j.claim IS NOT NULL AND j.state IN {IN_HOLDING}
    ORDER BY j.started_at"""

SQL_QUEUE_HOLDERS = f"""SELECT id FROM jobs INDEXED BY jobs_claimed WHERE claim IS NOT NULL
    AND state IN {IN_HOLDING} AND queue = ? ORDER BY started_at"""

SQL_CANCEL_ENDED = """UPDATE jobs SET claim = NULL, pid = NULL, pid_start = NULL,
    attempts = attempts + 1, updated_at = ? WHERE id = ? AND state = 'cancelled'
    AND claim = ?"""

SQL_CANCELLED_RUNNING = f"""SELECT {JOB_COLUMNS} FROM jobs INDEXED BY jobs_claimed
    WHERE claim IS NOT NULL AND state = 'cancelled'"""

# --if-busy skip: a job with one of the keys that waits or runs.
SQL_KEY_BUSY = f"""SELECT j.id FROM job_keys k JOIN jobs j ON j.id = k.job
    WHERE k.key IN ({{marks}}) AND j.state IN {IN_UNFINISHED}
    ORDER BY j.state = 'processing' DESC, j.seq LIMIT 1"""

SQL_KEYS_WAITING = f"""SELECT k.key, count(*) FROM jobs j JOIN job_keys k ON k.job = j.id
    WHERE j.state IN {IN_WAITING} GROUP BY k.key"""

SQL_LIMITS = "SELECT key, n FROM limits ORDER BY key"

SQL_SET_LIMIT = "INSERT OR REPLACE INTO limits (key, n) VALUES (?, ?)"

SQL_DELETE_LIMIT = "DELETE FROM limits WHERE key = ?"

# What a claim reads first, in one statement: paused queues (0), limits (1),
# and the keys running jobs hold, with how many hold each (2).
SQL_CLAIM_STATE = f"""SELECT 0, queue, NULL FROM paused
    UNION ALL SELECT 1, key, n FROM limits
    UNION ALL SELECT 2, * FROM ({SQL_HELD})"""

# The claim's tail for full keys: a job holding one of them is passed over.
CLAIM_KEYS_FREE = """ AND (keys IS NULL OR NOT EXISTS (SELECT 1 FROM job_keys k
    WHERE k.job = jobs.id AND k.key IN ({marks})))"""

SQL_HOOKS_OF = f"SELECT {JOB_COLUMNS} FROM jobs WHERE hook_of = ? ORDER BY seq"

SQL_ENV = "SELECT vars FROM envs WHERE id = ?"

SQL_ENVS_OF_HASH = "SELECT id, vars FROM envs WHERE hash = ?"

SQL_ADD_ENV = "INSERT INTO envs (hash, vars) VALUES (?, ?)"

SQL_JOB_ENV_IDS = """SELECT DISTINCT env_id FROM jobs WHERE id IN ({marks})
    AND env_id IS NOT NULL"""

SQL_DROP_UNUSED_ENVS = """DELETE FROM envs WHERE id IN ({marks})
    AND NOT EXISTS (SELECT 1 FROM jobs WHERE env_id = envs.id)
    AND NOT EXISTS (SELECT 1 FROM schedules WHERE env_id = envs.id)"""

SQL_INSERT_DEP = "INSERT OR IGNORE INTO deps (job, dep) VALUES (?, ?)"

SQL_CLAIMABLE = f"""SELECT {JOB_COLUMNS} FROM jobs INDEXED BY jobs_ready
    WHERE {READY} AND run_at <= ?{{where}}
    ORDER BY {{order}} LIMIT 1"""

# The distinct priorities of waiting jobs, highest first, one index seek
# each: a fifo claim takes the earliest due job of each (at most
# FIFO_SEEKS of them; past that it sorts every due job).
SQL_PRIORITIES = f"""WITH RECURSIVE p(v, n) AS (
    SELECT max(priority), 1 FROM jobs INDEXED BY jobs_ready WHERE {READY}
    UNION ALL SELECT (SELECT max(priority) FROM jobs INDEXED BY jobs_ready
    WHERE {READY} AND priority < p.v), n + 1 FROM p WHERE p.v IS NOT NULL AND n <= ?)
    SELECT v FROM p WHERE v IS NOT NULL"""

FIFO_SEEKS = 64

# The due jobs a claim takes before a job (by its ClaimOrder's key: {key}).
SQL_AHEAD = f"""SELECT count(*) FROM jobs INDEXED BY jobs_ready
    WHERE {READY} AND run_at <= ?{{where}} AND ({{key}}, run_at, seq) <
    (SELECT {{key}}, run_at, seq FROM jobs WHERE seq = ?)"""

SQL_CLAIM = """UPDATE jobs SET state = 'processing', claim = ?, worker = ?,
    started_at = ?, updated_at = ?, pid = NULL, pid_start = NULL
    WHERE seq = ?"""

SQL_RECORD_PID = "UPDATE jobs SET pid = ?, pid_start = ?" + FENCE

SQL_TAKE = "UPDATE jobs SET worker = ?, updated_at = ?" + FENCE

SQL_COMPLETE = """UPDATE jobs SET state = 'completed', attempts = ?,
    exit_code = ?, finished_at = ?, updated_at = ?, usage = ?, last_error = NULL,
    claim = NULL, pid = NULL, pid_start = NULL""" + FENCE

SQL_FAIL = """UPDATE jobs SET state = ?, attempts = ?, exit_code = ?,
    last_error = ?, run_at = ?, finished_at = ?, updated_at = ?, usage = ?,
    claim = NULL, pid = NULL, pid_start = NULL""" + FENCE

SQL_REQUEUE = """UPDATE jobs SET state = 'pending', updated_at = ?, claim = NULL,
    worker = NULL, pid = NULL, pid_start = NULL, started_at = NULL""" + FENCE

# A cancelled attempt's run_at is when its processes are killed (the cancel's
# grace): the worker that waits for them to end kills them then, should the
# cancel command itself not live that long.
SQL_CANCEL = """UPDATE jobs SET state = 'cancelled', finished_at = ?,
    updated_at = ?, last_error = 'cancelled',
    run_at = CASE WHEN state = 'processing' THEN ? ELSE run_at END WHERE id = ?"""

SQL_RUN_NOW = """UPDATE jobs SET run_at = ?, updated_at = ? WHERE id = ?
    AND state = 'failed'"""

SQL_EDIT = """UPDATE jobs SET command = ?, queue = ?, priority = ?, max_retries = ?,
    timeout = ?, run_at = ?, cwd = ?, env = ?, updated_at = ?
    WHERE id = ? AND updated_at = ? AND state IN ('pending', 'failed', 'dead')"""

SQL_WAITING_ON = f"""SELECT d.job, d.dep FROM deps d JOIN jobs j ON j.id = d.job
    WHERE d.dep IN ({{marks}}) AND j.state IN {IN_UNFINISHED}"""

SQL_RESET = ("UPDATE jobs SET state = 'pending', attempts = 0, run_at = ?, updated_at = ?, "
             "blocked = ?, " + ", ".join(f"{c} = NULL" for c in job_columns("r"))
             + " WHERE id = ?")

SQL_UNBLOCK = """UPDATE jobs SET blocked = 0 WHERE blocked = 1
    AND id IN (SELECT job FROM deps WHERE dep = ?)
    AND NOT EXISTS (SELECT 1 FROM deps d JOIN jobs j ON j.id = d.dep
                    WHERE d.job = jobs.id AND j.state != 'completed')"""

SQL_REBLOCK = f"""UPDATE jobs SET blocked = 1 WHERE state IN {IN_WAITING}
    AND id IN (SELECT job FROM deps WHERE dep = ?)"""

SQL_ATTEMPT_ADD = """INSERT OR IGNORE INTO attempts (job, attempt, queue, state, started_at,
    ended_at, wall, cpu_user, cpu_sys, max_rss, max_rss_bound, exit_code, signal, error)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"""

SQL_ATTEMPT_FIELDS = ("attempt", "state", "started_at", "ended_at", "wall", "cpu_user",
                      "cpu_sys", "max_rss", "max_rss_bound", "exit_code", "signal", "error")

SQL_ATTEMPTS_OF = (f"SELECT {', '.join(SQL_ATTEMPT_FIELDS)} FROM attempts WHERE job = ? "
                   "ORDER BY ended_at")

# Words for shell completion, per kind: cheap queries first (a slow one may
# run out of the time budget).
SQL_COMPLETION = {"ids": ["SELECT id FROM jobs ORDER BY seq DESC LIMIT 500"],
                  **{kind: [f"SELECT id FROM jobs WHERE state IN {states} ORDER BY seq DESC "
                            "LIMIT 500"] for kind, states in (
                      ("cancel", IN_UNFINISHED), ("dead", "('dead')"),
                      ("retry", "('dead', 'cancelled', 'completed', 'failed')"))},
                  "schedules": ["SELECT name FROM schedules ORDER BY name"],
                  "limits": ["SELECT key FROM limits UNION SELECT DISTINCT key FROM job_keys"],
                  "queues": ["SELECT DISTINCT queue FROM history UNION SELECT queue FROM paused",
                             "SELECT DISTINCT queue FROM jobs"]}

SQL_ENDED_SINCE = "SELECT queue, ended_at FROM attempts WHERE ended_at >= ?"

SQL_DELETE_ATTEMPTS = "DELETE FROM attempts WHERE job IN ({marks})"

SCHEDULE_FIELDS = ("name", "cron", "spec", "env_id", "umask", "overlap", "catch_up",
                   "jitter", "paused", "created_at", "last_slot", "next_at", "last_job",
                   "skips", "last_skip", "last_success")

SQL_SCHEDULES = f"SELECT {', '.join(SCHEDULE_FIELDS)} FROM schedules ORDER BY name"

SQL_SCHEDULE = f"SELECT {', '.join(SCHEDULE_FIELDS)} FROM schedules WHERE name = ?"

SQL_SCHEDULES_DUE = (f"SELECT {', '.join(SCHEDULE_FIELDS)} FROM schedules "
                     "WHERE paused = 0 AND next_at <= ? ORDER BY next_at")

SQL_NEXT_SCHEDULE = "SELECT min(next_at) FROM schedules WHERE paused = 0"

SQL_ADD_SCHEDULE = f"""INSERT INTO schedules ({', '.join(SCHEDULE_FIELDS[:12])})
    VALUES ({', '.join('?' * 12)})"""

SQL_SCHEDULE_FIRED = """UPDATE schedules SET last_slot = ?, next_at = ?,
    last_job = coalesce(?, last_job), skips = skips + ?,
    last_skip = coalesce(?, last_skip) WHERE name = ?"""

SQL_SCHEDULE_PAUSE = "UPDATE schedules SET paused = ?, next_at = ?, last_slot = ? WHERE name = ?"

SQL_DELETE_SCHEDULE = "DELETE FROM schedules WHERE name = ?"

SQL_SCHEDULE_SUCCESS = "UPDATE schedules SET last_success = ? WHERE name = ?"

SQL_SCHEDULE_ACTIVE = f"""SELECT id FROM jobs WHERE schedule = ?
    AND state IN {IN_UNFINISHED} ORDER BY seq LIMIT 1"""

SQL_RUNNABLE_SINCE = f"""SELECT min(run_at), id FROM jobs INDEXED BY jobs_ready
    WHERE {READY} AND run_at <= ?{{where}}"""

SQL_DELAYED = f"""SELECT queue, count(*) FROM jobs INDEXED BY jobs_ready
    WHERE {READY} AND run_at > ? GROUP BY queue"""

SQL_BLOCKED = f"""SELECT queue, count(*) FROM jobs WHERE state IN {IN_WAITING}
    AND blocked = 1 GROUP BY queue"""

SQL_DELETE_JOBS = "DELETE FROM jobs WHERE id IN ({marks})"

SQL_DELETE_DEPS = "DELETE FROM deps WHERE job IN ({marks})"

# Reads of jobs
SQL_JOB = f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?"

SQL_JOB_EXISTS = "SELECT 1 FROM jobs WHERE id = ?"

SQL_JOB_STATES = "SELECT id, state FROM jobs WHERE id IN ({marks})"

SQL_OWNED = "SELECT 1 FROM jobs" + FENCE

SQL_PROCESSING = f"""SELECT {JOB_COLUMNS} FROM jobs WHERE state = 'processing'
    ORDER BY started_at"""

SQL_WORKER_JOBS = """SELECT id FROM jobs WHERE state = 'processing' AND worker = ?
    ORDER BY started_at"""

SQL_RECENT_FAILURES = f"""SELECT {JOB_COLUMNS} FROM jobs
    WHERE state IN ('failed', 'dead') ORDER BY updated_at DESC LIMIT ?"""

SQL_LIST = f"SELECT {JOB_COLUMNS} FROM jobs{{where}} ORDER BY seq{{order}}{{limit}}"

SQL_LIST_COUNT = "SELECT count(*) FROM jobs{where}"

SQL_JOB_BY_SEQ = "SELECT id FROM jobs WHERE seq = ?"

SQL_DUE = f"""SELECT {JOB_COLUMNS} FROM jobs INDEXED BY jobs_ready
    WHERE {READY} AND run_at <= ?
    ORDER BY priority DESC, run_at, seq LIMIT ?"""

SQL_FINISHED_BEFORE = """SELECT id FROM jobs WHERE state IN ({marks})
    AND finished_at < ?"""

# (A cancelled job whose attempt still runs keeps its claim, and its keys: it
# is not deleted until that attempt has ended.)
SQL_IDS_STILL_IN = """SELECT id FROM jobs WHERE id IN ({marks}) AND state IN ({smarks})
    AND claim IS NULL"""

SQL_OPEN_DEPS = "SELECT count(*) FROM jobs WHERE id IN ({marks}) AND state != 'completed'"

SQL_COUNTS = "SELECT state, queue, count(*) FROM jobs GROUP BY state, queue"

SQL_NEXT_SCHEDULED = f"""SELECT id, run_at FROM jobs INDEXED BY jobs_ready
    WHERE {READY} AND run_at > ?
    ORDER BY run_at LIMIT 1"""

SQL_NEXT_RUN = f"""SELECT min(run_at) FROM jobs INDEXED BY jobs_ready
    WHERE {READY}{{where}}"""

SQL_WAITING = f"SELECT count(*) FROM jobs WHERE state IN {IN_WAITING}"

SQL_JOB_COUNT = "SELECT count(*) FROM jobs"

SQL_BLOCKED_ON_DEAD = f"""SELECT j.id, d.dep, coalesce(k.state, 'missing') FROM jobs j
    JOIN deps d ON d.job = j.id LEFT JOIN jobs k ON k.id = d.dep
    WHERE j.state IN {IN_WAITING} AND j.blocked = 1
    AND coalesce(k.state, 'missing') IN ('dead', 'cancelled', 'missing')"""

# Jobs that can never run until a person acts: each waiting job blocked,
# directly or through other waiting jobs, on a dependency that is dead,
# cancelled or deleted; with that dependency and its state.
SQL_STUCK = f"""WITH RECURSIVE stuck(job, dep, state) AS (
        SELECT d.job, d.dep, coalesce(k.state, 'missing') FROM deps d
        JOIN jobs j ON j.id = d.job LEFT JOIN jobs k ON k.id = d.dep
        WHERE j.state IN {IN_WAITING} AND j.blocked = 1
        AND coalesce(k.state, 'missing') IN ('dead', 'cancelled', 'missing')
    UNION
        SELECT d.job, s.dep, s.state FROM deps d JOIN stuck s ON d.dep = s.job
        JOIN jobs j ON j.id = d.job WHERE j.state IN {IN_WAITING}
        AND j.blocked = 1)
    SELECT job, dep, state FROM stuck"""

# wait with no ids: the jobs enqueued so far (seq <= ?) that are unfinished,
# and those that ended dead or cancelled (still in the home: in the DLQ, or
# cancelled and not yet pruned).
SQL_OPEN_UP_TO = f"""SELECT id, state, blocked FROM jobs
    WHERE seq <= ? AND state IN {IN_UNFINISHED}{{where}}"""

SQL_NOT_COMPLETED = """SELECT id, state FROM jobs WHERE seq <= ?
    AND state IN ('dead', 'cancelled'){where} ORDER BY seq"""

SQL_OPEN_OF = f"""SELECT id, state, blocked FROM jobs WHERE id IN ({{marks}})
    AND state IN {IN_UNFINISHED}"""

SQL_COUNTS_UP_TO = """SELECT state, count(*) FROM jobs WHERE seq >= ? AND seq <= ?{where}
    GROUP BY state"""

SQL_COUNTS_OF = "SELECT state, count(*) FROM jobs WHERE id IN ({marks}) GROUP BY state"

SQL_FIRST_OPEN = f"SELECT min(seq), max(seq) FROM jobs WHERE state IN {IN_UNFINISHED}{{where}}"

SQL_LAST_STARTED = """SELECT id FROM jobs WHERE started_at IS NOT NULL
    ORDER BY started_at DESC, seq DESC LIMIT 1"""

SQL_MAX_SEQ = "SELECT coalesce(max(seq), 0) FROM jobs"

SQL_COUNT_TABLES = "SELECT count(*) FROM sqlite_master"

# Workers and paused queues
SQL_WORKER_FIELDS = ("id", "pid", "host", "threads", "queues", "started_at", "heartbeat")

SQL_WORKERS = f"SELECT {', '.join(SQL_WORKER_FIELDS)} FROM workers ORDER BY started_at"

SQL_REGISTER = """INSERT OR REPLACE INTO workers (id, pid, host, threads, queues,
    started_at, heartbeat) VALUES (?, ?, ?, ?, ?, ?, ?)"""

SQL_HEARTBEAT = "UPDATE workers SET heartbeat = ? WHERE id = ?"

SQL_WORKER_THREADS = "UPDATE workers SET threads = ? WHERE id = ?"

SQL_DELETE_WORKER = "DELETE FROM workers WHERE id = ?"

SQL_PAUSED = "SELECT queue FROM paused"

SQL_PAUSE = "INSERT OR IGNORE INTO paused (queue) VALUES (?)"

SQL_RESUME = "DELETE FROM paused WHERE queue = ?"

SQL_RESUME_ALL = "DELETE FROM paused"


# Store #######################################################################

def worker_log_max():
    """Bytes a detached worker's log may reach before it is rotated:
    $QUEUECTL_WORKER_LOG_MAX or 10 MB."""
    text = os.environ.get("QUEUECTL_WORKER_LOG_MAX", "")
    return int(text) if text.isdigit() and int(text) > 0 else WORKER_LOG_MAX

def busy_timeout():
    """Seconds to wait for a busy database: $QUEUECTL_BUSY_TIMEOUT or 30."""
    text = os.environ.get("QUEUECTL_BUSY_TIMEOUT")
    if text is None:
        return BUSY_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 86400:
        raise UsageError(f"invalid QUEUECTL_BUSY_TIMEOUT {text!r}: use seconds "
                         "from 0 to 86400")
    return value

def sqlite_module():
    """_sqlite3, the C module that the sqlite3 package re-exports: the
    package adds only datetime adapters that queuectl never uses, and
    importing it (datetime, collections) costs every enqueue 4 ms."""
    try:
        import _sqlite3
        return _sqlite3
    except ImportError:                  # a Python that packs it otherwise
        import sqlite3
        return sqlite3

class Store:
    """One SQLite connection to home/queue.db; not shared between threads.

    durable=True makes every commit fsync (enqueues and user commands);
    workers use NORMAL: in WAL mode a lost update after power loss only
    means a job runs again, never a corrupt database.
    """

    def __init__(self, home, durable=True, local_lock=None, memory=False):
        self.sqlite3 = sqlite3 = sqlite_module()
        self.home = home
        # Threads of one worker share local_lock around write transactions:
        # they queue on it instead of in SQLite's busy handler, which sleeps
        # a millisecond or more each time it finds the database locked.
        self.local_lock = local_lock
        self.path = os.path.join(home, "queue.db")
        self.busy_timeout = 0
        self.limited = {}        # the limits the last claim saw
        if memory:               # an empty queue, for a home that has none
            self.db = sqlite3.connect(":memory:", isolation_level=None)
            self._setup()
            return
        try:
            ensure_private_dir(home)
        except OSError as e:
            raise UsageError(f"cannot create the home directory {home}: {e.strerror}; "
                             "give another with --home DIR or QUEUECTL_HOME") from None
        if not os.path.isdir(home):
            raise UsageError(f"the home {home} is not a directory; give --home "
                             "(or QUEUECTL_HOME) a directory")
        check_private(home, "home directory")
        if not os.path.exists(self.path):
            try:
                os.close(open_private(self.path, os.O_RDWR | os.O_EXCL))
            except FileExistsError:
                pass             # another command created it first
            else:
                # Said even when stderr is not a terminal: cron mails it, so
                # a job enqueued into a home nobody serves is never silent.
                sys.stderr.write(f"queuectl: note: created a new queue home in {home}; "
                                 "--home or QUEUECTL_HOME selects another\n")
        check_private(self.path, "database")
        timeout = busy_timeout()
        self.busy_timeout = timeout
        try:
            self.db = sqlite3.connect(self.path, timeout=timeout,
                                      isolation_level=None,
                                      check_same_thread=False)
            self.db.execute("PRAGMA synchronous = " + ("FULL" if durable else "NORMAL"))
            # Per connection: the WAL is truncated to this after a checkpoint.
            self.db.execute("PRAGMA journal_size_limit = 67108864")
            self._setup()
        except sqlite3.Error as e:
            raise self._error(e) from None

    def _error(self, e):
        msg = str(e)
        if "locked" in msg or "busy" in msg:
            return BusyError(f"the database {self.path} stayed busy for "
                             f"{self.busy_timeout:g}s; try again")
        if "not a database" in msg or "malformed" in msg:
            return UsageError(f"{self.path} is not a usable queuectl database ({msg})")
        return QueuectlError(f"database error on {self.path}: {msg}")

    def _setup(self):
        db = self.db
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            self._check_app_id()
            return
        if version > SCHEMA_VERSION:
            raise UsageError(
                f"{self.path} has schema version {version}, newer than this "
                f"queuectl {__version__} knows ({SCHEMA_VERSION}); use a newer queuectl")
        if version == 0 and db.execute("PRAGMA page_count").fetchone()[0] == 0:
            # A new file: these must be set before the first table exists,
            # and auto_vacuum outside a transaction.
            db.execute("PRAGMA auto_vacuum = INCREMENTAL")
            db.execute("PRAGMA journal_mode = WAL")
        with self.tx():
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                tables = db.execute(SQL_COUNT_TABLES).fetchone()[0]
                if tables:
                    raise UsageError(f"{self.path} is not a queuectl database; "
                                     "refusing to change it")
                for ddl in SCHEMA:
                    db.execute(ddl)
                db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            else:
                self._check_app_id()
                old = version
                while version < SCHEMA_VERSION:
                    for sql in MIGRATIONS[version]:
                        db.execute(sql)
                    version += 1
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                self.migrated_from = old
        db.execute("PRAGMA journal_mode = WAL")
        if getattr(self, "migrated_from", None) is not None:
            self._note_old_workers()

    def _note_old_workers(self):
        """After a migration: workers of an older queuectl that still run
        keep serving jobs the old way, without what came after their schema."""
        old = [w for w in self.workers() if worker_alive(self.home, w)]
        missing = ", ".join(v for k, v in MIGRATION_WHAT.items() if k >= self.migrated_from)
        if old:
            sys.stderr.write(
                f"queuectl: note: upgraded {self.path} to schema {SCHEMA_VERSION}; "
                f"{plural(len(old), 'worker')} of an older queuectl still run "
                f"and run jobs without {missing} until restarted: "
                "queuectl worker stop --wait, then start them again\n")

    def _check_app_id(self):
        if self.db.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
            raise UsageError(f"{self.path} is not a queuectl database; refusing "
                             "to change it")

    def tx(self):
        """`with store.tx():` one BEGIN IMMEDIATE transaction."""
        return _Transaction(self)

    def q(self, sql, params=()):
        """Run one read statement; all rows."""
        try:
            return self.db.execute(sql, params).fetchall()
        except self.sqlite3.Error as e:
            raise self._error(e) from None

    def x(self, sql, params=()):
        """Run one write statement (inside tx()); the cursor."""
        return self.db.execute(sql, params)

    def close(self):
        self.db.close()

    # Jobs: reads ------------------------------------------------------------

    def get(self, job_id):
        rows = self.q(SQL_JOB, (job_id,))
        return job_from_row(rows[0]) if rows else None

    def must_get(self, job_id):
        job = self.get(self.resolve(job_id))
        if job is None:
            raise NoSuchJob(f"no job with id {job_id!r}")
        return job

    def resolve(self, text):
        """A job as a person names it -> its id: the id itself, or #N (or a
        bare N that is no job's id) for the job numbered N, the number list
        shows (as tsp -c 3 and pueue log 3 take). Numbers count up in
        enqueue order; removing the newest jobs may free theirs for reuse."""
        num = text[1:] if text.startswith("#") else text
        if num.isdigit() and num.isascii() and len(num) < 19 and \
                (num != text or not self.get(check_name(text))):
            rows = self.q(SQL_JOB_BY_SEQ, (int(num),))
            if not rows:
                raise NoSuchJob(f"no job numbered {num}")
            return rows[0][0]
        return check_name(text)

    def states(self, ids):
        """{id: state} of the jobs of ids that exist."""
        return dict(self.q(SQL_JOB_STATES.format(marks=_marks(ids)), list(ids)))

    def processing(self):
        return [job_from_row(r) for r in self.q(SQL_PROCESSING)]

    def worker_jobs(self, worker):
        return [r[0] for r in self.q(SQL_WORKER_JOBS, (worker,))]

    def recent_failures(self, n):
        return [job_from_row(r) for r in self.q(SQL_RECENT_FAILURES, (n,))]

    def list_jobs(self, states=None, queues=None, limit=0, labels=None):
        """(jobs of states, queues and labels (None: all) in enqueue order,
        how many older ones match past limit; 0 = all): with a limit, the
        newest."""
        where, params = [], []
        if states:
            where.append(f"state IN ({_marks(states)})")
            params += states
        for column, values in (("queue", queues), ("label", labels)):
            if values:
                where.append(f"{column} IN ({_marks(values)})")
                params += values
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        rows = [job_from_row(r) for r in self.q(SQL_LIST.format(
            where=clause, order=" DESC" if limit else "",
            limit=f" LIMIT {int(limit)}" if limit else ""), params)]
        rows.reverse() if limit else None
        more = 0
        if limit and len(rows) == limit:
            more = self.q(SQL_LIST_COUNT.format(where=clause), params)[0][0] - len(rows)
        return rows, more

    def finished_before(self, states, cutoff):
        return [r[0] for r in self.q(SQL_FINISHED_BEFORE.format(marks=_marks(states)),
                                     list(states) + [cutoff])]

    def counts(self):
        """({state: n}, {queue: {state: n}}), every state present, in order."""
        counts = dict.fromkeys(STATES, 0)
        per_queue = {}
        for state, queue, n in self.q(SQL_COUNTS):
            counts[state] = counts.get(state, 0) + n
            per_queue.setdefault(queue, dict.fromkeys(STATES, 0))[state] = n
        return counts, per_queue

    def next_scheduled(self, now):
        """(id, run_at) of the next job that waits for its time, or None."""
        rows = self.q(SQL_NEXT_SCHEDULED, (iso(now),))
        return rows[0] if rows else None

    def next_run(self, where, params):
        return self.q(SQL_NEXT_RUN.format(where=where), params)[0][0]

    def waiting(self):
        return self.q(SQL_WAITING)[0][0]

    def job_count(self):
        return self.q(SQL_JOB_COUNT)[0][0]

    def blocked_on_dead(self):
        """[(job, dependency, its state)] of jobs that wait on a dependency
        that is dead, cancelled or missing."""
        return self.q(SQL_BLOCKED_ON_DEAD)

    def stuck(self):
        """{job: (dependency, its state)} of the jobs that can never run
        until a person acts (SQL_STUCK)."""
        return {job: (dep, state) for job, dep, state in self.q(SQL_STUCK)}

    def health(self):
        """(integrity_check lines, free bytes in the file)."""
        check = [r[0] for r in self.q("PRAGMA integrity_check")]
        free = self.q("PRAGMA freelist_count")[0][0] * self.q("PRAGMA page_size")[0][0]
        return check, free

    def reclaim_space(self):
        """Give freed pages back to the file system (best effort)."""
        try:
            # executescript steps the pragma to its end (execute frees one page).
            self.db.executescript("PRAGMA incremental_vacuum;")
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except self.sqlite3.Error:
            pass                    # space is reclaimed on a later run

    # Jobs: transitions (inside tx() unless said) ------------------------------

    def add_env(self, blob):
        """The id of the stored environment blob, added if new."""
        key = env_key(blob)
        for env_id, stored in self.x(SQL_ENVS_OF_HASH, (key,)).fetchall():
            if bytes(stored) == blob:
                return env_id
        return self.x(SQL_ADD_ENV, (key, blob)).lastrowid     # new, or a collision

    def env(self, env_id):
        """A stored environment (as env_from_blob gives it), or None."""
        rows = self.q(SQL_ENV, (env_id,))
        return env_from_blob(rows[0][0]) if rows else None

    def insert(self, spec, now, env_id=None, umask=None, hook_of=None, schedule=None):
        """enqueue: one validated job spec, to run in the stored environment
        env_id with umask (None: the worker's). Returns (the id, True), or
        (the id found, False) when nothing was added: spec['unique'] and the
        id exists, or --if-busy skip and a job with one of its keys waits
        or runs."""
        job_id = spec.get("id")
        if job_id is not None:
            if self.x(SQL_JOB_EXISTS, (job_id,)).fetchone():
                if spec.get("unique"):
                    return job_id, False
                raise QueuectlError(f"a job with id {job_id!r} exists already "
                                    "(use --unique to accept that)")
        keys = spec.get("keys") or []
        if spec.get("if_busy") == "skip":
            busy = self.x(SQL_KEY_BUSY.format(marks=_marks(keys)), keys).fetchone()
            if busy:
                return busy[0], False
        deps = [self.resolve(d) for d in spec.get("depends_on") or []]     # #N too
        spec["depends_on"] = deps or spec.get("depends_on")
        if job_id is not None and job_id in deps:
            raise UsageError(f"job {job_id!r} cannot depend on itself")
        known = {r[0] for r in self.x(SQL_JOB_STATES.format(marks=_marks(deps)),
                                      deps)} if deps else set()
        for dep in deps:
            if dep not in known:
                raise QueuectlError(f"unknown job {dep!r} in --after/depends_on")
        blocked = self._blocked(deps)
        stamp = iso(now)
        run_at = iso(spec["run_at"]) if spec.get("run_at") is not None else stamp
        row = {c: spec.get(c) for c in job_columns("s")}
        row.update(
            state=PENDING, queue=spec.get("queue") or DEFAULT_QUEUE,
            priority=spec.get("priority", 0), run_at=run_at, depends_on=_json_or_none(deps),
            blocked=int(blocked), env=_json_or_none(spec.get("env")), env_id=env_id,
            umask=umask, created_at=stamp, updated_at=stamp, keys=_json_or_none(keys),
            hooks=_json_or_none({k: spec[k] for k in HOOK_EVENTS if spec.get(k) is not None}),
            hook_of=hook_of, schedule=schedule)
        while True:
            row["id"] = try_id = job_id or new_id()
            try:
                self.x(SQL_INSERT, row)
                break
            except self.sqlite3.IntegrityError:
                if job_id is not None:
                    raise QueuectlError(f"a job with id {job_id!r} exists already") from None
        for dep in deps:
            self.x(SQL_INSERT_DEP, (try_id, dep))
        for key in keys:
            self.x(SQL_INSERT_KEY, (key, try_id))
        return try_id, True

    def _blocked(self, deps):
        """The one rule for a job's blocked flag, at enqueue and at reset
        (completions unblock with SQL_UNBLOCK): 1 while any dependency has
        not completed."""
        if not deps:
            return 0
        return int(self.x(SQL_OPEN_DEPS.format(marks=_marks(deps)), deps).fetchone()[0] > 0)

    @staticmethod
    def claim_filter(queues, paused):
        """The WHERE tail and parameters that keep a claim to queues (None:
        all; every worker serves HOOK_QUEUE too) and out of paused ones."""
        where, params = "", []
        if queues:
            queues = list(queues) + [HOOK_QUEUE]
            where += f" AND queue IN ({_marks(queues)})"
            params += queues
        if paused:
            where += f" AND queue NOT IN ({_marks(paused)})"
            params += sorted(paused)
        return where, params

    @classmethod
    def read_only(cls, home, budget):
        """A Store that only reads an existing database, changes nothing (no
        home created, no migration) and gives up past budget seconds in
        any one statement (sqlite3.OperationalError)."""
        self = cls.__new__(cls)
        self.sqlite3 = sqlite_module()
        self.home, self.local_lock, self.limited = home, None, {}
        self.path = os.path.join(home, "queue.db")
        self.db = self.sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=0,
                                       isolation_level=None)
        started = time.monotonic()
        self.db.set_progress_handler(lambda: time.monotonic() - started > budget, 100)
        return self

    def completion_words(self, kind):
        """Words a completion script offers: recent job ids, or queue names
        (the cheap query first: the scan of jobs may run out of time)."""
        words = []
        try:
            for sql in SQL_COMPLETION.get(kind, ()):
                words += [r[0] for r in self.db.execute(sql).fetchall()]
        except self.sqlite3.Error:
            pass                         # out of time, busy: what there is
        return words

    def claim(self, worker, queues, now, token=None, order=None):
        """claim: the next runnable job of queues (None: all) that is not
        paused, for worker, with claim token (default: a new one), taken in
        order (a ClaimOrder; None: by priority); the job, or None."""
        paused, full_queues, full = self._claim_state()
        if "*" in paused:
            return None
        where, params = self.claim_filter(queues, paused | full_queues)
        if full:
            where += CLAIM_KEYS_FREE.format(marks=_marks(full))
            params += full
        job = self._first_due(where, params, now, order)
        if job is None:
            return None
        job["claim"] = token or new_id() + new_id()
        job["worker"] = worker
        job["started_at"] = iso(now)
        self.x(SQL_CLAIM, (job["claim"], worker, job["started_at"], job["started_at"],
                           job["seq"]))
        return job

    def _claim_state(self):
        """What a claim passes over: (paused queues, queues at their limit,
        full keys); self.limited: the limits it saw."""
        paused, limits, held = set(), {}, []
        for kind, name, n in self.x(SQL_CLAIM_STATE):     # one statement, not three
            if kind == 0:
                paused.add(name)
            elif kind == 1:
                limits[name] = n
            else:
                held.append((name, n))
        self.limited = limits
        full_queues = set()
        if any(k.startswith(QUEUE_KEY) for k in limits):
            for queue, n in self.x(SQL_RUNNING_PER_QUEUE):
                if n >= limits.get(QUEUE_KEY + queue, n + 1):
                    full_queues.add(queue)
        return paused, full_queues, [k for k, n in held if n >= limits.get(k, 1)]

    def _first_due(self, where, params, now, order):
        """The job a claim takes: the first due one (and where) in order.
        By priority: one walk of the jobs_ready index. With fifo queues:
        the earliest due job of each priority (a seek each), and the first
        by priority of the other queues, the least of them by key."""
        stamp = iso(now)
        if order is None or order.fifo is None:
            row = self.x(SQL_CLAIMABLE.format(where=where, order="priority DESC, run_at, seq"),
                         [stamp] + params).fetchone()
            return row and job_from_row(row)
        priorities = [r[0] for r in self.x(SQL_PRIORITIES, (FIFO_SEEKS,))]
        if len(priorities) > FIFO_SEEKS:         # so many: sort them all instead
            row = self.x(SQL_CLAIMABLE.format(where=where, order=order_by(order.key)),
                         [stamp] + params + order.params).fetchone()
            return row and job_from_row(row)
        found = []
        if order.prio is not None:
            cond, extra = order.prio
            row = self.x(SQL_CLAIMABLE.format(where=f"{where} AND {cond}",
                                              order="priority DESC, run_at, seq"),
                         [stamp] + params + extra).fetchone()
            if row:
                job = job_from_row(row)
                found.append(((-job["priority"], job["run_at"], job["seq"]), job))
        cond, extra = order.fifo
        for v in priorities:
            row = self.x(SQL_CLAIMABLE.format(where=f"{where} AND priority = ? AND {cond}",
                                              order="run_at, seq"),
                         [stamp] + params + [v] + extra).fetchone()
            if row:
                job = job_from_row(row)
                found.append(((0, job["run_at"], job["seq"]), job))
        return min(found, key=lambda f: f[0])[1] if found else None

    def ahead(self, job, order, now, queues=None):
        """How many due jobs a claim in order (a ClaimOrder) takes before
        job: of queues (None: all) that are not paused nor full, and whose
        keys are not full, as a claim sees them."""
        paused, full_queues, full = self._claim_state()
        where, params = self.claim_filter(queues, paused | full_queues)
        if full:
            where += CLAIM_KEYS_FREE.format(marks=_marks(full))
            params += full
        return self.x(SQL_AHEAD.format(key=order.key, where=where),
                      [iso(now)] + params + order.params + order.params
                      + [job["seq"]]).fetchone()[0]

    def record_pid(self, job_id, worker, token, pid, start):
        """record pid; when the claim no longer holds: (False, (state,
        worker, claim) of the job now, or None)."""
        if self.x(SQL_RECORD_PID, (pid, start, job_id, worker, token)).rowcount:
            return True, None
        row = self.x(SQL_JOB, (job_id,)).fetchone()
        job = row and job_from_row(row)
        return False, job and (job["state"], job["worker"], job["claim"])

    def owns(self, job_id, worker, token):
        """Whether worker still holds the claim (inside the tx that acts on it)."""
        return self.x(SQL_OWNED, (job_id, worker, token)).fetchone() is not None

    def take(self, job_id, old, token, new):
        """take: a processing job from worker old to worker new, fenced on
        old and the claim; False when someone else settled or took it."""
        return bool(self.x(SQL_TAKE, (new, iso(time.time()), job_id, old,
                                      token)).rowcount)

    def finish(self, job, worker, token, ended, cfg, duration, now=None, usage=None):
        """complete or fail: the end of an attempt (ended, an Outcome). Returns (the job's new
        state, or None when the claim no longer holds: cancelled, or
        recovered by another worker; how many dependents it unblocked; the
        error as recorded, with why it is not retried when the retry policy
        says so). Fires the job's hook for its new state. usage: the
        attempt's rusage (cpu_user, cpu_sys, max_rss), None if unmeasured."""
        now = time.time() if now is None else now
        stamp = iso(now)
        attempts = job["attempts"] + 1
        rc, error, exit_code = ended.rc, ended.error, ended.exit_code
        fence = (job["id"], worker, token)
        unblocked = 0
        use = {"wall": None if duration is None else round(duration, 6),
               **(usage or dict.fromkeys(("cpu_user", "cpu_sys", "max_rss")))}
        use_json = usage_json(use)
        if error is None:
            state = COMPLETED
            cur = self.x(SQL_COMPLETE, (attempts, exit_code, stamp, stamp, use_json) + fence)
            if cur.rowcount:
                unblocked = self.x(SQL_UNBLOCK, (job["id"],)).rowcount
                if job["schedule"] is not None:
                    self.x(SQL_SCHEDULE_SUCCESS, (now, job["schedule"]))
        else:
            limit = effective(job, cfg, ("max_retries",))["max_retries"][0]
            verdict = retry_verdict(job, cfg, ended)
            if verdict:
                error = f"{error}; {verdict}"
            if attempts > limit or verdict:
                state, run_at, finished = DEAD, job["run_at"], stamp
            else:
                state, finished = FAILED, None
                run_at = iso(now + backoff_delay(attempts, cfg))
            cur = self.x(SQL_FAIL, (state, attempts, exit_code, error, run_at,
                                    finished, stamp, use_json) + fence)
        if not cur.rowcount:
            return None, 0, error
        self.fire_hook(job, {COMPLETED: "on_success", FAILED: "on_failure",
                             DEAD: "on_dead"}[state], cfg, state, exit_code, attempts,
                       error, now)
        self.add_history(job["queue"], now, error is not None, duration, use)
        self.add_attempt(job, attempts, state, now, use, rc, error)
        return state, unblocked, error

    def add_history(self, queue, now, failed, duration, use):
        """An ended attempt in its queue's history row of the quarter hour
        (one statement, in the transaction that records it)."""
        rss = use["max_rss"]
        runs = [0] * len(DURATION_BUCKETS)
        if duration is not None and duration <= DURATION_BUCKETS[-1]:
            runs[next(i for i, b in enumerate(DURATION_BUCKETS) if duration <= b)] = 1
        sizes = [0] * len(RSS_BUCKETS)
        if rss is not None and rss <= RSS_BUCKETS[-1]:
            sizes[next(i for i, b in enumerate(RSS_BUCKETS) if rss <= b)] = 1
        self.x(SQL_HISTORY_ADD, (
            queue, int(now // HISTORY_SLOT * HISTORY_SLOT), HISTORY_SLOT, 1, int(failed),
            duration or 0.0, int(duration is not None), use["cpu_user"] or 0.0,
            use["cpu_sys"] or 0.0,
            rss or 0, int(rss is not None), *runs, *sizes, rss or 0))

    def history_totals(self, since=0, queues=None):
        """{queue: {column: sum, rss_max: max}} of the history since (epoch;
        0: all of it, before the history began included)."""
        where, params = "", [since]
        if queues:
            where, params = f" AND queue IN ({_marks(queues)})", params + list(queues)
        names = [c for c, _ in HISTORY_SUMS] + ["rss_max"]
        return {r[0]: dict(zip(names, r[1:]))
                for r in self.q(SQL_HISTORY_TOTALS.format(where=where), params)}

    def history_series(self, since, queues=None):
        """[(start, {column: sum, rss_max})] of the history rows since,
        summed over queues (None: all)."""
        where, params = "", [since]
        if queues:
            where, params = f" AND queue IN ({_marks(queues)})", params + list(queues)
        names = [c for c, _ in HISTORY_SUMS] + ["rss_max"]
        return [(r[0], dict(zip(names, r[1:]))) for r in self.q(
            SQL_HISTORY_SERIES.format(where=where), params)]

    def roll_up_history(self, now):
        """Slots older than HISTORY_FINE_DAYS become days; rows written."""
        cutoff = int((now - HISTORY_FINE_DAYS * 86400) // 86400 * 86400)
        with self.tx():
            for sql in SQL_HISTORY_ROLLUP:
                self.x(sql, (cutoff,))

    def add_attempt(self, job, number, state, now, use, rc, error):
        """The row of an ended attempt: what it cost (use: wall, cpu_user,
        cpu_sys, max_rss, max_rss_bound) and how it ended (rc: waitpid-style)."""
        self.x(SQL_ATTEMPT_ADD, (
            job["id"], number, job["queue"], state, job["started_at"], now, use["wall"],
            use["cpu_user"], use["cpu_sys"], use["max_rss"],
            int(bool(use.get("max_rss_bound"))), rc if rc is not None and rc >= 0 else None,
            -rc if rc is not None and rc < 0 else None, error))

    def requeue(self, job_id, worker, token):
        """requeue, in a transaction of its own: back to pending, the attempt
        not counted. Whether the claim still held."""
        with self.tx():
            return bool(self.x(SQL_REQUEUE, (iso(time.time()), job_id, worker,
                                             token)).rowcount)

    def cancel(self, job, now, cfg, grace=0):
        """cancel; the on_cancel hook of a job that was not running (a running
        one's fires when its attempt has ended: cancel_ended, once its
        processes are gone; they are killed grace seconds from now)."""
        self.x(SQL_CANCEL, (iso(now), iso(now), iso(now + grace), job["id"]))
        if job["state"] != PROCESSING:
            self.fire_hook(job, "on_cancel", queue_config(cfg, job["queue"]), CANCELLED,
                           None, job["attempts"], "cancelled", now)

    def cancel_ended(self, job, token, cfg, rc=None, now=None, usage=None, duration=None):
        """cancel ended: the processes of a cancelled job's attempt are gone;
        it lets go of its keys, counts and records the attempt, and fires
        on_cancel. False if that was done already."""
        now = time.time() if now is None else now
        if not self.x(SQL_CANCEL_ENDED, (iso(now), job["id"], token)).rowcount:
            return False
        self.add_attempt(job, job["attempts"] + 1, CANCELLED, now,
                         {"wall": duration, **(usage or dict.fromkeys(
                             ("cpu_user", "cpu_sys", "max_rss")))}, rc, "cancelled")
        self.fire_hook(job, "on_cancel", queue_config(cfg, job["queue"]), CANCELLED,
                       describe_exit(rc)[0], job["attempts"] + 1, "cancelled", now)
        return True

    def let_go_cancelled(self, job_id, token):
        """A cancelled job's attempt was seen to have ended, by a command
        that is about to delete the job: its claim goes (cancel ended's
        statement, without the record and the hook)."""
        self.x(SQL_CANCEL_ENDED, (iso(time.time()), job_id, token))

    def cancelled_running(self):
        return [job_from_row(r) for r in self.q(SQL_CANCELLED_RUNNING)]

    def fire_hook(self, job, event, cfg, state, exit_code, attempts, error, now):
        """Enqueue job's hook for event (its own, else its queue's or the
        home's default in cfg) as a job of HOOK_QUEUE, in the transaction
        of the job's change; a hook's own end fires none."""
        if job["hook_of"] is not None or (job["hooks"] is None and not cfg.get(event)):
            return None
        use = effective_values(job, cfg, (event, "hook_timeout"))
        command = use[event]
        if not command or not command.strip():
            return None
        env = {**_loads(job["env"], {}),
               "QUEUECTL_JOB_ID": job["id"], "QUEUECTL_JOB_STATE": state,
               "QUEUECTL_EXIT_CODE": "" if exit_code is None else str(exit_code),
               "QUEUECTL_ATTEMPT": str(attempts), "QUEUECTL_ERROR": error or "",
               "QUEUECTL_LOG": log_path(self.home, job["id"]),
               "QUEUECTL_COMMAND": job["command"], "QUEUECTL_QUEUE": job["queue"],
               "QUEUECTL_HOOK": event}
        cwd = job["cwd"] if os.path.isdir(job["cwd"]) else "/"
        spec = {"command": command, "queue": HOOK_QUEUE, "cwd": cwd, "env": env,
                "timeout": use["hook_timeout"]}
        return self.insert(spec, now, job["env_id"], job["umask"], hook_of=job["id"])[0]

    def reset(self, job, now):
        """reset: a finished job back to pending, runnable now, attempts 0;
        blocked again on its unfinished dependencies; a completed one blocks
        again the jobs that depend on it."""
        blocked = self._blocked(_loads(job["depends_on"], []))
        self.x(SQL_RESET, (iso(now), iso(now), blocked, job["id"]))
        if job["state"] == COMPLETED:
            self.x(SQL_REBLOCK, (job["id"],))

    def run_now(self, job_id, now):
        """A failed job waiting out its backoff: runnable now."""
        self.x(SQL_RUN_NOW, (iso(now), iso(now), job_id))

    def edit(self, job, spec, now):
        """edit: a pending, failed or dead job's fields from a checked spec,
        fenced on its updated_at; False when it changed meanwhile."""
        run_at = iso(spec["run_at"]) if spec.get("run_at") is not None else job["run_at"]
        return bool(self.x(SQL_EDIT, (
            spec["command"], spec.get("queue") or DEFAULT_QUEUE, spec.get("priority", 0),
            spec.get("max_retries"), spec.get("timeout"), run_at, spec["cwd"],
            _json_or_none(spec.get("env")), iso(now), job["id"],
            job["updated_at"])).rowcount)

    def waiting_on(self, ids):
        """[(job, dependency)] of unfinished jobs that depend on one of ids."""
        return self.x(SQL_WAITING_ON.format(marks=_marks(ids)), ids).fetchall()

    def delete(self, ids, states):
        """The jobs of ids still in states, deleted with their dependency
        rows; their ids."""
        gone = [r[0] for r in self.x(SQL_IDS_STILL_IN.format(
            marks=_marks(ids), smarks=_marks(states)), list(ids) + list(states))]
        envs = [r[0] for r in self.x(SQL_JOB_ENV_IDS.format(marks=_marks(gone)), gone)]
        self.x(SQL_DELETE_JOBS.format(marks=_marks(gone)), gone)
        self.x(SQL_DELETE_DEPS.format(marks=_marks(gone)), gone)
        self.x(SQL_DELETE_KEYS.format(marks=_marks(gone)), gone)
        self.x(SQL_DELETE_ATTEMPTS.format(marks=_marks(gone)), gone)
        self.drop_unused_envs(envs)
        return gone

    def drop_unused_envs(self, env_ids):
        """Delete the environments of env_ids that no job uses any more."""
        self.x(SQL_DROP_UNUSED_ENVS.format(marks=_marks(env_ids)), env_ids)

    # Concurrency keys and limits --------------------------------------------

    def limits(self):
        return dict(self.q(SQL_LIMITS))

    def set_limit(self, key, n):
        with self.tx():
            self.x(SQL_SET_LIMIT, (key, n))

    def remove_limit(self, key):
        """Whether key had a limit set."""
        with self.tx():
            return bool(self.x(SQL_DELETE_LIMIT, (key,)).rowcount)

    def held(self):
        """{key: running jobs that hold it}, queues' own keys included."""
        held = dict(self.q(SQL_HELD))
        held.update((QUEUE_KEY + q, n) for q, n in self.q(SQL_RUNNING_PER_QUEUE))
        return held

    def holders(self, key):
        """The ids of the running jobs that hold key, oldest first."""
        if key.startswith(QUEUE_KEY):
            return [r[0] for r in self.q(SQL_QUEUE_HOLDERS, (key[len(QUEUE_KEY):],))]
        return [r[0] for r in self.q(SQL_HOLDERS, (key,))]

    def attempts_of(self, job_id):
        return [dict(zip(SQL_ATTEMPT_FIELDS, r)) for r in self.q(SQL_ATTEMPTS_OF, (job_id,))]

    # Recurring schedules ---------------------------------------------------

    def schedules(self):
        return [dict(zip(SCHEDULE_FIELDS, r)) for r in self.q(SQL_SCHEDULES)]

    def remove_schedule(self, name):
        """schedule rm, with its environment unless a job uses it; its name."""
        with self.tx():
            sch = self.schedule(name)
            self.x(SQL_DELETE_SCHEDULE, (sch["name"],))
            if sch["env_id"] is not None:
                self.drop_unused_envs([sch["env_id"]])
        return sch["name"]

    def pause_schedule(self, name, pause, next_at, label):
        """schedule pause/resume: from label on, next at next_at."""
        with self.tx():
            self.x(SQL_SCHEDULE_PAUSE, (int(pause), next_at, label, name))

    def add_schedule(self, name, cron, spec, blob, umask, overlap, catch_up, jitter, now,
                     label, next_at):
        """schedule add, with the environment blob (None: the worker's)."""
        with self.tx():
            if self.x(SQL_SCHEDULE, (name,)).fetchone():
                raise QueuectlError(f"a schedule named {name!r} exists already; "
                                    f"schedule rm {name} first")
            env_id = self.add_env(blob) if blob is not None else None
            self.x(SQL_ADD_SCHEDULE, (name, cron, _json_or_none(spec), env_id, umask,
                                      overlap, catch_up, jitter, 0, iso(now), label, next_at))

    def ended_since(self, since):
        """[(queue, ended_at)] of the attempts ended since (epoch)."""
        return self.q(SQL_ENDED_SINCE, (since,))

    def last_started(self):
        """The id of the job that started last, or None."""
        rows = self.q(SQL_LAST_STARTED)
        return rows[0][0] if rows else None

    def max_seq(self):
        return self.q(SQL_MAX_SEQ)[0][0]

    def open_jobs(self, ids=None, up_to=None, where="", params=()):
        """[(id, state, blocked)] of the unfinished jobs of ids, or of those
        enqueued up to seq up_to (and where)."""
        if ids is not None:
            return self.q(SQL_OPEN_OF.format(marks=_marks(ids)), ids)
        return self.q(SQL_OPEN_UP_TO.format(where=where), [up_to] + list(params))

    def first_open(self, where="", params=()):
        """The seq of the oldest unfinished job (and where), or None."""
        return self.q(SQL_FIRST_OPEN.format(where=where), list(params))[0][0]

    def selection_counts(self, ids=None, up_to=None, where="", params=(), first=0):
        """{state: n} of the jobs of ids, or of those enqueued from seq first
        up to seq up_to (and where): what a progress line counts."""
        if ids is not None:
            return dict(self.q(SQL_COUNTS_OF.format(marks=_marks(ids)), ids))
        return dict(self.q(SQL_COUNTS_UP_TO.format(where=where),
                           [first, up_to] + list(params)))

    def not_completed(self, up_to, where="", params=()):
        """[(id, state)] of the jobs up to seq up_to that ended dead or cancelled."""
        return self.q(SQL_NOT_COMPLETED.format(where=where), [up_to] + list(params))

    def due(self, now, limit):
        """Waiting jobs due at now, in claim order, at most limit."""
        return [job_from_row(r) for r in self.q(SQL_DUE, (iso(now), limit))]

    def delayed_and_blocked(self, now):
        """({queue: waiting jobs due later}, {queue: waiting jobs blocked})."""
        return dict(self.q(SQL_DELAYED, (iso(now),))), dict(self.q(SQL_BLOCKED))

    def runnable_since(self, now):
        """(since when, id) of the job that could run now and has waited
        longest: due, not blocked, its queue not paused (None: none). status
        and queuectl_oldest_pending_seconds both say it."""
        paused = self.paused()
        if "*" in paused:
            return None
        where, params = self.claim_filter(None, paused)
        row = self.q(SQL_RUNNABLE_SINCE.format(where=where), [iso(now)] + params)[0]
        return row if row[0] is not None else None

    def keys_waiting(self):
        """{key: how many waiting jobs hold it}."""
        return dict(self.q(SQL_KEYS_WAITING))

    def schedule(self, name):
        rows = self.q(SQL_SCHEDULE, (name,))
        if not rows:
            raise QueuectlError(f"no schedule named {name!r}")
        return dict(zip(SCHEDULE_FIELDS, rows[0]))

    def next_schedule(self):
        """When the next slot of any schedule is due (epoch), or None."""
        return self.q(SQL_NEXT_SCHEDULE)[0][0]

    def fire_schedules(self, now, say=None):
        """Enqueue the job of every due slot, each once: in one write
        transaction, so that of all the workers that call this, one fires a
        slot and the others find it handled. The jobs' ids."""
        fired = []
        fault("fire")
        with self.tx():
            for row in self.x(SQL_SCHEDULES_DUE, (now,)).fetchall():
                sch = dict(zip(SCHEDULE_FIELDS, row))
                self.x("SAVEPOINT fire")
                try:
                    fired += self._fire(sch, now, say)
                except (QueuectlError, ValueError) as e:
                    # One schedule that cannot fire never holds up the others:
                    # its slot is skipped, with why, and it moves on.
                    self.x("ROLLBACK TO fire")
                    self._skip(sch, now, f"cannot fire: {e}", say)
                self.x("RELEASE fire")
        return fired

    def _skip(self, sch, now, why, say):
        try:
            _, at = next_slot(Cron(sch["cron"]), now=now)
        except QueuectlError:
            at = now + 86400
        self.x(SQL_SCHEDULE_FIRED, (slot_label(now_label(now)), at, None, 1, why,
                                    sch["name"]))
        if say:
            say(f"schedule {sch['name']}: {why}")

    def _fire(self, sch, now, say):
        """One schedule's due slots: the latest catch_up of them become jobs
        (unless overlap skip finds its last run still pending or running),
        the older ones are missed; then its next slot."""
        import collections
        import random
        cron = Cron(sch["cron"])
        label = parse_slot_label(sch["last_slot"])
        due, passed = collections.deque(maxlen=sch["catch_up"]), 0
        if now - local_instant(label) > 366 * 86400:      # down for over a year
            label = now_label(now - 366 * 86400)
            passed = 1                   # slots before that count as one missed
        for t in cron.slots_after(label):
            at = local_instant(t)
            if at > now:
                break
            if due and local_instant(due[-1]) == at:
                due.pop()                # a slot the clock skipped: one run with
                passed -= 1              # the slot at the gap's end
            due.append(t)
            label = t
            passed += 1
        due = list(due)
        missed = passed - len(due)
        skipped, ids = missed, []
        last_skip = f"{plural(missed, 'slot')} missed while no worker ran" if missed \
            else None
        running = sch["overlap"] == "skip" and due and \
            self.x(SQL_SCHEDULE_ACTIVE, (sch["name"],)).fetchone()
        if running:
            skipped += len(due)
            last_skip = f"{slot_label(due[-1])} ({running[0]} still pending or running)"
            due = []
        spec = schedule_spec(sch)
        for t in due:
            job_id = f"{sch['name']}@{slot_label(t)}"
            run_at = max(local_instant(t), now - 1) + random.uniform(0, sch["jitter"])
            new, added = self.insert({**spec, "id": job_id, "unique": True, "run_at": run_at},
                                     now, sch["env_id"], sch["umask"], schedule=sch["name"])
            if added:
                ids.append(new)
            else:
                skipped += 1
                last_skip = f"{slot_label(t)} (a job with id {job_id} exists already)"
        if say and skipped:
            say(f"schedule {sch['name']}: skipped {plural(skipped, 'slot')}, last "
                f"{last_skip}")
        nxt, at = next_slot(cron, label)
        self.x(SQL_SCHEDULE_FIRED, (slot_label(label), at, ids[-1] if ids else None,
                                    skipped, last_skip, sch["name"]))
        return ids

    def hooks_of(self, job_id):
        return [job_from_row(r) for r in self.q(SQL_HOOKS_OF, (job_id,))]

    # Workers and paused queues ------------------------------------------------

    def workers(self):
        return [dict(zip(SQL_WORKER_FIELDS, r)) for r in self.q(SQL_WORKERS)]

    def live_workers(self):
        """Workers that are alive (dicts of SQL_WORKER_FIELDS); removes the
        rows and files of the dead ones."""
        alive, dead = [], []
        for w in self.workers():
            (alive if worker_alive(self.home, w) else dead).append(w)
        if dead:
            with self.tx():
                for w in dead:
                    self.x(SQL_DELETE_WORKER, (w["id"],))
            for w in dead:
                remove_worker_files(self.home, w["id"])
        return alive

    def register(self, wid, threads, queues):
        stamp = iso(time.time())
        with self.tx():
            self.x(SQL_REGISTER, (wid, os.getpid(), hostname(), threads,
                                  _json_or_none(queues), stamp, stamp))

    def set_threads(self, wid, threads):
        with self.tx():
            self.x(SQL_WORKER_THREADS, (threads, wid))

    def heartbeat(self, wid):
        """One heartbeat; False when the worker's row is gone."""
        with self.tx():
            return bool(self.x(SQL_HEARTBEAT, (iso(time.time()), wid)).rowcount)

    def unregister(self, wid):
        with self.tx():
            self.x(SQL_DELETE_WORKER, (wid,))

    def paused(self):
        return {r[0] for r in self.q(SQL_PAUSED)}

    def pause(self, queues):
        with self.tx():
            for q in queues:
                self.x(SQL_PAUSE, (q,))

    def resume(self, queues):
        """Resume queues (all, with none named)."""
        with self.tx():
            if not queues:
                self.x(SQL_RESUME_ALL)
            for q in queues:
                self.x(SQL_RESUME, (q,))

class _Transaction:
    def __init__(self, store):
        self.store = store

    def __enter__(self):
        lock = self.store.local_lock
        if lock is not None:
            lock.acquire()
        try:
            self.store.db.execute("BEGIN IMMEDIATE")
        except self.store.sqlite3.Error as e:
            if lock is not None:
                lock.release()
            raise self.store._error(e) from None
        return self.store

    def __exit__(self, etype, exc, tb):
        try:
            return self._end(etype, exc)
        finally:
            if self.store.local_lock is not None:
                self.store.local_lock.release()

    def _end(self, etype, exc):
        db = self.store.db
        if etype is None:
            try:
                db.execute("COMMIT")
                return False
            except self.store.sqlite3.Error as e:
                db.execute("ROLLBACK") if db.in_transaction else None
                raise self.store._error(e) from None
        if db.in_transaction:
            db.execute("ROLLBACK")
        if isinstance(exc, self.store.sqlite3.Error):
            raise self.store._error(exc) from None
        return False

def _marks(items):
    return ",".join("?" * len(items))

def job_from_row(row):
    return dict(zip(ROW_FIELDS, row))


# Worker liveness and wake-ups ################################################

# Each worker process holds an exclusive flock on home/run/<worker>.lock for
# its whole life: the kernel releases it the instant the process dies, so
# "is it alive?" never depends on clocks or pid reuse. Idle workers sleep in
# poll() on their FIFO home/run/<worker>.wake; commands that make a job
# runnable write a byte to every FIFO.


def run_dir(home):
    return ensure_private_dir(os.path.join(home, "run"))

def lock_held(home, wid):
    """True while the worker wid (on this host) holds its lock file."""
    import fcntl
    try:
        fd = os.open(os.path.join(home, "run", wid + ".lock"),
                     os.O_RDWR | O_NOFOLLOW | O_CLOEXEC)
    except FileNotFoundError:
        return False        # its files are gone: it ended
    except OSError:
        return True         # EMFILE, EIO...: uncertainty is never death
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True         # held (or cannot tell): the worker lives
    else:
        return False
    finally:
        os.close(fd)

def worker_alive(home, row):
    """Is the process of this workers row alive? On this host its lock says
    so (a stopped or suspended worker is still alive); elsewhere, only a
    heartbeat younger than the lease does."""
    if row["host"] == hostname():
        return lock_held(home, row["id"])
    return time.time() - epoch(row["heartbeat"]) <= LEASE

def worker_stale(row):
    """Its heartbeat is older than the lease: its jobs are recovered even if
    it lives (stopped, suspended, stuck); fencing keeps its late writes out."""
    return time.time() - epoch(row["heartbeat"]) > LEASE

def claim_tag(worker_id):
    """What begins the claim tokens a worker makes (the random XXXX of its
    id HOST-PID-XXXX): a job that holds one of them and is that worker's
    occupies one of its job threads; one it adopted (its token another's)
    is only watched."""
    return worker_id[-4:]

def remove_worker_files(home, wid):
    for suffix in (".lock", ".wake", ".threads"):
        try:
            os.unlink(os.path.join(home, "run", wid + suffix))
        except OSError:
            pass

def wake_workers(home):
    """Tell idle workers that a job may be runnable (cheap; never blocks)."""
    import stat
    path = os.path.join(home, "run")
    try:
        names = os.listdir(path)
    except OSError:
        return
    for name in names:
        if name.endswith(".wake"):
            try:
                fd = os.open(os.path.join(path, name), os.O_WRONLY | os.O_NONBLOCK
                             | O_NOFOLLOW | O_CLOEXEC)
            except OSError:
                continue        # ENXIO: nobody reads it; ELOOP: a planted symlink
            try:
                if stat.S_ISFIFO(os.fstat(fd).st_mode):     # never a planted file
                    os.write(fd, b"!")
            except OSError:
                pass            # full: it has been woken already
            finally:
                os.close(fd)

_HOST = []

def hostname():
    if not _HOST:
        _HOST.append(os.uname().nodename)
    return _HOST[0]


# One attempt: spawn, wait, timeout, record, footer ###########################

# Threading model (of a Worker and its two parts, Attempts and Recovery,
# which share one WorkerState, s; "self." below is that state's): one
# worker process runs `count` job threads, each with its own Store
# (connection); the main thread owns the signals, the wake-up FIFO,
# heartbeats, config reloads and the decisions of recovery, with its own
# Store. An adopted job is watched, and a recovered outcome recorded, by a
# thread of its own (with its own Store); stop --now kills from another.
#
# Shared state and its rules:
# - self.lock guards running, held (the claims its threads answer for),
#   active, settling, generation, threads_left and the completed/dead
#   counters: read and written only while holding it.
#   self.cond (on self.lock) wakes idle job threads.
# - stopping and kill_jobs are written only under self.lock and only ever go
#   from False to True; threads may read them without the lock and see the
#   change a step late, which each reader tolerates (a job claimed just
#   after a stop is given back uncounted).
# - config is replaced whole by the main thread; readers take one reference.
# - devnull, base_env, umask, id, home and queues are set before any thread
#   starts and never change.
# - env_cache maps env ids to environments; an id is never reused, so an
#   entry never goes stale. Threads add and clear entries (single dict
#   operations, atomic under the GIL); a miss only costs a read.
# - A Running's stopped and lost_to are set by other threads and read by its
#   own waiting thread, again only False/None -> set.
# - db_lock serialises this process's write transactions (Store.tx), so its
#   threads queue here instead of in SQLite's busy handler.
# - print_lock keeps each line of say() whole.
# Nothing else is shared: WorkerState, Worker, Attempts and Recovery have
# __slots__, so an attribute set anywhere else is an error, not a new field.

class WorkerState:
    """What the parts of a worker process share: the state its threads
    read and write under the rules of the threading model above, and the
    small acts on it that every part needs."""

    __slots__ = ("home", "id", "tag", "count", "queues", "drain", "out", "threading", "lock",
                 "cond", "print_lock", "db_lock", "running", "held", "active", "settling",
                 "generation", "stopping", "kill_jobs", "completed", "dead", "config_file",
                 "config", "_qcfg", "config_mtime", "signals", "threads_left", "base_env",
                 "env_cache", "umask", "devnull", "log_file", "log_max", "poke_fd", "lock_fd",
                 "progress", "slots")

    def __init__(self, home, count=1, queues=None, drain=False, out=None):
        import threading
        self.threading = threading
        self.home = home
        self.count = count
        self.queues = list(dict.fromkeys(queues or [])) or None
        self.drain = drain
        self.out = out or sys.stdout
        host = "".join(c if c.isalnum() or c in ".-" else "-" for c in hostname())
        self.id = f"{host[:40] or 'host'}-{os.getpid()}-{new_id()[:4]}"
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.print_lock = threading.Lock()
        self.db_lock = threading.Lock()  # write transactions of this process
        self.running = {}        # token -> Running
        # The claims a thread of this process answers for, from before its
        # claim (or take) is committed until its outcome is written: a
        # processing job of this worker whose claim is not here is tracked by
        # nobody (a thread that could not hand it on), and recovery takes it.
        self.held = set()
        self.tag = claim_tag(self.id)
        self.active = 0          # job threads claiming or running a job
        self.settling = 0        # threads recording a recovered job's outcome
        self.generation = 0      # bumped on every wake-up
        self.stopping = False
        self.kill_jobs = False   # stop --now: kill the running jobs
        self.completed = self.dead = 0
        # A draining worker at a terminal keeps wait's progress line under
        # its own lines (see say).
        self.slots = set()               # the slots of the job threads ({slot})
        self.progress = Progress() if drain and out is None else None
        if self.progress and not self.progress.on:
            self.progress = None
        self.config_file = Config(home)
        self.config = self.config_file.load()
        self._qcfg = (None, {})          # see _from_config
        self.config_mtime = self._config_mtime()
        self.signals = []
        self.threads_left = 0            # job threads not yet returned
        # Copied once, not per job; the wrapper's own variables never leak in.
        # Jobs enqueued with --worker-env get it; the others their own.
        self.base_env = {k: v for k, v in os.environ.items()
                         if not k.upper().startswith("__QUEUECTL_")}
        self.env_cache = {}              # env_id -> environment (rows never change)
        umask = os.umask(0o077)          # read it: no thread runs yet
        os.umask(umask)
        self.umask = f"{umask:04o}"
        self.devnull = None              # opened by run(), before any thread
        self.log_file = None             # worker.log, when detached (see say)
        self.log_max = worker_log_max()

    def say(self, text):
        with self.print_lock:
            try:
                if self.progress:        # the progress line goes, the line, it again
                    self.progress.clear()
                self.out.write(f"{human_time(time.time())} {text}\n")
                self.out.flush()
                if self.progress and self.progress.text:
                    self.progress.show(self.progress.text, force=True)
                if self.log_file:
                    self._rotate_log()
            except (OSError, ValueError):
                pass

    def _rotate_log(self):
        """A detached worker's log (its stdout and stderr): once it passes
        worker_log_max bytes it becomes worker.log.1 (the one before is
        dropped) and a new worker.log starts: two files, bounded."""
        if os.fstat(1).st_size < self.log_max:
            return
        fd = None
        try:
            os.replace(self.log_file, self.log_file + ".1")
            fd = open_private(self.log_file, os.O_WRONLY | os.O_APPEND)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
        finally:
            if fd is not None:
                os.close(fd)

    def notify(self):
        with self.cond:
            self.generation += 1
            self.cond.notify_all()

    def _poke_main(self):
        """Wake the main loop (a job thread ended or a watch finished)."""
        try:
            os.write(self.poke_fd, b"\0")
        except (OSError, AttributeError, TypeError):
            pass

    def _new_token(self):
        """A claim token of this worker (claim_tag tells whose), held (see
        self.held) before the claim that uses it is committed."""
        token = self.tag + new_id() + new_id()[:2]       # 12 characters, as ever
        with self.lock:
            self.held.add(token)
        return token

    def _drop_claim(self, token):
        with self.lock:
            self.held.discard(token)

    def _config_mtime(self):
        try:
            return os.stat(self.config_file.path).st_mtime_ns
        except OSError:
            return None

    def _until_written(self, action, what):
        """Run action until the database takes it: busy, a full disk or an
        I/O error only delay it (said at most once a minute), and an error
        is never taken as done."""
        delay, said = 0.05, None
        while True:
            try:
                return action()
            except QueuectlError as e:
                if said is None or time.monotonic() - said > 60:
                    said = time.monotonic()
                    self.say(f"{what}, will retry: {e}")
                time.sleep(delay)
                delay = min(delay * 4, 5)

    def _from_config(self, key, make):
        """make(config), computed once per key and config (a reload replaces
        self.config whole, and with it every value made from it)."""
        cfg, cache = self._qcfg
        if cfg is not self.config:
            cfg, cache = self.config, {}
            self._qcfg = (cfg, cache)
        found = cache.get(key)
        if found is None:
            found = cache[key] = make(cfg)
        return found

    def _claim_order(self):
        """The ClaimOrder of the current config."""
        return self._from_config(None, ClaimOrder)

    def _queue_config(self, queue):
        """queue_config of the current config, for queue."""
        return self._from_config(queue, lambda cfg: queue_config(cfg, queue))

# A job runs as /bin/sh -c JOB_WRAPPER in a new session (its own process
# group), stdin /dev/null, stdout and stderr appended straight to its log.
# Store.finish() is the one place an attempt's outcome is written; every
# update of a claimed job is fenced on (worker, claim) so a stale worker can
# never overwrite what another recorded.

class Outcome:
    """How an attempt ended, decided once, where it ended; finish, the retry
    policy, the log footer and the attempt's row read it, never its text.
    kind: exit (rc >= 0), signal (rc < 0), timeout, cpu_limit (killed past
    its CPU time limit: rc is the signal), not_started (its claim was
    revoked before it started), could_not_start, unknown (its worker died
    and it left no exit status). rc: waitpid-style, or None; error: what
    the user reads (None: it succeeded)."""

    __slots__ = ("kind", "rc", "error")

    def __init__(self, kind, rc=None, error=None):
        self.kind, self.rc, self.error = kind, rc, error

    @classmethod
    def of_exit(cls, rc):
        """The outcome of a waitpid-style status (None: unknown)."""
        return cls("unknown" if rc is None else "signal" if rc < 0 else "exit", rc,
                   describe_exit(rc)[1])

    @property
    def exit_code(self):
        return describe_exit(self.rc)[0] if self.rc is not None else None

    def retry_class(self):
        """What the retry policy matches: "timeout", "signal", an exit code,
        or None (it never ran or its end is unknown: always retried)."""
        if self.kind == "timeout":
            return "timeout"
        if self.kind in ("signal", "cpu_limit"):
            return "signal"
        return self.rc if self.kind == "exit" and self.rc else None

    def __repr__(self):
        return f"Outcome({self.kind!r}, {self.rc!r}, {self.error!r})"

def describe_exit(rc):
    """waitpid-style code (negative = signal) -> (exit_code, last_error)."""
    if rc is None:
        return None, "worker died and the job's outcome is unknown"
    if rc < 0:
        import signal
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return 128 - rc, f"killed by {name}"
    if rc == 0:
        return 0, None
    return rc, f"exit code {rc}"

def job_limits(job, cfg):
    """{mem, cpu_time, nofile, nice} of a job (effective); 0 = none."""
    return effective_values(job, cfg, LIMIT_KEYS)

def limits_script(lim):
    """The ulimit commands that set lim in the job's shell ("" if none). The
    CPU limit's hard limit is a second later than its soft one: SIGXCPU at
    the limit, SIGKILL a second on if the job ignores it."""
    parts = []
    if lim["mem"]:
        parts.append(f"ulimit -v {max(lim['mem'] // 1024, 1)}")
    if lim["cpu_time"]:
        n = cpu_seconds(lim["cpu_time"])
        parts += [f"ulimit -S -t {n}", f"ulimit -H -t {n + 1}"]
    if lim["nofile"]:
        parts.append(f"ulimit -n {lim['nofile']}")
    return " && ".join(parts)

def cpu_seconds(limit):
    """A CPU time limit as ulimit -t takes it: whole seconds, rounded up."""
    return max(int(-(-limit // 1)), 1)

def last_log_line(home, job_id, size=4096):
    """The last non-blank line of the job's output in its current attempt
    (after queuectl's last line in the log), without control characters
    and at most 200 characters; "" if none or the log cannot be read."""
    try:
        fd = os.open(log_path(home, job_id), os.O_RDONLY | O_NOFOLLOW | O_CLOEXEC)
    except OSError:
        return ""
    try:
        end = os.fstat(fd).st_size
        data = os.pread(fd, size, max(end - size, 0)).decode("utf-8", "replace")
    except OSError:
        return ""
    finally:
        os.close(fd)
    said = ""
    for line in data.splitlines():          # this attempt's: after queuectl's last line
        if line.startswith("[queuectl]"):
            said = ""
        elif line.strip():
            said = line
    if "\x1b" in said:                      # a colour: its escape sequence goes whole
        import re
        said = re.sub(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)?|.)", "", said)
    said = "".join(c if c.isprintable() else " " for c in said).strip()
    return said if len(said) <= 200 else said[:199] + "…"

def exit_outcome(home, job_id, rc):
    """An attempt's Outcome from its shell's exit status, in the job's own
    words: the last line its output ended with (`exit code 1: pg_dump:
    error: connection refused`); a command that could not run (127, 126)
    is named plainly."""
    ended = Outcome.of_exit(rc)
    if ended.kind == "exit" and rc:
        said = last_log_line(home, job_id)
        if rc in (126, 127):
            ended.error = cannot_run_text(rc, said)
        elif said:
            ended.error += ": " + said
    return ended

def cannot_run_text(rc, said):
    """The error of a command that could not run (exit 127: not found, 126:
    not executable), from what its shell said, without the wrapper's name:
    "command not found: rsync", "could not run: ./x.sh: Permission denied"."""
    import re
    m = re.match(r"^(?:sh|queuectl-job): (?:line )?\d+: (?:eval: )?(.*?): (.*)$", said)
    what, why = (m.group(1), m.group(2)) if m else ("", "")
    if rc == 127 and ("not found" in why or not m):
        return f"command not found: {what}" if what else "exit code 127 (command not found)"
    return f"could not run: {what}: {why}" if what else f"exit code {rc} (could not run)"

def launcher_missing(launcher, env):
    """The launcher's program when it cannot be found on the job's PATH
    (None: found, or no launcher)."""
    import shlex
    import shutil
    words = shlex.split(launcher) if launcher else []
    if not words:
        return None
    found = os.access(words[0], os.X_OK) if "/" in words[0] else \
        shutil.which(words[0], path=env.get("PATH", os.defpath))
    return None if found else words[0]

def launch_line(launcher, command):
    """The wrapper's line for a launcher: LAUNCHER sh -c COMMAND, quoted. ssh
    hands its arguments to a shell on the other side as one line, so for ssh
    the command goes quoted once more."""
    import shlex
    words = shlex.split(launcher)
    tail = ["sh", "-c", command]
    if words and os.path.basename(words[0]) == "ssh":
        tail = [shlex.join(tail)]
    return launcher + " " + shlex.join(tail)

def limit_outcome(lim, ended, usage):
    """An attempt's Outcome, naming the limit that ended it: a CPU time
    limit is known (SIGXCPU, or SIGKILL past it: a signal for the retry
    policy); an exhausted memory or descriptor limit only makes a call
    fail, so it is named as likely."""
    import signal
    xcpu, rc = int(signal.SIGXCPU), ended.rc
    cpu = usage and (usage["cpu_user"] or 0) + (usage["cpu_sys"] or 0)
    if lim["cpu_time"]:
        n = cpu_seconds(lim["cpu_time"])
        used = cpu is not None and cpu >= n - 0.1       # its own exit 152 is not one
        if rc == -xcpu or (rc in (128 + xcpu, -9, 137) and used):
            return Outcome("cpu_limit", -xcpu, f"killed: CPU time limit {n}s")
    if ended.error is None or ended.kind == "timeout":
        return ended
    hints = []
    if lim["mem"]:
        hints.append(f"memory limit {human_size(lim['mem'])}")
    if lim["nofile"]:
        hints.append(f"open files limit {lim['nofile']}")
    if hints:
        ended.error += f" (it may have hit its {' or '.join(hints)})"
    return ended

class Running:
    """A job this worker process runs (proc set) or adopted (proc None)."""

    __slots__ = ("job", "token", "pid", "start", "proc", "stopped", "began", "log_fd",
                 "lost_to", "rss_floor")

    def __init__(self, job, token, pid, start, proc):
        self.job, self.token, self.pid, self.start, self.proc = job, token, pid, start, proc
        self.stopped = False            # worker stop --now killed it
        self.began = time.monotonic()
        self.log_fd = None              # an own job's log, open for its footer
        self.lost_to = None             # the worker that adopted it from us
        self.rss_floor = 0              # see Attempts._usage

    def gone(self):
        if self.proc is not None:
            return self.proc.poll() is not None
        return not same_process(self.pid, self.start)

    def group_alive(self):
        """True while its process group may be signalled: an own leader not
        yet reaped keeps the pgid from being reused; after that, while any
        member lives (a pgid is not reused while its group has members)."""
        if self.proc is not None and self.proc.returncode is None:
            return True
        return group_alive(self.pid)

class Ended:
    """An attempt that has ended, to be recorded: its job, its Outcome, how
    long it ran and what it used (None: not measured), its open log (for the
    footer), its process group ((pgid, leader start): a cancelled one's end
    waits for it), and whether its thread claims the next job in the
    transaction that records it."""

    __slots__ = ("job", "outcome", "duration", "usage", "log_fd", "group", "claim_next")

    def __init__(self, job, outcome, duration=None, usage=None, log_fd=None, group=None,
                 claim_next=False):
        self.job, self.outcome, self.duration, self.usage = job, outcome, duration, usage
        self.log_fd, self.group, self.claim_next = log_fd, group, claim_next

class Attempts:
    """One attempt of a job, as a Worker runs it: spawn -> wait -> timeout ->
    record -> footer. Its context is explicit: the worker's shared state
    (s, a WorkerState) and its recovery (which it hands a job to on a bug)."""

    __slots__ = ("s", "recovery")

    def __init__(self, state):
        self.s, self.recovery = state, None

    def _job_env(self, store, job, token, attempt):
        """The job's environment: its enqueuer's (or with --worker-env, the
        worker's), its --env values, then its identity variables."""
        if job["env_id"] is None:
            env = dict(self.s.base_env)
        else:
            base = self.s.env_cache.get(job["env_id"])
            if base is None:
                base = store.env(job["env_id"])
                if base is None:
                    raise QueuectlError(f"its environment {job['env_id']} is missing "
                                        "from the database")
                if len(self.s.env_cache) >= 64:
                    self.s.env_cache.clear()
                self.s.env_cache[job["env_id"]] = base
            env = dict(base)
        if job["env"]:
            env.update(_loads(job["env"], {}))
        if job["hook_of"] is None:
            env["QUEUECTL_JOB_ID"] = job["id"]
            env["QUEUECTL_ATTEMPT"] = str(attempt)
        else:                # a hook: its env holds its job's (QUEUECTL_JOB_ID...)
            env["QUEUECTL_HOOK_ID"] = job["id"]
        env["QUEUECTL_HOME"] = self.s.home    # never a job's own --env value
        env["QUEUECTL_CLAIM"] = token       # how its processes are found again
        env["__QUEUECTL_STATUS"] = status_path(self.s.home, job["id"], token)
        env["__QUEUECTL_COMMAND"] = job["command"]
        env["__QUEUECTL_CWD"] = job["cwd"]
        env["__QUEUECTL_UMASK"] = (self.s.umask if job["umask"] is None
                                   else f"{job['umask']:04o}")
        env["__QUEUECTL_LIMITS"] = limits_script(self._limits(job))
        launch = self._launch(job)
        if launch:
            env["__QUEUECTL_LAUNCH"] = launch_line(launch, job["command"])
        return env

    def _launch(self, job):
        """The job's launcher with {slot} and {host} filled in ("": none),
        once per attempt."""
        launch = job.get("_launch")
        if launch is None:
            use = effective_values(job, self.s._queue_config(job["queue"]),
                                   ("launcher", "launcher_hosts"))
            slot = getattr(self.s.threading.current_thread(), "slot", 0)
            hosts = [h for h in use["launcher_hosts"].split(",") if h]
            launch = job["_launch"] = (use["launcher"] or "").replace("{slot}", str(slot)) \
                .replace("{host}", hosts[slot % len(hosts)] if hosts else "localhost")
        return launch

    def _rss_floor(self):
        """This worker's own peak RSS, in bytes, just after a spawn."""
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _usage(self, run):
        """What a reaped job's shell and its children used (wait4), or None.
        Linux starts a spawned child's peak RSS at its parent's (the
        worker's, at exec time): a peak no higher than that is only an upper
        bound of the job's own, marked max_rss_bound."""
        usage = getattr(run.proc, "rusage", None)
        if usage is None:
            return None
        usage = dict(usage)
        if usage["max_rss"] <= run.rss_floor:
            usage["max_rss_bound"] = True
        return usage

    def _limits(self, job):
        """job_limits, once per attempt (the spawn, the wrapper and the
        outcome each ask)."""
        lim = job.get("_limits")
        if lim is None:
            lim = job["_limits"] = job_limits(job, self.s.config)
        return lim

    def execute(self, store, job):
        """Run one claimed job to its end: how it Ended (None when there is
        nothing to record: stopped and given back, taken over, or handed to
        recovery). Any failure to start it is a counted, failed attempt with
        its reason."""
        attempt = job["attempts"] + 1
        token = job["claim"]
        timeout = effective(job, self.s.config, ("timeout",))["timeout"][0]
        path = log_path(self.s.home, job["id"])
        fd = None
        try:
            fault("after-claim", job["id"])
            try:
                fd = open_private(path, os.O_RDWR | os.O_APPEND)
            except OSError as e:
                # ELOOP: a symlink was planted at the log's name; never follow it.
                raise OSError(e.errno, f"could not open its log {path}: "
                              f"{e.strerror}") from None
            try:
                log_line(fd, f"[queuectl] attempt {attempt} started "
                             f"{human_time(job['started_at'])} on worker {self.s.id}\n")
            except OSError:
                pass                     # a full disk: the job may still run
            began = time.monotonic()
            fault("before-spawn", job["id"])
            try:
                cwd_is_dir = stat_isdir(job["cwd"])
            except PermissionError:      # a parent it cannot search: as below
                cwd_is_dir = True
            if not cwd_is_dir:
                raise FileNotFoundError(2, f"no such directory (cwd {job['cwd']})")
            if not os.access(job["cwd"], os.X_OK):
                # What its shell would exit with (126), said plainly: not
                # retried unless the retry policy names 126.
                return Ended(job, Outcome("exit", 126, "could not start: Permission denied "
                                          f"(cwd {job['cwd']})"), log_fd=fd)
            argv = ["/bin/sh", "-c", JOB_WRAPPER, "sh"]
            nice = self._limits(job)["nice"]
            if nice:                 # nice(1) execs the shell: same pid, niced
                argv = [nice_path(), "-n", str(nice)] + argv
            env = self._job_env(store, job, token, attempt)
            missing = launcher_missing(self._launch(job), env)
            if missing:                  # as a command not found: not retried
                return Ended(job, Outcome("exit", 127, f"launcher not found: {missing}"),
                             log_fd=fd)
            proc = spawn(argv, job["cwd"], env, self.s.devnull, fd)
        except Exception as e:           # OSError, an unencodable env, a bug
            reason = (e.strerror if isinstance(e, OSError) and e.strerror else
                      str(e) if isinstance(e, QueuectlError) else repr(e))
            return Ended(job, Outcome("could_not_start", None, f"could not start: {reason}"),
                         log_fd=fd)
        run = Running(job, token, proc.pid, None, proc)
        run.began, run.log_fd = began, fd
        with self.s.lock:
            self.s.running[token] = run
            stop_now = self.s.kill_jobs
        try:
            run.rss_floor = self._rss_floor()
            fault("after-spawn", job["id"])
            # Most jobs are short: their pid need not reach the database. One
            # still running after PID_DELAY gets its pid recorded, for adoption
            # and cancel; they find a younger one by its claim token.
            if not wait_exit(proc.pid, PID_DELAY, proc):
                _, run.start = proc_start(proc.pid)
                self._record_pid(store, run)
            if stop_now:
                run.stopped = True
                self._kill(store, run, self.s.config["kill_grace"])
            return self._wait(store, run, timeout)
        except Exception as e:           # a bug: never leave the job stuck
            self.recovery._abandon(store, job, token, e)
            return None

    def _record_pid(self, store, run):
        job = run.job
        try:
            with store.tx():
                held, row = store.record_pid(job["id"], self.s.id, run.token,
                                             run.pid, run.start)
        except QueuectlError:
            return               # the pid stays unknown: it is found by its claim
        if held or row is None:
            return
        state, owner, claim = row
        if claim != run.token:
            return
        if state == CANCELLED:
            # Cancelled while starting; cancel kills it too, but may have
            # looked while it was still in execve. It is our unreaped child,
            # so its pid cannot belong to anyone else.
            kill_group(run.pid, self.s.config["kill_grace"], run.gone)
        elif owner != self.s.id:
            # Adopted while this worker was frozen: it is the adopter's now.
            self.s.say(f"{job['id']} was taken over by worker {owner} while "
                       "starting; leaving it running")

    def _signal_owned(self, store, run, sig, stop=False):
        """Signal a job's process group only while this worker still owns its
        claim. The check and the signal share one write transaction, so no
        adoption can come between them however long this thread sleeps; an
        error (busy, disk full) is retried, never taken as ownership. stop:
        mark the job stopped by stop --now first. True if it was ours."""
        def check_and_signal():
            with store.tx():
                mine = store.owns(run.job["id"], self.s.id, run.token)
                if mine and run.group_alive():
                    run.stopped = run.stopped or (stop and not run.gone())
                    signal_group(run.pid, sig)
            return mine
        return self.s._until_written(check_and_signal, f"{run.job['id']}: cannot check "
                                     "that it is still ours before signalling it")

    def _kill(self, store, run, grace):
        """kill_group for a job this worker owns; False if it is not ours.
        Returns once no process of its group is left: one that outlives
        SIGKILL (uninterruptible sleep) is waited for, never taken as gone."""
        import signal
        owned = [True]

        def send(sig):
            if owned[0]:
                owned[0] = self._signal_owned(store, run, sig)

        def ended():
            return run.gone() and not run.group_alive()
        kill_group(run.pid, grace, run.gone, send)
        said = False
        while owned[0] and not ended():
            if not said:
                said = True
                self.s.say(f"{run.job['id']}: its processes outlive SIGKILL; waiting for "
                           "them to end")
            send(signal.SIGKILL)
            poll_until(ended, 5, first=0.05)
        return owned[0]

    def _wait(self, store, run, timeout):
        """Wait for a running or adopted job to end, enforcing its timeout:
        how it Ended, or None when there is nothing to record (stopped and
        given back, taken over by another worker)."""
        job = run.job
        timed_out = False
        status = status_path(self.s.home, job["id"], run.token)
        deadline = epoch(job["started_at"]) + timeout if timeout else None
        # In slices of a second: a cancel whose command died before killing
        # it is seen to here, past its grace.
        while not (run.proc is not None and run.proc.returncode is not None) and not \
                wait_exit(run.pid, 1.0 if deadline is None else
                          min(max(deadline - time.time(), 0), 1.0), run.proc, run.start):
            if run.lost_to:
                return self._let_go(run)
            if deadline is not None and time.time() >= deadline:
                timed_out = self._kill(store, run, self.s.config["kill_grace"])
                break
            self._kill_cancelled(store, run.job["id"], run.token, run.pid)
        if run.proc is not None:
            while run.proc.returncode is None and not wait_exit(run.pid, 1.0, run.proc):
                if run.lost_to:
                    return self._let_go(run)
            rc = run.proc.returncode
            usage = self._usage(run)
        else:
            wait_exit(run.pid, None, start=run.start)
            kind, rc = self._read_status(job, status)
            rc = rc if kind == "exit" else None
            usage = None         # adopted: its own worker was its parent
        # The attempt ends with the last process of its group, not its shell.
        left = self._await_group(store, run, None if timed_out or not timeout
                                 else epoch(job["started_at"]) + timeout)
        if left == "lost":
            return self._let_go(run)
        if left == "timeout":
            timed_out = self._kill(store, run, self.s.config["kill_grace"])
        duration = time.monotonic() - run.began if run.proc is not None else \
            time.time() - epoch(job["started_at"])
        fault("before-record", job["id"])
        if (run.stopped or timed_out) and run.group_alive():
            self._kill(store, run, self.s.config["kill_grace"])
        with self.s.lock:
            self.s.running.pop(run.token, None)
        if run.stopped and rc != 0:
            # Killed by stop --now: back to pending, not counted. A job that
            # exited 0 as it was stopped is recorded completed below.
            held = self.s._until_written(
                lambda: store.requeue(job["id"], self.s.id, run.token),
                f"{job['id']}: cannot put it back to pending yet")
            self.s._drop_claim(run.token)
            if held:
                remove_file(status)
                wake_workers(self.s.home)
            self.s.say(f"{job['id']} stopped, back to pending" if held else
                       f"{job['id']} stopped")
            self._footer(job, run.log_fd, f"[queuectl] attempt {job['attempts'] + 1} "
                         "stopped by worker stop --now; back to pending, not counted\n")
            return None
        ended = exit_outcome(self.s.home, job["id"], rc)
        if timed_out:
            ended = Outcome("timeout", None, f"timed out after {timeout:g}s")
        elif rc == WRAPPER_REFUSED and run.proc is not None:
            kind, _ = self._read_status(job, status)
            if kind == "revoked":
                ended = Outcome("not_started", None,
                                "not started: its claim was revoked before it started")
            elif kind == "absent":
                ended = Outcome("could_not_start", None, f"could not start: cannot create "
                                f"{status}")
        if not timed_out:
            ended = limit_outcome(self._limits(job), ended, usage)
        return Ended(job, ended, duration, usage, run.log_fd, (run.pid, run.start),
                     claim_next=run.proc is not None)

    def _read_status(self, job, status):
        """read_status, looked at again until it can be read: "I could not
        read it" (EMFILE, EIO) is never an outcome."""
        delay, said = 0.05, False
        while True:
            try:
                fault("read-status", job["id"])
                kind, value = read_status(status)
            except QueuectlError as e:
                kind, value = "unknown", str(e)
            if kind != "unknown":
                return kind, value
            if not said:
                said = True
                self.s.say(f"{job['id']}: cannot read its status file yet, will retry: "
                           f"{value}")
            time.sleep(delay)
            delay = min(delay * 2, 5)

    def _await_group(self, store, run, deadline):
        """Wait for the processes an ended shell left in its group (cmd &):
        None once none is left; "timeout" at deadline (epoch); "stopped" or
        "cancelled" when worker stop --now or cancel will see to them; "lost"
        when another worker took the job over."""
        if not run.group_alive():
            return None                  # nearly always: one kill(0)
        self.s.say(f"{run.job['id']}: its shell has ended; waiting for the processes it "
                   "left in its group")
        if run.proc is not None and run.start is None:
            try:             # its pgid, for cancel, retry and recovery to see
                with store.tx():
                    store.record_pid(run.job["id"], self.s.id, run.token, run.pid, None)
            except QueuectlError:
                pass         # they still find the processes by their claim
        delay, look = 0.01, 0.0
        while run.group_alive():
            if run.lost_to:
                return "lost"
            if run.stopped:
                return "stopped"
            now = time.time()
            if deadline is not None and now >= deadline:
                return "timeout"
            if now >= look:
                look = now + 1.0
                try:
                    row = store.get(run.job["id"])
                except QueuectlError:
                    row = None           # cannot tell: look again
                if row and row["state"] == CANCELLED and row["claim"] == run.token:
                    return "cancelled"
            time.sleep(delay)
            delay = min(delay * 2, 1.0)      # each look scans /proc
        return None

    def _let_go(self, run):
        with self.s.lock:
            self.s.running.pop(run.token, None)
            self.s.held.discard(run.token)
        self.s.say(f"{run.job['id']} belongs to worker {run.lost_to} now; leaving it "
                   "running")
        if run.log_fd is not None:
            os.close(run.log_fd)
        return None

    def _await_cancelled(self, store, job, group):
        """Wait until no process of a cancelled attempt is left (its shell's
        end is not its end: a child that ignores SIGTERM runs on, and holds
        the job's keys). cancel signals them and kills them after its grace;
        should any outlive the kill time it set (the job's run_at), this
        kills them, in a transaction that checks the job is still cancelled
        with this claim (so a frozen worker never kills another attempt)."""
        token, delay = job["claim"], 0.005
        pgid, start = group or (None, None)
        kill_at = epoch(job["run_at"]) if job["run_at"] else time.time()
        while attempt_alive(token, pgid, start):
            if time.time() >= kill_at:
                self._kill_cancelled(store, job["id"], token, pgid)
                kill_at = time.time() + 1
            time.sleep(delay)
            delay = min(delay * 2, 1.0)      # each look scans /proc

    def _kill_cancelled(self, store, job_id, token, group):
        """SIGKILL what is left of a cancelled attempt once its cancel's grace
        (its run_at) is over, in a transaction that checks the job is still
        cancelled with this claim: a worker that slept meanwhile never kills
        another attempt. Nothing when it cannot tell (busy, full disk)."""
        import signal

        def due():
            row = store.get(job_id)
            return (row and row["state"] == CANCELLED and row["claim"] == token
                    and row["run_at"] and time.time() >= epoch(row["run_at"]))
        try:
            if not due():                    # a read: no write lock each second
                return
            with store.tx():
                if not due():
                    return
                self.s.say(f"{job_id}: its cancelled attempt outlived the grace; killing it")
                if group:
                    signal_group(group, signal.SIGKILL)
                kill_claim(token, signal.SIGKILL)
        except QueuectlError:
            pass                             # look again in a moment

    def _cancel_ended(self, store, job, rc=None, usage=None, duration=None):
        with store.tx():
            ended = store.cancel_ended(job, job["claim"], self.s.config, rc, usage=usage,
                                       duration=duration)
        if ended:
            self.s.notify()            # its keys are free
            wake_workers(self.s.home)
        return ended

    def _footer(self, job, fd, text):
        if fd is None:
            _safe_append(self.s.home, job["id"], text)
            return
        try:
            log_line(fd, text)
        except OSError:
            pass
        finally:
            os.close(fd)

    def _record(self, store, end, recovered=False):
        """Write how an attempt Ended (and claim the next job in the same
        transaction when end.claim_next); report it; the next job or None.
        An outcome is retried until it is written: busy, a full disk, an I/O
        error only delay it, and its status file stays until then."""
        job, ended, duration, usage = end.job, end.outcome, end.duration, end.usage
        log_fd, group, claim_next = end.log_fd, end.group, end.claim_next
        token = self.s._new_token() if claim_next else None

        def write():
            fault("record", job["id"])
            with store.tx():
                state, unblocked, err = store.finish(
                    job, self.s.id, job["claim"], ended,
                    self.s._queue_config(job["queue"]), duration, usage=usage)
                nxt = None
                # Not after a fenced-out end (cancelled, taken over): this
                # thread may wait for the attempt's processes first.
                # Nor in a thread that is no longer wanted (worker threads N).
                if claim_next and state is not None and not self.s.stopping \
                        and self.s.threads_left <= self.s.count:
                    nxt = store.claim(self.s.id, self.s.queues, time.time(), token,
                                      self.s._claim_order())
            return state, unblocked, err, nxt
        nxt = None
        try:
            state, unblocked, error, nxt = self.s._until_written(
                write, f"{job['id']}: cannot record its outcome yet")
        finally:
            if token is not None and nxt is None:
                self.s._drop_claim(token)
        status = status_path(self.s.home, job["id"], job["claim"])
        try:
            current = None if state is not None else store.get(job["id"])
        except QueuectlError:
            current = {"state": PROCESSING, "claim": job["claim"]}   # keep the file
        # A recorded attempt of our own: its file is ours (even a revoke
        # marker in it names this worker), and nobody needs it any more.
        kind, claimant = ("ours", None) if state is not None and not recovered \
            else read_status(status)
        if kind == "ours":
            remove_file(status)
        elif kind == "unknown":
            pass                 # cannot tell what it holds: the sweep decides later
        elif kind == "revoked":
            # The fence that keeps a frozen claimant from starting the job:
            # only the claimant itself, which will never spawn it now, or the
            # sweep once the claimant is gone, may remove it.
            if claimant == self.s.id:
                remove_file(status)
        elif current is None or current["state"] != PROCESSING or \
                current["claim"] != job["claim"]:
            # Recorded, or cancelled: nobody needs the status file. A worker
            # that took a running job over (same claim) still reads it.
            remove_file(status)
        if state is None and current and current["state"] == CANCELLED \
                and current["claim"] == job["claim"]:
            self._await_cancelled(store, current, group)
            self.s._until_written(lambda: self._cancel_ended(store, current, ended.rc, usage,
                                                             duration),
                                  f"{job['id']}: cannot record the end of its cancelled "
                                  "attempt yet")
        attempt = job["attempts"] + 1
        took = f", ran {duration:.3f}s" if duration is not None else ""
        if state is None:
            outcome = "taken over by another worker; result not recorded"
            if current and current["state"] == CANCELLED:
                outcome = f"cancelled; {'exit 0' if error is None else error}{took}"
            if ended.kind == "not_started":
                outcome = "not started: taken over by another worker"
        elif error is None:
            outcome = f"exit 0{took}"
        elif ended.kind == "timeout":
            outcome = f"{error}; killed"
        else:
            outcome = f"{error}{took}"
        if ended.exit_code is not None and error is not None and ended.kind != "exit":
            outcome += f" (exit {ended.exit_code})"
        self._footer(job, log_fd, f"[queuectl] attempt {attempt} "
                     + ("" if ended.kind == "not_started" else "ended: ")
                     + outcome + (f"; now {state}" if state and state != COMPLETED else "")
                     + "\n")
        if state == COMPLETED:
            with self.s.lock:
                self.s.completed += 1
            self.s.say(f"{job['id']} completed (attempt {attempt}{took})")
        elif state is None:
            self.s.say(f"{job['id']} {outcome.split(';')[0]} (attempt {attempt})")
        else:
            with self.s.lock:
                self.s.dead += state == DEAD and job["hook_of"] is None
            self.s.say(f"{job['id']} {state}: {error} (attempt {attempt}{took})")
        # A job that held keys lets another run: wake the threads and workers
        # that passed it over (a queue's own key: the queue has a limit).
        keyed = job["keys"] is not None or QUEUE_KEY + job["queue"] in store.limited
        if state != COMPLETED or unblocked or keyed or (self.s.drain and nxt is None):
            self.s.notify()
        if unblocked or keyed:
            wake_workers(self.s.home)
        self.s._drop_claim(job["claim"])      # last: a cancelled one's end is written
        return nxt


# Recovery: recover, adopt, watch, sweep ######################################

class Recovery:
    """Recovery of jobs whose worker is dead or past its lease: recover,
    adopt, watch, settle, sweep; run by the worker's main thread (decisions)
    and by threads of their own (records and watches). Its context: the
    worker's shared state (s) and its attempts (which wait for and record
    what it adopts)."""

    __slots__ = ("s", "attempts")

    def __init__(self, state):
        self.s, self.attempts = state, None

    # A processing job whose worker is dead, or past its lease (stopped,
    # frozen, on another host), is settled by its start fence and its status
    # file: not started -> revoked and counted; running -> adopted, never
    # re-run or killed; ended -> its exit status recorded. The main thread
    # only decides; records and watches run in threads of their own, so
    # heartbeats never wait on a busy database.

    def _recover(self, store):
        try:
            # Claims held before and after the read: a job is tracked by none
            # of our threads only if it is in neither (one being recorded
            # leaves the first, one being claimed joins the second).
            with self.s.lock:
                held = set(self.s.held)
            rows = store.processing()
            with self.s.lock:
                held |= self.s.held
            workers = store.live_workers()
            alive = {w["id"] for w in workers} | {self.s.id}
            self._sweep_status_files({(j["id"], j["claim"]) for j in rows}, alive)
            fresh = {w["id"] for w in workers if not worker_stale(w)} | {self.s.id}
            self._sweep_cancelled(store, fresh, held)
            for job in rows:
                if job["worker"] == self.s.id and job["claim"] not in held:
                    # Ours, but no thread of ours tracks it (one that could
                    # not hand it on: no database, no descriptor): settle it.
                    self.s.say(f"{job['id']}: no thread of this worker tracks it; "
                               "recovering it")
                    self._recover_job(store, job, True)
                    continue
                if job["worker"] in fresh:
                    continue
                with self.s.lock:
                    mine = self.s.running.get(job["claim"])
                if mine is not None and mine.proc is not None:
                    # Our own child, adopted away while we were frozen, whose
                    # adopter is gone now: ours again, our thread records it.
                    if self._take(store, job):
                        mine.lost_to = None
                    continue
                self._recover_job(store, job, job["worker"] in alive)
        except (QueuectlError, OSError) as e:
            self.s.say(f"recovery scan failed, will retry: {e}")

    def _sweep_cancelled(self, store, fresh, held):
        """Cancelled jobs of workers that are gone or past their lease (a
        frozen one may never record them), or ours that no thread of ours
        tracks: once no process of their group or claim is left, their
        attempt has ended, or was revoked before it started and can never
        start (keys let go, on_cancel)."""
        import signal
        rows = [j for j in store.cancelled_running() if j["worker"] not in fresh
                or j["worker"] == self.s.id and j["claim"] not in held]
        if not rows:
            return
        running = live_claims()
        for job in rows:
            pgid = job["pid"] if job["pid"] and our_group(job["pid"], job["pid_start"]) \
                else None
            if job["claim"] in running or pgid:
                if job["run_at"] and time.time() >= epoch(job["run_at"]):
                    kill_claim(job["claim"], signal.SIGKILL)   # past the cancel's grace
                    if pgid:
                        signal_group(pgid, signal.SIGKILL)
                continue
            self.attempts._cancel_ended(store, job)

    def _sweep_status_files(self, wanted, alive):
        """Remove status files nobody will read: not a processing job's, older
        than the lease, with no process of their claim left, and, for a
        revoked claim, whose worker is gone (it could still try to start)."""
        rd = os.path.join(self.s.home, "run")
        try:
            names = [n for n in os.listdir(rd) if n.endswith(".exit")]
        except OSError:
            return
        for name in names:
            job_id, _, token = name[:-5].rpartition(".")
            path = os.path.join(rd, name)
            try:
                if (job_id, token) in wanted or time.time() - os.stat(path).st_mtime <= LEASE:
                    continue
                kind, who = read_status(path)
                if kind == "revoked" and who in alive or kind == "unknown":
                    continue
                if kind == "running" and claim_processes(token):
                    continue
                os.unlink(path)
            except OSError:
                pass

    def _recover_job(self, store, job, alive):
        old, token = job["worker"], job["claim"]
        status = status_path(self.s.home, job["id"], token)
        kind, value = read_status(status)
        if kind == "absent":
            if revoke(status, old):
                how = "stopped" if alive else "died"
                self._settle(store, job, Outcome(
                    "not_started", None, f"not started: worker {old} {how} before "
                    "starting it"), None)
                return
            kind, value = read_status(status)       # it has just started
        if kind == "unknown":
            return                                  # decide nothing; next scan
        if kind == "running":
            pid, start = job["pid"], job["pid_start"]
            if not same_process(pid, start):
                pid, start = find_job_process(token)
            if pid:
                self._adopt(store, job, pid, start)
                return
            kind, value = read_status(status)       # it may have just ended
            if kind == "unknown":
                return
        if kind in ("running", "exit") and attempt_alive(token, job["pid"], job["pid_start"]):
            return              # its shell has ended, not its group: next scan
        if kind == "revoked":
            self._settle(store, job, Outcome(
                "not_started", None, "not started: its claim was revoked before it "
                "started"), None)
            return
        rc = value if kind == "exit" else None
        started = epoch(job["started_at"]) if job["started_at"] else None
        try:
            ended = os.stat(status).st_mtime if rc is not None else time.time()
        except OSError:
            ended = time.time()
        duration = None if started is None else max(ended - started, 0)
        if rc is not None:
            self.s.say(f"{job['id']} ended while worker {old} was gone; "
                       "recording its exit status")
        self._settle(store, job, exit_outcome(self.s.home, job["id"], rc), duration)

    def _abandon(self, store, job, token, error, recover=True):
        """After a bug in this worker while it held a job: stop waiting for
        it and hand it to recovery, which settles it from its status file
        (at once when recover, else at the next scan, so that a bug that
        keeps happening cannot spin); never leave it processing for good."""
        with self.s.lock:
            self.s.settling += 1       # a draining thread must not end meanwhile
            run = self.s.running.pop(token, None)
        dropped = False
        if run is not None and run.proc is not None:
            # Our own child: reap it when it ends (its adopter reads its status
            # file), and close its log (the adopter appends the footer).
            self.s.threading.Thread(target=run.proc.wait, daemon=True).start()
            if run.log_fd is not None:
                os.close(run.log_fd)
                run.log_fd = None
        try:
            self.s.say(f"{job['id']}: internal error ({error!r}); handing it to recovery")
            if os.environ.get("QUEUECTL_DEBUG"):
                import traceback
                traceback.print_exc()
            if store is None:
                fault("adopt-store", job["id"])
                store = Store(self.s.home, durable=False, local_lock=self.s.db_lock)
            with store.tx():
                store.take(job["id"], self.s.id, token, self.s.id + "!abandoned")
            self.s._drop_claim(token)          # not ours now; a recovery takes it anew
            dropped = True
            row = store.get(job["id"])
            if recover and row and row["state"] == PROCESSING and row["claim"] == token:
                self._recover_job(store, row, True)
        except Exception as e:       # the next recovery scan (ours or another's)
            self.s.say(f"{job['id']}: cannot hand it to recovery yet: {e!r}")
        finally:
            # Tracked by no thread of ours now: if it is still ours (the take
            # above failed), our next recovery scan takes it up.
            if not dropped:
                self.s._drop_claim(token)
            with self.s.lock:
                self.s.settling -= 1
            self.s.notify()

    def _take(self, store, job):
        """Make a recovered job this worker's (fenced on its old worker and
        claim); False when someone else settled or took it first. Its claim
        is held (self.s.held) before the take is committed."""
        token = job["claim"]
        with self.s.lock:
            new = token not in self.s.held
            self.s.held.add(token)
        taken = False
        try:
            with store.tx():
                taken = store.take(job["id"], job["worker"], token, self.s.id)
        finally:
            if not taken and new:
                self.s._drop_claim(token)
        if taken:
            job["worker"] = self.s.id
        return taken

    def _settle(self, store, job, ended, duration):
        """Record a recovered job's outcome, in a thread of its own."""
        with self.s.lock:
            self.s.settling += 1       # first: a draining thread must not end now
        taken = False
        try:
            taken = self._take(store, job)
        finally:
            if not taken:
                with self.s.lock:
                    self.s.settling -= 1
        if not taken:
            return

        def record():
            st = None
            try:
                fault("adopt-store", job["id"])
                st = Store(self.s.home, durable=False, local_lock=self.s.db_lock)
                self.attempts._record(st, Ended(job, ended, duration), recovered=True)
            except Exception as e:             # a bug: keep the worker alive
                self._abandon(st, job, job["claim"], e, recover=False)
            finally:
                if st is not None:
                    st.close()
                with self.s.lock:
                    self.s.settling -= 1
                self.s.notify()            # a draining thread may end now
                self.s._poke_main()
        self.s.threading.Thread(target=record, daemon=True).start()

    def _adopt(self, store, job, pid, start):
        old = job["worker"]
        if not self._take(store, job):
            return
        job["pid"], job["pid_start"] = pid, start
        try:
            with store.tx():
                store.record_pid(job["id"], self.s.id, job["claim"], pid, start)
        except QueuectlError:
            pass                 # the pid stays unknown: it is found by its claim
        self.s.say(f"{job['id']} adopted from worker {old} (pid {pid})")
        _safe_append(self.s.home, job["id"], f"[queuectl] worker {old} is gone; "
                     f"worker {self.s.id} adopted the running job\n")
        run = Running(job, job["claim"], pid, start, None)
        with self.s.lock:
            self.s.running[run.token] = run
        timeout = effective(job, self.s.config, ("timeout",))["timeout"][0]
        self.s.threading.Thread(target=self._watch, args=(run, timeout),
                                daemon=True).start()

    def _watch(self, run, timeout):
        store = None
        try:
            fault("adopt-store", run.job["id"])
            store = Store(self.s.home, durable=False, local_lock=self.s.db_lock)
            end = self.attempts._wait(store, run, timeout)
            if end is not None:
                self.attempts._record(store, end)
        except Exception as e:      # no database now, or a bug: the next scan
            self._abandon(store, run.job, run.token, e, recover=False)
        finally:
            if store is not None:
                store.close()
            self.s._poke_main()


# Workers #####################################################################

class Worker:
    """A worker process: its lifecycle, signals, heartbeats and job threads,
    which claim jobs, run them (Attempts) and record them; its recovery
    (Recovery) settles what other workers left. All three share one
    WorkerState (s)."""

    __slots__ = ("s", "attempts", "recovery")

    def __init__(self, home, count=1, queues=None, drain=False, out=None):
        self.s = WorkerState(home, count, queues, drain, out)
        self.attempts, self.recovery = Attempts(self.s), Recovery(self.s)
        self.attempts.recovery, self.recovery.attempts = self.recovery, self.attempts

    @property
    def id(self):
        return self.s.id

    # Stopping -----------------------------------------------------------------

    def request_stop(self, now=False):
        with self.s.cond:
            first_now = now and not self.s.kill_jobs
            if not self.s.stopping:
                self.s.say(f"worker {self.s.id} stopping"
                           + (": killing running jobs" if now else
                              ": finishing running jobs (interrupt again or "
                              "'worker stop --now' to kill them)"))
            elif first_now:
                self.s.say(f"worker {self.s.id} stopping now: killing running jobs")
            self.s.stopping = True
            self.s.kill_jobs = self.s.kill_jobs or now
            self.s.cond.notify_all()
        if first_now:
            self.s.threading.Thread(target=self._kill_running, daemon=True).start()

    def _kill_running(self):
        """stop --now: kill the jobs this worker still owns; they go back to
        pending uncounted (see _wait)."""
        import signal
        store = None
        try:
            store = Store(self.s.home, durable=False, local_lock=self.s.db_lock)
            with self.s.lock:
                items = list(self.s.running.values())
            for r in items:
                self.attempts._signal_owned(store, r, signal.SIGTERM, stop=True)
            def ended():
                with self.s.lock:
                    return not any(r in items for r in self.s.running.values())
            if poll_until(ended, self.s.config["kill_grace"], first=0.05, cap=0.05):
                return
            for r in items:
                if r.group_alive():
                    self.attempts._signal_owned(store, r, signal.SIGKILL)
        except QueuectlError as e:
            self.s.say(f"could not stop running jobs: {e}")
        finally:
            if store is not None:
                store.close()

    # Lifecycle -------------------------------------------------------------

    def run(self):
        """Run until stopped (or, with drain, until nothing is left); the
        exit code: 1 when drain and a job ended dead, else 0."""
        import fcntl
        import signal
        rd = run_dir(self.s.home)
        ensure_private_dir(os.path.join(self.s.home, "logs"))
        store = Store(self.s.home, durable=False, local_lock=self.s.db_lock)
        self.s.devnull = os.open(os.devnull, os.O_RDONLY | O_CLOEXEC)
        self.s.lock_fd = open_private(os.path.join(rd, self.s.id + ".lock"), os.O_RDWR)
        fcntl.flock(self.s.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fifo = os.path.join(rd, self.s.id + ".wake")
        os.mkfifo(fifo, 0o600)
        os.chmod(fifo, 0o600)                    # whatever the umask
        # O_RDWR keeps a writer open, so poll() does not see EOF forever.
        fifo_fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK | O_CLOEXEC)
        sig_r, sig_w = os.pipe()
        os.set_blocking(sig_r, False)
        os.set_blocking(sig_w, False)
        self.s.poke_fd = sig_w
        old_wakeup = signal.set_wakeup_fd(sig_w)
        handlers = {}
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            self._register(store)
            what = ", ".join(self.s.queues) if self.s.queues else "all queues"
            self.s.say(f"worker {self.s.id} started: {self.s.count} thread"
                       f"{'s' if self.s.count != 1 else ''}, {what}"
                       + (", drain" if self.s.drain else ""))
            self.recovery._recover(store)
            sched_next = self._fire_schedules(store)    # before a drain looks
            self.s.threads_left = self.s.count
            for _ in range(self.s.count):
                self.s.threading.Thread(target=self._job_thread, daemon=True).start()
            next_beat = time.monotonic() + HEARTBEAT
            next_release = 0.0
            next_rollup = time.monotonic() + 60       # not in every short drain
            where, params = store.claim_filter(self.s.queues, ())
            first = store.first_open(where, params) if self.s.progress else None
            while True:
                with self.s.lock:
                    if self.s.threads_left == 0 and not self.s.running and not self.s.settling:
                        break
                ready = readable([fifo_fd, sig_r], 1.0)
                if fifo_fd in ready:
                    _drain_fd(fifo_fd)
                    self.s.notify()
                    sched_next = None            # schedule add/resume wakes us too
                    self._resize(store)          # worker threads N wakes us too
                if not self.s.stopping and (sched_next is None or time.time() >= sched_next):
                    sched_next = self._fire_schedules(store)
                if sig_r in ready:
                    _drain_fd(sig_r)
                self._handle_signals()
                self._reload_config()
                if first is not None:
                    self._show_progress(store, first, where, params)
                if self.s.stopping and time.monotonic() >= next_release:
                    next_release = time.monotonic() + 1.0
                    self._release_lost(store)
                if time.monotonic() >= next_beat:
                    # A stopping worker still heartbeats: its running jobs
                    # are its own until they end.
                    next_beat = time.monotonic() + HEARTBEAT
                    self._heartbeat(store)
                    self._resize(store)
                    if time.monotonic() >= next_rollup:
                        next_rollup = time.monotonic() + 3600
                        self._roll_up(store)
                    if not self.s.stopping:
                        self.recovery._recover(store)
                        self.s.notify()   # a safety net for any missed wake-up
                        sched_next = None
        finally:
            for sig, h in handlers.items():
                signal.signal(sig, h)
            signal.set_wakeup_fd(old_wakeup)
            self.s.poke_fd = None
            for fd in (sig_r, sig_w, fifo_fd):
                os.close(fd)
            try:
                store.unregister(self.s.id)
            except QueuectlError:
                pass
            store.close()
            remove_worker_files(self.s.home, self.s.id)
            os.close(self.s.lock_fd)
            os.close(self.s.devnull)
            if self.s.progress:
                with self.s.print_lock:
                    self.s.progress.clear()
                    self.s.progress = None
        self.s.say(f"worker {self.s.id} stopped: {self.s.completed} completed, "
                   f"{self.s.dead} dead")
        return EXIT_FAIL if self.s.drain and self.s.dead else EXIT_OK

    def _show_progress(self, store, first, where, params):
        try:
            counts = store.selection_counts(None, 2 ** 62, where, params, first=first)
        except QueuectlError:
            return                       # busy: next time
        with self.s.print_lock:
            self.s.progress.show(self.s.progress.counts(counts))

    def _roll_up(self, store):
        try:
            store.roll_up_history(time.time())
        except QueuectlError as e:
            self.s.say(f"cannot roll up the history yet, will retry: {e}")

    def _resize(self, store):
        """Take the number of job threads `worker threads N` asked for (in
        run/ID.threads): start the missing threads at once; surplus ones
        end as they finish their jobs (see _job_loop)."""
        try:
            fd = os.open(os.path.join(self.s.home, "run", self.s.id + ".threads"),
                         os.O_RDONLY | O_NOFOLLOW | O_CLOEXEC)
        except OSError:
            return
        try:
            n = int(os.read(fd, 32))
        except (OSError, ValueError):
            return
        finally:
            os.close(fd)
        if n == self.s.count or self.s.stopping or not 1 <= n <= VALUE_RULES["count"][2]:
            return
        try:
            store.set_threads(self.s.id, n)
        except QueuectlError as e:
            self.s.say(f"cannot take {n} job threads yet, will retry: {e}")
            return
        with self.s.lock:
            old, self.s.count = self.s.count, n
            grow = max(n - self.s.threads_left, 0)
            self.s.threads_left += grow
        for _ in range(grow):
            self.s.threading.Thread(target=self._job_thread, daemon=True).start()
        self.s.notify()                  # an idle surplus thread ends now
        self.s.say(f"worker {self.s.id}: {plural(n, 'job thread')} (was {old})")

    def _fire_schedules(self, store):
        """Enqueue the jobs of due schedule slots; when to look again."""
        now = time.time()
        try:
            nxt = store.next_schedule()
            if nxt is not None and nxt <= now:
                for job_id in store.fire_schedules(now, self.s.say):
                    self.s.say(f"schedule: enqueued {job_id}")
                self.s.notify()
                wake_workers(self.s.home)
                nxt = store.next_schedule()
        except (QueuectlError, OSError) as e:
            self.s.say(f"cannot fire schedules yet, will retry: {e}")
            return now + HEARTBEAT
        return min(nxt, now + HEARTBEAT) if nxt is not None else now + HEARTBEAT

    def _release_lost(self, store):
        """A stopping worker does not wait for a job of its own that another
        worker adopted while this one was frozen: its waiting thread lets go
        (the adopter records it)."""
        with self.s.lock:
            own = [r for r in self.s.running.values() if r.proc is not None]
        for r in own:
            try:
                job = store.get(r.job["id"])
            except QueuectlError:
                return
            if job and job["claim"] == r.token and job["state"] == PROCESSING \
                    and job["worker"] != self.s.id:
                r.lost_to = job["worker"]

    def _on_signal(self, signum, frame):
        self.s.signals.append(signum)      # handled by the main loop

    def _handle_signals(self):
        import signal
        while self.s.signals:
            sig = self.s.signals.pop(0)
            if sig == signal.SIGUSR1:
                self.request_stop(now=True)
            elif sig == signal.SIGINT and self.s.stopping:
                self.request_stop(now=True)
            else:                        # SIGTERM, SIGHUP, a first SIGINT
                self.request_stop()

    def _reload_config(self):
        mtime = self.s._config_mtime()
        if mtime == self.s.config_mtime:
            return
        self.s.config_mtime = mtime
        try:
            self.s.config = self.s.config_file.load()
            self.s.say("config reloaded: " + ", ".join(
                f"{k}={v}" for k, v in self.s.config.items()))
        except QueuectlError as e:
            self.s.say(f"config not reloaded, keeping the last good one: {e}")

    def _register(self, store):
        store.register(self.s.id, self.s.count, self.s.queues)

    def _heartbeat(self, store):
        try:
            if not store.heartbeat(self.s.id):
                self._register(store)
        except QueuectlError as e:
            self.s.say(f"heartbeat failed, will retry: {e}")

    # Claiming --------------------------------------------------------------

    def claim(self, store):
        """Claim the next runnable job (one BEGIN IMMEDIATE); None if none."""
        token, job = self.s._new_token(), None
        try:
            with store.tx():
                job = store.claim(self.s.id, self.s.queues, time.time(), token,
                                  self.s._claim_order())
        finally:
            if job is None:
                self.s._drop_claim(token)
        return job

    def _idle_wait(self, store, claimed_at):
        """Seconds an idle job thread may sleep, or None when draining is done.
        A job that was due at claimed_at and was passed over waits for a key
        (a holder's end wakes the threads): only jobs due after claimed_at
        set how long to sleep."""
        paused = store.paused()
        if "*" in paused:
            return None if self.s.drain and self._drained() else HEARTBEAT
        where, params = store.claim_filter(self.s.queues, paused)
        now = time.time()
        after = " AND run_at > ?"
        nxt = store.next_run(where + after, params + [iso(claimed_at)])
        if nxt is not None and epoch(nxt) <= now:
            return 0.001                 # due since the claim: claim it
        if not self.s.drain:
            return HEARTBEAT if nxt is None else min(epoch(nxt) - now, HEARTBEAT)
        # Draining: wait for a retry's backoff, and for a key a due job needs;
        # a job scheduled for later is left for a later worker.
        retry = store.next_run(where + " AND state = 'failed'" + after,
                               params + [iso(claimed_at)])
        if retry is not None:
            return min(epoch(retry) - now, HEARTBEAT)
        due = store.next_run(where, params)
        if due is not None and epoch(due) <= now:
            return HEARTBEAT
        return None if self._drained() else HEARTBEAT

    def _drained(self):
        """Whether a draining worker is done: no job of its own claimed,
        running or being recorded. Tells the other threads to stop too."""
        with self.s.lock:
            if self.s.active == 0 and not self.s.running and not self.s.settling:
                self.s.stopping = True
                self.s.cond.notify_all()
                return True
        return False

    def _record_and_claim_next(self, store, end):
        """The step between two jobs of a job thread: record how one ended
        and, in the same transaction, claim the next (None if none)."""
        try:
            return self.attempts._record(store, end)
        except Exception as e:           # a bug: never leave the job stuck
            self.recovery._abandon(store, end.job, end.job["claim"], e)
            return None

    def _job_thread(self):
        """One job thread: run jobs until stopped (or no longer wanted);
        survive its own bugs. It holds a slot, the least index no other
        job thread holds (a launcher's {slot})."""
        retired, me = False, self.s.threading.current_thread()
        with self.s.lock:
            me.slot = min(set(range(len(self.s.slots) + 1)) - self.s.slots)
            self.s.slots.add(me.slot)
        try:
            while not self.s.stopping:
                try:
                    retired = self._job_loop()
                    return
                except QueuectlError as e:         # the database, for a moment
                    self.s.say(f"cannot claim a job yet, will retry: {e}")
                    time.sleep(0.5)
                except Exception as e:             # a bug: keep the worker alive
                    self.s.say(f"worker thread error: {e!r}")
                    if os.environ.get("QUEUECTL_DEBUG"):
                        import traceback
                        traceback.print_exc()
                    time.sleep(1)
        finally:
            with self.s.lock:
                self.s.slots.discard(me.slot)
                if not retired:          # a retired thread is counted out already
                    self.s.threads_left -= 1
            self.s.notify()
            self.s._poke_main()

    def _job_loop(self):
        """Claim and run jobs; True when this thread ends because fewer are
        wanted (worker threads N)."""
        # self.s.active counts threads that hold a claimed job (or are claiming),
        # so that --drain never ends while a job is on its way.
        store = Store(self.s.home, durable=False, local_lock=self.s.db_lock)
        job = None
        try:
            while True:
                if job is None:
                    with self.s.lock:
                        if self.s.stopping:
                            return False
                        if self.s.threads_left > self.s.count:
                            self.s.threads_left -= 1
                            return True
                        gen = self.s.generation
                        self.s.active += 1
                    claimed_at = time.time()
                    try:
                        job = self.claim(store)
                    finally:
                        if job is None:
                            with self.s.lock:
                                self.s.active -= 1
                    if job is None:
                        wait = self._idle_wait(store, claimed_at)
                        if wait is None:
                            return
                        with self.s.cond:
                            if self.s.generation == gen and not self.s.stopping:
                                self.s.cond.wait(wait)
                        continue
                if self.s.stopping:
                    return               # finally gives the unstarted job back
                claimed, job = job, None
                try:
                    end = self.attempts.execute(store, claimed)
                    if end is not None:
                        job = self._record_and_claim_next(store, end)
                finally:
                    if job is None:
                        with self.s.lock:
                            self.s.active -= 1
        finally:
            if job is not None:
                # Stopping with a claimed job not yet started: give it back
                # uncounted (a worker stop is not the job's failure).
                try:
                    store.requeue(job["id"], self.s.id, job["claim"])
                except QueuectlError:
                    pass             # recovery will settle it
                self.s._drop_claim(job["claim"])
                with self.s.lock:
                    self.s.active -= 1
            store.close()


# Output ######################################################################

def term_width():
    """Columns to fit tables into; None = no limit (not a terminal)."""
    cols = os.environ.get("COLUMNS", "")
    if cols.isdigit() and int(cols) > 0:
        return int(cols)
    try:
        if sys.stdout.isatty():
            return os.get_terminal_size(sys.stdout.fileno()).columns
    except (OSError, ValueError, AttributeError):
        pass
    return None

class Progress:
    """One line on stderr kept up to date while a command works, at a
    terminal only (never in a pipe, a log or cron's mail): redrawn at most
    five times a second; clear() before anything else is printed."""

    __slots__ = ("stream", "on", "last", "shown", "began", "done0", "text")

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        try:
            self.on = self.stream.isatty()
        except (AttributeError, ValueError):
            self.on = False
        self.last, self.shown, self.began, self.done0 = 0.0, False, time.monotonic(), None
        self.text = ""

    def show(self, text, force=False):
        if not self.on or (not force and time.monotonic() - self.last < 0.2):
            return
        self.last, self.text = time.monotonic(), text
        try:
            width = os.get_terminal_size(self.stream.fileno()).columns or 80
        except (OSError, ValueError):
            width = 80
        self.stream.write("\r\x1b[K" + cut(text, width - 1))
        self.stream.flush()
        self.shown = True

    def clear(self):
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False

    def counts(self, counts, total=None):
        """The line of wait and a draining worker, from {state: n}:
        `312/500 done · 4 running · 184 waiting · 0 dead · ETA 5s`; the ETA
        from how fast jobs have finished since the line first showed."""
        done = counts.get(COMPLETED, 0)
        ended = done + counts.get(DEAD, 0) + counts.get(CANCELLED, 0)
        total = sum(counts.values()) if total is None else total
        if self.done0 is None:
            self.done0 = ended
        rate = (ended - self.done0) / max(time.monotonic() - self.began, 1e-9)
        left = total - ended
        eta = ("ETA " + human_duration(left / rate)) if rate > 0 and left else \
            "ETA ?" if left else "all ended"
        waiting = counts.get(PENDING, 0) + counts.get(FAILED, 0)
        return (f"{done}/{total} done · {counts.get(PROCESSING, 0)} running · "
                f"{waiting} waiting · {counts.get(DEAD, 0)} dead · {eta}")

def one_line(text):
    return " ".join(str(text).split()) if text is not None else "-"

def cut(text, width):
    """text in width characters, cut with …, never inside a word that holds
    a number: "ran 111ms" in 8 is "ran…", not "ran 11…"."""
    if len(text) <= width:
        return text
    end = max(width - 1, 0)
    start = end
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    stop = end
    while stop < len(text) and not text[stop].isspace():
        stop += 1
    if start > 0 and any(c.isdigit() for c in text[start:stop]):
        end = start
    return text[:end].rstrip() + "…"

STATE_COLORS = {PROCESSING: "36", FAILED: "33", COMPLETED: "32", DEAD: "1;31",
                CANCELLED: "2"}

def use_color(stream=None):
    """Colour only on a terminal, never with NO_COLOR set to a non-empty
    value (no-color.org: an empty one does not count) or TERM=dumb."""
    stream = stream or sys.stdout
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False

def paint(text, code, on=True):
    return f"\x1b[{code}m{text}\x1b[0m" if on and code else text

def table(headers, rows, width=None, color_col=None, shrink=None, drop=()):
    """Aligned columns, fitted to width: first the columns of drop that say
    the same on every row (PRI all 0) are left out, then the columns of
    shrink ((index, narrowest), cut first to last; default: the last
    column, to 8) are cut with …, then the rest of drop are left out; the
    others (ids, states) are never cut. color_col: index of a column of
    states, coloured on a terminal."""
    rows = [[("-" if c is None else str(c)) for c in row] for row in rows]
    n = len(headers)
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    shown = list(range(n))
    if width:
        over = sum(widths) + 2 * (n - 1) - width
        for i in drop:                   # a column that tells rows apart stays longer
            if over > 0 and len(rows) > 1 and len({r[i] for r in rows}) == 1:
                shown.remove(i)
                over -= widths[i] + 2
        drop = [i for i in drop if i in shown]
        for i, least in (shrink if shrink is not None else ((n - 1, 8),)):
            if over <= 0:
                break
            by = min(over, max(widths[i] - least, 0))
            widths[i] -= by
            over -= by
        for i in drop:
            if over <= 0:
                break
            shown.remove(i)
            over -= widths[i] + 2
    color = color_col is not None and use_color()
    lines = []
    for k, row in enumerate([list(headers)] + rows):
        cells = {i: cut(row[i], widths[i]).ljust(widths[i]) for i in shown}
        if color and k and color_col in cells:
            cells[color_col] = paint(cells[color_col], STATE_COLORS.get(row[color_col]))
        lines.append("  ".join(cells[i] for i in shown).rstrip())
    return "\n".join(lines)

def print_json(obj):
    import json
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False) + "\n")

# The public columns whose value, when the job sets none, is its queue's or
# the home's: shown as the value that applies, with where it came from.
SHOWN_EFFECTIVE = ("max_retries", "timeout", "mem", "cpu_time", "nofile", "nice",
                   "retry_on", "no_retry_on", "launcher")

def job_public(job, home, cfg=None):
    """A job as users see it (show --json, list --json). Of its environment
    only the names set with --env show: values only with show --env. With
    cfg (the home's config), values the job leaves to its queue or home are
    the ones that apply, and "from" says whose each is (job, queue, home)."""
    out = {}
    for k, _, _, kept, flags in JOB_TABLE:
        if "p" not in flags:
            continue
        v = job[k]
        if kept == "time":
            v = show_time(v)
        elif kept == "json":
            v = _loads(v, JSON_SHOWN[k])
        elif kept == "names":
            v = sorted(_loads(v, {}))
        out[k] = v
        if k == "id":
            out["number"] = job["seq"]           # #N names the job too
        if k == "env":
            out["env_from"] = "worker" if job["env_id"] is None else "enqueuer"
            out["umask"] = None if job["umask"] is None else f"{job['umask']:04o}"
    if cfg is not None:
        eff = effective(job, cfg, SHOWN_EFFECTIVE)
        out.update((k, v) for k, (v, _) in eff.items())
        out["from"] = {k: src for k, (_, src) in eff.items()}
    out["log"] = log_path(home, job["id"])
    return out

def job_environment(store, job):
    """The environment a job runs in, as far as it is stored: its enqueuer's
    (none with --worker-env) and its --env values; the worker adds
    QUEUECTL_HOME, QUEUECTL_JOB_ID, QUEUECTL_ATTEMPT and QUEUECTL_CLAIM."""
    env = {}
    if job["env_id"] is not None:
        env = store.env(job["env_id"]) or {}
    env.update(_loads(job["env"], {}))
    return dict(sorted(env.items()))

def blocked_on(store, job):
    """[(dep id, its state or 'missing')] of a job's unmet dependencies."""
    deps = _loads(job["depends_on"], [])
    if not deps or not job["blocked"]:
        return []
    states = store.states(deps)
    return [(d, states.get(d, "missing")) for d in deps
            if states.get(d) != COMPLETED]

class WhyContext:
    """What every job's reasons are read against (paused queues, limits,
    keys held, live workers), read from the database once, when first
    needed, for a whole list."""

    def __init__(self, store, now):
        self.store, self.now = store, now
        self._paused = self._limits = self._held = self._workers = self._slow = None

    def paused(self):
        if self._paused is None:
            self._paused = self.store.paused()
        return self._paused

    def limits(self):
        if self._limits is None:
            self._limits, self._held = self.store.limits(), self.store.held()
        return self._limits

    def held(self):
        self.limits()
        return self._held

    def workers(self):
        """[(worker, its job threads that run a job)] of the live workers
        (a job it adopted from a dead worker takes up no job thread)."""
        if self._workers is None:
            busy = {}
            for job in self.store.processing():
                if job["worker"] and (job["claim"] or "").startswith(
                        claim_tag(job["worker"])):
                    busy[job["worker"]] = busy.get(job["worker"], 0) + 1
            self._workers = [(w, busy.get(w["id"], 0))
                             for w in self.store.live_workers()]
        return self._workers

    def slow_after(self, queue):
        """Seconds after which a running job of queue is slow (slow_factor
        times its p95 run time, from the history once 20 runs are known),
        or None."""
        if self._slow is None:
            try:
                cfg = Config(self.store.home).load()
            except QueuectlError:
                cfg = CONFIG_DEFAULTS
            self._slow = {}
            for q, h in self.store.history_totals().items():
                factor = queue_config(cfg, q)["slow_factor"]
                p95 = history_figures(h)["run_p95"]
                if factor and p95 and h["run_count"] >= 20:
                    self._slow[q] = (factor * p95, p95, factor)
        return self._slow.get(queue)

def why_reasons(store, job, now, ctx=None):
    """[(code, text, details)]: why job is not running now, in plain words,
    one per reason (why, list's WHEN and doctor read them); for a running
    or finished job, one that says so. The codes are stable (why --json):
    scheduled, backoff, dependencies, paused, key_full, no_worker,
    workers_busy, ready; running; completed, dead, cancelled."""
    ctx = ctx or WhyContext(store, now)
    state, queue = job["state"], job["queue"]
    if state == PROCESSING:
        pid = f", pid {job['pid']}" if job["pid"] else ""
        ran = now - epoch(job["started_at"])
        slow = ctx.slow_after(queue)
        mark = (f"; slow: over {slow[2]:g} × its queue's p95 run time "
                f"({human_duration(slow[1])})") if slow and ran > slow[0] else ""
        return [("running", f"running for {human_duration(ran)} on worker {job['worker']}"
                 f"{pid}{mark}", {"worker": job["worker"], "slow": bool(mark)})]
    if state in FINISHED:
        tries = plural(job["attempts"], "attempt")
        when = relative(job["finished_at"] or job["updated_at"], now)
        text = {COMPLETED: f"completed {when}, after {tries}",
                DEAD: f"dead {when}, after {tries}: {job['last_error']}",
                CANCELLED: f"cancelled {when}, after {tries}"}[state]
        return [(state, text, {"attempts": job["attempts"]})]
    reasons = []
    run_at = epoch(job["run_at"])
    if job["run_at"] > iso(now):         # as the claim compares: run_at <= now
        at = f"{local_time(run_at, now)} ({relative(job['run_at'], now)})"
        if state == FAILED:
            reasons.append(("backoff", f"waiting out its backoff until {at}, after "
                            f"attempt {job['attempts']} failed: {job['last_error']}",
                            {"until": show_time(job["run_at"])}))
        else:
            reasons.append(("scheduled", f"scheduled for {at}",
                            {"until": show_time(job["run_at"])}))
    deps = blocked_on(store, job)
    if deps:
        reasons.append(("dependencies", "waits for " + ", ".join(
            f"{d} ({s})" for d, s in deps), {"on": dict(deps)}))
    paused = ctx.paused()
    if "*" in paused or queue in paused:
        reasons.append(("paused", f"queue {queue} is paused" if queue in paused else
                        "every queue is paused", {"queue": queue}))
    limits, held = ctx.limits(), ctx.held()
    keys = _loads(job["keys"], [])
    if QUEUE_KEY + queue in limits:
        keys.append(QUEUE_KEY + queue)
    for key in keys:
        limit = limits.get(key, 1)
        if held.get(key, 0) >= limit:
            holders = store.holders(key)
            reasons.append(("key_full", f"key {key} is full: {held[key]} of {limit} "
                            f"running ({', '.join(holders[:5])}"
                            f"{', …' if len(holders) > 5 else ''})",
                            {"key": key, "limit": limit, "holders": holders}))
    serving = [(w, n) for w, n in ctx.workers() if queue == HOOK_QUEUE or
               w["queues"] is None or queue in _loads(w["queues"], [])]
    if not serving:
        reasons.append(("no_worker", f"no live worker serves queue {queue}",
                        {"queue": queue}))
    else:
        threads = sum(w["threads"] for w, _ in serving)
        busy = sum(n for _, n in serving)
        if busy >= threads:
            reasons.append(("workers_busy", f"all {plural(threads, 'thread')} of the "
                            f"{plural(len(serving), 'worker')} that serve queue {queue} "
                            "are busy", {"threads": threads, "busy": busy}))
    if not reasons:
        reasons.append(("ready", "nothing holds it back: a worker claims it next "
                        "(after any job ahead of it)", {}))
    return reasons

def when_text(store, job, now, ctx=None):
    """list's WHEN: the first reason a waiting job waits, briefly."""
    state = job["state"]
    if state in (PENDING, FAILED):
        code, _, info = why_reasons(store, job, now, ctx)[0]
        if code in ("scheduled", "backoff"):
            return (f"due {local_time(epoch(job['run_at']), now, short=True)} "
                    f"({relative(job['run_at'], now)})")
        if code == "dependencies":
            return "blocked on " + ",".join(
                f"{d}({s})" if s != PENDING else d for d, s in info["on"].items())
        if code == "key_full":
            return f"key {info['key']} full"
        return {"paused": "paused", "no_worker": "no worker",
                "workers_busy": "workers busy"}.get(code, "ready")
    if state == PROCESSING:
        ran = now - epoch(job["started_at"])
        slow = (ctx or WhyContext(store, now)).slow_after(job["queue"])
        return f"running {human_duration(ran)}" + (", slow" if slow and ran > slow[0] else "")
    return relative(job["finished_at"] or job["updated_at"], now)

def summary_lines(counts, per_queue, workers, paused, every_queue):
    """The queue at a glance, for status and top: jobs per state, workers
    (and paused queues, when given), the per-queue table (always with
    every_queue, else only when there is more than the default queue)."""
    color = use_color()
    threads = sum(w["threads"] for w in workers)
    lines = ["jobs: " + ", ".join(f"{counts[s]} {paint(s, STATE_COLORS.get(s), color)}"
                                  for s in STATES)]
    queues = [[q] + [c[s] for s in STATES] for q, c in sorted(per_queue.items())]
    if every_queue or len(per_queue) > 1 or (per_queue and DEFAULT_QUEUE not in per_queue):
        lines += table(["QUEUE"] + [s.upper() for s in STATES],
                       queues or [[DEFAULT_QUEUE] + [0] * len(STATES)]).splitlines()
    n = len(workers)
    lines.append(f"workers: {plural(threads, 'job thread')} in {n} live worker "
                 f"process{'' if n == 1 else 'es'}"
                 + (("; paused: " + ("all queues" if "*" in paused else ", ".join(paused)))
                    if paused else ""))
    return lines

SPARKS = "▁▂▃▄▅▆▇█"

def sparkline(values):
    """Numbers as a row of block characters, the highest a full one (a
    blank for none at all)."""
    top = max(values, default=0)
    return "".join(" " if not v else SPARKS[min(int(v / top * 7.999), 7)] for v in values)

def running_shares(store, now):
    """[(job, seconds it has run, its queue's usual (p50) run time or None,
    whether it is slow)] of the running jobs, as top and serve show them."""
    running = [j for j in store.processing() if j["state"] == PROCESSING]
    if not running:
        return []
    ctx, usual = WhyContext(store, now), {}
    for q, h in store.history_totals(queues=sorted({j["queue"] for j in running})).items():
        usual[q] = history_figures(h)["run_p50"]
    out = []
    for j in running:
        ran, slow = now - epoch(j["started_at"]), ctx.slow_after(j["queue"])
        out.append((j, ran, usual.get(j["queue"]), bool(slow and ran > slow[0])))
    return out

def render_top(store, home, width, height, live=True):
    """One frame of `top`, most important first, so a short terminal cuts
    from the bottom: the counts, running jobs (pid, run time and its share
    of the queue's usual run time), jobs finished per minute over the last
    hour per queue, the per-queue table, recent failures."""
    now = time.time()
    counts, per_queue = store.counts()
    summary = summary_lines(counts, per_queue, store.live_workers(),
                            sorted(store.paused()), every_queue=True)
    clock = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(now))
    lines = [f"queuectl top  {home}  {clock}" + ("  (q to quit)" if live else ""),
             summary[0], summary[-1], ""]
    running = running_shares(store, now)
    lines.append(f"running ({len(running)}):")
    if running:
        rows = []
        for j, ran, p50, slow in running:
            share = f"{ran / p50 * 100:.0f}% of {human_duration(p50)}" if p50 else "-"
            if slow:
                share += ", slow"
            rows.append([j["id"], j["queue"], j["pid"], human_duration(ran), share,
                         one_line(j["command"])])
        lines += table(["ID", "QUEUE", "PID", "RAN", "OF USUAL (p50)", "COMMAND"], rows,
                       width).splitlines()
    per_minute = {}
    for queue, ended in store.ended_since(now - 3600):
        per_minute.setdefault(queue, [0] * 60)[min(int((now - ended) // 60), 59)] += 1
    if per_minute:
        lines += ["", "finished per minute, the last hour (oldest left):"]
        name = max(len(q) for q in per_minute)
        lines += [f"{q.ljust(name)}  {sparkline(v[::-1])}  {sum(v)}/h"
                  for q, v in sorted(per_minute.items())]
    lines += [""] + summary[1:-1]
    failures = store.recent_failures(5)
    if failures:
        lines += ["", "recent failures:"]
        lines += table(["ID", "STATE", "WHEN", "ERROR"],
                       [[j["id"], j["state"], relative(j["updated_at"], now),
                         one_line(j["last_error"])] for j in failures],
                       width, color_col=1).splitlines()
    return "\n".join(cut(line, width + line.count("\x1b") * 4) if width else line
                     for line in lines[:height])


# Commands ####################################################################

# One cmd_<name>(args) -> exit code per subcommand, in --help order.


# Commands: enqueue -----------------------------------------------------------

def open_store(args, durable=True, create=False):
    """The home's store. Only commands that create work (create=True) create
    a home: the others, on a home with no queue yet, say so on stderr and
    see an empty queue (exit 0 and empty output for scripts)."""
    if not create and not os.path.exists(os.path.join(args.home, "queue.db")) \
            and (os.path.isdir(args.home) or not os.path.exists(args.home)):
        if os.path.isdir(args.home):
            check_private(args.home, "home directory")
        sys.stderr.write(f"queuectl: note: there is no queue in {args.home} yet; "
                         "point at another home with --home or QUEUECTL_HOME\n")
        return Store(args.home, memory=True)
    return Store(args.home, durable=durable)

SHELL_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                       "0123456789@%+=:,./-_")

def shell_join(words):
    """Words -> one shell command that gives the job the same arguments
    (each word quoted as needed, as shlex.join does)."""
    return " ".join(w if w and all(c in SHELL_SAFE for c in w)
                    else "'" + w.replace("'", "'\"'\"'") + "'" for w in words)

def job_text(args):
    """The command (or JSON job) of an enqueue from its words, or None.

    Options come first; everything from the first other word on is the
    command, as with nohup, tsp or pueue: `enqueue echo hello world`, and
    `enqueue -- -cmd` for a command that starts with -. Several words are
    joined, each quoted as needed. One word is used as it is: a shell
    command line, or a JSON job. Options may still follow a command line
    given as one quoted argument (`enqueue 'cmd arg' --queue q`), as before;
    not a program whose path has a space ('/opt/my app/run' --full)."""
    words = list(args.job or [])
    if words and words[0] == "--":
        words = words[1:]
    elif quoted_then_options(words, args.cwd):
        rest, words = words[1:], words[:1]
        args.job = []
        args.parser.parse_args(rest, namespace=args)
        if args.job:
            raise UsageError("give the command as one quoted argument or as "
                             "separate words, not both: queuectl enqueue "
                             "'cmd arg' or queuectl enqueue cmd arg")
    elif len(words) > 1:
        warn_options_in_command(args, words)
    if not words:
        return None
    return words[0] if len(words) == 1 else shell_join(words)

def warn_options_in_command(args, words):
    """One rule, as tsp and pueue: options come before the command, and
    everything from its first word on is the command. A later word that is
    one of this command's own long options (`enqueue sleep 5 --timeout 2`)
    is the command's, so say so on stderr; `--` before the command is the
    way to mean it."""
    own = {f for flags, _ in getattr(args, "specs", ()) for f in flags if f.startswith("--")}
    own.add("--home")                    # every command's (a job in the wrong home)
    seen = [w for w in words[1:] if w.partition("=")[0] in own]
    if seen:
        sys.stderr.write(f"queuectl: warning: {seen[0]} comes after the command's first "
                         "word, so it is part of the command, not an option; put options "
                         "before the command, or -- before the command to mean it\n")

def quoted_then_options(words, cwd=None):
    """1.0's form of a command: one quoted command line (or JSON job)
    followed by options, `'cmd arg' --queue q`; not a program whose path
    has a space ('/opt/my app/run' --full). enqueue, schedule add and the
    fast parse of enqueue all ask this one question."""
    return len(words) > 1 and (words[0].lstrip().startswith("{") or (
        any(c.isspace() for c in words[0]) and not os.path.exists(
            os.path.join(cwd or ".", words[0]))))

def parse_specs(args):
    """The job specs of an enqueue, validated; flags override JSON fields.
    A rejected --stdin line is named by its number, whatever the error."""
    text = job_text(args)
    if args.stdin:
        if text is not None or args.command is not None:
            raise UsageError("--stdin reads the jobs from standard input; "
                             "give no JOB or --command with it")
        items = []
        # Only \n ends a line: \f, \x1c or U+2028 belong to the command.
        for n, raw in enumerate(sys.stdin.buffer.read().split(b"\n"), 1):
            try:
                line = raw.removesuffix(b"\r").decode("utf-8")
            except UnicodeDecodeError:
                raise UsageError(f"--stdin: line {n} is not valid UTF-8") from None
            if line.strip() and not line.lstrip().startswith("#"):
                items.append((f"line {n}", line))    # as crontab: # comments
        if not items:
            raise UsageError("--stdin: no jobs on standard input")
    else:
        if text is None and args.command is None:
            raise UsageError("enqueue needs a command: queuectl enqueue 'echo hi' "
                             "or queuectl enqueue echo hi (or a JSON job, or -c)")
        if text is not None and args.command is not None \
                and not text.lstrip().startswith("{"):
            raise UsageError("give the command once: as words or as --command")
        items = [("", text)]
    if args.run_at is not None and args.delay is not None:
        raise UsageError("give --run-at or --delay, not both")
    if args.stdin and args.id is not None and len(items) > 1:
        raise UsageError("--id names one job; with --stdin put ids in the lines")
    env = {}
    for kv in args.env or []:
        k, sep, v = kv.partition("=")
        if not k:
            raise UsageError(f"invalid --env {kv!r}: use NAME=VALUE or NAME")
        if not sep:                      # --env NAME: this one, passed through
            v = os.environ.get(k)
            if v is None:
                raise UsageError(f"--env {k}: {k} is not set here; give "
                                 f"--env {k}=VALUE")
        env[k] = v
    specs = []
    for where, text in items:
        try:
            specs.append((where, check_spec(job_spec(args, text, env))))
        except QueuectlError as e:
            if where:
                raise type(e)(f"{where}: {e}") from None
            raise
    return specs

def job_spec(args, text, env):
    """One job's spec: its text (a command or JSON job) and the flags."""
    spec = spec_from_text(text) if text is not None else {}
    if args.command is not None:
        spec["command"] = args.command
    flags = {"id": args.id, "priority": args.priority, "max_retries": args.max_retries,
             "timeout": args.timeout, "queue": args.queue, "cwd": args.cwd,
             "label": args.label, "launcher": args.launcher}
    for k, v in flags.items():
        if v is not None:
            spec[k] = v
    if args.run_at is not None:
        spec.pop("delay", None)
        spec["run_at"] = args.run_at
    if args.delay is not None:
        spec.pop("run_at", None)
        spec["delay"] = args.delay
    if args.after:
        spec["depends_on"] = list(spec.get("depends_on") or []) + args.after
    if env:
        spec["env"] = {**(spec["env"] if isinstance(spec.get("env"), dict) else {}),
                       **env}
    if args.unique:
        spec["unique"] = True
    if args.key:
        keys = spec.get("keys") or []
        spec["keys"] = ([keys] if isinstance(keys, str) else keys) + args.key \
            if isinstance(keys, (str, list)) else keys        # check_spec says what
    for name in ("if_busy", "retry_on", "no_retry_on") + HOOK_EVENTS + LIMIT_KEYS:
        if getattr(args, name, None) is not None:
            spec[name] = getattr(args, name)
    return spec

def cmd_enqueue(args):
    """Add jobs; print each job's id (or the jobs as JSON with --json)."""
    specs = parse_specs(args)
    blob = umask = None
    if not args.worker_env:              # run as if here: environment and umask
        blob, umask = captured_env(), current_umask()
    store = open_store(args, create=True)
    now = time.time()
    ids, stuck, skipped = [], {}, False
    with store.tx():
        env_id = store.add_env(blob) if blob is not None else None
        for where, spec in specs:
            try:
                job_id, added = store.insert(spec, now, env_id, umask)
            except QueuectlError as e:
                if where:
                    raise type(e)(f"{where}: {e}") from None
                raise
            ids.append(job_id)
            skipped = skipped or not added
            if not added and spec.get("if_busy") == "skip" and sys.stderr.isatty():
                sys.stderr.write(f"queuectl: note: job {job_id} holds or waits for "
                                 f"key {', '.join(spec['keys'])}; enqueued nothing\n")
        if skipped and env_id is not None:       # maybe no job uses it
            store.drop_unused_envs([env_id])
        if any(spec.get("depends_on") for _, spec in specs):
            stuck = store.stuck()
    wake_workers(args.home)
    if sys.stderr.isatty():              # a person at a terminal, not cron
        hint_no_worker(store, {spec.get("queue") or DEFAULT_QUEUE for _, spec in specs})
    for job_id in [i for i in ids if i in stuck][:10]:
        dep, state = stuck[job_id]
        sys.stderr.write(f"queuectl: warning: job {job_id} waits on "
                         f"{stuck_text(dep, state)}: it runs only once {dep} is "
                         "retried and completes\n")
    if args.json:
        cfg = Config(args.home).load()
        jobs = [job_public(store.get(i), args.home, cfg) for i in ids]
        print_json(jobs if args.stdin else jobs[0])
    elif args.stdin and len(ids) > 1 and sys.stdout.isatty():
        # A person reads a summary; a script (stdout not a terminal) the ids.
        label = {spec.get("label") for _, spec in specs}
        print(f"enqueued {len(ids)} jobs: {ids[0]} … {ids[-1]}"
              + (f", label {label.pop()}" if len(label) == 1 and None not in label else "")
              + (f" (queuectl wait --label {shell_join([args.label])})" if args.label else ""))
    else:
        sys.stdout.write("".join(i + "\n" for i in ids))
    return EXIT_OK

def hint_no_worker(store, queues):
    """One line on stderr when no live worker serves one of queues."""
    served = set()
    for w in store.live_workers():
        if w["queues"] is None:
            return
        served.update(_loads(w["queues"], []))
    idle = sorted(set(queues) - served)
    if idle:
        sys.stderr.write(f"queuectl: note: no worker is running for queue "
                         f"{', '.join(idle)}; start one with: queuectl worker start "
                         "--detach\n")

# Commands: workers -----------------------------------------------------------

def cmd_worker_start(args):
    """Run workers in this process until stopped (or drained)."""
    import resource
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    need = FDS_BASE + FDS_PER_THREAD * args.count
    if soft != resource.RLIM_INFINITY and need > soft:
        raise UsageError(f"invalid --count {args.count}: {args.count} threads need "
                         f"about {need} open files but the limit is {soft} "
                         "(ulimit -n); raise the limit or use a smaller --count")
    store = open_store(args, durable=False, create=True)
    others = store.live_workers()
    store.close()
    Config(args.home).load()
    if others:
        threads = sum(w["threads"] for w in others)
        sys.stderr.write(
            f"queuectl: note: {plural(len(others), 'worker')} ({plural(threads, 'thread')}) "
            f"already run on {args.home}; with this one, {plural(len(others) + 1, 'worker')} "
            f"({plural(threads + args.count, 'thread')}) will run\n")
    if args.detach:
        return detach_worker(args)
    return Worker(args.home, args.count, args.queue, args.drain).run()

def detach_worker(args):
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        data = b""
        while True:
            chunk = os.read(r, 64)
            if not chunk:
                break
            data += chunk
        os.close(r)
        os.waitpid(pid, 0)
        if not data:
            raise QueuectlError("the detached worker did not start; see "
                                + os.path.join(args.home, "worker.log"))
        print(data.decode())
        if sys.stdout.isatty():              # scripts read the pid alone
            print(f"the worker runs in the background; its log: "
                  f"{os.path.join(args.home, 'worker.log')}")
        return EXIT_OK
    code = EXIT_FAIL
    try:
        os.close(r)
        os.setsid()
        if os.fork():
            os._exit(0)
        logfd = open_private(os.path.join(args.home, "worker.log"),
                             os.O_WRONLY | os.O_APPEND)
        nullfd = os.open(os.devnull, os.O_RDONLY)
        os.dup2(nullfd, 0)
        os.dup2(logfd, 1)
        os.dup2(logfd, 2)
        os.close(nullfd)
        os.close(logfd)
        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        worker = Worker(args.home, args.count, args.queue, args.drain)
        worker.s.log_file = os.path.join(args.home, "worker.log")
        os.write(w, str(os.getpid()).encode())
        os.close(w)
        code = worker.run()
    except BaseException as e:                      # report, never return to main
        try:
            sys.stderr.write(f"queuectl: error: worker failed: {e}\n")
        except Exception:
            pass
    finally:
        os._exit(code)

def cmd_worker_stop(args):
    """Ask every live worker of this home to stop, and wait until they have
    (at most --timeout; --no-wait: return at once)."""
    import signal
    if args.no_wait and (args.wait or args.timeout is not None):
        raise UsageError("--no-wait returns at once: give it without --wait or --timeout")
    store = open_store(args)
    workers = chosen_workers(store, args.which)
    for w in workers:
        try:
            os.kill(w["pid"], signal.SIGUSR1 if args.now else signal.SIGTERM)
        except ProcessLookupError:
            pass
    if not workers:
        print("no live workers")
        return EXIT_OK
    print(f"stopping {len(workers)} worker{'s' if len(workers) != 1 else ''}"
          + (" now" if args.now else ""))
    if not args.no_wait and not poll_until(
            lambda: not any(lock_held(args.home, w["id"]) for w in workers),
            args.timeout, first=0.01, cap=0.05):
        raise QueuectlError(f"workers still running after {args.timeout:g}s")
    return EXIT_OK

def chosen_workers(store, which):
    """The live workers of this home on this host, or those of them named
    by id or pid."""
    workers = [w for w in store.live_workers() if w["host"] == hostname()]
    if which:
        named = set(which)
        unknown = named - {w["id"] for w in workers} - {str(w["pid"]) for w in workers}
        if unknown:
            raise QueuectlError(f"no live worker {sorted(unknown)[0]!r} of this home on "
                                "this host; queuectl worker status lists them")
        workers = [w for w in workers if w["id"] in named or str(w["pid"]) in named]
    return workers

def cmd_worker_threads(args):
    """Change how many jobs running workers run at once, without a restart
    (tsp -S, pueue parallel): each live worker (or each named) gets N job
    threads. New threads start at once; a surplus thread ends when its
    job does."""
    n = args.threads
    store = open_store(args)
    workers = chosen_workers(store, args.which)
    if not workers:
        raise QueuectlError("no live worker on this host; start one with: queuectl worker "
                            f"start --count {n}")
    need = FDS_BASE + FDS_PER_THREAD * n
    for w in workers:
        soft = open_files_limit(w["pid"])
        if soft is not None and need > soft:
            raise QueuectlError(f"worker {w['id']} cannot run {n} threads: they need about "
                                f"{need} open files and its limit is {soft}")
    rd = run_dir(args.home)
    for w in workers:
        write_atomic(os.path.join(rd, w["id"] + ".threads"), f"{n}\n")
    wake_workers(args.home)
    ids, now_live = {w["id"] for w in workers}, {}

    def taken():
        now_live.clear()
        now_live.update((x["id"], x) for x in store.live_workers() if x["id"] in ids)
        return all(x["threads"] == n for x in now_live.values())
    poll_until(taken, 10, first=0.01, cap=0.1)
    missed = [w for w in workers if w["id"] not in now_live or now_live[w["id"]]["threads"] != n]
    if missed:
        for w in missed:                 # nothing is left for it to take later
            remove_file(os.path.join(rd, w["id"] + ".threads"))
        w = missed[0]
        raise QueuectlError(
            f"worker {w['id']} (pid {w['pid']}) " + (
                "stopped before it took the change" if w["id"] not in now_live else
                f"did not take {n} threads within 10s (stopping, frozen, or an older "
                "queuectl?)") + "; nothing changed for it")
    for w in workers:
        print(f"worker {w['id']} (pid {w['pid']}): {plural(n, 'job thread')}, was "
              f"{w['threads']}" + ("; a surplus thread ends when its job does"
                                   if n < w["threads"] else ""))
    return EXIT_OK

def open_files_limit(pid):
    """The soft RLIMIT_NOFILE of process pid, or None if unknown/unlimited."""
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    soft = line.split()[3]
                    return int(soft) if soft.isdigit() else None
    except OSError:
        pass
    return None

def workers_info(store):
    """Live workers as worker status --json (and serve) show them."""
    return [{"id": w["id"], "pid": w["pid"], "host": w["host"],
             "threads": w["threads"], "queues": _loads(w["queues"], None),
             "started_at": show_time(w["started_at"]),
             "heartbeat": show_time(w["heartbeat"]),
             "jobs": store.worker_jobs(w["id"])} for w in store.live_workers()]

def cmd_worker_status(args):
    """Live workers: id, pid, host, threads, started, heartbeat, current jobs."""
    out = workers_info(open_store(args))
    if args.json:
        print_json(out)
    elif not out:
        print("no live workers")
    else:
        print(table(["ID", "PID", "HOST", "THREADS", "QUEUES", "STARTED",
                     "HEARTBEAT", "JOBS"],
                    [[w["id"], w["pid"], w["host"], w["threads"],
                      ",".join(w["queues"] or ["*"]), relative(w["started_at"]),
                      relative(w["heartbeat"]),
                      ",".join(w["jobs"]) or "-"] for w in out], term_width()))
    return EXIT_OK

# Commands: status, show, list, stats -----------------------------------------

def cmd_status(args):
    """Counts per state and queue, workers, oldest pending, next scheduled."""
    if args.id:
        args.env = False
        return cmd_show(args)
    store = open_store(args)
    now = time.time()
    info, workers = status_info(store, now)
    if args.json:
        print_json(info)
        return EXIT_OK
    oldest, nxt, paused = info["oldest_pending"], info["next_scheduled"], info["paused"]
    print("\n".join(summary_lines(info["counts"], info["queues"], workers, paused=None,
                                  every_queue=False)))
    if oldest:
        print(f"oldest pending: {oldest['id']}, could run since "
              f"{relative(oldest['due_at'], now)}")
    if nxt:
        print(f"next scheduled: {nxt['id']} {relative(nxt['run_at'], now)} "
              f"({human_time(nxt['run_at'])})")
    if paused:
        print("paused: " + ("all queues" if "*" in paused else ", ".join(paused)))
    for sch in info["schedules"]:
        when = "paused" if sch["paused"] else \
            f"next run {local_time(epoch(sch['next_run']), now)} ({relative(sch['next_run'], now)})"
        print(f"schedule {sch['name']} ({sch['cron']}): {when}"
              + ("" if workers or sch["paused"] else "; no worker is running to fire it"))
    return EXIT_OK

def status_info(store, now):
    """(what status --json prints, the live workers' rows): counts per
    state and queue, workers, the oldest runnable job, the next scheduled
    one, paused queues, schedules. serve's overview and /api/status too."""
    counts, per_queue = store.counts()
    workers = store.live_workers()
    oldest = store.runnable_since(now)   # as queuectl_oldest_pending_seconds says
    nxt = store.next_scheduled(now)
    paused = sorted(store.paused())
    schedules = [{"name": sch["name"], "cron": sch["cron"], "paused": bool(sch["paused"]),
                  "next_run": None if sch["paused"] else show_time(iso(sch["next_at"]))}
                 for sch in store.schedules()]
    return {
        "counts": counts,
        "queues": per_queue,
        "workers": {"live": len(workers),
                    "threads": sum(w["threads"] for w in workers)},
        "oldest_pending": ({"id": oldest[1], "due_at": show_time(oldest[0]),
                            "age_seconds": round(max(now - epoch(oldest[0]), 0), 3)}
                           if oldest else None),
        "next_scheduled": ({"id": nxt[0], "run_at": show_time(nxt[1])}
                           if nxt else None),
        "paused": paused,
        "schedules": schedules,
    }, workers

def cmd_show(args):
    """Every field of one job, and its log path; --env: its environment."""
    store = open_store(args)
    job = store.must_get(args.id)
    pub, blocked, attempts = show_info(store, args.home, job)
    environment = job_environment(store, job) if args.env else None
    if args.json:
        if args.env:
            pub["environment"] = environment
        print_json(pub)
        return EXIT_OK
    width = max(len(k) for k in pub)
    for k, v in show_fields(pub, blocked):
        print(f"{k.ljust(width)}  {v}")
    if attempts:
        print("attempts:")
        for number, state, end, use, again in attempt_rows(attempts):
            if again:
                print("  (retried by hand)")
            print(f"  {number}  {state:<9}  {end:<14}  {use}")
    if args.env:
        print("environment:" + ("" if job["env_id"] is not None else
                                " the worker's, and"))
        for k, v in environment.items():
            print(f"  {k}={v}")
    return EXIT_OK

def show_info(store, home, job):
    """(what show --json prints, the unmet dependencies with their states,
    the attempts' rows): the one source of show, serve's job page and
    /api/jobs/ID."""
    pub = job_public(job, home, Config(home).load())
    blocked = blocked_on(store, job)
    pub["blocked_on"] = [d for d, _ in blocked]
    pub["hook_jobs"] = [{"id": h["id"], "event": _loads(h["env"], {}).get("QUEUECTL_HOOK"),
                         "state": h["state"]} for h in store.hooks_of(job["id"])]
    attempts = store.attempts_of(job["id"])
    pub["attempts_recorded"] = [{**a, "ended_at": show_time(iso(a["ended_at"])),
                                 "started_at": show_time(a["started_at"])}
                                for a in attempts]
    return pub, blocked, attempts

def show_fields(pub, blocked):
    """[(field, text)] as show prints a job's fields (serve's job page too)."""
    sources, out = pub.get("from", {}), []
    for k, v in pub.items():
        if k in ("from", "attempts_recorded"):
            continue
        if k in sources and sources[k] != "job":
            v = f"{'-' if v in (None, '') else v}  ({sources[k]}'s)"
        elif k == "blocked_on":
            v = ", ".join(f"{d} ({s})" for d, s in blocked) or None
        elif k in ("depends_on", "env", "keys"):
            v = ", ".join(v) or None
        elif k == "hooks":
            v = "; ".join(f"{e}: {c}" for e, c in v.items()) or None
        elif k == "hook_jobs":
            v = ", ".join(f"{h['id']} ({h['event']}, {h['state']})" for h in v) or None
        elif k == "usage":
            v = usage_text(v) + ("  (measured locally: the launcher's, not the "
                                 "remote side's)" if pub.get("launcher") else "") if v else None
        elif k in ("mem",) and v:
            v = human_size(v)
        elif k in JOB_TIMES and v is not None:
            v = f"{human_time(v)} ({relative(v)})"
        out.append((k, "-" if v is None else str(v)))
    return out

def attempt_rows(attempts):
    """[(number, state, how it ended, what it cost, retried by hand before
    it)] of a job's attempts, as show prints them."""
    rows, last = [], 0
    for a in attempts:
        end = (f"exit {a['exit_code']}" if a["exit_code"] is not None else
               f"signal {a['signal']}" if a["signal"] is not None else "no exit status")
        use = usage_text(a) if a["cpu_user"] is not None else \
            "did not run" if a["wall"] is None else (
                f"ran {a['wall']:.3f}s, CPU and memory not measured (adopted "
                "or recovered: its worker died)")
        rows.append((a["attempt"], a["state"], end, use, a["attempt"] <= last))
        last = a["attempt"]              # numbering starts again after a retry
    return rows

def usage_text(u):
    """An attempt's cost in one line: ran, user, sys, max RSS."""
    parts = [] if u.get("wall") is None else [f"ran {u['wall']:.3f}s"]
    if u.get("cpu_user") is None:
        return ", ".join(parts + ["CPU and memory not measured"]) if parts \
            else "did not run"
    bound = "≤ " if u.get("max_rss_bound") else ""
    return ", ".join(parts + [f"user {u['cpu_user']:.3f}s", f"sys {u['cpu_sys']:.3f}s",
                              f"max RSS {bound}{human_size(u['max_rss'])}"])

def cmd_list(args):
    """Jobs in enqueue order, filtered by --state/--queue, at most --limit."""
    store = open_store(args)
    return list_jobs(store, args, args.state)

def list_jobs(store, args, states):
    """list and dlq list: the newest jobs (all with --json, unless --limit),
    oldest first so the newest is next to the prompt; a footer says how many
    older ones a human view leaves out."""
    limit = args.limit
    if limit is None:
        limit = 0 if args.json or args.all else 100
    rows, more = store.list_jobs(states, args.queue, limit, args.label)
    if args.json:
        cfg = Config(args.home).load()
        print_json([job_public(j, args.home, cfg) for j in rows])
        return EXIT_OK
    if not rows:
        print("no jobs")
        return EXIT_OK
    now = time.time()
    ctx = WhyContext(store, now)
    cfg = Config(args.home).load() if args.cmd == "dlq" else None
    if cfg is not None:
        print(labelled_table(
            ["ID", "QUEUE", "TRIES", "DIED", "LAST ERROR", "COMMAND"],
            [[j["id"], j["queue"], f"{j['attempts']}/{allowed_attempts(j, cfg)}",
              relative(j["finished_at"], now), one_line(j["last_error"]),
              one_line(j["command"])] for j in rows], rows, 2,
            drop=(1, 3), shrink=((4, 20), (5, 20), (4, 8), (5, 8), (3, 8))))
    else:
        print(labelled_table(
            ["ID", "#", "STATE", "QUEUE", "PRI", "TRIES", "WHEN", "OUTCOME", "COMMAND"],
            [[j["id"], j["seq"], j["state"], j["queue"], j["priority"],
              j["attempts"] + (j["state"] == PROCESSING), when_text(store, j, now, ctx),
              outcome_text(j), one_line(command_text(j))] for j in rows], rows, 4,
            color_col=2, drop=(4, 5, 3),
            shrink=((7, 20), (8, 20), (8, 12), (7, 12), (8, 8), (7, 8), (6, 14), (6, 8))))
    if more:
        print(f"… {more} older job{'s' if more != 1 else ''} not shown "
              "(--all for every one, --limit N for the newest N)")
    return EXIT_OK

def labelled_table(headers, cells, jobs, at, drop, shrink, **kw):
    """table() of jobs, with a LABEL column at index at when one has a
    label (dropped after drop's columns, shrunk first)."""
    if any(j["label"] for j in jobs):
        headers = headers[:at] + ["LABEL"] + headers[at:]
        cells = [c[:at] + [j["label"] or "-"] + c[at:] for c, j in zip(cells, jobs)]
        shift = lambda i: i + (i >= at)             # noqa: E731
        drop = tuple(shift(i) for i in drop) + (at,)
        shrink = ((at, 12),) + tuple((shift(i), n) for i, n in shrink)
        kw["color_col"] = shift(kw.get("color_col", -1)) if "color_col" in kw else None
        if kw["color_col"] is None:
            del kw["color_col"]
    return table(headers, cells, term_width(), drop=drop, shrink=shrink, **kw)

def command_text(job):
    """A job's command as list shows it; a hook's names its job and event."""
    if job["hook_of"] is None:
        return job["command"]
    event = _loads(job["env"], {}).get("QUEUECTL_HOOK", "hook")
    return f"[{event} of {job['hook_of']}] {job['command']}"

def histogram_quantile(q, counts, bounds, total, within=True):
    """The q-quantile (0 to 1) of a histogram: counts per bucket of bounds
    (not cumulative), total all of them (past the last bound included),
    interpolated within its bucket as Prometheus's histogram_quantile does
    (within=False: the bucket's upper bound); None when it is empty."""
    if not total:
        return None
    rank, seen, low = q * total, 0, 0
    for n, high in zip(counts, bounds):
        if n and seen + n >= rank:
            return low + (high - low) * (rank - seen) / n if within else high
        seen, low = seen + n, high
    return bounds[-1]

def history_figures(h):
    """A history sum (history_totals' or history_series') as stats shows
    it: attempts, failures, success rate, run time and peak RSS p50/p95."""
    runs = [h[c] for c in RUN_COLUMNS]
    sizes = [h[c] for c in RSS_COLUMNS]
    return {"attempts": h["attempts"], "failures": h["failures"],
            "success_rate": round(1 - h["failures"] / h["attempts"], 4) if h["attempts"] else None,
            "run_p50": histogram_quantile(0.5, runs, DURATION_BUCKETS, h["run_count"]),
            "run_p95": histogram_quantile(0.95, runs, DURATION_BUCKETS, h["run_count"]),
            # RSS buckets grow 4x: their bound, never a made-up figure inside
            "max_rss_p50": histogram_quantile(0.5, sizes, RSS_BUCKETS, h["rss_count"], False),
            "max_rss_p95": histogram_quantile(0.95, sizes, RSS_BUCKETS, h["rss_count"], False),
            "cpu_seconds": round(h["cpu_user"] + h["cpu_sys"], 3)}

def short_duration(v):
    return "-" if v is None else human_duration(v)

BARS = " ▏▎▍▌▋▊▉█"

def bar(value, top, width=20):
    """value as a bar of width characters at most (top: a full one)."""
    if not top or not value:
        return ""
    eighths = max(round(value / top * width * 8), 1)
    return "█" * (eighths // 8) + BARS[eighths % 8].strip()

def cmd_stats(args):
    """Per queue, from the history (which prune keeps): attempts, success
    rate, p50/p95 of run time and of peak RSS; --by hour|day: over time."""
    now = time.time()
    since = now - parse_duration(args.since, "--since") if args.since else None
    store = open_store(args)
    if args.by:
        return stats_by(store, args, now, since)
    rows = [{"queue": q, **history_figures(h)}
            for q, h in store.history_totals(since or 0, args.queue).items() if h["attempts"]]
    if args.json:
        print_json(rows)
        return EXIT_OK
    if not rows:
        print("no attempts recorded" + (f" in the last {args.since}" if args.since else ""))
        return EXIT_OK
    print(table(["QUEUE", "ATTEMPTS", "SUCCESS", "RUN p50", "RUN p95", "RSS p50", "RSS p95"],
                [[r["queue"], r["attempts"], f"{r['success_rate'] * 100:.1f}%",
                  short_duration(r["run_p50"]), short_duration(r["run_p95"]),
                  "-" if r["max_rss_p50"] is None else "≤" + human_size(r["max_rss_p50"]),
                  "-" if r["max_rss_p95"] is None else "≤" + human_size(r["max_rss_p95"])]
                 for r in rows], term_width()))
    return EXIT_OK

def local_start(t, span):
    """The start (epoch) of the local hour (span 3600) or day (86400) that
    the instant t is in, by the offset in force at t: across a change of
    daylight time, a day may last 23 or 25 hours, an hour repeat. A day
    starts at its midnight's instant by local_instant's one rule."""
    import datetime as dt
    lt = time.localtime(t)
    if span == 3600:
        return int(t - (t + lt.tm_gmtoff) % 3600)
    return int(local_instant(dt.datetime(lt.tm_year, lt.tm_mon, lt.tm_mday)))

def stats_by(store, args, now, since):
    """stats --by hour|day: one row per local hour or day (default: the
    last 24 hours, the last 30 days), empty ones included, with a bar."""
    span = {"hour": 3600, "day": 86400}[args.by]
    if since is None:
        since = now - 24 * span if span == 3600 else now - 30 * span
    first, sums = local_start(since, span), {}
    for start, h in store.history_series(first, args.queue):
        if start == 0:
            continue                     # counted before the history began
        acc = sums.setdefault(local_start(start, span), dict.fromkeys(h, 0))
        for k, v in h.items():
            acc[k] = max(acc[k], v) if k == "rss_max" else acc[k] + v
    empty = dict.fromkeys([c for c, _ in HISTORY_SUMS] + ["rss_max"], 0)
    rows = []
    t = first
    while t <= now:
        rows.append({"start": show_time(iso(t)), **history_figures(sums.get(t, empty))})
        nxt = local_start(t + span + 3600 if span == 86400 else t + span, span)
        t = nxt if nxt > t else t + span         # a day whose midnight was skipped
    if args.json:
        print_json(rows)
        return EXIT_OK
    top = max(r["attempts"] for r in rows)
    fmt = "%Y-%m-%d %H:%M" if span == 3600 else "%Y-%m-%d %a"
    print(table([args.by.upper(), "JOBS", "FAILED", "RUN p50", "RUN p95", ""],
                [[time.strftime(fmt, time.localtime(epoch(r["start"]))), r["attempts"],
                  r["failures"], short_duration(r["run_p50"]), short_duration(r["run_p95"]),
                  bar(r["attempts"], top)] for r in rows], term_width()))
    return EXIT_OK

SCHEDULE_NOT_ENQUEUE = ("id", "unique", "stdin", "json", "run_at", "delay", "after",
                       "if_busy")

# Commands: schedules ---------------------------------------------------------

def cmd_schedule_list(args):
    """Schedules, their next and last runs."""
    return schedule_list(open_store(args), args, time.time())

def cmd_schedule_rm(args):
    """Remove a schedule, and its environment unless a job uses it."""
    store = open_store(args)
    name = store.remove_schedule(args.name)
    print(f"schedule {name} removed (its jobs stay)")
    return EXIT_OK

def cmd_schedule_pause(args, pause=True):
    """Fire no slot until resumed; resumed, from the next slot on (no
    catch-up of the pause)."""
    store, now = open_store(args), time.time()
    sch = store.schedule(args.name)
    _, at = next_slot(Cron(sch["cron"]), now=now)
    store.pause_schedule(sch["name"], pause, at, slot_label(now_label(now)))
    print(f"schedule {sch['name']} " + ("paused" if pause else
                                         f"resumed; next run {local_time(at, now)}"))
    wake_workers(args.home)
    return EXIT_OK

def cmd_schedule_resume(args):
    return cmd_schedule_pause(args, pause=False)

def cmd_schedule_run(args):
    """A schedule's job, once, now (after the last, with overlap skip)."""
    store, now = open_store(args), time.time()
    sch = store.schedule(args.name)
    with store.tx():
        job_id, _ = store.insert({**schedule_spec(sch), "id": f"{sch['name']}@run-{new_id()}"},
                                 now, sch["env_id"], sch["umask"], schedule=sch["name"])
    wake_workers(args.home)
    print(job_id)
    return EXIT_OK

def cmd_schedule_add(args):
    """A schedule: a cron expression and the job each of its slots becomes."""
    check_name(args.name, "schedule name", 100)    # NAME@2026-12-01T03:00 is an id
    cron = Cron(args.cron)
    opts, command = schedule_words(args)
    args.job = []
    args.parser.parse_args(opts, namespace=args)
    check_arguments(args)
    args.job = ["--"] + command if command else []
    for name in SCHEDULE_NOT_ENQUEUE:
        setattr(args, name, False if name in ("unique", "stdin", "json") else None)
    (_, spec), = parse_specs(args)
    spec.pop("run_at", None)
    fixed = sorted(set(spec) & {"id", "unique", "depends_on", "if_busy", "delay"})
    if fixed:
        raise UsageError(f"a schedule's job cannot have {', '.join(fixed)}: each slot "
                         "makes its own id, and --overlap says what a busy one does")
    blob = umask = None
    if not args.worker_env:
        blob, umask = captured_env(), current_umask()
    overlap = args.overlap or "skip"
    if overlap not in ("skip", "queue"):
        raise UsageError(f"invalid --overlap {overlap!r}: use skip (the default: no "
                         "new run while the last one waits or runs) or queue")
    catch_up = 1 if args.catch_up is None else check_value("catch_up", args.catch_up,
                                                           "--catch-up", text=True)
    jitter = 0 if args.jitter is None else check_value("jitter", args.jitter, "--jitter",
                                                       text=True)
    now = time.time()
    label, at = next_slot(cron, now=now)
    store = open_store(args, create=True)
    store.add_schedule(args.name, cron.text, spec, blob, umask, overlap, catch_up, jitter,
                       now, slot_label(now_label(now)), at)
    wake_workers(args.home)
    print(f"schedule {args.name}: next run {local_time(at, now)} ({relative(iso(at), now)})")
    if not store.live_workers():
        sys.stderr.write("queuectl: note: no worker is running on this home, so nothing "
                         "fires until one does: queuectl worker start\n")
    return EXIT_OK

def schedule_words(args):
    """schedule add's argv read as enqueue reads its own (argparse gives
    every word after NAME CRON to COMMAND): (the options with NAME and
    CRON, the command's words). Options come first; the command is what
    follows --, verbatim, or starts at the first other word; 1.0's form, a
    quoted command line followed by options, is read too."""
    raw = list(args.argv)
    at = raw.index("schedule")
    raw = raw[raw.index("add", at) + 1:]
    takes_value = {f: kw.get("action") != "store_true" for flags, kw in args.specs
                   for f in flags if f.startswith("-")}
    takes_value["--home"] = True         # every command's own option
    opts, positional, i = [], [], 0

    def option(j):
        n = 2 if takes_value.get(raw[j].partition("=")[0]) and "=" not in raw[j] else 1
        opts.extend(raw[j:j + n])
        return j + n
    while i < len(raw):
        word = raw[i]
        if word == "--":
            return opts + positional, raw[i + 1:]
        if word.startswith("-") and word != "-":
            i = option(i)
        elif len(positional) < 2:
            positional.append(word)
            i += 1
        else:
            break
    command = raw[i:]
    if len(command) > 1 and not quoted_then_options(command):
        warn_options_in_command(args, command)
    if quoted_then_options(command):
        j, more = 1, []                  # 'cmd arg' --queue q
        while j < len(command) and command[j].startswith("-") and command[j] != "--":
            n = 2 if takes_value.get(command[j].partition("=")[0]) \
                and "=" not in command[j] else 1
            more.extend(command[j:j + n])
            j += n
        if j < len(command):
            raise UsageError("give the command as one quoted argument or as separate "
                             "words, not both: queuectl schedule add NAME CRON 'cmd arg' "
                             "or queuectl schedule add NAME CRON -- cmd arg")
        opts.extend(more)
        command = command[:1]
    return opts + positional, command

def schedule_overdue(sch, now):
    """The dead man's switch: a line when two slots of a schedule that is
    not paused have come since its last success (or since it was added)."""
    if sch["paused"]:
        return None
    since = sch["last_success"] or epoch(sch["created_at"])
    # Two slots have come since the last success (or since it was added).
    passed = 0
    for t in Cron(sch["cron"]).slots_after(now_label(since)):
        if local_instant(t) > now or passed == 2:
            break
        passed += 1
    if passed < 2:
        return None
    what = (f"since {human_time(sch['last_success'])}" if sch["last_success"]
            else "since it was added " + relative(sch["created_at"], now))
    return (f"schedule {sch['name']} ({sch['cron']}) has not succeeded {what}: its "
            f"last two slots passed without a success; last run: "
            f"{sch['last_job'] or 'none'}")

def schedule_list(store, args, now):
    rows = []
    for sch in store.schedules():
        last = store.get(sch["last_job"]) if sch["last_job"] else None
        try:
            command = _loads(sch["spec"], {}).get("command")
        except ValueError:
            command = None               # doctor says what is wrong with it
        rows.append({"name": sch["name"], "cron": sch["cron"], "command": command,
                     "paused": bool(sch["paused"]),
                     "next_run": None if sch["paused"] else show_time(iso(sch["next_at"])),
                     "last_job": sch["last_job"], "last_state": last and last["state"],
                     "last_success": sch["last_success"] and show_time(
                         iso(sch["last_success"])),
                     "skips": sch["skips"], "last_skip": sch["last_skip"],
                     "overlap": sch["overlap"], "catch_up": sch["catch_up"],
                     "jitter": sch["jitter"]})
    if args.json:
        print_json(rows)
        return EXIT_OK
    if not rows:
        print("no schedules")
        return EXIT_OK
    print(table(["NAME", "SCHEDULE", "NEXT", "LAST RUN", "OUTCOME", "SKIPS", "COMMAND"],
                [[r["name"], r["cron"], "paused" if r["paused"] else
                  local_time(epoch(r["next_run"]), now),
                  r["last_job"] or "-", r["last_state"] or "-", r["skips"],
                  one_line(r["command"] or "")] for r in rows], term_width(),
                color_col=4, shrink=((6, 12), (6, 8)), drop=(5, 1)))
    return EXIT_OK

# Commands: why and limits ----------------------------------------------------

def cmd_why(args):
    """Why a job is not running now: one line per reason (or how it ended)."""
    store, now = open_store(args), time.time()
    job = store.must_get(args.id)
    reasons = why_reasons(store, job, now)
    if reasons[0][0] == "ready":
        # The claim's own order (scheduling_mode), counted by the claim's rule.
        cfg = Config(args.home).load()
        served = [_loads(w["queues"], None) for w in store.live_workers()]
        queues = None if None in served else sorted({q for qs in served for q in qs})
        n = store.ahead(job, ClaimOrder(cfg), now, queues)
        mode = queue_config(cfg, job["queue"])["scheduling_mode"]
        rule = ("priority ignored, the earlier due first" if mode == "fifo" else
                "higher priority first, then the earlier due")
        reasons[0] = ("ready", "nothing holds it back: a worker claims it next" if not n else
                      f"nothing holds it back: a worker claims it after the {plural(n, 'due job')}"
                      f" ahead of it (scheduling_mode {mode}: {rule})",
                      {"ahead": n, "scheduling_mode": mode})
    if args.json:
        print_json({"id": job["id"], "state": job["state"],
                    "reasons": [{"code": c, "text": t, **d} for c, t, d in reasons]})
    else:
        sys.stdout.write("".join(f"{job['id']}: {t}\n" for _, t, _ in reasons))
    return EXIT_OK

def cmd_limit_set(args):
    """At most N running jobs hold KEY."""
    key = check_limit_key(args.key)
    n = check_value("key_limit", args.n, "N", text=True)
    open_store(args, create=True).set_limit(key, n)
    print(f"{key}: at most {n} running")
    wake_workers(args.home)              # a raised limit lets more run now
    return EXIT_OK

def cmd_limit_rm(args):
    """Remove a limit (a key: 1 again; a queue: none)."""
    key = check_limit_key(args.key)
    if not open_store(args).remove_limit(key):
        raise QueuectlError(f"key {key} has no limit set")
    print(f"{key}: " + ("no limit" if key.startswith(QUEUE_KEY) else
                        "at most 1 running (the default)"))
    wake_workers(args.home)
    return EXIT_OK

def cmd_limit_list(args):
    """Limits set, and keys in use, with what holds them and what waits."""
    store = open_store(args)
    limits, held = store.limits(), store.held()
    waiting = store.keys_waiting()
    _, per_queue = store.counts()
    waiting.update((k, per_queue.get(k[len(QUEUE_KEY):], {}).get(PENDING, 0)
                    + per_queue.get(k[len(QUEUE_KEY):], {}).get(FAILED, 0))
                   for k in limits if k.startswith(QUEUE_KEY))
    keys = sorted(set(limits) | {k for k in held if not k.startswith(QUEUE_KEY)}
                  | set(waiting))
    rows = [{"key": k, "limit": limits.get(k, 1), "set": k in limits,
             "running": held.get(k, 0), "waiting": waiting.get(k, 0)} for k in keys]
    if args.json:
        print_json(rows)
    elif not rows:
        print("no limits set and no job holds a key")
    else:
        print(table(["KEY", "LIMIT", "RUNNING", "WAITING"],
                    [[r["key"], r["limit"] if r["set"] else f"{r['limit']} (default)",
                      r["running"], r["waiting"]] for r in rows], term_width()))
    return EXIT_OK

def allowed_attempts(job, cfg):
    """How many attempts a job may have: its retries (effective) + 1."""
    return effective(job, cfg, ("max_retries",))["max_retries"][0] + 1

def outcome_text(job):
    """What came of a job, for list: the pid of a running one, the exit of
    a finished one and how long it ran, the last error of a failed one."""
    state = job["state"]
    if state == PROCESSING:
        return f"pid {job['pid']}" if job["pid"] else "starting"
    if state == PENDING:
        return "-"
    ran = ""
    if job["started_at"] and job["finished_at"]:
        ran = f", ran {human_duration(epoch(job['finished_at']) - epoch(job['started_at']))}"
    if state == COMPLETED:
        return f"exit 0{ran}"
    if state == CANCELLED:
        return "cancelled"
    return one_line(job["last_error"]) + (ran if state == DEAD else "")

# Commands: logs and wait -----------------------------------------------------

def cmd_logs(args):
    """Print a job's log; --tail N lines; --follow until the job ends, then
    exit as wait does: 0 completed, 1 dead or cancelled, 3 stuck."""
    store = open_store(args)
    if args.id is None:                  # like tsp -c: the latest job's
        args.id = store.last_started()
        if args.id is None:
            raise QueuectlError("no job has started yet; name one: queuectl logs ID")
    job = store.must_get(args.id)
    path = log_path(args.home, job["id"])
    out = sys.stdout.buffer
    f = open_log(path)
    if f is None and job["started_at"] is None and job["attempts"] == 0:
        sys.stderr.write(f"queuectl: note: job {job['id']} has not started yet "
                         f"({when_text(store, job, time.time())}); its log is empty\n")
    if f is None and not args.follow:
        return EXIT_OK
    pos = 0
    if f is not None:
        with f:
            pos = tail_start(f, args.tail) if args.tail is not None else 0
            pos = copy_from(path, pos, out)
    if not args.follow:
        return EXIT_OK
    at, end = [pos], [None]

    def ended():
        at[0] = copy_from(path, at[0], out)
        now = store.get(job["id"])
        if now is None or now["state"] in FINISHED:
            end[0] = now and now["state"]
        elif now["blocked"] and job["id"] in store.stuck():
            end[0] = "stuck"
        return end[0] is not None or now is None
    poll_until(ended, first=0.05, cap=0.5)       # until the job ends: no limit
    copy_from(path, at[0], out)
    if end[0] == COMPLETED:
        return EXIT_OK
    sys.stderr.write(f"queuectl: error: job {job['id']} " + (
        "was deleted" if end[0] is None else
        "can never run: {} waits on {}".format(
            job["id"], stuck_text(*store.stuck().get(job["id"], ("?", "?"))))
        if end[0] == "stuck" else f"is {end[0]}") + "\n")
    return EXIT_STUCK if end[0] == "stuck" else EXIT_FAIL

def tail_start(f, n):
    """Offset where the last n lines of binary file f start."""
    f.seek(0, 2)
    end = f.tell()
    if n == 0:
        return end
    pos, found = end, 0
    block = 65536
    # A final newline ends the last line; it does not start a new one.
    if end:
        f.seek(end - 1)
        if f.read(1) == b"\n":
            found = -1
    while pos > 0:
        step = min(block, pos)
        pos -= step
        f.seek(pos)
        data = f.read(step)
        i = len(data)
        while True:
            i = data.rfind(b"\n", 0, i)
            if i < 0:
                break
            found += 1
            if found == n:
                return pos + i + 1
    return 0

def copy_from(path, pos, out):
    """Copy a file from offset pos to out; the new offset."""
    f = open_log(path)
    if f is not None:
        with f:
            f.seek(pos)
            while True:
                chunk = f.read(1 << 16)
                if not chunk:
                    break
                out.write(chunk)
                pos += len(chunk)
    out.flush()
    return pos

def cmd_wait(args):
    """Block until every job is finished or can never run until a person
    acts. Exit 0: all completed; 1: one ended dead or cancelled (or was
    deleted); 3: one waits on a dead, cancelled or deleted dependency;
    124: --timeout ran out. With no ids: every job enqueued so far (of
    --queue), and a dead or cancelled one still in the home counts, however
    long ago it ended: the answer never depends on when wait started."""
    store = open_store(args)
    if args.ids:
        try:
            ids = list(dict.fromkeys(store.resolve(i) for i in args.ids))
        except QueuectlError as e:       # exit 2, as an unknown id: a script's mistake
            raise UsageError(str(e)) from None
        missing = [i for i in ids if i not in store.states(ids)]
        if missing:                      # exit 2: a script's mistake
            raise UsageError(f"no job with id {missing[0]!r}")
        if args.queue or args.label:
            raise UsageError("give job ids, or --queue and --label, not both")
    seq = store.max_seq()
    fault("wait-began")
    # Hooks report on jobs, they are not the work: a bare wait leaves them out.
    where, params = f" AND queue != '{HOOK_QUEUE}'", []
    if args.queue:
        where, params = f" AND queue IN ({_marks(args.queue)})", list(args.queue)
    if args.label:
        where += f" AND label IN ({_marks(args.label)})"
        params += args.label
    left, stuck = {}, {}
    progress = Progress()

    def settled():
        if progress.on:                  # at a terminal: what has happened so far
            progress.show(progress.counts(store.selection_counts(
                ids if args.ids else None, seq, where, params)), force=True)
        rows = store.open_jobs(ids=ids if args.ids else None, up_to=seq, where=where,
                               params=params)    # a deleted job has settled too
        left.clear()
        left.update((i, s) for i, s, _ in rows)
        stuck.clear()
        if any(b for _, _, b in rows):   # only then can one be stuck
            stuck.update((j, why) for j, why in store.stuck().items() if j in left)
        return len(stuck) == len(left)
    try:
        finished = poll_until(settled, args.timeout, first=0.02, cap=0.5)
    finally:
        progress.clear()
    if not finished:
        waiting = [f"{i} ({s})" for i, s in left.items() if i not in stuck]
        sys.stderr.write(f"queuectl: error: timed out after {human_duration(args.timeout)}; "
                         f"still waiting for {len(waiting)} job"
                         f"{'s' if len(waiting) != 1 else ''}: {', '.join(waiting[:5])}"
                         f"{', …' if len(waiting) > 5 else ''}\n")
        return EXIT_TIMEOUT
    if args.ids:
        states = store.states(ids)
        bad = [(i, states.get(i, "deleted")) for i in ids
               if states.get(i, "deleted") in (DEAD, CANCELLED, "deleted")]
    else:
        bad = store.not_completed(seq, where, params)
    parts = []
    if bad:
        dead = [i for i, s in bad if s == DEAD]
        parts.append(f"{plural(len(bad), 'job')} did not complete: "
                     + ", ".join(f"{i} {s}" for i, s in bad[:5]) + (", …" if len(bad) > 5 else "")
                     + (f" (see queuectl logs {dead[0]}, queuectl dlq list)" if dead else ""))
    if stuck:
        parts.append("; ".join(f"{j} waits on {stuck_text(dep, st)}"
                               for j, (dep, st) in list(stuck.items())[:5])
                     + ("; …" if len(stuck) > 5 else "")
                     + (": retry or remove that dependency, or cancel the job"
                        if any(st != "missing" for _, st in stuck.values()) else
                        ": cancel or remove the job"))
    if parts:
        sys.stderr.write("queuectl: error: " + "; ".join(parts) + "\n")
        return EXIT_FAIL if bad else EXIT_STUCK
    return EXIT_OK

# Commands: acting on jobs: retry, pause, cancel, dlq, remove, edit, prune ----

def selected_ids(store, args, allowed, default=None):
    """The ids a command acts on: those named, or those its selectors pick
    (--all, --state, --queue, --label: jobs in allowed states, default
    states unless --state names them); never both."""
    selectors = args.all or getattr(args, "state", None) or args.queue or args.label
    if bool(args.ids) == bool(selectors):
        raise UsageError("give job ids, or select jobs with --all, --state, --queue or "
                         "--label" + (" (not both)" if args.ids else ""))
    if args.ids:
        return list(dict.fromkeys(store.resolve(i) for i in args.ids))
    states = args.state or list(default or allowed)
    for st in states:
        if st not in allowed:
            raise UsageError(f"--state {st} is not allowed here; use "
                             + ", ".join(allowed))
    return [j["id"] for j in store.list_jobs(states, args.queue, 0, args.label)[0]]

def stuck_text(dep, state):
    """'fetch, which is dead' / 'fetch, which was deleted'."""
    return f"{dep}, which " + ("was deleted" if state == "missing" else f"is {state}")

def reset_jobs(store, ids, allowed, verb):
    """retry / dlq retry, all or nothing: dead, cancelled or completed jobs
    back to pending with attempts reset; a failed one (waiting out its
    backoff) runnable now, its attempts kept."""
    for job in [store.must_get(i) for i in ids]:
        wait_attempt_gone(store, job)
    now = time.time()
    with store.tx():             # read and change under one write lock
        jobs = [store.must_get(i) for i in ids]
        for job in jobs:
            wait_attempt_gone(store, job, timeout=0)
            if job["state"] not in allowed:
                raise QueuectlError(f"cannot {verb} job {job['id']}: it is "
                                    f"{job['state']}; only {', '.join(allowed)} jobs can be")
        for job in jobs:
            if job["state"] == FAILED:
                store.run_now(job["id"], now)
            else:
                store.reset(job, now)
    for job in jobs:                     # so the log tells the first run from this one
        _safe_append(store.home, job["id"], f"[queuectl] retried by hand ({verb}) at "
                     f"{human_time(now)}" + ("; runs now\n" if job["state"] == FAILED else
                                                 "; attempts start again at 1\n"))
    wake_workers(store.home)
    return jobs

def print_ids_or_count(args, ids, verb):
    """Named jobs: their ids, one a line; selected ones: how many."""
    if args.ids:
        sys.stdout.write("".join(i + "\n" for i in ids))
    else:
        print(f"{verb} {len(ids)} job{'s' if len(ids) != 1 else ''}")

def cmd_retry(args):
    """Dead, cancelled or completed jobs run again (attempts reset); a
    failed one waiting out its backoff runs now."""
    store = open_store(args)
    ids = selected_ids(store, args, STATE_CHOICES["retry"],
                       default=(DEAD, CANCELLED))
    print_ids_or_count(args, [j["id"] for j in reset_jobs(
        store, ids, (DEAD, CANCELLED, COMPLETED, FAILED), "retry")], "retried")
    return EXIT_OK

def cmd_pause(args):
    """Stop claiming from queues (all when none named); running jobs go on."""
    names = args.queues or ["*"]
    store = open_store(args, create=True)
    store.pause(names)
    print("paused: " + ("all queues" if names == ["*"] else ", ".join(names)))
    return EXIT_OK

def cmd_resume(args):
    """Claim from queues again (all when none named)."""
    names = args.queues
    store = open_store(args, create=True)
    store.resume(names)
    wake_workers(args.home)
    left = store.paused()
    print("resumed: " + (", ".join(names) if names else "all queues"))
    if "*" in left:
        sys.stderr.write("queuectl: note: all queues are still paused (by "
                         "'queuectl pause' with no queue); run 'queuectl resume' "
                         "to resume them all\n")
    return EXIT_OK

def cmd_cancel(args):
    """Cancel jobs: pending and failed ones at once; running ones get
    --signal (TERM), then KILL after --grace (config kill_grace); returns
    once their processes are gone."""
    try:
        cfg = Config(args.home).load()
    except UsageError:
        if args.grace is None:
            raise
        cfg = dict(CONFIG_DEFAULTS)      # --grace given: cancel all the same
        sys.stderr.write("queuectl: warning: config.json is unreadable: no default "
                         "on_cancel hook runs\n")
    grace = args.grace if args.grace is not None else cfg["kill_grace"]
    sig = parse_signal(args.signal)
    store = open_store(args)
    now = time.time()
    revoked, progress = [], Progress()
    try:
        with store.tx():         # read and change under one write lock
            ids = selected_ids(store, args, STATE_CHOICES["cancel"])
            jobs = [store.must_get(i) for i in ids]
            for job in jobs:
                if job["state"] not in (PENDING, FAILED, PROCESSING):
                    raise QueuectlError(f"cannot cancel job {job['id']}: it is "
                                        f"{job['state']}")
            for n, job in enumerate(jobs):
                progress.show(f"cancelling: {n}/{len(jobs)} jobs")
                # Before the commit: an attempt that has not started must
                # never start, even if this command dies right after it.
                if job["state"] == PROCESSING:
                    path = status_path(args.home, job["id"], job["claim"])
                    try:
                        job["revoked"] = revoke(path, job["worker"])
                    except OSError as e:
                        raise QueuectlError(f"cannot cancel job {job['id']} now: "
                                            f"{e.strerror or e}; try again") from None
                    if job["revoked"]:
                        revoked.append(path)
                # The claim stays: it names the cancelled attempt's
                # processes, and retry waits until none of them is left.
                store.cancel(job, now, cfg, grace)
    except BaseException:
        for path in revoked:     # nothing was cancelled: undo, all or nothing
            remove_file(path)
        raise
    finally:
        progress.clear()
    stop_attempts([j for j in jobs if j["state"] == PROCESSING and not j["revoked"]],
                  grace, sig)
    print_ids_or_count(args, [j["id"] for j in jobs], "cancelled")
    return EXIT_OK

def parse_signal(text):
    """'TERM', 'SIGTERM', 'term' or '15' -> a signal number."""
    import signal
    name = str(text).strip().upper()
    try:
        return signal.Signals(int(name)) if name.isascii() and name.isdigit() else \
            signal.Signals[name if name.startswith("SIG") else "SIG" + name]
    except (KeyError, ValueError):
        raise UsageError(f"invalid --signal {text!r}: use a name such as TERM, "
                         "INT, HUP or KILL, or a number") from None

def stop_attempts(jobs, grace, sig):
    """Stop what is left of cancelled attempts that had started: their
    process groups (by the recorded pid, even once the shell itself has
    ended, or found by the claim token) and every process that carries
    their claim: sig to all, then SIGKILL to what is left after grace
    seconds. (Their workers wait for them to end, and kill them past the
    grace should this command not live that long.)"""
    import signal
    attempts = []
    for job in jobs:
        pid, start = job["pid"], job["pid_start"]
        if not (same_process(pid, start) or pid and our_group(pid, start)):
            try:                            # younger than PID_DELAY: find it in /proc
                pid, start = find_job_process(job["claim"])
            except OSError:
                pid = None
        attempts.append((job["claim"], pid, start))

    def send(s):
        for token, pid, _ in attempts:
            if pid:
                signal_group(pid, s)
            kill_claim(token, s, but_group=pid)

    def ended():
        return not any(attempt_alive(t, p, s) for t, p, s in attempts)
    send(sig)
    if attempts and not poll_until(ended, grace, first=0.005):
        send(signal.SIGKILL)
        poll_until(ended, 5, first=0.005)

def wait_attempt_gone(store, job, timeout=10.0, verb="retry"):
    """Wait until a cancelled job's last attempt has ended, else refuse: a
    job never runs while its previous attempt does. It has ended once its
    worker let go of its claim (no process of its group or claim left), or,
    when that worker is gone or past its lease, once none is seen."""
    if job["state"] != CANCELLED or not job["claim"]:
        return
    left = []

    def gone():
        row = store.get(job["id"]) if timeout else job
        if not row or row["state"] != CANCELLED or row["claim"] != job["claim"]:
            return True
        owner = [w for w in store.workers() if w["id"] == row["worker"]]
        if owner and worker_alive(store.home, owner[0]) and not worker_stale(owner[0]):
            left[:] = [(row["pid"], None)]       # it lets go once they are gone
            return False
        try:
            left[:] = claim_processes(job["claim"])
        except OSError:
            left[:] = [(None, None)]             # cannot tell: not gone
        if not left and row["pid"] and our_group(row["pid"], row["pid_start"]):
            left[:] = [(row["pid"], None)]
        return not left
    if not poll_until(gone, timeout, first=0.01, cap=0.05):
        pid = f" (pid {left[0][0]})" if left[0][0] else ""
        raise QueuectlError(f"cannot {verb} job {job['id']}: its cancelled attempt "
                            f"still has running processes{pid}; try again once "
                            "they have stopped")

def cmd_dlq_list(args):
    """Dead jobs: those that failed for good."""
    return list_jobs(open_store(args), args, [DEAD])

def cmd_dlq_retry(args):
    """Dead jobs run again, attempts reset."""
    args.state = None
    store = open_store(args)
    ids = selected_ids(store, args, (DEAD,))
    print_ids_or_count(args, [j["id"] for j in reset_jobs(
        store, ids, (DEAD,), "dlq retry")], "retried")
    return EXIT_OK

def cmd_dlq_purge(args):
    """Dead jobs deleted, with their logs."""
    args.state = None
    store = open_store(args)
    jobs = [store.must_get(i) for i in selected_ids(store, args, (DEAD,))]
    for job in jobs:
        if job["state"] != DEAD:
            raise QueuectlError(f"cannot purge job {job['id']}: it is {job['state']}, "
                                "not dead")
    n = delete_jobs(store, [j["id"] for j in jobs], (DEAD,))
    print(f"purged {n} job{'s' if n != 1 else ''}")
    return EXIT_OK

def delete_jobs(store, ids, states):
    """Delete the jobs of ids still in states, and their logs, in batches;
    how many were deleted. A cancelled job whose attempt has not ended
    (claim set) stays: its id must not be reused while they run, and its
    keys are held until a worker sees its end."""
    deleted, progress = 0, Progress()
    for i in range(0, len(ids), 500):
        progress.show(f"deleting: {i}/{len(ids)} jobs")
        batch = ids[i:i + 500]
        with store.tx():         # only jobs still finished: one retried meanwhile stays
            gone = store.delete(batch, states)
            # Under the write lock: no job of the same id can be enqueued
            # and start a new log before these are gone.
            for job_id in gone:
                remove_file(log_path(store.home, job_id))
        deleted += len(gone)
    progress.clear()
    return deleted

def cmd_remove(args):
    """Delete jobs that are not running, and their logs; refused for a job
    that unfinished jobs (not removed with it) depend on."""
    store = open_store(args)
    ids = list(dict.fromkeys(store.resolve(i) for i in args.ids))
    for job in [store.must_get(i) for i in ids]:
        wait_attempt_gone(store, job, verb="remove")
    with store.tx():
        for job in [store.must_get(i) for i in ids]:
            if job["state"] == PROCESSING:
                raise QueuectlError(f"cannot remove job {job['id']}: it is running; "
                                    "cancel it first")
            wait_attempt_gone(store, job, timeout=0, verb="remove")
            if job["state"] == CANCELLED and job["claim"]:
                store.let_go_cancelled(job["id"], job["claim"])
        waiting = [(j, d) for j, d in store.waiting_on(ids) if j not in ids]
        if waiting:
            j, d = waiting[0]
            raise QueuectlError(f"cannot remove job {d}: job {j} waits on it; "
                                f"remove or cancel {j} too")
        gone = set(store.delete(ids, [s for s in STATES if s != PROCESSING]))
        for job_id in gone:      # under the write lock, as in delete_jobs
            remove_file(log_path(store.home, job_id))
    sys.stdout.write("".join(i + "\n" for i in ids if i in gone))
    return EXIT_OK

def cmd_edit(args):
    """Change a pending, failed or dead job: with flags, or in $EDITOR as
    JSON; checked as enqueue checks a job."""
    words = list(args.words or [])
    if words and words[0].startswith("-"):    # options after the ID, then -- CMD
        cut = words.index("--") if "--" in words else len(words)
        opts, words = words[:cut], words[cut + 1:]
        args.words = []
        args.parser.parse_args(opts + [args.id], namespace=args)
        if args.words:
            raise UsageError("put a new command after --: queuectl edit ID "
                             "[OPTIONS] -- COMMAND")
        check_arguments(args)
    store = open_store(args)
    job = store.must_get(args.id)
    editable = (PENDING, FAILED, DEAD)
    if job["state"] not in editable:
        raise QueuectlError(f"cannot edit job {job['id']}: it is {job['state']}; "
                            f"only {', '.join(editable)} jobs can be")
    spec = {"command": job["command"], "queue": job["queue"], "priority": job["priority"],
            "max_retries": job["max_retries"], "timeout": job["timeout"],
            "run_at": show_time(job["run_at"]), "cwd": job["cwd"],
            "env": _loads(job["env"], {})}
    flags = {"queue": args.queue, "priority": args.priority, "max_retries": args.max_retries,
             "timeout": args.timeout, "cwd": args.cwd, "run_at": args.run_at}
    command = args.command if args.command is not None else (
        (words[0] if len(words) == 1 else shell_join(words)) if words else None)
    if args.command is not None and words:
        raise UsageError("give the new command once: as words or as --command")
    changes = {k: v for k, v in flags.items() if v is not None}
    if command is not None:
        changes["command"] = command
    if args.delay is not None:
        if args.run_at is not None:
            raise UsageError("give --run-at or --delay, not both")
        changes["delay"] = args.delay
        spec.pop("run_at")
    env = dict(spec["env"])
    for kv in args.env or []:
        k, sep, v = kv.partition("=")
        env[k] = v if sep else os.environ.get(k)
        if env[k] is None:
            raise UsageError(f"--env {k}: {k} is not set here; give --env {k}=VALUE")
    for k in args.unset_env or []:
        env.pop(k, None)
    if args.env or args.unset_env:
        changes["env"] = env
    if changes:
        spec.update(changes)
    else:
        if not sys.stdin.isatty():
            raise UsageError("edit needs a change (--priority, --run-at, -- COMMAND, …), "
                             "or a terminal to open the job in $EDITOR")
        spec = edit_in_editor(args.home, job, spec)
    cwd_kept = args.cwd is None and spec["cwd"] == job["cwd"]
    if cwd_kept:                 # it may be gone by now: only a new one is checked
        spec.pop("cwd")
    hook_queue = spec.get("queue") == HOOK_QUEUE == job["queue"]
    if hook_queue:               # a hook stays a hook (no user job may join _hooks)
        spec.pop("queue")
    check_spec(spec)
    if cwd_kept:
        spec["cwd"] = job["cwd"]
    if hook_queue:
        spec["queue"] = HOOK_QUEUE
    with store.tx():
        if not store.edit(job, spec, time.time()):
            now = store.get(job["id"])
            raise QueuectlError(f"job {job['id']} changed while it was being edited "
                                f"(it is {now['state'] if now else 'deleted'} now); "
                                "nothing was changed")
    wake_workers(args.home)
    print(job["id"])
    return EXIT_OK

def edit_in_editor(home, job, spec):
    """The job's spec as JSON in $VISUAL or $EDITOR (vi); the edited spec.
    The file (with the job's --env values) is private, in HOME/run."""
    import json
    import signal
    import subprocess

    def interrupted(signum, frame):
        raise KeyboardInterrupt
    path = os.path.join(run_dir(home), f"edit-{job['id']}-{new_id()}.json")
    for sig in (signal.SIGTERM, signal.SIGHUP):  # the file holds --env values
        signal.signal(sig, interrupted)
    fd = open_private(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        os.write(fd, (json.dumps(spec, indent=2) + "\n").encode())
        os.close(fd)
        editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
        rc = subprocess.call(["/bin/sh", "-c", editor + ' "$1"', "editor", path])
        if rc != 0:
            raise QueuectlError(f"the editor ({editor}) exited {rc}; nothing was changed")
        with open(path, encoding="utf-8") as f:
            text = f.read()
    finally:
        remove_file(path)
    new = json_object(text, "the edited job", "; nothing was changed")
    if new.get("id", job["id"]) != job["id"]:
        raise UsageError("a job's id cannot be edited; nothing was changed")
    new.pop("id", None)
    fixed = set(new) - set(spec) - {"delay"}
    if fixed & SPEC_FIELDS:
        raise UsageError(f"{', '.join(sorted(fixed & SPEC_FIELDS))} cannot be edited; "
                         "nothing was changed")
    new = {**spec, **new}        # a field left out keeps its value
    if new == spec:
        raise QueuectlError("no change; nothing was changed")
    if "delay" in new:
        new.pop("run_at")
    return new

def cmd_prune(args):
    """Delete finished jobs older than --older-than, and their logs. Dead
    jobs only with --state dead: the DLQ is for a person to read."""
    age = parse_duration(args.older_than, "--older-than")
    states = args.state or [COMPLETED, CANCELLED]
    for st in states:
        if st not in STATE_CHOICES["prune"]:
            raise UsageError(f"prune removes only finished jobs; --state takes "
                             f"{', '.join(FINISHED)}, not {st!r}")
    store = open_store(args)
    ids = store.finished_before(states, iso(time.time() - age))
    if args.dry_run:
        sys.stdout.write("".join(i + "\n" for i in ids))
        print(f"would prune {len(ids)} job{'s' if len(ids) != 1 else ''}", file=sys.stderr)
        return EXIT_OK
    if age == 0 and ids and not args.yes and sys.stdin.isatty() \
            and (store.waiting() or store.live_workers()):
        sys.stderr.write(f"queuectl: prune --older-than 0 deletes all {len(ids)} "
                         f"finished jobs ({', '.join(states)}), even ones that ended a "
                         "moment ago, while this home is busy. Delete them? [y/N] ")
        sys.stderr.flush()
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            raise QueuectlError("nothing was pruned (--yes skips this question)")
    n = delete_jobs(store, ids, states)
    store.roll_up_history(time.time())   # the history itself is kept, bounded
    store.reclaim_space()
    print(f"pruned {n} job{'s' if n != 1 else ''}")
    return EXIT_OK

# Commands: config ------------------------------------------------------------

def cmd_config_set(args):
    """Set one setting (KEY or queue.NAME.KEY)."""
    cfg = Config(args.home)
    key = normalize_key(args.key)
    value = parse_config_text(key, args.value)
    try:
        ensure_private_dir(args.home)
        check_private(args.home, "home directory")
        cfg.set(key, value)
    except OSError as e:        # a full disk is no usage error: exit 1
        raise QueuectlError(f"cannot write {cfg.path}: {e.strerror}") from None
    print(f"{key} = {value}")
    return EXIT_OK

def cmd_config_get(args):
    """One setting; a queue's that is not set: the home's value applies.
    With no key, every setting (as config list)."""
    if args.key is None:
        return cmd_config_list(args)
    key = normalize_key(args.key)
    values = Config(args.home).load()
    value = values.get(key, values[key.rpartition(".")[2]])
    print_json(value) if args.json else print(value)
    return EXIT_OK

def cmd_config_list(args):
    """Every setting, defaults marked."""
    cfg = Config(args.home)
    values, explicit = cfg.load(), cfg.read_set()
    if args.json:
        print_json(values)
        return EXIT_OK
    for k, v in values.items():
        note = "" if k in explicit else "  (default)"
        print(f"{k} = {v}{note}")
    return EXIT_OK

# Commands: top and completion ------------------------------------------------

def cmd_top(args):
    """A live view refreshed in place; q or Ctrl-C to quit."""
    if args.interval <= 0:
        raise UsageError("invalid --interval: use a number of seconds above 0")
    store = open_store(args)
    if args.once or not (sys.stdout.isatty() and sys.stdin.isatty()):
        if not args.once:
            raise UsageError("top needs a terminal; use 'top --once' or 'status'")
        print(render_top(store, args.home, term_width(), 10_000, live=False))
        return EXIT_OK
    import signal
    import termios
    import tty
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    out = sys.stdout

    def leave(signum, frame):            # SIGTERM, SIGHUP: the terminal is put back
        raise KeyboardInterrupt
    handlers = {sig: signal.signal(sig, leave) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        tty.setcbreak(fd)
        out.write("\x1b[?1049h\x1b[?25l")          # alternate screen, no cursor
        while True:
            size = os.get_terminal_size(out.fileno())
            frame = render_top(store, args.home, size.columns, size.lines - 1)
            # Over the last frame, line by line (no clear: no flicker over ssh).
            out.write("\x1b[H" + frame.replace("\n", "\x1b[K\r\n") + "\x1b[K\x1b[J")
            out.flush()
            if readable([fd], args.interval):
                if os.read(fd, 64).lower().startswith(b"q"):
                    break
    except KeyboardInterrupt:
        pass
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        out.write("\x1b[?25h\x1b[?1049l")
        out.flush()
        for sig, h in handlers.items():
            signal.signal(sig, h)
    return EXIT_OK

def cmd_help(args):
    """The manual at the terminal: the README's sections (keys, hooks,
    schedules, retry policy, exit codes...), read from the README.md beside
    this file (make install puts one there): one source, no second copy."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise QueuectlError(f"cannot read the manual {path}: {e.strerror}; queuectl --help "
                            "lists the commands") from None
    import re
    text = re.sub(r"<!--.*?-->\n?", "", text, flags=re.S)
    sections = {}
    for part in re.split(r"(?m)^(?=## )", text)[1:]:
        sections[part.split("\n", 1)[0][3:]] = part.rstrip() + "\n"
    topic = " ".join(args.topic or []).strip().lower()
    if not topic:
        print("queuectl help TOPIC prints one of these sections of the manual:\n  "
              + "\n  ".join(sections))
        return EXIT_OK
    found = [t for t in sections if topic in t.lower()] or \
        [t for t in sections if all(w in t.lower() for w in topic.split())]
    if not found:
        raise UsageError(f"no section of the manual is about {topic!r}; queuectl help "
                         "lists them")
    sys.stdout.write(sections[found[0]])
    return EXIT_OK

def cmd_completion(args):
    """Print a shell completion script: bash, zsh or fish. Job ids and queue
    names come from the live home (queuectl __complete), bounded in time."""
    spec = completion_spec()
    print({"bash": bash_completion, "zsh": zsh_completion,
           "fish": fish_completion}[args.shell](spec))
    return EXIT_OK

COMPLETE_BUDGET = 0.06       # seconds __complete may spend in the database

def complete_values(argv):
    """queuectl __complete ids|queues|keys [HOME]: words for a completion
    script, one a line; nothing on any error or past the time budget (a
    shell waits for this while a person types)."""
    kind = argv[0] if argv else ""
    if kind == "keys":
        print("\n".join(CONFIG_DEFAULTS))
        return EXIT_OK
    words = []
    try:
        home = resolve_home(argv[1] if len(argv) > 1 else None)
        words = Store.read_only(home, COMPLETE_BUDGET).completion_words(kind)
    except Exception:            # no home, not a db: nothing
        pass
    words = list(dict.fromkeys(w for w in words if w != "*"))
    sys.stdout.write("".join(w + "\n" for w in words))
    return EXIT_OK

def completion_kind(words, name):
    """What a command's positional argument completes to: the live words
    of complete_values (@ids; only the jobs the command can act on for
    cancel, retry and dlq) or None."""
    if name in ("id", "ids"):
        return {"cancel": "@cancel", "retry": "@retry", "dlq": "@dead"}.get(words[0], "@ids")
    if name == "name" and words[0] == "schedule" and words[-1] != "add":
        return "@schedules"
    if name == "key":
        return "@keys" if words[0] == "config" else "@limits"
    return {"queues": "@queues"}.get(name)

def completion_spec():
    """[(words typed so far, [flags and actions], positional kind, {flag:
    values})], longest paths first. A kind or value is @ids, @queues or
    @keys (from the live home), or a list of words."""
    cases = [((), sorted(COMMAND_NAMES, key=[c.words[0] for c in COMMAND_TABLE].index)
              + ["-h", "--help", "--home", "--version"], None, {"--home": "@dirs"})]
    for c in COMMAND_TABLE:
        extra = ["-h", "--help", "--home"]
        if c.handler is None:
            cases.append((c.words, actions_of(c.words[0]) + extra, None, {}))
            continue
        flags, positional, values = [], None, {"--home": "@dirs"}
        for names, kw in c.args:
            if not names[0].startswith("-"):
                if positional is None:   # the first word after the command's
                    positional = completion_kind(c.words, names[0]) or kw.get("choices")
                continue
            flags += names
            long = names[-1]
            if long == "--state":
                values[long] = list(STATE_CHOICES.get(c.words[-1], STATES))
            elif long in ("--queue", "--after"):
                values[long] = "@queues" if long == "--queue" else "@ids"
            elif long == "--signal":
                values[long] = ["TERM", "INT", "HUP", "KILL", "QUIT", "USR1", "USR2"]
            elif long == "--cwd":
                values[long] = "@dirs"
        cases.append((c.words, flags + extra, positional, values))
    return sorted(cases, key=lambda case: -len(case[0]))

def bash_completion(spec):
    """The bash script (zsh runs it too, through bashcompinit)."""
    lines = ["# queuectl completion for bash: source <(queuectl completion bash)",
             "_queuectl_live() {",
             "    # Live words from the home, never more than about 0.1 s.",
             "    local t=; command -v timeout >/dev/null 2>&1 &&",
             "        t=\"timeout ${QUEUECTL_COMPLETE_TIMEOUT:-0.1}\"",
             '    $t "${COMP_WORDS[0]}" __complete "$1" ${2:+"$2"} 2>/dev/null',
             "}",
             "_queuectl() {",
             "    # An id may hold a colon (NAME@2026-12-06T03:00), where bash splits",
             "    # words: the replies lose what bash keeps before the colon (as",
             "    # bash-completion's __ltrim_colon_completions does).",
             "    local colon= i",
             "    _queuectl_words",
             '    if [ -n "$colon" ]; then',
             "        for ((i = 0; i < ${#COMPREPLY[@]}; i++)); do",
             '            COMPREPLY[i]=${COMPREPLY[i]#"$colon"}',
             "        done",
             "    fi",
             "}",
             "_queuectl_words() {",
             "    [ -n \"${ZSH_VERSION-}\" ] && emulate -L ksh",
             '    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]}',
             '    local words=" ${COMP_WORDS[*]:1:$((COMP_CWORD - 1))} " opts= pos= vals= home= i',
             "    for ((i = 1; i < COMP_CWORD - 1; i++)); do",
             '        [ "${COMP_WORDS[i]}" = --home ] && home=${COMP_WORDS[i+1]}',
             "    done",
             '    if [ -z "${ZSH_VERSION-}" ] && [[ $COMP_WORDBREAKS == *:* ]] &&',
             '            [ -n "${COMP_LINE-}" ]; then',
             "        local line=${COMP_LINE:0:COMP_POINT} lw",
             '        read -ra lw <<< "$line"',
             '        if [[ ${line: -1} != [[:space:]] && ${lw[${#lw[@]}-1]} == *:* ]]; then',
             "            cur=${lw[${#lw[@]}-1]} prev=${lw[${#lw[@]}-2]}",
             '            colon=${cur%"${cur##*:}"} words=" ${lw[*]:1:${#lw[@]}-2} "',
             "        fi",
             "    fi",
             '    case "$words" in']
    for path, flags, positional, values in spec:
        pattern = '*" ' + " ".join(path) + ' "*' if path else "*"
        pos = (positional if isinstance(positional, str) or positional is None
               else ",".join(positional)) or ""
        vals = " ".join(f"{k}:{v if isinstance(v, str) else ','.join(v)}"
                        for k, v in values.items())
        lines.append(f'        {pattern}) opts="{" ".join(flags)}" pos="{pos}" vals="{vals}" ;;')
    lines += ["    esac",
              "    local v want",
              "    for v in $vals; do",
              '        if [ "$prev" = "${v%%:*}" ]; then',
              "            want=${v#*:}",
              '            case $want in',
              '                @dirs) COMPREPLY=($(compgen -d -- "$cur")) ;;',
              '                @*) COMPREPLY=($(compgen -W "$(_queuectl_live ${want#@} "$home")" '
              '-- "$cur")) ;;',
              '                *) COMPREPLY=($(compgen -W "${want//,/ }" -- "$cur")) ;;',
              "            esac",
              "            return 0",
              "        fi",
              "    done",
              '    if [ -n "$pos" ] && [ "${cur#-}" = "$cur" ]; then',
              '        case $pos in',
              '            @*) COMPREPLY=($(compgen -W "$(_queuectl_live ${pos#@} "$home")" '
              '-- "$cur")) ;;',
              '            *) COMPREPLY=($(compgen -W "${pos//,/ }" -- "$cur")) ;;',
              "        esac",
              "        return 0",
              "    fi",
              '    COMPREPLY=($(compgen -W "$opts" -- "$cur"))',
              "}",
              "complete -F _queuectl queuectl queuectl.py ./queuectl.py"]
    return "\n".join(lines)

def zsh_completion(spec):
    """zsh: the bash script, through zsh's own bashcompinit."""
    return ("# queuectl completion for zsh: source <(queuectl completion zsh)\n"
            "autoload -U +X compinit && compinit\n"
            "autoload -U +X bashcompinit && bashcompinit\n"
            + bash_completion(spec).split("\n", 1)[1])

def fish_completion(spec):
    """fish: one complete line per flag, action and argument."""
    groups = {c.words[0]: actions_of(c.words[0]) for c in COMMAND_TABLE if c.handler is None}
    lines = ["# queuectl completion for fish: queuectl completion fish | source",
             "function __queuectl_live",
             "    set -l limit 0.1; set -q QUEUECTL_COMPLETE_TIMEOUT; "
             "and set limit $QUEUECTL_COMPLETE_TIMEOUT",
             "    set -l t; command -sq timeout; and set t timeout $limit",
             "    $t queuectl __complete $argv 2>/dev/null",
             "end",
             "complete -c queuectl -f"]

    def condition(path):
        if not path:
            return "__fish_use_subcommand"
        parts = [f"__fish_seen_subcommand_from {w}" for w in path]
        others = [g for g, acts in groups.items() if path[-1] in acts and g not in path]
        if len(path) == 1 and path[0] in groups:        # the group, no action yet
            parts.append(f"not __fish_seen_subcommand_from {' '.join(groups[path[0]])}")
        parts += [f"not __fish_seen_subcommand_from {g}" for g in others]
        return "; and ".join(parts)

    def words(v):
        if v == "@dirs":
            return "(__fish_complete_directories)"
        return f"(__queuectl_live {v[1:]})" if isinstance(v, str) else " ".join(v)
    for path, flags, positional, values in spec:
        cond = condition(path)
        subs = [f for f in flags if not f.startswith("-")]
        if subs:
            lines.append(f"complete -c queuectl -n '{cond}' -a '{' '.join(subs)}'")
        for f in flags:
            if not f.startswith("-") or f in ("-h", "--home") and path:
                continue
            opt = f"-l {f[2:]}" if f.startswith("--") else f"-s {f[1:]}"
            v = values.get(f)
            lines.append(f"complete -c queuectl -n '{cond}' {opt}"
                         + (f" -x -a '{words(v)}'" if v else ""))
        if positional:
            lines.append(f"complete -c queuectl -n '{cond}' -a '{words(positional)}'")
    return "\n".join(lines)

# Commands: doctor and metrics ------------------------------------------------

def cmd_doctor(args):
    """Check the queue's health: integrity, permissions, orphaned, stuck and
    blocked jobs, db size. Exit 1 when something is wrong."""
    store = open_store(args)
    now = time.time()
    problems, notes = [], []
    check, free = store.health()
    if check != ["ok"]:
        problems.append("integrity_check: " + "; ".join(check[:5]))
    for path in (os.path.join(args.home, "config.json"), os.path.join(args.home, "logs")):
        try:
            check_private(path, "file" if path.endswith(".json") else "directory")
        except FileNotFoundError:
            pass
        except UsageError as e:
            problems.append(str(e))
    try:
        Config(args.home).load()
    except UsageError as e:
        problems.append(str(e))
    workers = store.live_workers()
    for w in workers:
        if worker_stale(w):
            problems.append(f"worker {w['id']} (pid {w['pid']}) has not heartbeated "
                            f"since {human_time(w['heartbeat'])}: stopped or stuck? Its jobs are "
                            "recovered by other workers")
    live = {w["id"] for w in workers if not worker_stale(w)}
    unrecorded = []
    for job in store.processing():
        if job["worker"] not in live:
            problems.append(f"job {job['id']} is processing but its worker "
                            f"{job['worker']} is gone; start a worker to recover it")
        elif attempt_ended(args.home, job):
            unrecorded.append(job)
        elif job["timeout"] and now - epoch(job["started_at"]) > job["timeout"] + LEASE + 60:
            problems.append(f"job {job['id']} runs past its timeout "
                            f"({human_duration(now - epoch(job['started_at']))})")
    if unrecorded:
        time.sleep(0.5)          # a worker records an ended job within milliseconds
    for job in unrecorded:
        again = store.get(job["id"])
        if again and again["state"] == PROCESSING and again["claim"] == job["claim"]:
            problems.append(f"job {job['id']} is processing but its process has "
                            f"ended; worker {job['worker']} has not recorded the "
                            "outcome yet (full disk? database errors?)")
    for job_id, dep, state in store.blocked_on_dead():
        problems.append(f"job {job_id} waits on {dep}, which is {state}; "
                        f"retry {dep} or cancel {job_id}")
    for sch in store.schedules():
        try:
            _loads(sch["spec"], {})
            late = schedule_overdue(sch, now)
        except (QueuectlError, ValueError) as e:
            late = f"schedule {sch['name']} cannot fire: {e}"
        if late:
            problems.append(late)
        elif not live and not sch["paused"]:
            notes.append(f"warning: schedule {sch['name']} fires only while a worker runs, "
                         "and none does: start one with 'queuectl worker start'")
    ctx, waits = WhyContext(store, now), {}
    for job in store.due(now, 1000):
        for code, text, info in why_reasons(store, job, now, ctx):
            if code in ("paused", "key_full", "no_worker", "workers_busy"):
                what = (code, info.get("key") or info.get("queue") or job["queue"])
                waits.setdefault(what, [0, text])[0] += 1
    for (code, _), (n, text) in waits.items():
        if code == "no_worker" and not live:
            continue             # said below, once for every queue
        notes.append(f"{plural(n, 'due job')} wait{'s' if n == 1 else ''}: {text}")
    pending = store.waiting()
    if pending and not live:
        notes.append(f"{plural(pending, 'job')} wait{'s' if pending == 1 else ''} and no "
                     "worker is running: "
                     "start one with 'queuectl worker start'")
    other = os.path.join(os.path.expanduser("~"), ".queuectl")
    if os.path.exists(os.path.join(other, "queue.db")) and \
            os.path.realpath(other) != os.path.realpath(args.home):
        notes.append(f"warning: {other} is a queue home too, and not the one in use "
                     f"({args.home}): jobs enqueued there run only for a worker started "
                     "there; if it was made by mistake, move its jobs and remove it")
    size = sum(os.path.getsize(store.path + ext) for ext in ("", "-wal")
               if os.path.exists(store.path + ext))
    jobs = store.job_count()
    notes.append(f"database {store.path}: {size / 1e6:.1f} MB with its WAL, "
                 f"{free / 1e6:.1f} MB free pages, {jobs} jobs, schema {SCHEMA_VERSION}")
    if args.json:
        print_json({"ok": not problems, "problems": problems, "notes": notes})
    else:
        for p in problems:
            print(f"problem: {p}")
        for n in notes:
            print(f"note: {n}")
        print("ok" if not problems else f"{len(problems)} problem"
              f"{'s' if len(problems) != 1 else ''} found")
    return EXIT_OK if not problems else EXIT_FAIL

def attempt_ended(home, job):
    """True when a processing job's attempt has started and no process of it
    is left (an outcome its worker has not written yet)."""
    kind, _ = read_status(status_path(home, job["id"], job["claim"]))
    if kind == "exit":
        return True
    if kind != "running":
        return False             # not started yet, or cannot tell
    try:
        return not claim_processes(job["claim"])
    except OSError:
        return False

def cmd_metrics(args):
    """Prometheus text format (0.0.4): jobs per state and queue, runnable,
    delayed and blocked jobs, workers, attempts, failures, a histogram of
    run times per queue, and how long the oldest runnable job has waited."""
    sys.stdout.write(metrics_text(open_store(args), time.time()))
    return EXIT_OK

def metrics_text(store, now):
    """The metrics, as metrics prints them and serve's /metrics serves them."""
    out = []

    def family(name, kind, help_, samples):
        """One metric family: HELP, TYPE, then its samples, each a (suffix,
        labels, value); a family with no samples is left out."""
        if not samples:
            return
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        for suffix, labels, value in samples:
            text = ",".join(f'{k}="{prom_escape(v)}"' for k, v in labels.items())
            out.append(f"{name}{suffix}{{{text}}} {prom_value(value)}" if text
                       else f"{name}{suffix} {prom_value(value)}")
    _, per_queue = store.counts()
    queues = sorted(per_queue) or [DEFAULT_QUEUE]
    family("queuectl_jobs", "gauge", "Jobs by state and queue.",
           [("", {"queue": q, "state": st}, per_queue.get(q, {}).get(st, 0))
            for q in queues for st in STATES])
    delayed, blocked = store.delayed_and_blocked(now)
    family("queuectl_delayed_jobs", "gauge",
           "Waiting jobs scheduled for later (--run-at, --delay, a retry's backoff).",
           [("", {"queue": q}, delayed.get(q, 0)) for q in queues])
    family("queuectl_blocked_jobs", "gauge", "Waiting jobs blocked on a dependency.",
           [("", {"queue": q}, blocked.get(q, 0)) for q in queues])
    oldest = store.runnable_since(now)
    family("queuectl_oldest_pending_seconds", "gauge",
           "How long the oldest job that could run now (due, not blocked, queue not "
           "paused) has waited; 0 when none.",
           [("", {}, round(max(now - epoch(oldest[0]), 0), 3) if oldest else 0)])
    workers = store.live_workers()
    limits, held = store.limits(), store.held()
    keys = sorted(set(limits) | set(held))
    family("queuectl_key_running", "gauge",
           "Running jobs that hold each key (queue:NAME: a queue with a limit).",
           [("", {"key": k}, held.get(k, 0)) for k in keys
            if not k.startswith(QUEUE_KEY) or k in limits])
    family("queuectl_key_limit", "gauge", "Running jobs each key allows (limit set).",
           [("", {"key": k}, n) for k, n in limits.items()])
    schedules = store.schedules()
    family("queuectl_schedule_last_success_timestamp_seconds", "gauge",
           "When each schedule's last run completed (Unix time; 0 = never): a "
           "dead man's switch.",
           [("", {"schedule": c["name"]}, c["last_success"] or 0) for c in schedules])
    family("queuectl_schedule_skips_total", "counter",
           "Slots a schedule skipped (overlap skip, or missed beyond --catch-up).",
           [("", {"schedule": c["name"]}, c["skips"]) for c in schedules])
    family("queuectl_schedule_next_run_timestamp_seconds", "gauge",
           "When each schedule that is not paused fires next (Unix time).",
           [("", {"schedule": c["name"]}, c["next_at"]) for c in schedules
            if not c["paused"]])
    family("queuectl_workers", "gauge", "Live worker processes.", [("", {}, len(workers))])
    family("queuectl_worker_threads", "gauge", "Job threads of live workers.",
           [("", {}, sum(w["threads"] for w in workers))])
    ctx, slow = WhyContext(store, now), {}
    for job in store.processing():
        after = ctx.slow_after(job["queue"])
        if job["state"] == PROCESSING and after and now - epoch(job["started_at"]) > after[0]:
            slow[job["queue"]] = slow.get(job["queue"], 0) + 1
    family("queuectl_slow_jobs", "gauge",
           "Running jobs past slow_factor times their queue's p95 run time.",
           [("", {"queue": q}, slow.get(q, 0)) for q in queues])
    stats = store.history_totals()           # the one source, as stats reads it
    zero = {c: 0 for c, _ in HISTORY_SUMS}
    squeues = sorted(stats) or [DEFAULT_QUEUE]
    family("queuectl_attempts_total", "counter", "Attempts that ended.",
           [("", {"queue": q}, stats.get(q, zero)["attempts"]) for q in squeues])
    family("queuectl_failures_total", "counter",
           "Attempts that failed (exit != 0, timeout, worker died).",
           [("", {"queue": q}, stats.get(q, zero)["failures"]) for q in squeues])

    def histogram(q, columns, bounds, count, total):
        row, samples, n = stats.get(q, zero), [], 0
        for le, c in zip(bounds, columns):
            n += row[c]
            samples.append(("_bucket", {"queue": q, "le": prom_value(le)}, n))
        return samples + [("_bucket", {"queue": q, "le": "+Inf"}, row[count]),
                          ("_sum", {"queue": q}, row[total]), ("_count", {"queue": q}, row[count])]
    family("queuectl_job_duration_seconds", "histogram",
           "Run time of ended attempts, by queue.",
           [x for q in squeues for x in histogram(q, RUN_COLUMNS, DURATION_BUCKETS,
                                                   "run_count", "run_sum")])
    family("queuectl_cpu_seconds_total", "counter",
           "CPU seconds of measured attempts (the job's shell and its children), by mode.",
           [("", {"queue": q, "mode": mode}, stats.get(q, zero)[f"cpu_{key}"])
            for q in squeues for mode, key in (("user", "user"), ("system", "sys"))])
    samples = [x for q in squeues for x in histogram(q, RSS_COLUMNS, RSS_BUCKETS,
                                                      "rss_count", "rss_sum")]
    family("queuectl_job_max_rss_bytes", "histogram",
           "Peak RSS of the largest process of measured attempts, by queue.", samples)
    return "\n".join(out) + "\n"

def prom_escape(value):
    """A label value in the text format: \\, \" and newline escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

def prom_value(v):
    """A sample value or le bound: integers without a point, +Inf, NaN."""
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "+Inf" if v > 0 else "-Inf"
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else repr(float(v))


# Commands: serve -------------------------------------------------------------

# A read-only status page, /metrics and /api over HTTP, for a browser
# through an ssh tunnel and for Prometheus. Every page is built from the
# functions --json prints (status_info, show_info, job_public, metrics_text),
# so the page and the CLI cannot disagree. Each request opens its own
# connection, reads, closes it, and only then writes to the client: a slow
# or stalled client holds no lock and no transaction.

SERVE_BIND = "127.0.0.1:8765"
SERVE_THREADS = 8                        # requests served at once; more get 503
SERVE_TIMEOUT = 10                       # seconds a client has to send its request
SERVE_BUSY = 5                           # seconds a request waits for a locked
                                         # database (QUEUECTL_BUSY_TIMEOUT, if less)
SERVE_BUDGET = 20                        # seconds any one query may take
SERVE_LOG_TAIL = 64 * 1024               # bytes of a log a job page shows
SERVE_LIST = 50                          # newest jobs and dead jobs listed
SERVE_API_LIMIT = (100, 10_000)          # /api/jobs: default and largest limit

# The CLI's colours (STATE_COLORS), as CSS: one ANSI code, one colour.
ANSI_CSS = {"36": "color:#0a8a9a", "33": "color:#a86b00", "32": "color:#1a7f37",
            "1;31": "color:#c62828;font-weight:bold", "2": "color:#777"}

SERVE_CSS = """
:root{color-scheme:light dark}
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1b1b1b;background:#fff}
header{display:flex;flex-wrap:wrap;gap:.3em 1em;padding:.5em 1em;background:#eef1f4}
header a{font-weight:bold;color:inherit}main{padding:0 1em 1em}
h2{font-size:1.05em;margin:1.2em 0 .3em}
table{border-collapse:collapse;display:block;overflow-x:auto;max-width:100%}
th,td{text-align:left;padding:.15em .6em .15em 0;vertical-align:top;white-space:nowrap}
td.cmd,td.wrap{white-space:normal;word-break:break-all;min-width:12em}
th{font-weight:600;border-bottom:1px solid #ccc}
.tail{display:flex;flex-direction:column-reverse;overflow:auto;max-height:60vh;
background:#f6f8fa}
pre{margin:0;padding:.6em;white-space:pre-wrap;word-break:break-all}
code,pre{font-family:ui-monospace,monospace;font-size:13px}
.muted{color:#777}svg.spark{vertical-align:middle}
svg .ok{stroke:#1a7f37;fill:none}svg .bad{stroke:#c62828;fill:none}
a{color:#0b5cad}@media (max-width:640px){.opt{display:none}}
@media (prefers-color-scheme:dark){body{background:#15181c;color:#dde}
header{background:#23272e}.tail{background:#1e2227}th{border-color:#444}a{color:#6cb6ff}}
"""

# The refresh: fetch this page again every few seconds, swap in its <main>.
# A log's box is anchored at its end (column-reverse), so it shows the
# newest lines, before and after each swap, with or without this script.
SERVE_JS = """(function(){var n=0,every=%d,up=document.getElementById("updated");
function tick(){fetch(location.pathname,{cache:"no-store",credentials:"same-origin"})
.then(function(r){if(!r.ok)throw new Error("HTTP "+r.status);return r.text()})
.then(function(t){var d=new DOMParser().parseFromString(t,"text/html");
document.getElementById("live").replaceWith(d.getElementById("live"));
up.textContent=d.getElementById("updated").textContent;up.dataset.refreshed=++n})
.catch(function(e){up.textContent="not refreshed: "+e.message})
.finally(function(){setTimeout(tick,every)})}setTimeout(tick,every)})();"""

# A token travels in a header and a cookie: letters, digits and . _ ~ + / = -
# (base64 and its URL-safe form).
TOKEN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                        "0123456789._~+/=-")

def parse_bind(text):
    """--bind HOST:PORT (HOST a name or address, [::1] for IPv6; :PORT for
    every address) -> (host, port, whether it is loopback only)."""
    import ipaddress
    host, sep, port = text.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise UsageError(f"invalid --bind {text!r}: give HOST:PORT, such as {SERVE_BIND}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    return host, int(port), loopback

def read_token(path):
    """The token in --token-file: a regular file only its owner can read,
    holding 16-4096 of TOKEN_CHARS."""
    import stat
    try:
        fd = os.open(path, os.O_RDONLY | O_NOFOLLOW | O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise UsageError(f"cannot read the token file {path}: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077:
        os.close(fd)
        raise UsageError(f"the token file {path} must be a regular file that only "
                         f"its owner can read (chmod 600 {path})")
    with os.fdopen(fd, "rb") as f:
        token = f.read(4097).strip()
    if not 16 <= len(token) <= 4096 or not set(token.decode("latin-1")) <= TOKEN_CHARS:
        raise UsageError(f"the token in {path} must be 16-4096 letters, digits or . _ ~ + / "
                         "= - (head -c 24 /dev/urandom | base64 makes one)")
    return token.decode("ascii")

def check_serve_home(home):
    """Refuse at start a home serve could not read (another user's, one
    others can write, a schema to migrate), as the CLI would; a home with
    no queue yet is served empty, and said so."""
    if not os.path.exists(os.path.join(home, "queue.db")):
        if os.path.isdir(home):
            check_private(home, "home directory")
        elif os.path.lexists(home):
            raise UsageError(f"the home {home} is not a directory; give --home "
                             "(or QUEUECTL_HOME) a directory")
        sys.stderr.write(f"queuectl: note: there is no queue in {home} yet; it is "
                         "served as empty until a command creates it\n")
        return
    check_private(home, "home directory")
    check_private(os.path.join(home, "queue.db"), "database")
    serve_store(home).close()

def cmd_serve(args):
    """Serve the status page, /metrics and /api until SIGTERM or SIGINT."""
    import http.server
    import signal
    import socket
    import threading
    host, port, loopback = parse_bind(args.bind)
    token = read_token(args.token_file) if args.token_file else None
    if not loopback and token is None:
        raise UsageError(f"refusing to serve on {args.bind}, which is not loopback, "
                         "without --token-file; or use the default and an ssh tunnel: "
                         "ssh -L 8765:127.0.0.1:8765 HOST")
    check_serve_home(args.home)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)    # a client gone: an error, not death

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        slots = threading.BoundedSemaphore(SERVE_THREADS)

        def process_request(self, request, client_address):
            # At most SERVE_THREADS at once; the next gets a 503 from here,
            # never a wait that would hold up this loop (and shutdown).
            if not self.slots.acquire(blocking=False):
                try:
                    request.settimeout(1)
                    request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nRetry-After: 1"
                                    b"\r\nContent-Length: 0\r\n\r\n")
                except OSError:
                    pass
                self.shutdown_request(request)
                return
            try:
                super().process_request(request, client_address)
            except BaseException:
                self.slots.release()
                raise

        def process_request_thread(self, request, client_address):
            try:
                super().process_request_thread(request, client_address)
            finally:
                self.slots.release()

        def handle_error(self, request, client_address):
            e = sys.exc_info()[1]
            if not isinstance(e, (ConnectionError, TimeoutError)):   # a client gone
                sys.stderr.write(f"queuectl serve: error: {client_address[0]}: {e!r}\n")

    try:
        server = Server((host, port), serve_handler(args.home, token))
    except OSError as e:
        raise QueuectlError(f"cannot serve on {args.bind}: {e.strerror}") from None
    bound = server.server_address
    url = (f"http://{'[' + bound[0] + ']' if ':' in bound[0] else bound[0]}:{bound[1]}/")
    stop = lambda *_: threading.Thread(target=server.shutdown, daemon=True).start()  # noqa
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"queuectl: serving {args.home} read-only on {url}"
          + (" (a token is required)" if token else ""), flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
    # Requests in flight get a moment to finish: take back every slot.
    deadline = time.monotonic() + 2
    for _ in range(SERVE_THREADS):
        Server.slots.acquire(timeout=max(deadline - time.monotonic(), 0))
    print("queuectl: serve stopped", flush=True)
    return EXIT_OK

class Deadline:
    """A request's input with one deadline for all of it: a client that
    sends its request a byte at a time is cut off when it passes, not at
    each read's timeout."""

    def __init__(self, f, sock, seconds):
        self.f, self.sock, self.until = f, sock, time.monotonic() + seconds

    def readline(self, *a):
        left = self.until - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request took too long")
        self.sock.settimeout(left)
        return self.f.readline(*a)

    def __getattr__(self, name):
        return getattr(self.f, name)

def serve_handler(home, token):
    """The request handler of serve: GET and HEAD of its pages, nothing else."""
    import hmac
    import http.server
    import json
    import secrets
    import urllib.parse

    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = f"queuectl/{__version__}"
        sys_version = ""
        timeout = SERVE_TIMEOUT

        def setup(self):
            super().setup()
            self.rfile = Deadline(self.rfile, self.connection, SERVE_TIMEOUT)

        def log_request(self, code="-", size="-"):
            # Errors only (the refresh is frequent), without the query: it
            # may hold a mistyped token.
            if not isinstance(code, int) or code >= 400:
                path = urllib.parse.urlsplit(getattr(self, "path", "")).path
                self.log_message("%s %s %s", getattr(self, "command", "-"), path, code)

        def log_message(self, fmt, *a):
            sys.stderr.write(f"queuectl serve: {self.address_string()} {fmt % a}\n")

        def do_GET(self):
            self.answer(body=True)

        def do_HEAD(self):
            self.answer(body=False)

        def refuse(self):
            self.reply(405, "text/plain", b"only GET and HEAD: serve is read-only\n",
                       body=True, extra={"Allow": "GET, HEAD"})
        do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = refuse

        def reply(self, code, kind, data, body, extra=()):
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            for k, v in dict(extra).items():
                self.send_header(k, v)
            self.end_headers()
            if body:
                self.wfile.write(data)

        def authorized(self):
            """Whether the request carries the token (always, with none set):
            as a Bearer header, or the cookie a ?token= link sets."""
            if token is None:
                return True
            given = [self.headers.get("Authorization", "").partition("Bearer ")[2].strip()]
            for part in self.headers.get("Cookie", "").split(";"):
                name, _, value = part.strip().partition("=")
                if name == "queuectl_token":
                    given.append(value)
            return any(hmac.compare_digest(g.encode("utf-8", "replace"), token.encode())
                       for g in given if g)

        def answer(self, body):
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
            if token is not None and "token" in query:
                ok = hmac.compare_digest(query["token"][0].encode("utf-8", "replace"),
                                         token.encode())
                # Lax: the link may be opened from another site (a chat, a
                # wiki); the cookie only ever reads.
                return self.reply(303 if ok else 401, "text/plain",
                                  b"see the page without the token\n" if ok else
                                  b"wrong token\n", body,
                                  {"Location": url.path or "/", "Set-Cookie":
                                   f"queuectl_token={token}; Path=/; HttpOnly; "
                                   "SameSite=Lax"} if ok else {})
            if not self.authorized():
                return self.reply(401, "text/plain", b"a token is required: an "
                                  b"Authorization: Bearer header, or a ?token= link\n",
                                  body, {"WWW-Authenticate": "Bearer"})
            if url.path == "/favicon.ico":
                return self.reply(204, "image/x-icon", b"", body)
            nonce, extra = secrets.token_urlsafe(12), {}
            try:
                code, kind, text = serve_route(home, url.path, query, nonce)
            except UsageError as e:
                code, kind, text = 400, "text/plain", f"{e}\n"
            except BusyError as e:
                code, kind, text = 503, "text/plain", f"{e}\n"
                extra["Retry-After"] = "5"
            except QueuectlError as e:
                code, kind, text = 500, "text/plain", f"{e}\n"
                sys.stderr.write(f"queuectl serve: error: {url.path}: {e}\n")
            except Exception as e:       # noqa: BLE001  a page, not the server
                sys.stderr.write(f"queuectl serve: error: {url.path}: {e!r}\n")
                code, kind, text = 500, "text/plain", "could not read the queue; see " \
                    "serve's log\n"
            if kind == "json":
                kind, text = "application/json", json.dumps(text, indent=2) + "\n"
            if kind.startswith("text/html"):
                extra["Content-Security-Policy"] = (
                    f"default-src 'none'; style-src 'nonce-{nonce}'; script-src "
                    f"'nonce-{nonce}'; connect-src 'self'; img-src 'self'; base-uri "
                    "'none'; form-action 'none'; frame-ancestors 'none'")
            self.reply(code, kind, text.encode("utf-8", "replace"), body, extra)
    return Handler

def serve_store(home):
    """A store for one request: read-only (no home created, no migration,
    no write), waiting at most SERVE_BUSY for a locked database; an empty
    one while the home has no queue."""
    path = os.path.join(home, "queue.db")
    try:
        os.stat(path)
    except FileNotFoundError:
        return Store(home, memory=True)
    except OSError as e:
        raise QueuectlError(f"cannot read {path}: {e.strerror}") from None
    store = Store.read_only(home, SERVE_BUDGET)
    store.busy_timeout = min(SERVE_BUSY, busy_timeout())
    try:
        store.db.execute(f"PRAGMA busy_timeout = {int(store.busy_timeout * 1000)}")
        version = store.db.execute("PRAGMA user_version").fetchone()[0]
    except store.sqlite3.Error as e:
        store.close()
        raise store._error(e) from None
    if version != SCHEMA_VERSION:
        store.close()
        raise QueuectlError(f"{path} has schema {version}, not {SCHEMA_VERSION}: "
                            "run queuectl status once (as its owner) to upgrade it")
    return store

def serve_route(home, path, query, nonce):
    """(status, content type or "json", text) of one GET."""
    parts = [urllib_unquote(p) for p in path.strip("/").split("/")] if path != "/" else []
    store = serve_store(home)
    try:
        now = time.time()
        if not parts:
            return 200, "text/html; charset=utf-8", serve_overview(store, home, now, nonce)
        if parts == ["metrics"]:
            return 200, "text/plain; version=0.0.4; charset=utf-8", metrics_text(store, now)
        if parts == ["api", "status"]:
            return 200, "json", status_info(store, now)[0]
        if parts == ["api", "jobs"]:
            return 200, "json", serve_list(store, home, query)
        api = len(parts) == 3 and parts[:2] == ["api", "jobs"]
        if not api and not (len(parts) == 2 and parts[0] == "job"):
            return 404, "text/plain", f"no page {path}\n"
        try:                             # an id, or #N; an invalid id is a 400
            job = store.must_get(parts[-1])
        except NoSuchJob as e:
            return 404, "text/plain", f"{e}\n"
        if api:
            return 200, "json", show_info(store, home, job)[0]
        return 200, "text/html; charset=utf-8", serve_job(store, home, job, now, nonce)
    finally:
        store.close()

def urllib_unquote(text):
    import urllib.parse
    try:
        return urllib.parse.unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise UsageError(f"invalid path part {text[:40]!r}: not UTF-8") from None

def serve_list(store, home, query):
    """/api/jobs?state=S&queue=Q&label=L&limit=N: what list --json prints,
    with list's checks; the newest SERVE_API_LIMIT[0] unless limit says."""
    states = [s for v in query.get("state", []) for s in v.split(",")]
    queues = [check_name(q, "queue") for v in query.get("queue", []) for q in v.split(",")]
    labels = [check_label(v) for v in query.get("label", [])]
    bad = [s for s in states if s not in STATES]
    if bad:
        raise UsageError(f"invalid state {bad[0]!r}: one of " + ", ".join(STATES))
    limit = query.get("limit", [str(SERVE_API_LIMIT[0])])[-1]
    if not (limit.isascii() and limit.isdigit()) or not 1 <= int(limit) <= SERVE_API_LIMIT[1]:
        raise UsageError(f"invalid limit {limit[:40]!r}: a whole number from 1 to "
                         f"{SERVE_API_LIMIT[1]} (queuectl list --json has no limit)")
    rows, _ = store.list_jobs(states or None, queues or None, int(limit), labels or None)
    cfg = Config(home).load()
    return [job_public(j, home, cfg) for j in rows]

def html_page(home, title, body, nonce, refresh):
    """A whole page: one stylesheet, the refresh script when refresh (ms)."""
    import html
    import socket
    clock = human_time(time.time())
    script = f'<script nonce="{nonce}">{SERVE_JS % refresh}</script>' if refresh else ""
    css = SERVE_CSS + "".join(f".st-{s}{{{ANSI_CSS[c]}}}" for s, c in STATE_COLORS.items())
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{html.escape(title)}</title><style nonce=\"{nonce}\">{css}</style>"
            f'</head><body><header><a href="/">queuectl</a>'
            f"<span>{html.escape(socket.gethostname())}:{html.escape(home)}</span>"
            f'<span id="updated" data-refreshed="0">{html.escape(clock)}</span></header>'
            f'<main id="live">{body}</main>{script}</body></html>\n')

def html_table(headers, rows, classes=(), narrow=()):
    """rows of already escaped cells; classes: {column: CSS class}; the
    columns of narrow are left out at a phone's width."""
    classes = dict(classes)
    for i in narrow:
        classes[i] = (classes.get(i, "") + " opt").strip()
    head = "".join(f'<th class="{classes[i]}">{h}</th>' if i in classes else f"<th>{h}</th>"
                   for i, h in enumerate(headers))
    return (f"<table><thead><tr>{head}</tr></thead><tbody>" + "".join(
        "<tr>" + "".join(f'<td class="{classes[i]}">{c}</td>' if i in classes
                         else f"<td>{c}</td>" for i, c in enumerate(r)) + "</tr>"
        for r in rows) + "</tbody></table>")

def html_state(state):
    """A state in its CLI colour, and in words."""
    return f'<span class="st-{state}">{state}</span>'

def html_job_link(job_id):
    import html
    import urllib.parse
    return f'<a href="/job/{urllib.parse.quote(job_id, safe="")}">{html.escape(job_id)}</a>'

def spark_svg(ended, failed):
    """Two lines over 24 hourly values: attempts ended, and failed."""
    top = max(ended + failed + [1])
    def points(values):
        return " ".join(f"{i * 4},{19 - v / top * 17:.1f}" for i, v in enumerate(values))
    return (f'<svg class="spark" width="96" height="20" viewBox="0 0 96 20" role="img" '
            f'aria-label="last 24 hours: {sum(ended)} ended, {sum(failed)} failed">'
            f'<polyline class="ok" points="{points(ended)}"/>'
            f'<polyline class="bad" points="{points(failed)}"/></svg>')

def serve_overview(store, home, now, nonce):
    """The overview: queues, workers, running jobs, the DLQ, schedules, the
    newest jobs."""
    import html
    e = html.escape
    info, _ = status_info(store, now)
    cfg = Config(home).load()
    limits = store.limits()
    paused = set(info["paused"])
    hour = int(now // 3600 * 3600)
    counts = ", ".join(f"{info['counts'][s]} {html_state(s)}" for s in STATES)
    out = [f"<h2>Queues</h2><p>jobs: {counts}"
           f" · {plural(info['workers']['threads'], 'job thread')} in "
           f"{plural(info['workers']['live'], 'live worker')}</p>"]
    rows = []
    for q, c in sorted(info["queues"].items()) or [(DEFAULT_QUEUE, dict.fromkeys(STATES, 0))]:
        ended, failed = [0] * 24, [0] * 24
        for start, h in store.history_series(hour - 23 * 3600, [q]):
            i = int((start - (hour - 23 * 3600)) // 3600)
            if 0 <= i < 24:
                ended[i] += h["attempts"]                # four quarter hours
                failed[i] += h["failures"]
        rows.append([e(q)] + [str(c.get(s, 0)) for s in STATES]
                    + [str(limits.get(QUEUE_KEY + q, "-")),
                       "paused" if q in paused or "*" in paused else "",
                       spark_svg(ended, failed) + f" {sum(ended)} ended, {sum(failed)} failed"])
    out.append(html_table(["queue"] + [html_state(s) for s in STATES]
                          + ["limit", "paused", "last 24 h"], rows, narrow=(4, 6, 7, 8)))
    running = running_shares(store, now)
    out.append(f"<h2>Running ({len(running)})</h2>")
    if running:
        rows = []
        for j, ran, p50, slow in running:
            share = (f'<meter min="0" max="100" value="{min(ran / p50 * 100, 100):.0f}">'
                     f"</meter> {ran / p50 * 100:.0f}% of {human_duration(p50)}"
                     if p50 else "-") + (", slow" if slow else "")
            rows.append([html_job_link(j["id"]), e(j["queue"]), str(j["pid"] or "starting"),
                         human_duration(ran), share, e(one_line(j["command"]))])
        out.append(html_table(["id", "queue", "pid", "ran", "of usual (p50)", "command"],
                              rows, {5: "cmd"}, narrow=(1, 2)))
    workers = workers_info(store)
    out.append(f"<h2>Workers ({len(workers)})</h2>")
    if workers:
        out.append(html_table(
            ["id", "pid", "host", "threads", "queues", "started", "heartbeat", "jobs"],
            [[e(w["id"]), str(w["pid"]), e(w["host"]), str(w["threads"]),
              e(",".join(w["queues"] or ["*"])), relative(w["started_at"], now),
              relative(w["heartbeat"], now),
              ", ".join(html_job_link(x) for x in w["jobs"]) or "-"] for w in workers],
            narrow=(1, 2, 4, 5)))
    dead, more = store.list_jobs([DEAD], None, SERVE_LIST)
    out.append(f"<h2>Dead letter queue ({len(dead) + more})</h2>")
    if dead:
        out.append(html_table(
            ["id", "queue", "tries", "died", "last error", "command"],
            [[html_job_link(j["id"]), e(j["queue"]),
              f"{j['attempts']}/{allowed_attempts(j, cfg)}",
              relative(j["finished_at"], now), e(one_line(j["last_error"])),
              e(one_line(j["command"]))] for j in reversed(dead)], {4: "wrap", 5: "cmd"},
            narrow=(1, 2, 5)))
    if info["schedules"]:
        out.append("<h2>Schedules</h2>" + html_table(
            ["name", "cron", "next run"],
            [[e(s["name"]), e(s["cron"]), "paused" if s["paused"] else
              f"{e(local_time(epoch(s['next_run']), now))} ({relative(s['next_run'], now)})"]
             for s in info["schedules"]]))
    jobs, more = store.list_jobs(None, None, SERVE_LIST)
    ctx = WhyContext(store, now)
    out.append(f"<h2>Newest jobs ({len(jobs) + more})</h2>")
    if jobs:
        out.append(html_table(
            ["id", "#", "state", "queue", "label", "when", "outcome", "command"],
            [[html_job_link(j["id"]), str(j["seq"]), html_state(j["state"]), e(j["queue"]),
              e(j["label"] or "-"), e(when_text(store, j, now, ctx)), e(outcome_text(j)),
              e(one_line(command_text(j)))] for j in reversed(jobs)], {7: "cmd"},
            narrow=(1, 3, 4, 6)))
    return html_page(home, "queuectl", "".join(out), nonce, 5000)

def terminal_text(text):
    """A log's text as a terminal would leave it on screen, roughly: colour
    and other escape sequences dropped, a carriage return (a progress bar)
    a new line, other control characters shown as U+FFFD."""
    import re
    text = re.sub(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)?|[@-_])", "", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "\ufffd", text)

def serve_job(store, home, job, now, nonce):
    """A job's page: show's fields, its attempts, why it waits, its log's tail."""
    import html
    e = html.escape
    pub, blocked, attempts = show_info(store, home, job)
    out = [f"<h2>Job {e(job['id'])} {html_state(job['state'])}</h2>"
           f"<p class=\"cmd\"><code>{e(command_text(job))}</code></p>"]
    if attempts:
        out.append("<h2>Attempts</h2>" + html_table(
            ["#", "state", "ended", "cost"],
            [[str(n), html_state(st), e(end), e(use) + (" (after a retry by hand)"
                                                          if again else "")]
             for n, st, end, use, again in attempt_rows(attempts)]))
    heading = {PENDING: "Why it is not running", FAILED: "Why it is not running",
               PROCESSING: "Why"}.get(job["state"], "How it ended")
    out.append(f"<h2>{heading}</h2><ul>" + "".join(
        f"<li>{e(t)}</li>" for _, t, _ in why_reasons(store, job, now)) + "</ul>")
    try:
        f = open_log(log_path(home, job["id"]))
    except QueuectlError as err:     # a planted symlink: said, never followed
        f, missing = None, str(err)
    else:
        missing = "no log yet"
    if f is None:
        out.append(f"<h2>Log</h2><p class=\"muted\">{e(missing)}</p>")
    else:
        with f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(size - SERVE_LOG_TAIL, 0))
            data = f.read(SERVE_LOG_TAIL)
        if size > SERVE_LOG_TAIL:        # from a line's start, or a character's
            cut = data.find(b"\n", 0, 4096)
            data = data[cut + 1:] if cut >= 0 else data.lstrip(bytes(range(0x80, 0xc0)))
        note = (f" (the last {human_size(len(data))} of {human_size(size)}; "
                f"queuectl logs {job['id']} prints it all)" if size > SERVE_LOG_TAIL else "")
        out.append(f"<h2>Log{e(note)}</h2><div class=\"tail\"><pre id=\"log\">"
                   f"{e(terminal_text(data.decode('utf-8', 'replace')))}</pre></div>")
    out.append("<h2>What show says</h2>" + html_table(["field", "value"], [
        [e(k), html_state(v) if k == "state" else e(v)]
        for k, v in show_fields(pub, blocked)], {1: "wrap"}))
    return html_page(home, f"queuectl: {job['id']}", "".join(out), nonce,
                     0 if job["state"] in FINISHED else 2000)


# Command line ################################################################

# Each command is declared once, below, in --help order: its words, one line
# of help, its handler, its examples, its arguments, and (for the few shown
# by a bare `queuectl`) its short form. The parser, each command's --help
# with its examples, the short usage, bash completion and dispatch are all
# built from this one list.


class Command:
    __slots__ = ("words", "help", "handler", "examples", "args", "common")

    def __init__(self, words, help_, handler=None, examples=(), args=(), common=None):
        self.words = tuple(words.split())
        self.help, self.handler, self.examples = help_, handler, list(examples)
        self.args, self.common = list(args), common

def arg(*flags, **kw):
    """One argument of a command, as for argparse's add_argument."""
    return flags, kw

HOME_HELP = "queue home (default: $QUEUECTL_HOME or ~/.queuectl)"

JSON_ARG = arg("--json", action="store_true", help="print JSON")

QUEUES_ARG = arg("--queue", action="append", metavar="Q",
                 help="jobs of these queues (repeatable, or Q1,Q2)")

LABELS_ARG = arg("--label", action="append", metavar="L", type=check_label,
                 help="jobs with this label (repeatable)")

LIMIT_ARG = arg("--limit", type=lambda t: check_value("limit", t, "--limit", text=True),
                metavar="N", help="the newest N (default 100; --json: all; 0 = all)")

ALL_ARG = arg("--all", action="store_true", help="every job, not only the newest 100")

# argparse.REMAINDER, spelled out: naming it would import argparse (10 ms)
# at every start, before main() knows whether the command needs it.
REMAINDER = "..."

def spec_dest(flags, kw):
    """The attribute an argument lands in, named as argparse names it."""
    if kw.get("dest"):
        return kw["dest"]
    if not flags[0].startswith("-"):
        return flags[0]
    return next((f for f in flags if f.startswith("--")), flags[0]).lstrip("-") \
        .replace("-", "_")

def _value(name, flag):
    """An argparse type: the option's text checked by check_value()."""
    return lambda text: check_value(name, text, flag, text=True)

ENQUEUE_ARGS = [
    arg("job", nargs=REMAINDER, metavar="COMMAND",
        help="the command: one shell command line, or words (joined, each "
             "quoted as needed), or a JSON object; options go before it, "
             "and -- before a command that starts with -"),
    arg("-c", "--command", metavar="CMD", help="the shell command"),
    arg("--id", help="the job id (default: a short random one)"),
    arg("-p", "--priority", type=_value("priority", "--priority"), metavar="N",
        help="higher runs first (default 0)"),
    arg("--max-retries", type=_value("max_retries", "--max-retries"), metavar="N",
        help="retries after the first attempt (default: config)"),
    arg("--timeout", type=_value("timeout", "--timeout"), metavar="DUR",
        help="90, 90s, 5m, 2h; 0 = none (default: config job_timeout)"),
    arg("--run-at", metavar="TIME",
        help="03:00 (the next one), tomorrow 03:00, 2026-12-01 03:00, +90m, "
             "or ISO-8601 (local time unless it has an offset)"),
    arg("--delay", metavar="DUR", help="90, 90s, 5m, 2h, 1d"),
    arg("--queue", metavar="Q", help=f"queue name (default {DEFAULT_QUEUE})"),
    arg("--launcher", metavar="CMD", type=check_launcher,
        help="run it through this command prefix ('srun --quiet --'; '' = none; "
             "default: config launcher)"),
    arg("--label", metavar="TEXT", type=check_label,
        help="a label: list, wait, cancel and retry select jobs by it (--stdin: "
             "the whole batch)"),
    arg("--after", action="append", metavar="ID",
        help="run after this job completed (repeatable)"),
    arg("--cwd", metavar="DIR", help="working directory (default: the current one)"),
    arg("--env", action="append", metavar="K=V|NAME",
        help="set K=V, or pass NAME's value from here, for the job (repeatable)"),
    arg("--worker-env", action="store_true",
        help="run in the worker's environment and umask, not in yours"),
    arg("--unique", action="store_true",
        help="if the id exists already, print it and change nothing"),
    arg("--key", action="append", metavar="KEY", type=check_key,
        help="hold KEY while running: at most N jobs with it run at once "
             "(limit set KEY N; default 1) (repeatable)"),
    arg("--if-busy", metavar="skip|queue", type=check_if_busy,
        help="skip: if a job with one of its keys waits or runs, print its id "
             "and enqueue nothing (default queue)"),
    arg("--on-success", metavar="CMD", help="run CMD when the job completes"),
    arg("--on-failure", metavar="CMD",
        help="run CMD after each failed attempt that will be retried"),
    arg("--on-dead", metavar="CMD", help="run CMD when the job goes to the DLQ"),
    arg("--on-cancel", metavar="CMD", help="run CMD when the job is cancelled"),
    arg("--retry-on", metavar="CODES", type=lambda t: parse_codes(t, "--retry-on"),
        help="retry only these exit codes (2,64-78); others go to the DLQ"),
    arg("--no-retry-on", metavar="CODES",
        type=lambda t: parse_codes(t, "--no-retry-on"),
        help="never retry these exit codes (also: timeout, signal)"),
    arg("--mem", metavar="SIZE", type=_value("mem", "--mem"),
        help="address space per process: 512M, 2G (ulimit -v; 0 = none)"),
    arg("--cpu-time", metavar="DUR", type=_value("cpu_time", "--cpu-time"),
        help="CPU time per process: 90s, 1h (ulimit -t; 0 = none)"),
    arg("--nofile", metavar="N", type=_value("nofile", "--nofile"),
        help="open files per process (ulimit -n; 0 = none)"),
    arg("--nice", metavar="N", type=_value("nice", "--nice"),
        help="run at this niceness above the worker's (nice -n N)"),
    arg("--stdin", action="store_true",
        help="one job per line (JSON or command), all or nothing"),
    arg("--json", action="store_true", help="print the job as JSON"),
]

COMMAND_TABLE = [
    Command("enqueue", "add a job; prints its id", cmd_enqueue, [
        "queuectl enqueue 'pg_dump mydb > /backup/mydb.sql'",
        "queuectl enqueue --queue backups rsync -a /srv/ /backup/srv/",
        "queuectl enqueue --id nightly --unique --max-retries 5 ./backup.sh",
        "queuectl enqueue --run-at 03:00 -- ./report.sh --full",
        "queuectl enqueue '{\"id\":\"a\",\"command\":\"echo hi\",\"max_retries\":2}'"], [
        *ENQUEUE_ARGS],
        common=("enqueue 'CMD'", "add a job (prints its id)")),
    Command("worker", "start, stop, list workers, or change their threads"),
    Command("worker start", "run jobs until stopped", cmd_worker_start, [
        "queuectl worker start --count 4", "queuectl worker start --drain",
        "queuectl worker start --detach"], [
        arg("--count", type=_value("count", "--count"), default=1, metavar="N",
            help="worker threads in this process (default 1)"),
        arg("--queue", action="append", metavar="Q",
            help="serve only these queues (repeatable, or Q1,Q2; default: all)"),
        arg("--drain", action="store_true",
            help="exit when no job can run now and none awaits a retry"),
        arg("--detach", action="store_true",
            help="run in the background, log to HOME/worker.log, print the pid")],
        common=("worker start", "run jobs (--count N, --drain, --detach)")),
    Command("worker stop", "stop the live workers of this home (or those named); waits",
            cmd_worker_stop, [
        "queuectl worker stop", "queuectl worker stop --now --timeout 30",
        "queuectl worker stop 4242"], [
        arg("which", nargs="*", metavar="WORKER",
            help="only these workers, by id or pid (worker status lists them)"),
        arg("--now", action="store_true",
            help="also stop running jobs (back to pending, attempt not counted)"),
        arg("--wait", action="store_true",
            help="return once they have exited (the default; kept for scripts)"),
        arg("--no-wait", action="store_true", help="ask them to stop and return at once"),
        arg("--timeout", type=_value("wait", "--timeout"), metavar="DUR",
            help="give up waiting (exit 1) after this many seconds")]),
    Command("worker threads", "change how many jobs live workers run at once",
            cmd_worker_threads, ["queuectl worker threads 8",
                                 "queuectl worker threads 1 4242"], [
        arg("threads", type=_value("count", "N"), metavar="N",
            help="job threads for each worker (1-256)"),
        arg("which", nargs="*", metavar="WORKER",
            help="only these workers, by id or pid (default: every live one)")]),
    Command("worker status", "list live workers", cmd_worker_status,
            ["queuectl worker status"], [JSON_ARG]),
    Command("status", "counts per state, workers, oldest pending, next run", cmd_status,
            ["queuectl status", "queuectl status --json"], [
        arg("id", nargs="?", metavar="ID", help="show one job instead"), JSON_ARG],
        common=("status", "counts per state, workers, what is next")),
    Command("show", "every field of one job, and its log path", cmd_show,
            ["queuectl show nightly", "queuectl show nightly --env"], [
        arg("id", metavar="ID"),
        arg("--env", action="store_true",
            help="also print the job's environment, values included"), JSON_ARG]),
    Command("list", "list jobs in enqueue order", cmd_list, [
        "queuectl list --state failed", "queuectl list --queue reports --limit 20"], [
        arg("--state", action="append", metavar="S",
            help="only jobs in these states (repeatable, or S1,S2): " + ", ".join(STATES)),
        arg("--queue", action="append", metavar="Q",
            help="only jobs of these queues (repeatable, or Q1,Q2)"), LABELS_ARG, ALL_ARG,
        LIMIT_ARG, JSON_ARG],
        common=("list [--state S]", "jobs and their states")),
    Command("why", "why a job is not running now (or how it ended)", cmd_why, [
        "queuectl why nightly", "queuectl why nightly --json"],
        [arg("id", metavar="ID"), JSON_ARG],
        common=("why ID", "why a job waits")),
    Command("stats", "per queue: attempts, success rate, run time and peak RSS",
            cmd_stats, ["queuectl stats", "queuectl stats --queue backups --since 7d"], [
        arg("--queue", action="append", metavar="Q",
            help="only these queues (repeatable, or Q1,Q2)"),
        arg("--since", metavar="DUR", help="attempts that ended in the last DUR (7d, 12h)"),
        arg("--by", choices=("hour", "day"),
            help="a row per hour (default: the last 24) or day (the last 30), with a bar"),
        JSON_ARG]),
    Command("logs", "print a job's log (default: the latest started job's)", cmd_logs, [
        "queuectl logs nightly -n 50", "queuectl logs nightly --follow", "queuectl logs"], [
        arg("id", nargs="?", metavar="ID", help="the job (default: the one started last)"),
        arg("-n", "--tail", type=_value("tail", "--tail"), metavar="N",
            help="only the last N lines"),
        arg("-f", "--follow", action="store_true", help="keep printing until the job ends")],
        common=("logs ID", "a job's output")),
    Command("wait", "block until jobs finish; 0 if all completed", cmd_wait, [
        "id=$(queuectl enqueue make build) && queuectl wait \"$id\"",
        "queuectl wait --queue reports --timeout 1h", "queuectl wait"], [
        arg("ids", nargs="*", metavar="ID",
            help="these jobs (default: every job enqueued so far)"),
        arg("--queue", action="append", metavar="Q",
            help="every job of these queues enqueued so far (repeatable, or Q1,Q2)"),
        arg("--label", action="append", metavar="L", type=check_label,
            help="every job with this label enqueued so far (repeatable)"),
        arg("--timeout", type=_value("wait", "--timeout"), metavar="DUR",
            help="give up after this long: 90, 90s, 5m, 2h (exit 124)")]),
    Command("retry", "run jobs again: dead, cancelled, completed; failed ones now",
            cmd_retry, ["queuectl retry k3x9qa", "queuectl retry --queue reports",
                        "queuectl retry --all"], [
        arg("ids", nargs="*", metavar="ID"),
        arg("--all", action="store_true", help="every dead and cancelled job"),
        arg("--state", action="append", metavar="S",
            help="jobs in these states (repeatable, or S1,S2; default dead,cancelled): "
                 "dead, cancelled, completed, failed"),
        arg("--queue", action="append", metavar="Q",
            help="jobs of these queues (repeatable, or Q1,Q2)"), LABELS_ARG]),
    Command("pause", "stop claiming from queues (all when none named)", cmd_pause,
            ["queuectl pause reports", "queuectl pause"],
            [arg("queues", nargs="*", metavar="QUEUE")]),
    Command("resume", "claim from paused queues again (all when none named)", cmd_resume,
            ["queuectl resume reports", "queuectl resume"],
            [arg("queues", nargs="*", metavar="QUEUE")]),
    Command("cancel", "cancel jobs; stops running ones (TERM, then KILL)", cmd_cancel, [
        "queuectl cancel k3x9qa", "queuectl cancel --queue reports --state pending",
        "queuectl cancel --all --grace 30s", "queuectl cancel --signal INT k3x9qa"], [
        arg("ids", nargs="*", metavar="ID"),
        arg("--all", action="store_true",
            help="every pending, failed and running job"),
        arg("--state", action="append", metavar="S",
            help="jobs in these states (repeatable, or S1,S2): pending, failed, processing"),
        arg("--queue", action="append", metavar="Q",
            help="jobs of these queues (repeatable, or Q1,Q2)"), LABELS_ARG,
        arg("--signal", default="TERM", metavar="SIG",
            help="first signal to running jobs (default TERM)"),
        arg("--grace", type=_value("kill_grace", "--grace"), metavar="DUR",
            help="then KILL after this long (default: config kill_grace)")]),
    Command("remove", "delete jobs that are not running, and their logs", cmd_remove,
            ["queuectl remove k3x9qa"], [arg("ids", nargs="+", metavar="ID")]),
    Command("edit", "change a pending, failed or dead job (flags or $EDITOR)", cmd_edit, [
        "queuectl edit k3x9qa --priority 10 --run-at 03:00",
        "queuectl edit k3x9qa -- ./backup.sh --full", "queuectl edit k3x9qa"], [
        arg("id", metavar="ID"),
        arg("words", nargs=REMAINDER, metavar="COMMAND",
            help="a new command (as for enqueue); with no change given, "
                 "$EDITOR opens the job as JSON"),
        arg("-c", "--command", metavar="CMD", help="a new shell command"),
        arg("-p", "--priority", type=_value("priority", "--priority"), metavar="N"),
        arg("--queue", metavar="Q"),
        arg("--max-retries", type=_value("max_retries", "--max-retries"), metavar="N"),
        arg("--timeout", type=_value("timeout", "--timeout"), metavar="DUR"),
        arg("--run-at", metavar="TIME"), arg("--delay", metavar="DUR"),
        arg("--cwd", metavar="DIR"),
        arg("--env", action="append", metavar="K=V|NAME", help="set (repeatable)"),
        arg("--unset-env", action="append", metavar="NAME", help="unset (repeatable)")]),
    Command("dlq", "the dead letter queue: list, retry, purge"),
    Command("dlq list", "list dead jobs", cmd_dlq_list, ["queuectl dlq list"],
            [QUEUES_ARG, LABELS_ARG, ALL_ARG, LIMIT_ARG, JSON_ARG],
            common=("dlq list", "jobs that failed for good")),
    Command("dlq retry", "run dead jobs again (attempts reset)", cmd_dlq_retry, [
        "queuectl dlq retry k3x9qa", "queuectl dlq retry --all",
        "queuectl dlq retry --queue reports"], [
        arg("ids", nargs="*", metavar="ID"),
        arg("--all", action="store_true", help="every dead job"), QUEUES_ARG, LABELS_ARG]),
    Command("dlq purge", "delete dead jobs and their logs", cmd_dlq_purge,
            ["queuectl dlq purge --all"], [
        arg("ids", nargs="*", metavar="ID"),
        arg("--all", action="store_true", help="every dead job"), QUEUES_ARG, LABELS_ARG]),
    Command("prune", "delete old finished jobs and their logs", cmd_prune, [
        "queuectl prune --older-than 7d",
        "queuectl prune --older-than 30d --state dead"], [
        arg("--older-than", required=True, metavar="DUR",
            help="finished longer ago than this (7d, 12h)"),
        arg("--state", action="append", metavar="S",
            help="only these states (repeatable, or S1,S2; default completed,cancelled): "
                 + ", ".join(FINISHED)),
        arg("--dry-run", action="store_true", help="list what would go; delete nothing"),
        arg("--yes", action="store_true",
            help="no question for --older-than 0 on a busy home")]),
    Command("schedule", "recurring jobs: add, list, rm, pause, resume, run"),
    Command("schedule add", "run a command on a cron schedule", cmd_schedule_add, [
        "queuectl schedule add nightly '0 3 * * *' --mem 2G --nice 10 -- ./backup.sh",
        "queuectl schedule add sync @hourly --overlap queue --jitter 5m -- ./sync.sh"], [
        arg("name", metavar="NAME"), arg("cron", metavar="CRON",
                                         help="5 fields (m h dom mon dow) or @daily ..."),
        *[a for a in ENQUEUE_ARGS if spec_dest(*a) not in SCHEDULE_NOT_ENQUEUE],
        arg("--overlap", metavar="skip|queue",
            help="skip (default): no new run while the last one waits or runs"),
        arg("--catch-up", metavar="N", help="after downtime, enqueue at most the latest N "
                                            "missed slots (default 1)"),
        arg("--jitter", metavar="DUR", help="spread each start over up to DUR")]),
    Command("schedule list", "schedules, their next and last runs", cmd_schedule_list,
            ["queuectl schedule list"], [JSON_ARG]),
    Command("schedule rm", "remove a schedule (its jobs stay)", cmd_schedule_rm,
            ["queuectl schedule rm nightly"], [arg("name", metavar="NAME")]),
    Command("schedule pause", "fire no slot until resumed", cmd_schedule_pause,
            ["queuectl schedule pause nightly"], [arg("name", metavar="NAME")]),
    Command("schedule resume", "fire again, from the next slot on", cmd_schedule_resume,
            ["queuectl schedule resume nightly"], [arg("name", metavar="NAME")]),
    Command("schedule run", "enqueue a schedule's job once, now", cmd_schedule_run,
            ["queuectl schedule run nightly"], [arg("name", metavar="NAME")]),
    Command("limit", "concurrency limits of keys and queues: set, list, rm"),
    Command("limit set", "at most N running jobs hold KEY (queue:NAME: a queue's)",
            cmd_limit_set, ["queuectl limit set db-main 1", "queuectl limit set queue:reports 2"],
            [arg("key", metavar="KEY"), arg("n", metavar="N")]),
    Command("limit list", "limits set, and keys in use with what holds them", cmd_limit_list,
            ["queuectl limit list"], [JSON_ARG]),
    Command("limit rm", "remove a limit (a key: 1 again; a queue: none)", cmd_limit_rm,
            ["queuectl limit rm queue:reports"], [arg("key", metavar="KEY")]),
    Command("config", "get, set or list settings"),
    Command("config get", "print one setting (no KEY: every setting, as list)",
            cmd_config_get, ["queuectl config get max-retries", "queuectl config get"],
            [arg("key", metavar="KEY", nargs="?"), JSON_ARG]),
    Command("config set", "change one setting", cmd_config_set,
            ["queuectl config set max-retries 5"],
            [arg("key", metavar="KEY"), arg("value", metavar="VALUE")]),
    Command("config list", "every setting and its value", cmd_config_list,
            ["queuectl config list"], [JSON_ARG]),
    Command("metrics", "Prometheus text format metrics", cmd_metrics,
            ["queuectl metrics > /var/lib/node_exporter/queuectl.prom"]),
    Command("serve", "a read-only status page, /metrics and /api over HTTP", cmd_serve, [
        "queuectl serve", "queuectl serve --bind 127.0.0.1:9000",
        "queuectl serve --bind 0.0.0.0:8765 --token-file /etc/queuectl/token"], [
        arg("--bind", default=SERVE_BIND, metavar="HOST:PORT",
            help=f"where to listen (default {SERVE_BIND}; not loopback: needs --token-file)"),
        arg("--token-file", metavar="PATH",
            help="require the token in this 0600 file (Authorization: Bearer, or a "
                 "?token= link that sets a cookie)")]),
    Command("top", "a live view: counts, running jobs, recent failures", cmd_top, [
        "queuectl top", "queuectl top --interval 5", "queuectl top --once"], [
        arg("--interval", type=_value("interval", "--interval"), default=1.0, metavar="DUR",
            help="seconds between refreshes (default 1)"),
        arg("--once", action="store_true",
            help="print one frame and exit (no terminal needed)")]),
    Command("help", "the manual's sections at the terminal (keys, hooks, schedules...)",
            cmd_help, ["queuectl help keys", "queuectl help retry policy", "queuectl help"], [
        arg("topic", nargs="*", metavar="TOPIC",
            help="words of a section's title (none: list them)")]),
    Command("completion", "print a shell completion script", cmd_completion, [
        "source <(queuectl completion bash)",
        "queuectl completion bash > /etc/bash_completion.d/queuectl",
        "source <(queuectl completion zsh)        # in ~/.zshrc",
        "queuectl completion fish > ~/.config/fish/completions/queuectl.fish"],
        [arg("shell", choices=["bash", "zsh", "fish"], help="the shell")]),
    Command("doctor", "check integrity, permissions, stuck and orphaned jobs", cmd_doctor,
            ["queuectl doctor", "queuectl doctor --json"], [JSON_ARG]),
]

COMMAND_NAMES = {c.words[0] for c in COMMAND_TABLE}

def actions_of(group):
    """The actions of a command group (worker, dlq, config), in order."""
    return [c.words[1] for c in COMMAND_TABLE if len(c.words) == 2 and c.words[0] == group]

def short_usage():
    lines = ["usage: queuectl [--home DIR] COMMAND ...", "", "Common commands:"]
    lines += [f"  queuectl {c.common[0]:<22} {c.common[1]}"
              for c in COMMAND_TABLE if c.common]
    lines += ["", "Run 'queuectl --help' for every command, 'queuectl COMMAND --help' "
              "for one."]
    return "\n".join(lines) + "\n"

class Args:
    """The parsed arguments of a command (argparse's Namespace, or fast_parse's)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

def fast_parse(argv):
    """argv of a plain enqueue, parsed as argparse parses it but without
    importing argparse and the re, enum and gettext it pulls in: 10 ms of
    every enqueue that cron runs. None for anything else (help, a mistake,
    an abbreviated option, --, a value that starts with -, 1.0's quoted
    command followed by options): argparse then parses argv, with its
    usage and messages. test_queuectl checks that the two agree."""
    home, i = None, 0
    if argv[:1] == ["--home"] and len(argv) > 1 and not argv[1].startswith("-"):
        home, i = argv[1], 2
    elif argv[:1] and argv[0].startswith("--home="):
        home, i = argv[0][len("--home="):], 1
    if argv[i:i + 1] != ["enqueue"]:
        return None
    c = next(c for c in COMMAND_TABLE if c.words == ("enqueue",))
    values = {"cmd": "enqueue", "home": home, "handler": c.handler, "parser": None,
              "specs": c.args}
    options, positional = {"--home": ("home", "store", None)}, None
    for flags, kw in c.args:
        dest, action = spec_dest(flags, kw), kw.get("action", "store")
        if flags[0].startswith("-"):
            values[dest] = kw.get("default", False if action == "store_true" else None)
            options.update((f, (dest, action, kw.get("type"))) for f in flags)
        else:
            positional = dest           # the command's words (nargs=REMAINDER)
    i += 1
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "-":
        name, eq, value = argv[i].partition("=")
        if name not in options or (eq and not name.startswith("--")):
            return None
        dest, action, convert = options[name]
        i += 1
        if action == "store_true":
            if eq:
                return None
            values[dest] = True
            continue
        if not eq:
            if i == len(argv) or argv[i].startswith("-"):
                return None
            value, i = argv[i], i + 1
        try:
            value = convert(value) if convert else value
        except Exception:
            return None                  # argparse says what is wrong
        values[dest] = (values[dest] or []) + [value] if action == "append" else value
    words = argv[i:]
    if quoted_then_options(words, values.get("cwd")):
        return None                      # 1.0's 'cmd arg' --queue q: argparse reads it
    values[positional] = words
    return Args(**values)

def build_parser(only=None):
    """The argument parser, built from COMMAND_TABLE; with only=NAME, just
    that command's part (building all of them costs a cron-driven enqueue
    several ms)."""
    import argparse

    parsers = {}                         # COMMAND_TABLE's words -> its parser
    top_parser = [None]                  # the whole parser, whose argv main sets


    class Parser(argparse.ArgumentParser):
        def error(self, message):
            # One line: what is wrong and where to look. A mistyped command
            # gets the nearest one; the hint names the (sub)command's --help.
            import difflib
            argv = getattr(top_parser[0], "argv", [])
            bad = message.split("invalid choice: '", 1)[1].split("'", 1)[0] \
                if "invalid choice: '" in message else None
            before = argv[:argv.index(bad)] if bad in argv else argv
            words = [w for w in before if (w,) in parsers][:1]
            if words and bad is None and tuple(before[before.index(words[0]):][:2]) in parsers:
                words = list(before[before.index(words[0]):][:2])
            prog = " ".join(["queuectl"] + words)
            if bad is None:
                raise UsageError(f"{message} (see {prog} --help)")
            choices = [w[-1] for w in parsers if w[:-1] == tuple(words)]
            near = difflib.get_close_matches(bad, choices, n=1, cutoff=0.6)
            raise UsageError(f"unknown command {bad!r}" + (f': did you mean "{near[0]}"?'
                                                           if near else "")
                             + f" (see {prog} --help)")

    common = Parser(add_help=False)
    common.add_argument("--home", default=argparse.SUPPRESS, metavar="DIR", help=HOME_HELP)
    parser = top_parser[0] = Parser(
        prog="queuectl", description="A background job queue for shell commands: retries, "
        "backoff, a dead letter queue, timeouts and crash recovery, all in SQLite.")
    parser.add_argument("--version", action="version", version=f"queuectl {__version__}")
    parser.add_argument("--home", metavar="DIR", help=HOME_HELP)
    top = parser.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=Parser)
    groups = {}
    for c in COMMAND_TABLE:
        if only is not None and c.words[0] != only:
            continue
        epilog = ("examples:\n" + "\n".join("  " + e for e in c.examples)
                  if c.examples else None)
        parent = top if len(c.words) == 1 else groups[c.words[0]]
        many = [a for a in c.args if a[0][0].startswith("-")][10:]
        usage = ("queuectl " + " ".join(c.words) + " [OPTION ...] " + " ".join(
            f"{kw['metavar']} ..." if kw.get("nargs") == REMAINDER else kw["metavar"]
            for flags, kw in c.args if not flags[0].startswith("-"))) if many else None
        p = parent.add_parser(c.words[-1], help=c.help, description=c.help, epilog=epilog,
                              usage=usage,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              parents=[common])
        parsers[c.words] = p
        if c.handler is None:            # a group: its actions follow
            groups[c.words[0]] = p.add_subparsers(dest="action", metavar="ACTION",
                                                  parser_class=Parser)
            continue
        for flags, kw in c.args:
            p.add_argument(*flags, **kw)
        p.set_defaults(handler=c.handler, parser=p, specs=c.args)
    return parser

# Options that take lists: repeated, or comma-separated, or both.
LIST_OPTIONS = {"state": "--state", "queue": "--queue", "queues": "QUEUE"}

def check_arguments(args):
    """Checks every command shares: no empty value (--state '' is a
    mistake, not 'all'); list options split on commas, each state known and
    each queue a valid name."""
    for flags, kw in getattr(args, "specs", ()):
        dest = spec_dest(flags, kw)
        value = getattr(args, dest, None)
        name = flags[-1] if flags[0].startswith("-") else kw.get("metavar", dest)
        values = value if isinstance(value, list) else [value]
        if dest in ("job", "words", "value", "launcher") + HOOK_EVENTS or \
                not any(v == "" for v in values):
            continue             # config set KEY '', --on-dead '', --launcher '': none
        allowed = {"state": "one of " + ", ".join(STATES),
                   "queue": "a queue name", "queues": "a queue name"}.get(dest)
        raise UsageError(f"{name} needs a value" + (f": {allowed}" if allowed else ""))
    for dest, name in LIST_OPTIONS.items():
        value = getattr(args, dest, None)
        if not isinstance(value, list):
            continue
        items = [part.strip() for v in value for part in v.split(",")]
        if "" in items:
            raise UsageError(f"{name} {','.join(value)!r} has an empty item")
        for item in items:
            if dest == "state" and item not in STATES:
                raise UsageError(f"unknown state {item!r}; use one of " + ", ".join(STATES))
            if dest != "state" and item != HOOK_QUEUE:
                check_name(item, "queue name")
        setattr(args, dest, list(dict.fromkeys(items)))

def _command_name(argv):
    """The subcommand named in argv (after --home DIR), or None."""
    i = 0
    while i < len(argv) and argv[i].startswith("--home"):
        i += 1 if "=" in argv[i] else 2
    return argv[i] if i < len(argv) and argv[i] in COMMAND_NAMES else None

def main(argv=None):
    """Run one command; returns its exit code. Errors become one line on
    stderr; QUEUECTL_DEBUG=1 shows tracebacks of unexpected ones."""
    if argv is None:
        argv = sys.argv[1:]
        if not (_command_name(argv) == "worker" and "start" in argv):
            # Like cat: a closed pipe (| head) ends the command quietly, at
            # any write. A worker keeps running; it ignores a closed output.
            # (_signal: the signal module's enums cost an enqueue 1 ms.)
            import _signal
            _signal.signal(_signal.SIGPIPE, _signal.SIG_DFL)
    argv = list(argv)
    if argv[:1] == ["__complete"]:
        return complete_values(argv[1:])
    if not argv:
        # Bare, as tsp and pueue: the queue, once there is one; else how to start.
        home = os.environ.get("QUEUECTL_HOME") or os.path.join(
            os.path.expanduser("~"), ".queuectl")
        if not os.path.exists(os.path.join(home, "queue.db")):
            sys.stdout.write(short_usage())
            return EXIT_OK
        argv = ["list"]
    try:
        only = _command_name(argv)
        args = fast_parse(argv)
        if args is None:
            parser = build_parser(only)
            parser.argv = argv
            args = parser.parse_args(argv)
            args.argv = argv
        args.home = resolve_home(getattr(args, "home", None))
        check_arguments(args)
        if args.cmd is None:
            sys.stdout.write(short_usage())
            return EXIT_OK
        handler = getattr(args, "handler", None)
        if handler is None:              # a group named without its action
            actions = actions_of(args.cmd)
            sys.stderr.write(f"usage: queuectl {args.cmd} {{{','.join(actions)}}} ...\n")
            raise UsageError(f"{args.cmd} needs an action: " + ", ".join(actions))
        return handler(args)
    except QueuectlError as e:
        sys.stderr.write(f"queuectl: error: {e}\n")
        return e.code
    except KeyboardInterrupt:
        sys.stderr.write("queuectl: error: interrupted\n")
        return 130
    except BrokenPipeError:
        try:
            sys.stdout = None
        except Exception:
            pass
        return EXIT_OK
    except Exception as e:
        if os.environ.get("QUEUECTL_DEBUG"):
            raise
        sys.stderr.write(f"queuectl: error: unexpected {type(e).__name__}: {e} "
                         "(run with QUEUECTL_DEBUG=1 for details, and please "
                         "report it)\n")
        return EXIT_FAIL

if __name__ == "__main__":
    sys.exit(main())
