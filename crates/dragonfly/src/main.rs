//! `dragonfly up`: runs a manager (on an SQLite file), a scheduler, a seed peer and a peer
//! on this machine, with generated configs, so `dfget URL -O PATH` works right away and the
//! manager's API (preheat jobs, clusters) answers. The scheduler and both daemons register
//! with the manager and take their config from it. Everything binds to 127.0.0.1; the
//! generated YAML files are left in the state directory for reading and reuse.

use anyhow::Context;
use clap::{Parser, Subcommand};
use d7y_config::dfdaemon::Config as DaemonConfig;
use d7y_config::manager::Config as ManagerConfig;
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

    /// Manager REST port (the API, Swagger UI at /swagger/).
    #[arg(long, default_value_t = 8080)]
    manager_port: u16,

    /// Manager gRPC port.
    #[arg(long, default_value_t = 65003)]
    manager_grpc_port: u16,

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

fn daemon_yaml(
    name: &str,
    dir: &Path,
    socket: &Path,
    base: u16,
    seed: bool,
    manager: &str,
) -> String {
    let seed_section = if seed {
        "seedPeer:\n  enable: true\n  type: super\n  clusterID: 1\n  keepaliveInterval: 5s\n"
    } else {
        ""
    };
    format!(
        "host:\n  ip: 127.0.0.1\n  hostname: {name}\n\
         download:\n  server:\n    socketPath: {socket}\n\
         upload:\n  server:\n    ip: 127.0.0.1\n    port: {upload}\n\
         storage:\n  dir: {data}\n  server:\n    ip: 127.0.0.1\n    tcpPort: {piece}\n\
         metrics:\n  server:\n    ip: 127.0.0.1\n    port: {metrics}\n\
         health:\n  server:\n    ip: 127.0.0.1\n    port: {health}\n\
         proxy:\n  server:\n    ip: 127.0.0.1\n    port: {proxy}\n\
         server:\n  cacheDir: {cache}\n\
         manager:\n  addr: {manager}\n\
         dynconfig:\n  refreshInterval: 10s\n{seed_section}",
        socket = socket.display(),
        data = dir.join("data").display(),
        cache = dir.join("cache").display(),
        upload = base,
        metrics = base + 2,
        health = base + 3,
        proxy = base + 1,
        piece = base + 5,
    )
}

/// How many ports each daemon takes from its base: upload, proxy, metrics, health, (stats),
/// piece server.
const PORT_SPAN: u16 = 6;

/// The scheduler's port (and its metrics port, 1000 above) must not fall among the daemons'
/// blocks, or one of the three would fail to bind half-way through start-up.
fn check_ports(
    scheduler: u16,
    peer_base: u16,
    seed_base: u16,
    manager: [u16; 2],
) -> anyhow::Result<()> {
    let scheduler_metrics = scheduler
        .checked_add(1000)
        .context("--scheduler-port is too high: its metrics port is 1000 above it")?;
    if manager[0] == manager[1]
        || manager.contains(&scheduler)
        || manager.contains(&scheduler_metrics)
    {
        anyhow::bail!(
            "--manager-port {} and --manager-grpc-port {} must differ from each other and from the scheduler's ports {scheduler} and {scheduler_metrics}",
            manager[0],
            manager[1]
        );
    }
    for (what, port) in [
        ("--scheduler-port", scheduler),
        ("the scheduler's metrics port", scheduler_metrics),
        ("--manager-port", manager[0]),
        ("--manager-grpc-port", manager[1]),
    ] {
        for (name, base) in [("peer", peer_base), ("seed peer", seed_base)] {
            if (base..base + PORT_SPAN).contains(&port) {
                anyhow::bail!(
                    "{what} {port} falls among the {name}'s ports {base}-{}; choose another --scheduler-port or --base-port",
                    base + PORT_SPAN - 1
                );
            }
        }
    }
    Ok(())
}

