#!/usr/bin/env python3
"""dfget through dfdaemon vs curl, side by side, against a local nginx origin.

Usage: scripts/bench_dfget.py [--size-mib 1024] [--rounds 3]

Each round downloads the same bytes with curl and with dfget (a fresh task each round via a
distinct query string, so nothing is served from the daemon's cache), alternating the order.
Reports medians, the dfget/curl throughput ratio, dfdaemon's peak RSS and the CPU seconds
per GiB spent by dfdaemon + dfget versus curl. Prints a Markdown table.
"""
import argparse, os, resource, shutil, signal, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sh(*cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def peak_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--write-buffer", type=int, default=None,
                    help="dfdaemon storage.writeBufferSize in bytes (default: the daemon's)")
    args = ap.parse_args()
    if not shutil.which("nginx") or not shutil.which("curl"):
        sh("apt-get", "install", "-y", "-qq", "nginx", "curl")
    sh("cargo", "build", "--release", "--bins", cwd=ROOT)
    dfget = os.path.join(ROOT, "target/release/dfget")
    dfdaemon = os.path.join(ROOT, "target/release/dfdaemon")

    tmp = tempfile.mkdtemp(prefix="d7y-bench-")
    procs = []
    try:
        www = os.path.join(tmp, "www")
        os.makedirs(www)
        blob = os.path.join(www, "blob")
        with open(blob, "wb") as f:
            chunk = os.urandom(1 << 20)
            for i in range(args.size_mib):
                f.write(chunk[i % 256:] + chunk[: i % 256])
        size = os.path.getsize(blob)
        port = 18181
        conf = os.path.join(tmp, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"""user root; worker_processes 1; daemon off; pid {tmp}/nginx.pid; error_log {tmp}/nginx.err;
events {{ worker_connections 256; }}
http {{ access_log off; sendfile on; client_body_temp_path {tmp}/cb; proxy_temp_path {tmp}/pt;
fastcgi_temp_path {tmp}/ft; uwsgi_temp_path {tmp}/ut; scgi_temp_path {tmp}/st;
server {{ listen 127.0.0.1:{port}; root {www}; }} }}
""")
        nginx = subprocess.Popen(["nginx", "-c", conf])
        procs.append(nginx)
        time.sleep(0.3)
        if nginx.poll() is not None:
            sys.exit(f"nginx did not start (is port {port} taken?): see {tmp}/nginx.err")
        sock = os.path.join(tmp, "d.sock")
        dconf = os.path.join(tmp, "d.yaml")
        wb = f"writeBufferSize: {args.write_buffer}, " if args.write_buffer else ""
        with open(dconf, "w") as f:
            f.write(f"""host: {{ip: 127.0.0.1}}
download: {{server: {{socketPath: {sock}}}}}
upload: {{server: {{ip: 127.0.0.1, port: 0}}}}
storage: {{{wb}dir: {tmp}/data, server: {{ip: 127.0.0.1, tcpPort: 0}}}}
metrics: {{server: {{ip: 127.0.0.1, port: 0}}}}
health: {{server: {{ip: 127.0.0.1, port: 0}}}}
""")
        daemon = subprocess.Popen([dfdaemon, "--config", dconf, "--log-level", "warn"])
        procs.append(daemon)
        for _ in range(100):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
        time.sleep(0.3)
        url = f"http://127.0.0.1:{port}/blob"
        sh("curl", "-s", "-f", "-o", "/dev/null", url)  # warm the page cache for both

        out = os.path.join(tmp, "out")
        os.makedirs(out)
        curl_t, dfget_t, curl_cpu, dfget_cpu = [], [], [], []
        for r in range(args.rounds):
            order = ["curl", "dfget"] if r % 2 == 0 else ["dfget", "curl"]
            for tool in order:
                target = os.path.join(out, f"{tool}-{r}")
                # Start each measurement with no dirty pages left by the previous one.
                os.sync()
                c0 = children_cpu()
                d0 = cpu_seconds(daemon.pid)
                t0 = time.monotonic()
                if tool == "curl":
                    sh("curl", "-s", "-f", "-o", target, url)
                else:
                    sh(dfget, f"{url}?round={r}", "-O", target, "-e", sock, "--no-progress")
                elapsed = time.monotonic() - t0
                cpu = children_cpu() - c0
                assert os.path.getsize(target) == size, f"{tool} wrote a short file"
                if tool == "curl":
                    curl_t.append(elapsed)
                    curl_cpu.append(cpu)
                else:
                    dfget_t.append(elapsed)
                    dfget_cpu.append(cpu + cpu_seconds(daemon.pid) - d0)
                if subprocess.run(["cmp", "-s", blob, target]).returncode != 0:
                    sys.exit(f"{tool} round {r}: output differs from the origin's file")
                os.remove(target)
                if tool == "dfget":
                    # Drop the cached copy as curl's output is dropped, so both tools
                    # write into recycled page cache: on this VM, memory touched for the
                    # first time costs about 3x the CPU (a cache that only grows made
                    # later dfget rounds 3x slower than the first ones).
                    tasks = os.path.join(tmp, "data/content/tasks")
                    for shard in os.listdir(tasks):
                        shutil.rmtree(os.path.join(tasks, shard))
        rss = peak_rss_kib(daemon.pid)
        gib = size / (1 << 30)
        mc, md = statistics.median(curl_t), statistics.median(dfget_t)
        print(f"\n| {args.size_mib} MiB, {args.rounds} rounds | curl | dfget + dfdaemon | ratio |")
        print("|---|---|---|---|")
        print(f"| median time (s) | {mc:.2f} | {md:.2f} | |")
        print(f"| median throughput (MiB/s) | {size / mc / 2**20:.0f} | {size / md / 2**20:.0f} | **{mc / md:.2f}** of curl |")
        print(f"| CPU seconds per GiB (median) | {statistics.median(curl_cpu) / gib:.2f} | {statistics.median(dfget_cpu) / gib:.2f} | |")
        print(f"| dfdaemon peak RSS | | {rss / 1024:.0f} MiB | |")
        print(f"\nraw curl: {[round(t, 2) for t in curl_t]}  dfget: {[round(t, 2) for t in dfget_t]}")
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
