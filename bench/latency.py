#!/usr/bin/env python3
"""Wake-up latency: from the moment the sender's COMMIT returns to
  (a) a LISTENing session receiving the queue's notification, and
  (b) a session blocked in pgflow.read_with_poll returning the message,
compared with a plain loop that reads every 100 ms (measured on fewer messages, and its
expectation: uniform over the interval, so p50 ~ 50 ms, p99 ~ 99 ms, plus the read itself).

Messages are sent one at a time, each in its own transaction, with the receiver idle and waiting
before every send, so each sample is one wake-up, not a queue draining. Run by bench/latency.sh,
which starts its own cluster; prints a markdown table on stdout.

    python3 bench/latency.py DSN [messages] [waiters]

(d) and (e) repeat (a) and (b) with 200 sessions waiting at once (the third argument): every
listener's receipt counts in (d); in (e) every reader is woken and the one that got the message
counts.
"""

import json
import multiprocessing
import random
import statistics
import sys
import threading
import time

import psycopg
from psycopg import sql


def pct(xs, p):
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(p / 100 * len(xs) + 0.5)) - 1))
    return xs[k]


# Sender and receiver run in separate processes (one Python thread each, no shared interpreter
# lock between them) and take their timestamps from the same system-wide monotonic clock.
clock = time.monotonic


def listen_receiver(dsn, q, n, pipe):
    with psycopg.connect(dsn, autocommit=True) as lis:
        lis.execute(sql.SQL("LISTEN {}").format(sql.Identifier(f"pgflow.queue.{q}")))
        received = {}
        pipe.send("ready")
        for note in lis.notifies(timeout=30, stop_after=n):
            t = clock()
            mid = json.loads(note.payload)["first_msg_id"]
            received[mid] = t
            pipe.send(mid)
        pipe.send(received)


def bench_listen(dsn, n):
    q = "lat_listen"
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("SELECT pgflow.create_queue(%s, notify => true)", (q,))
    here, there = multiprocessing.Pipe()
    proc = multiprocessing.Process(target=listen_receiver, args=(dsn, q, n, there))
    proc.start()
    assert here.recv() == "ready"
    sender = psycopg.connect(dsn, autocommit=False)
    committed = {}
    for _ in range(n):
        mid = sender.execute("SELECT pgflow.send(%s, '{}')", (q,)).fetchone()[0]
        sender.commit()
        committed[mid] = clock()
        if not here.poll(5):  # the listener has it (or it was missed)
            break
        here.recv()
        time.sleep(random.uniform(0.001, 0.003))
    received = here.recv()
    while not isinstance(received, dict):
        received = here.recv()
    proc.join()
    sender.close()
    lat = [(received[m] - committed[m]) * 1000 for m in committed if m in received]
    return lat, n - len(lat)


def poll_receiver(dsn, q, n, pipe):
    with psycopg.connect(dsn, autocommit=True) as reader:
        returned, empty = {}, 0
        for _ in range(n):
            pipe.send("waiting")
            rows = reader.execute(
                "SELECT msg_id FROM pgflow.read_with_poll(%s, 30, 1, 10, 5000)", (q,)).fetchall()
            t = clock()
            if not rows:
                empty += 1
                continue
            returned[rows[0][0]] = t
            reader.execute("SELECT pgflow.delete(%s, %s)", (q, rows[0][0]))
        pipe.send(returned)


def bench_read_with_poll(dsn, n):
    q = "lat_poll"
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("SELECT pgflow.create_queue(%s)", (q,))
        enabled = admin.execute("SELECT pgflow.wakeups_enabled()").fetchone()[0]
    here, there = multiprocessing.Pipe()
    proc = multiprocessing.Process(target=poll_receiver, args=(dsn, q, n, there))
    proc.start()
    sender = psycopg.connect(dsn, autocommit=False)
    committed = {}
    for _ in range(n):
        assert here.recv() == "waiting"
        time.sleep(random.uniform(0.002, 0.004))  # the reader is blocked in read_with_poll now
        mid = sender.execute("SELECT pgflow.send(%s, '{}')", (q,)).fetchone()[0]
        sender.commit()
        committed[mid] = clock()
    returned = here.recv()
    proc.join()
    sender.close()
    lat = [(returned[m] - committed[m]) * 1000 for m in committed if m in returned]
    return lat, n - len(lat), enabled


def bench_plain_poll(dsn, n, interval=0.1):
    """A client loop: read; if nothing, sleep 100 ms and read again."""
    q = "lat_plain"
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("SELECT pgflow.create_queue(%s)", (q,))
    reader = psycopg.connect(dsn, autocommit=True)
    sender = psycopg.connect(dsn, autocommit=False)
    returned = {}
    stop = threading.Event()

    def poll_loop():
        while not stop.is_set():
            rows = reader.execute("SELECT msg_id FROM pgflow.read(%s, 30, 1)", (q,)).fetchall()
            if rows:
                returned[rows[0][0]] = clock()
                reader.execute("SELECT pgflow.delete(%s, %s)", (q, rows[0][0]))
            else:
                time.sleep(interval)

    t = threading.Thread(target=poll_loop)
    t.start()
    committed = {}
    for _ in range(n):
        time.sleep(random.uniform(0.0, interval))  # sends fall at random points of the cycle
        mid = sender.execute("SELECT pgflow.send(%s, '{}')", (q,)).fetchone()[0]
        sender.commit()
        committed[mid] = clock()
        while mid not in returned:
            time.sleep(0.001)
    stop.set()
    t.join()
    reader.close()
    sender.close()
    return [(returned[m] - committed[m]) * 1000 for m in committed]


