#!/usr/bin/env python3
"""Python clients of the real-client corpus (tests/tests/corpus.rs).

Every client is bounded twice, by a count (--max) and by a deadline (--secs),
so it stops by itself even if the test that started it cannot kill it. When
it stops it prints one JSON line on stdout:

    {"ops": attempts, "ok": succeeded, "fail": failed, "secs": elapsed}

which the test turns into the rate it achieved: a storm case must really be
a fast failing loop, and a healthy case must really succeed.

    clients.py requests URL --retries R --backoff B [--calls C] [--insecure]
    clients.py redis --port P --password PW [--set]
    clients.py resolve NAME [--rate PER_SEC]
    clients.py udp-clients --port P --procs N --count K --gap SECS
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import time


class PerSecond:
    """Attempts per second since t0, for tests that judge a rate over a
    window (a budget's)."""

    def __init__(self, t0):
        self.t0 = t0
        # The same moment on the wall clock, so a test can place its own
        # events (a budget's creation) on this run's seconds.
        self.t0_ms = int((time.time() - (time.monotonic() - t0)) * 1000)
        self.counts = []

    def tick(self):
        i = int(time.monotonic() - self.t0)
        while len(self.counts) <= i:
            self.counts.append(0)
        self.counts[i] += 1


def report(ops, ok, fail, t0, **extra):
    out = {"ops": ops, "ok": ok, "fail": fail, "secs": round(time.monotonic() - t0, 6)}
    out.update(extra)
    print(json.dumps(out), flush=True)


def requests_client(a):
    """requests with urllib3's Retry doing the retrying, as applications
    configure it: backoff_factor=0 is the storm, a positive factor the
    library's exponential backoff (its healthy twin)."""
    import requests
    import urllib3
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    urllib3.disable_warnings()
    failed = [0]
    per_s = PerSecond(time.monotonic())

    class CountingRetry(Retry):
        """Counts failed attempts: urllib3 calls increment once per attempt
        it retries or gives up on (Retry.new keeps the subclass)."""

        def increment(self, *args, **kwargs):
            failed[0] += 1
            per_s.tick()
            return super().increment(*args, **kwargs)

    retry = CountingRetry(
        total=a.retries,
        connect=a.retries,
        status=a.retries,
        backoff_factor=a.backoff,
        status_forcelist=[503],
        raise_on_status=False,
        respect_retry_after_header=False,
    )
    s = requests.Session()  # keep-alive: one pooled connection per host
    adapter = HTTPAdapter(max_retries=retry)
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    t0 = per_s.t0
    end = t0 + a.secs
    ok = calls = 0
    statuses = {}
    try:
        while calls < a.calls and failed[0] + ok < a.max and time.monotonic() < end:
            calls += 1
            try:
                r = s.get(a.url, timeout=2, verify=not a.insecure)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code < 400:
                    ok += 1
                    per_s.tick()
            except requests.exceptions.ConnectionError:
                statuses["conn-error"] = statuses.get("conn-error", 0) + 1
    except KeyboardInterrupt:
        pass  # SIGINT ends the run early, with its report
    report(failed[0] + ok, ok, failed[0], t0, calls=calls, final=statuses,
           per_s=per_s.counts, t0_ms=per_s.t0_ms)


def redis_client(a):
    """redis-py, with the library's own retry turned off so that the loop
    here is the retry policy (redis-py >= 6 otherwise retries a failed AUTH
    with exponential backoff: a healthy client, not this case)."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    r = redis.Redis(host=a.host, port=a.port, password=a.password,
                    socket_timeout=2, retry=Retry(NoBackoff(), 0))
    t0 = time.monotonic()
    end = t0 + a.secs
    ops = ok = 0
    errors = {}
    while ops < a.max and time.monotonic() < end:
        ops += 1
        try:
            if a.set:
                r.set(f"key:{ops % 100}", "v")
                r.get(f"key:{ops % 100}")
            else:
                r.ping()
            ok += 1
        except redis.exceptions.RedisError as e:
            errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
    report(ops, ok, ops - ok, t0, errors=errors)


def resolve(a):
    """The system resolver (glibc getaddrinfo, as any program calls it),
    at a fixed pace or, with --rate 0, as fast as it answers."""
    t0 = time.monotonic()
    end = t0 + a.secs
    gap = 1.0 / a.rate if a.rate else 0.0
    due = t0
    ops = ok = 0
    errors = {}
    per_s = PerSecond(t0)
    try:
        while ops < a.max and time.monotonic() < end:
            # Counted once answered: SIGINT ends the run early, with its
            # report, and the lookup it cuts short is not counted.
            try:
                socket.getaddrinfo(a.name, 80, socket.AF_INET, socket.SOCK_STREAM)
                ok += 1
            except socket.gaierror as e:
                errors[str(e)] = errors.get(str(e), 0) + 1
            ops += 1
            per_s.tick()
            if gap:
                due += gap
                time.sleep(max(0.0, due - time.monotonic()))
    except KeyboardInterrupt:
        pass
    report(ops, ok, ops - ok, t0, errors=errors, per_s=per_s.counts, t0_ms=per_s.t0_ms)


def udp_one(a):
    """One client process: K distinct requests, each answered, a gap apart.
    Even-numbered clients connect their socket, odd ones use sendto, as
    both kinds exist."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1.0)
    peer = (a.host, a.port)
    if a.index % 2 == 0:
        s.connect(peer)
    t0 = time.monotonic()
    end = t0 + a.secs
    ops = ok = 0
    while ops < a.count and time.monotonic() < end:
        ops += 1
        msg = f"get key-{os.getpid()}-{ops}".encode()
        try:
            if a.index % 2 == 0:
                s.send(msg)
                data = s.recv(2048)
            else:
                s.sendto(msg, peer)
                data, _ = s.recvfrom(2048)
            ok += data == b"ok " + msg
        except OSError:
            pass
        time.sleep(a.gap)
    report(ops, ok, ops - ok, t0)


def udp_clients(a):
    """Starts N client processes at once (children of this one) and sums
    what they report."""
    t0 = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "udp-one", "--host", a.host, "--port", str(a.port),
             "--count", str(a.count), "--gap", str(a.gap), "--secs", str(a.secs),
             "--index", str(i)],
            stdout=subprocess.PIPE,
        )
        for i in range(a.procs)
    ]
    ops = ok = 0
    for p in procs:
        out, _ = p.communicate(timeout=a.secs + 5)
        r = json.loads(out.decode().strip().splitlines()[-1])
        ops += r["ops"]
        ok += r["ok"]
    report(ops, ok, ops - ok, t0, procs=len(procs))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("requests")
    r.add_argument("url")
    r.add_argument("--retries", type=int, default=0)
    r.add_argument("--backoff", type=float, default=0.0)
    r.add_argument("--calls", type=int, default=1_000_000)
    r.add_argument("--insecure", action="store_true")
    d = sub.add_parser("redis")
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=int, required=True)
    d.add_argument("--password", required=True)
    d.add_argument("--set", action="store_true")
    n = sub.add_parser("resolve")
    n.add_argument("name")
    n.add_argument("--rate", type=float, default=0.0)
    u = sub.add_parser("udp-clients")
    o = sub.add_parser("udp-one")
    o.add_argument("--index", type=int, default=0)
    for sp in (u, o):
        sp.add_argument("--host", default="127.0.0.1")
        sp.add_argument("--port", type=int, required=True)
        sp.add_argument("--count", type=int, default=20)
        sp.add_argument("--gap", type=float, default=0.1)
    u.add_argument("--procs", type=int, default=20)
    for sp in sub.choices.values():
        sp.add_argument("--max", type=int, default=1_000_000)
        sp.add_argument("--secs", type=float, default=4.0)
    a = p.parse_args()
    {
        "requests": requests_client,
        "redis": redis_client,
        "resolve": resolve,
        "udp-clients": udp_clients,
        "udp-one": udp_one,
    }[a.cmd](a)


if __name__ == "__main__":
    main()
