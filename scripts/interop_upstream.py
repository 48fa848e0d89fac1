#!/usr/bin/env python3
"""Mixed swarms of upstream's dragonfly-client and ours on loopback (see interop_upstream.sh).

Prints a Markdown report; exits non-zero when a check fails.
"""
import argparse, hashlib, os, shutil, signal, subprocess, sys, tempfile, time

MIB = 1 << 20


class Cluster:
    def __init__(self, upstream, ours, tmp):
        self.upstream, self.ours, self.tmp = upstream, ours, tmp
        self.procs = []
        self.next_port = 24000

    def port(self):
        self.next_port += 1
        return self.next_port

    def spawn(self, name, cmd, log):
        f = open(os.path.join(self.tmp, f"{name}.out"), "w")
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        self.procs.append((name, p, log))
        return p

    def stop(self):
        # Peers first (upstream's leave the scheduler with DeleteHost), the scheduler and
        # the origin last.
        for _, p, _ in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()

    def origin(self):
        www = os.path.join(self.tmp, "www")
        os.makedirs(www, exist_ok=True)
        self.www = www
        self.origin_port = self.port()
        self.access_log = os.path.join(self.tmp, "access.log")
        conf = os.path.join(self.tmp, "nginx.conf")
        t = self.tmp
        with open(conf, "w") as f:
            f.write(f"""user root; worker_processes 1; daemon off; pid {t}/nginx.pid; error_log {t}/nginx.err;
events {{ worker_connections 512; }}
http {{ log_format sent '$uri $body_bytes_sent'; access_log {self.access_log} sent;
sendfile on; client_body_temp_path {t}/cb; proxy_temp_path {t}/pt;
fastcgi_temp_path {t}/ft; uwsgi_temp_path {t}/ut; scgi_temp_path {t}/st;
server {{ listen 127.0.0.1:{self.origin_port}; root {www}; }} }}
""")
        self.spawn("nginx", ["nginx", "-c", conf], None)
        wait_port(self.origin_port)

    def publish(self, name, size):
        data = os.urandom(size)
        with open(os.path.join(self.www, name), "wb") as f:
            f.write(data)
        return f"http://127.0.0.1:{self.origin_port}/{name}", hashlib.sha256(data).hexdigest()

    def origin_bytes(self, name):
        total = 0
        if os.path.exists(self.access_log):
            for line in open(self.access_log):
                uri, sent = line.split()
                if uri == f"/{name}":
                    total += int(sent)
        return total

    def scheduler(self, seed_upload_port):
        d = os.path.join(self.tmp, "scheduler")
        os.makedirs(d)
        self.scheduler_port = self.port()
        conf = os.path.join(d, "scheduler.yaml")
        with open(conf, "w") as f:
            f.write(f"server:\n  listenIP: 127.0.0.1\n  port: {self.scheduler_port}\n"
                    f"metrics:\n  addr: 127.0.0.1:{self.port()}\n"
                    f"seedPeers:\n  - ip: 127.0.0.1\n    port: {seed_upload_port}\n")
        self.spawn("scheduler", [os.path.join(self.ours, "scheduler"), "--config", conf], None)
        wait_port(self.scheduler_port)

    def dynconfig(self, d):
        path = os.path.join(d, "dynconfig.yaml")
        with open(path, "w") as f:
            f.write(f"scheduler:\n  addrs:\n    - 127.0.0.1:{self.scheduler_port}\n")
        return path

    def daemon(self, name, upstream=False, seed=False, upload_port=None):
        """Starts a dfdaemon (ours or upstream's); returns (socket, upload port)."""
        d = os.path.join(self.tmp, name)
        os.makedirs(d)
        sock = os.path.join(d, "dfdaemon.sock")
        upload = upload_port or self.port()
        piece = self.port()
        conf = os.path.join(d, "dfdaemon.yaml")
        lines = [
            "host:", f"  hostname: {name}", "  ip: 127.0.0.1",
            "download:", "  server:", f"    socketPath: {sock}",
            "upload:", "  server:", "    ip: 127.0.0.1", f"    port: {upload}",
            "storage:", f"  dir: {d}/data", "  server:", "    ip: 127.0.0.1", f"    tcpPort: {piece}",
        ]
        if upstream:
            lines += [f"    quicPort: {self.port()}",
                      "proxy:", "  server:", "    ip: 127.0.0.1", f"    port: {self.port()}",
                      "metrics:", "  server:", "    ip: 127.0.0.1", f"    port: {self.port()}",
                      "health:", "  server:", "    ip: 127.0.0.1", f"    port: {self.port()}",
                      "stats:", "  server:", "    ip: 127.0.0.1", f"    port: {self.port()}"]
        else:
            lines += ["metrics:", "  server:", "    ip: 127.0.0.1", f"    port: {self.port()}",
                      "health:", "  server:", "    ip: 127.0.0.1", f"    port: {self.port()}"]
        if seed:
            lines += ["seedPeer:", "  enable: true", "  type: super"]
        with open(conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        binary = os.path.join(self.upstream if upstream else self.ours, "dfdaemon")
        cmd = [binary, "--config", conf, "--dynconfig", self.dynconfig(d)]
        if upstream:
            cmd += ["--log-dir", os.path.join(d, "log")]
        self.spawn(name, cmd, d)
        wait_socket(sock)
        return sock, upload

    def dfget(self, upstream, sock, url, out, extra=()):
        binary = os.path.join(self.upstream if upstream else self.ours, "dfget")
        started = time.time()
        r = subprocess.run([binary, url, "-O", out, "-e", sock, "--no-progress", *extra],
                           capture_output=True, text=True, timeout=120)
        return r, time.time() - started


def wait_port(port, timeout=30):
    import socket
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"port {port} never opened")