def many_receiver(dsn, q, mode, waiters, pipe):
    """`waiters` sessions in one process, a thread each: LISTENing on the queue's channel, or
    blocked in read_with_poll on it. Every receipt (msg_id, time) goes back through the pipe."""
    out, lock, ready, stop = [], threading.Lock(), threading.Barrier(waiters + 1, timeout=120), threading.Event()

    def listener():
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute(sql.SQL("LISTEN {}").format(sql.Identifier(f"pgflow.queue.{q}")))
            ready.wait()
            while not stop.is_set():
                for note in c.notifies(timeout=0.5):
                    t = clock()
                    p = json.loads(note.payload)
                    with lock:
                        out.append((p["last_msg_id"], t))

    def reader():
        with psycopg.connect(dsn, autocommit=True) as c:
            ready.wait()
            while not stop.is_set():
                rows = c.execute("SELECT msg_id FROM pgflow.read_with_poll(%s, 30, 1, 1, 5000)", (q,)).fetchall()
                t = clock()
                if rows:
                    with lock:
                        out.append((rows[0][0], t))
                    c.execute("SELECT pgflow.delete(%s, %s)", (q, rows[0][0]))

    threads = [threading.Thread(target=listener if mode == "listen" else reader) for _ in range(waiters)]
    for t in threads:
        t.start()
    ready.wait()
    pipe.send("ready")
    pipe.recv()  # the sender is done
    time.sleep(1)
    stop.set()
    for t in threads:
        t.join()
    pipe.send(out)


def bench_many(dsn, n, waiters, mode):
    """Commit to receipt with `waiters` sessions waiting: for LISTEN every listener's receipt
    counts; for read_with_poll the one reader that got the message (all of them are woken)."""
    q = f"lat_many_{mode}"
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("SELECT pgflow.create_queue(%s, notify => true)", (q,))
    here, there = multiprocessing.Pipe()
    proc = multiprocessing.Process(target=many_receiver, args=(dsn, q, mode, waiters, there))
    proc.start()
    assert here.recv() == "ready"
    time.sleep(1)
    sender = psycopg.connect(dsn, autocommit=False)
    committed = {}
    for _ in range(n):
        mid = sender.execute("SELECT pgflow.send(%s, '{}')", (q,)).fetchone()[0]
        sender.commit()
        committed[mid] = clock()
        time.sleep(random.uniform(0.02, 0.04))  # every waiter is back to waiting
    here.send("done")
    out = here.recv()
    proc.join()
    sender.close()
    lat = [(t - committed[m]) * 1000 for m, t in out if m in committed]
    expected = n * waiters if mode == "listen" else n
    return lat, expected - len(lat)


def row(name, lat, lost, target=None):
    p50, p99 = pct(lat, 50), pct(lat, 99)
    lo = min(lat)
    verdict = "" if target is None else ("yes" if p99 < target else "**no**")
    return (f"| {name} | {len(lat)} | {lost} | {lo:.2f} | {p50:.2f} | {p99:.2f} | {max(lat):.2f} | "
            f"{statistics.mean(lat):.2f} | {verdict} |")


def main():
    dsn = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE EXTENSION IF NOT EXISTS pgflow")
        version = c.execute("SHOW server_version").fetchone()[0]
    print(f"(a) LISTEN, {n} messages ...", file=sys.stderr)
    a, a_lost = bench_listen(dsn, n)
    print(f"(b) read_with_poll, {n} messages ...", file=sys.stderr)
    b, b_lost, enabled = bench_read_with_poll(dsn, n)
    m = max(100, n // 10)
    print(f"(c) plain 100 ms poll loop, {m} messages ...", file=sys.stderr)
    c = bench_plain_poll(dsn, m)
    many = int(sys.argv[3]) if len(sys.argv) > 3 else 200
    k = max(50, n // 5)
    print(f"(d) {many} listeners, {k} messages ...", file=sys.stderr)
    d, d_lost = bench_many(dsn, k, many, "listen")
    print(f"(e) {many} sessions in read_with_poll, {k} messages ...", file=sys.stderr)
    e, e_lost = bench_many(dsn, k, many, "read")
    print(f"PostgreSQL {version}, wake-ups through shared memory: {'on' if enabled else 'off'}. "
          "Latency in ms from the sender's COMMIT returning to the receiver having the event.\n")
    print("| path | messages | missed | min ms | p50 ms | p99 ms | max ms | mean ms | p99 < 5 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|:---:|")
    print(row("(a) LISTEN on the queue channel, notification received", a, a_lost, 5))
    print(row("(b) read_with_poll (poll_interval_ms 5000) returns the message", b, b_lost, 5))
    print(row("(c) plain loop: read, sleep 100 ms, read again (measured)", c, 0))
    print("| (c') plain 100 ms loop, expected: uniform over the interval | | | 0 | 50 | 99 | 100 | 50 | |")
    print()
    print("| path, many waiters | receipts | missed | min ms | p50 ms | p99 ms | max ms | mean ms | p99 < 20 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|:---:|")
    print(row(f"(d) {many} sessions LISTENing, each notification received by each", d, d_lost, 20))
    print(row(f"(e) {many} sessions blocked in read_with_poll, the message returned", e, e_lost, 20))


if __name__ == "__main__":
    main()