/// Writes the three configs and returns them parsed (so a bad flag fails before anything
/// starts).
fn generate(up: &Up) -> anyhow::Result<Generated> {
    let seed_base = up
        .base_port
        .checked_add(100 + PORT_SPAN)
        .map(|_| up.base_port + 100)
        .context("--base-port is too high: the seed peer's ports are 100 above it")?;
    check_ports(
        up.scheduler_port,
        up.base_port,
        seed_base,
        [up.manager_port, up.manager_grpc_port],
    )?;
    let dir = std::path::absolute(&up.dir).context("resolve --dir")?;
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let socket = match &up.socket {
        Some(s) => std::path::absolute(s).context("resolve --socket")?,
        None if is_root() => PathBuf::from(d7y_config::dfdaemon::DEFAULT_DOWNLOAD_SOCKET),
        None => dir.join("dfdaemon.sock"),
    };
    let manager_addr = format!("127.0.0.1:{}", up.manager_grpc_port);
    let manager_dir = dir.join("manager");
    let manager_yaml = format!(
        "server:\n  rest:\n    addr: 127.0.0.1:{rest}\n  grpc:\n    listenIP: 127.0.0.1\n    advertiseIP: 127.0.0.1\n    port: {{start: {grpc}, end: {grpc}}}\n\
         database:\n  type: sqlite\n  sqlite:\n    path: {db}\n\
         metrics:\n  enable: false\n",
        rest = up.manager_port,
        grpc = up.manager_grpc_port,
        db = manager_dir.join("manager.db").display(),
    );
    // The seed peer is listed here too, so the first downloads use it before the
    // scheduler's first refresh from the manager (which then names it as well).
    let scheduler_yaml = format!(
        "server:\n  listenIP: 127.0.0.1\n  advertiseIP: 127.0.0.1\n  port: {port}\n  host: scheduler\n  cacheDir: {cache}\n\
         metrics:\n  addr: 127.0.0.1:{metrics}\n\
         manager:\n  addr: {manager_addr}\n  schedulerClusterID: 1\n  keepAlive:\n    interval: 5s\n\
         dynconfig:\n  refreshInterval: 10s\n\
         seedPeers:\n  - hostname: seed\n    ip: 127.0.0.1\n    port: {seed_base}\n",
        port = up.scheduler_port,
        metrics = up.scheduler_port + 1000,
        cache = dir.join("scheduler-cache").display(),
    );
    let seed_dir = dir.join("seed-peer");
    let peer_dir = dir.join("peer");
    let seed_yaml = daemon_yaml(
        "seed",
        &seed_dir,
        &seed_dir.join("dfdaemon.sock"),
        seed_base,
        true,
        &manager_addr,
    );
    let peer_yaml = daemon_yaml(
        "peer",
        &peer_dir,
        &socket,
        up.base_port,
        false,
        &manager_addr,
    );
    let dynconfig = format!(
        "scheduler:\n  addrs:\n    - 127.0.0.1:{}\n",
        up.scheduler_port
    );
    for (name, text) in [
        ("manager.yaml", &manager_yaml),
        ("scheduler.yaml", &scheduler_yaml),
        ("seed-peer.yaml", &seed_yaml),
        ("peer.yaml", &peer_yaml),
        ("dynconfig.yaml", &dynconfig),
    ] {
        std::fs::write(dir.join(name), text).with_context(|| format!("write {name}"))?;
    }
    Ok(Generated {
        manager: ManagerConfig::from_yaml(&manager_yaml)?,
        root_password: root_password(&manager_dir)?,
        scheduler: SchedulerConfig::from_yaml(&scheduler_yaml)?,
        seed: DaemonConfig::from_yaml(&seed_yaml)?,
        peer: DaemonConfig::from_yaml(&peer_yaml)?,
        socket,
    })
}

/// What `generate` wrote, parsed.
struct Generated {
    manager: ManagerConfig,
    root_password: String,
    scheduler: SchedulerConfig,
    seed: DaemonConfig,
    peer: DaemonConfig,
    socket: PathBuf,
}

/// The manager's root password for this state directory: chosen once (random) and kept
/// beside the database, readable by this user only, so every `dragonfly up` can print it.
fn root_password(dir: &Path) -> anyhow::Result<String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join("root-password");
    if let Ok(existing) = std::fs::read_to_string(&path) {
        if !existing.trim().is_empty() {
            return Ok(existing.trim().to_string());
        }
    }
    let bytes: [u8; 12] = rand::random();
    let password: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("write {}", path.display()))?;
    file.write_all(password.as_bytes())?;
    Ok(password)
}

async fn up(args: Up) -> anyhow::Result<()> {
    let Generated {
        mut manager,
        root_password,
        scheduler,
        seed,
        peer,
        socket,
    } = generate(&args)?;
    let scheduler_addr = format!("127.0.0.1:{}", args.scheduler_port);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    // The manager first: the others register with it (and retry until it answers).
    manager.initial_root_password = Some(root_password.clone());
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
    let mut manager_task = tokio::spawn(d7y_manager::run(
        manager,
        stopped(stop_rx.clone()),
        Some(bound_tx),
    ));
    let manager_bound = tokio::select! {
        b = bound_rx => b.ok(),
        r = &mut manager_task => {
            return match r {
                Ok(Err(e)) => Err(anyhow::Error::from(e).context("the manager failed")),
                _ => Err(anyhow::anyhow!("the manager stopped before it listened")),
            };
        }
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
        let rest = manager_bound
            .map(|b| b.rest.to_string())
            .unwrap_or_else(|| format!("127.0.0.1:{}", args.manager_port));
        println!(
            "dragonfly is up: scheduler {scheduler_addr}, seed peer 127.0.0.1:{}, peer socket {}\n\
             manager http://{rest} (API /api/v1, Swagger UI /swagger/), user root, password {root_password}\n\
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
        r = &mut manager_task => Some(("manager", r.map(|r| r.map_err(anyhow::Error::from)))),
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
                let _ = manager_task.await;
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

#[cfg(test)]
mod tests {
    use super::check_ports;

    #[test]
    fn ports_that_collide_are_refused_before_anything_starts() {
        // (scheduler, peer base, seed base, manager REST and gRPC, accepted)
        let m = [8080, 65003];
        let cases = [
            (8002, 4000, 4100, m, true),
            (4001, 4000, 4100, m, false),
            (4105, 4000, 4100, m, false),
            (4106, 4000, 4100, m, true),
            (3000, 4000, 4100, m, false), // its metrics port is 4000
            (3999, 4000, 4100, m, true),
            (65000, 4000, 4100, m, false), // metrics port past 65535
            (8002, 4000, 4100, [4003, 65003], false),
            (8002, 4000, 4100, [8080, 8080], false),
            (8002, 4000, 4100, [9002, 65003], false), // the scheduler's metrics
        ];
        for (scheduler, peer, seed, manager, ok) in cases {
            assert_eq!(
                check_ports(scheduler, peer, seed, manager).is_ok(),
                ok,
                "scheduler {scheduler}, peer {peer}, seed {seed}, manager {manager:?}"
            );
        }
    }
}