def wait_socket(path, timeout=30):
    import socket
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            s.close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"socket {path} never opened")


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--ours", required=True)
    ap.add_argument("--version", default="")
    ap.add_argument("--size-mib", type=int, default=96)
    ap.add_argument("--keep", action="store_true", help="keep the logs (printed path)")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="d7y-interop-")
    c = Cluster(os.path.abspath(args.upstream), os.path.abspath(args.ours), tmp)
    rows, failures = [], []

    def check(case, ok, detail):
        rows.append((case, "yes" if ok else "**no**", detail))
        if not ok:
            failures.append(case)

    size = args.size_mib * MIB
    try:
        c.origin()
        seed_upload = c.port()
        c.scheduler(seed_upload)
        seed_sock, _ = c.daemon("seed", seed=True, upload_port=seed_upload)

        # (a) An upstream peer beside our scheduler and seed peer.
        up_sock, _ = c.daemon("up0", upstream=True)
        url, digest = c.publish("a.bin", size)
        out = os.path.join(tmp, "a.out")
        r, took = c.dfget(True, up_sock, url, out)
        ok = r.returncode == 0 and os.path.exists(out) and sha256(out) == digest
        check("(a) upstream dfget via our scheduler + seed: output identical", ok,
              r.stderr.strip()[-300:] if not ok else f"{size // MIB} MiB")
        check("(a) upstream dfget returns promptly", ok and took < 10, f"{took:.2f} s")
        sent = c.origin_bytes("a.bin")
        check("(a) origin served one copy", sent <= size + MIB, f"{sent / size:.3f} copies")

        # (b) Our peer fetching from an upstream peer that alone holds the file: the
        # upstream peer goes to the origin itself (LEVEL3), so the seed is not triggered.
        url, digest = c.publish("b.bin", size)
        out_up = os.path.join(tmp, "b.up")
        r, took = c.dfget(True, up_sock, url, out_up, ["--priority", "3"])
        check("(b) upstream peer fetches from the origin", r.returncode == 0,
              r.stderr.strip()[-300:] if r.returncode else f"{took:.2f} s")
        our_sock, _ = c.daemon("ours0")
        out = os.path.join(tmp, "b.ours")
        r, took = c.dfget(False, our_sock, url, out)
        ok = r.returncode == 0 and sha256(out) == digest
        check("(b) our peer from the upstream peer: output identical", ok,
              r.stderr.strip()[-300:] if not ok else f"{took:.2f} s")
        sent = c.origin_bytes("b.bin")
        check("(b) origin served one copy", sent <= size + MIB, f"{sent / size:.3f} copies")

        # (c) Two upstream and two of our peers with our seed, all at once.
        up1_sock, _ = c.daemon("up1", upstream=True)
        ours1_sock, _ = c.daemon("ours1")
        url, digest = c.publish("c.bin", size)
        peers = [(True, up_sock), (True, up1_sock), (False, our_sock), (False, ours1_sock)]
        running = []
        for i, (up, sock) in enumerate(peers):
            binary = os.path.join(c.upstream if up else c.ours, "dfget")
            out = os.path.join(tmp, f"c.{i}")
            running.append((up, out, time.time(), subprocess.Popen(
                [binary, url, "-O", out, "-e", sock, "--no-progress"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        for up, out, started, p in running:
            _, err = p.communicate(timeout=180)
            took = time.time() - started
            who = "upstream" if up else "ours"
            ok = p.returncode == 0 and sha256(out) == digest
            check(f"(c) mixed swarm, {who} peer {os.path.basename(out)}: output identical", ok,
                  err.strip()[-300:] if not ok else f"{took:.2f} s")
        sent = c.origin_bytes("c.bin")
        check("(c) origin served one copy", sent <= size + MIB, f"{sent / size:.3f} copies")
    finally:
        c.stop()

    print(f"Upstream dragonfly-client {args.version}, {args.size_mib} MiB files, loopback.\n")
    print("| check | passed | detail |")
    print("|---|---|---|")
    for case, ok, detail in rows:
        print(f"| {case} | {ok} | {detail.replace('|', '/')} |")
    # What upstream's daemons complained about (errors and warnings in their logs).
    complaints = []
    for name in ("up0", "up1"):
        logdir = os.path.join(tmp, name, "log")
        for root, _, files in os.walk(logdir):
            for f in files:
                for line in open(os.path.join(root, f), errors="replace"):
                    if " ERROR " in line or " WARN " in line:
                        complaints.append(f"{name}: {line.strip()[:240]}")
    print(f"\nUpstream daemons logged {len(complaints)} warnings or errors.")
    for line in complaints[:40]:
        print(f"    {line}")
    if failures or args.keep:
        print(f"\nlogs kept in {tmp}", file=sys.stderr)
        sys.exit(1 if failures else 0)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
