#!/usr/bin/env python3
"""Where a swarm run's time went, from the daemons' logs kept by netns_bench.

Run the bench with the daemons at debug level and their logs kept:

    DFDAEMON_LOG_LEVEL=debug D7Y_KEEP_LOGS=/tmp/keep \\
        target/release/examples/netns_bench --peers 16 --rate 100mbit --systems dragonfly

then:

    scripts/swarm_trace.py /tmp/keep timeline [--bucket 1.0]   # links over time
    scripts/swarm_trace.py /tmp/keep links --from 5 --to 20     # each host's links
    scripts/swarm_trace.py /tmp/keep gaps                       # idle time between pieces
    scripts/swarm_trace.py /tmp/keep seed                       # the seed's upload, its last distinct piece

Each `piece fetched` line (its end, its duration, its parent) is spread evenly over its
duration; a host's downlink is what it fetched, its uplink what others fetched from it.
Percentages are payload against the link rate (`--rate-mbit`), so a full link reads
about 93-95% (headers and ACKs). Time 0 is the first registration with the scheduler.
Host 0 is the seed peer (on the origin's host).
"""

import argparse
import collections
import datetime
import glob
import re
import signal
import statistics


def stamp(line):
    return datetime.datetime.fromisoformat(line.split()[0].rstrip("Z")).timestamp()


def host_of(peer_id):
    m = re.search(r"-host(\d+)-", peer_id)
    return int(m.group(1)) if m else None


def load(directory):
    """Fetches as (start, end, host, parent host or None for the origin, answer ms, piece)."""
    fetches, t0 = [], None
    for path in glob.glob(directory + "/host*/dfdaemon.log"):
        host = int(re.search(r"host(\d+)/", path).group(1))
        # A fetch's `piece received` line comes before its `piece fetched`, but other
        # fetches' lines may come between: matched by piece number.
        answers = {}
        for line in open(path, errors="replace"):
            if "registered with scheduler" in line:
                t = stamp(line)
                t0 = t if t0 is None else min(t0, t)
            elif "piece received" in line:
                m = re.search(r"number=(\d+) header_ms=(\d+)", line)
                if m:
                    answers[m.group(1)] = int(m.group(2))
            elif "piece fetched" in line:
                m = re.search(r'number=(\d+) parent="([^"]*)" millis=(\d+)', line)
                if not m:
                    continue
                end = stamp(line)
                start = end - int(m.group(3)) / 1000
                parent = host_of(m.group(2)) if m.group(2) else None
                answer = answers.pop(m.group(1), None)
                fetches.append((start, end, host, parent, answer, int(m.group(1))))
    if t0 is None:
        raise SystemExit(f"no registration found under {directory}")
    return [(s - t0, e - t0, h, p, a, n) for s, e, h, p, a, n in fetches]


def spread(fetches, a, b, piece):
    """Bytes each host received and sent between a and b (seconds)."""
    down, up = collections.Counter(), collections.Counter()
    for s, e, h, p, *_ in fetches:
        overlap = max(0.0, min(e, b) - max(s, a))
        if overlap <= 0:
            continue
        share = piece * overlap / max(e - s, 1e-3)
        down[h] += share
        if p is not None:
            up[p] += share
    return down, up


def timeline(fetches, args):
    piece = args.piece_mib * 2**20
    cap = args.rate_mbit * 1e6 / 8 * args.bucket
    # Host 0 is the seed peer: its own fetches are from the origin, on its host.
    hosts = sorted({h for _, _, h, *_ in fetches} - {0})
    end = max(e for _, e, *_ in fetches)
    print("from (s)  seed up %  hosts down %: mean  min  max")
    t = 0.0
    while t < end:
        down, up = spread(fetches, t, t + args.bucket, piece)
        v = [down[h] / cap * 100 for h in hosts]
        print(f"{t:8.2f}  {up[0] / cap * 100:9.0f}  {sum(v) / len(v):19.0f} {min(v):4.0f} {max(v):4.0f}")
        t += args.bucket
    ends = collections.defaultdict(float)
    for _, e, h, *_ in fetches:
        if h != 0:
            ends[h] = max(ends[h], e)
    print("last piece per host (s):", " ".join(f"{e:.2f}" for e in sorted(ends.values())))


