//! `dragonfly up`: runs a scheduler, a seed peer and a peer on this machine, with generated
//! configs, so `dfget URL -O PATH` works right away. Everything binds to 127.0.0.1; the
//! generated YAML files are left in the state directory for reading and reuse.

use anyhow::Context;
use clap::{Parser, Subcommand};
use d7y_config::dfdaemon::Config as DaemonConfig;
use d7y_config::scheduler::Config as SchedulerConfig;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "dragonfly",
    version,
    about = "Dragonfly P2P distribution, all in one"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a local cluster (scheduler + seed peer + peer) in the foreground.
    Up(Up),
}

#[derive(Debug, clap::Args)]
struct Up {
    /// State directory: generated configs, task storage, sockets.
    #[arg(long, default_value = ".dragonfly")]
    dir: PathBuf,

    /// The peer's download socket, where dfget connects. Defaults to dfget's default
    /// (/var/run/dragonfly/dfdaemon.sock) when running as root, else `<dir>/dfdaemon.sock`.
    #[arg(long)]
    socket: Option<PathBuf>,

    /// Scheduler gRPC port.
    #[arg(long, default_value_t = 8002)]
    scheduler_port: u16,

    /// First of the peer's ports (upload gRPC, then metrics, health, piece server, ...):
    /// upstream's 4000-4005. The seed peer uses the same layout 100 higher.
    #[arg(long, default_value_t = 4000)]
    base_port: u16,

