#!/usr/bin/env python3
"""Plots a netns_bench results.json: completion-time CDF per system, and bytes by source.

Usage: scripts/plot_swarm.py results.json OUT_DIR
Writes OUT_DIR/swarm-cdf.png and OUT_DIR/swarm-sources.png (needs matplotlib).
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        data = json.load(f)
    out = sys.argv[2]
    size_mib = data["size"] / 2**20
    title = f'{data["peers"]} hosts, {size_mib:.0f} MiB, {data["rate"]} links'
    if data.get("rates") and len(set(data["rates"].split(","))) > 1:
        title += " (unequal)"
    if any(j > 0 for j in data.get("joins", [])):
        title += ", late joiners"

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in data["results"]:
        times = sorted(r["times"])
        n = len(times)
        xs = [0.0] + [t for t in times for _ in (0, 1)]
        ys = [0.0] + [y for i in range(n) for y in (i / n, (i + 1) / n)]
        ax.plot(xs, ys, label=r["name"], drawstyle="default")
    sim = sorted(data.get("sim_times", []))
    if sim:
        n = len(sim)
        xs = [0.0] + [t for t in sim for _ in (0, 1)]
        ys = [0.0] + [y for i in range(n) for y in (i / n, (i + 1) / n)]
        ax.plot(xs, ys, label="simulator (swarmsim)", linestyle=":", color="gray")
    ax.axvline(data["t_star"], color="black", linestyle="--", label="Kumar–Ross bound T*")
    if data.get("bound", data["t_star"]) > data["t_star"] * 1.001:
        ax.axvline(data["bound"], color="black", linestyle="-.", label="bound for these rates and joins")
    ax.set_xlabel("completion time (s)")
    ax.set_ylabel("fraction of hosts done")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(f"{out}/swarm-cdf.png", dpi=120)
    plt.close(fig)

    df = next((r for r in data["results"] if r["name"] == "dragonfly" and r["sources"]), None)
    if df:
        fig, ax = plt.subplots(figsize=(7, 4))
        hosts = [f"host {i + 1}" for i in range(len(df["sources"]))]
        origin = [s[0] / 2**20 for s in df["sources"]]
        seed = [s[1] / 2**20 for s in df["sources"]]
        peers = [s[2] / 2**20 for s in df["sources"]]
        ax.bar(hosts, origin, label="origin")
        ax.bar(hosts, seed, bottom=origin, label="seed peer")
        ax.bar(hosts, peers, bottom=[a + b for a, b in zip(origin, seed)], label="other peers")
        ax.set_ylabel("MiB received")
        ax.set_title(f"Dragonfly: bytes by source ({title})")
        ax.legend()
        fig.tight_layout()
        fig.savefig(f"{out}/swarm-sources.png", dpi=120)
    print(f"wrote {out}/swarm-cdf.png" + (f" and {out}/swarm-sources.png" if df else ""))


if __name__ == "__main__":
    main()