def links(fetches, args):
    piece = args.piece_mib * 2**20
    cap = args.rate_mbit * 1e6 / 8 * (args.to - args.frm)
    down, up = spread(fetches, args.frm, args.to, piece)
    children = collections.defaultdict(set)
    for s, e, h, p, *_ in fetches:
        if p is not None and min(e, args.to) > max(s, args.frm):
            children[p].add(h)
    print(f"{args.frm}-{args.to} s  host  up %  down %  children")
    for h in sorted(set(up) | set(down)):
        d = "     -" if h == 0 else f"{down[h] / cap * 100:6.0f}"  # the seed's is the origin's
        print(f"{h:14d}  {up[h] / cap * 100:4.0f}  {d}  {len(children[h]):8d}")
    hosts = [h for h in set(up) | set(down) if h != 0]
    print(f"mean of the hosts: up {sum(up[h] for h in hosts) / cap * 100 / len(hosts):.1f}%,"
          f" down {sum(down[h] for h in hosts) / cap * 100 / len(hosts):.1f}%")


def gaps(fetches, _args):
    pairs = collections.defaultdict(list)
    for s, e, h, p, a, _ in fetches:
        if p is not None:  # parents' flows only: the origin's has no answer to wait for
            pairs[(h, p)].append((s, e, a or 0))
    busy = idle = answers = 0.0
    waits = []
    for runs in pairs.values():
        runs.sort()
        for i, (s, e, a) in enumerate(runs):
            busy += e - s
            answers += a / 1000
            if i > 0:
                gap = s - runs[i - 1][1]
                if 0 <= gap < 0.5:  # longer: the parent had nothing new
                    waits.append(gap)
                    idle += gap
    total = busy + idle
    print(f"fetches from parents {sum(map(len, pairs.values()))}, flow-seconds busy {busy:.1f}")
    print(f"waiting for the parent's answer: {answers:.2f} s ({100 * answers / total:.2f}% of busy)")
    print(f"between one piece's end and the next request: {idle:.2f} s ({100 * idle / total:.2f}%)")
    if len(waits) >= 10:
        q = statistics.quantiles(waits, n=10)
        print(f"  p10 / p50 / p90: {q[0] * 1000:.1f} / {q[4] * 1000:.1f} / {q[8] * 1000:.1f} ms")


def seed(fetches, args):
    """The seed's upload: every piece is sent by it once at least, and each host's end
    follows the last one, so its uplink is the swarm's critical path."""
    piece = args.piece_mib * 2**20
    cap = args.rate_mbit * 1e6 / 8
    served = sorted((s, e, h, n) for s, e, h, p, _, n in fetches if p == 0)
    if not served:
        raise SystemExit("no fetch from the seed peer (host 0)")
    first = {}
    for s, e, h, n in served:
        first.setdefault(n, (s, e, h))
    last = max(e for _, e, _ in first.values())
    # The earliest the seed could send these pieces once each: payload at the shaped
    # rate, less the Ethernet, IP and TCP headers (1448 payload bytes a 1514-byte frame).
    floor = len(first) * piece / cap * 1514 / 1448
    print(f"pieces served {len(served)}, distinct {len(first)}; last distinct piece ends at "
          f"{last:.2f} s, {last / floor:.3f} x its floor ({floor:.2f} s at {args.rate_mbit:g} Mbit)")
    copies = [(s, e, h, n) for s, e, h, n in served if first[n][0] != s]
    if copies:
        print("copies (start-end s, host, piece):",
              ", ".join(f"{s:.1f}-{e:.1f} h{h} #{n}" for s, e, h, n in copies))
    t, step = 0.0, args.bucket
    row = []
    while t < last:
        _, up = spread(fetches, t, t + step, piece)
        row.append(f"{t:g}:{up[0] / (cap * step) * 100:.0f}")
        t += step
    print("seed uplink payload % by time (s):", " ".join(row))


def main():
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # quiet when piped into head
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", help="the D7Y_KEEP_LOGS directory")
    ap.add_argument("view", choices=["timeline", "links", "gaps", "seed"])
    ap.add_argument("--rate-mbit", type=float, default=100.0)
    ap.add_argument("--piece-mib", type=float, default=4.0)
    ap.add_argument("--bucket", type=float, default=1.0, help="timeline step (s)")
    ap.add_argument("--from", dest="frm", type=float, default=5.0)
    ap.add_argument("--to", type=float, default=20.0)
    args = ap.parse_args()
    fetches = load(args.logs)
    if not fetches:
        raise SystemExit("no `piece fetched` lines: run the daemons at debug level")
    {"timeline": timeline, "links": links, "gaps": gaps, "seed": seed}[args.view](fetches, args)


if __name__ == "__main__":
    main()