    /// Log level: trace, debug, info, warn, error.
    #[arg(short = 'l', long, default_value = "info")]
    log_level: String,
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn daemon_yaml(name: &str, dir: &Path, socket: &Path, base: u16, seed: bool) -> String {
    let seed_section = if seed {
        "seedPeer:\n  enable: true\n  type: super\n"
    } else {
        ""
    };
    format!(
        "host:\n  ip: 127.0.0.1\n  hostname: {name}\n\
         download:\n  server:\n    socketPath: {socket}\n\
         upload:\n  server:\n    ip: 127.0.0.1\n    port: {upload}\n\
         storage:\n  dir: {data}\n  server:\n    ip: 127.0.0.1\n    tcpPort: {piece}\n\
         metrics:\n  server:\n    ip: 127.0.0.1\n    port: {metrics}\n\
         health:\n  server:\n    ip: 127.0.0.1\n    port: {health}\n{seed_section}",
        socket = socket.display(),
        data = dir.join("data").display(),
        upload = base,
        metrics = base + 2,
        health = base + 3,
        piece = base + 5,
    )
}

/// Writes the three configs and returns them parsed (so a bad flag fails before anything
/// starts).
fn generate(up: &Up) -> anyhow::Result<(SchedulerConfig, DaemonConfig, DaemonConfig, PathBuf)> {
    let dir = std::path::absolute(&up.dir).context("resolve --dir")?;
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let socket = match &up.socket {
        Some(s) => std::path::absolute(s).context("resolve --socket")?,
        None if is_root() => PathBuf::from(d7y_config::dfdaemon::DEFAULT_DOWNLOAD_SOCKET),
        None => dir.join("dfdaemon.sock"),
    };
    let seed_base = up
        .base_port
        .checked_add(100)
        .context("--base-port is too high")?;
    let scheduler_yaml = format!(
        "server:\n  listenIP: 127.0.0.1\n  advertiseIP: 127.0.0.1\n  port: {port}\n\
         metrics:\n  addr: 127.0.0.1:{metrics}\n\
         seedPeers:\n  - hostname: seed\n    ip: 127.0.0.1\n    port: {seed_base}\n",
        port = up.scheduler_port,
        metrics = up.scheduler_port.saturating_add(1000),
    );
    let seed_dir = dir.join("seed-peer");
    let peer_dir = dir.join("peer");
    let seed_yaml = daemon_yaml(
        "seed",
        &seed_dir,
        &seed_dir.join("dfdaemon.sock"),
        seed_base,
        true,
    );
    let peer_yaml = daemon_yaml("peer", &peer_dir, &socket, up.base_port, false);
    let dynconfig = format!(
        "scheduler:\n  addrs:\n    - 127.0.0.1:{}\n",
        up.scheduler_port
    );
    for (name, text) in [
        ("scheduler.yaml", &scheduler_yaml),
        ("seed-peer.yaml", &seed_yaml),
        ("peer.yaml", &peer_yaml),
        ("dynconfig.yaml", &dynconfig),
    ] {
        std::fs::write(dir.join(name), text).with_context(|| format!("write {name}"))?;
    }
    Ok((
        SchedulerConfig::from_yaml(&scheduler_yaml)?,
        DaemonConfig::from_yaml(&seed_yaml)?,
        DaemonConfig::from_yaml(&peer_yaml)?,
        socket,
    ))
}

async fn up(args: Up) -> anyhow::Result<()> {
    let (scheduler, seed, peer, socket) = generate(&args)?;
    let scheduler_addr = format!("127.0.0.1:{}", args.scheduler_port);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut scheduler_task = tokio::spawn(d7y_scheduler::run(scheduler, stopped(stop_rx.clone())));
    let mut seed_task = tokio::spawn(d7y_dfdaemon::run_with(
        seed,
        vec![scheduler_addr.clone()],
        stopped(stop_rx.clone()),
    ));
    let mut peer_task = tokio::spawn(d7y_dfdaemon::run_with(
        peer,
        vec![scheduler_addr.clone()],
        stopped(stop_rx.clone()),
    ));
    // Wait until the peer's socket answers before telling the user to use it.
    for _ in 0..200 {
        if tokio::net::UnixStream::connect(&socket).await.is_ok() || peer_task.is_finished() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    if !peer_task.is_finished() {
        let endpoint = if socket == Path::new(d7y_config::dfdaemon::DEFAULT_DOWNLOAD_SOCKET) {
            String::new()
        } else {
            format!(" -e {}", socket.display())
        };
        println!(
            "dragonfly is up: scheduler {scheduler_addr}, seed peer 127.0.0.1:{}, peer socket {}\n\
             configs in {}\n\
             try: dfget <URL> -O <PATH>{endpoint}\n\
             stop with Ctrl-C",
            args.base_port + 100,
            socket.display(),
            std::path::absolute(&args.dir)?.display(),
        );
    }
    let failed = tokio::select! {
        _ = d7y_telemetry::shutdown_signal() => None,
        r = &mut scheduler_task => Some(("scheduler", r.map(|r| r.map_err(anyhow::Error::from)))),
        r = &mut seed_task => Some(("seed peer", r.map(|r| r.map_err(anyhow::Error::from)))),
        r = &mut peer_task => Some(("peer", r.map(|r| r.map_err(anyhow::Error::from)))),
    };
    let _ = stop_tx.send(true);
    match failed {
        None => {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                let _ = scheduler_task.await;
                let _ = seed_task.await;
                let _ = peer_task.await;
            })
            .await;
            Ok(())
        }
        Some((what, Ok(Ok(())))) => anyhow::bail!("the {what} stopped unexpectedly"),
        Some((what, Ok(Err(e)))) => Err(e.context(format!("the {what} failed"))),
        Some((what, Err(e))) => anyhow::bail!("the {what} crashed: {e}"),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let Command::Up(up_args) = args.command;
    let runtime = match d7y_telemetry::setup(&d7y_telemetry::LogOptions {
        level: &up_args.log_level,
        dir: None,
        file_name: "dragonfly.log",
        console: true,
    }) {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("dragonfly: {err}");
            return ExitCode::from(err.exit_code());
        }
    };
    match runtime.block_on(up(up_args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dragonfly: {e:#}");
            ExitCode::FAILURE
        }
    }
}
