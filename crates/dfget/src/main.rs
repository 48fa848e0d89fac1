//! `dfget`: download a URL through the local dfdaemon, with upstream's flags.
//!
//! dfget never downloads by itself: it asks the daemon on its unix socket, shows progress,
//! and the daemon places the file at the output path atomically. dfget depends on the API
//! and the shared types only, never on the daemon's code.

use bytesize::ByteSize;
use clap::Parser;
use d7y_types::Digest;
use dragonfly_api::common::v2::{Download, TaskType};
use dragonfly_api::dfdaemon::v2::dfdaemon_download_client::DfdaemonDownloadClient;
use dragonfly_api::dfdaemon::v2::{
    download_task_response::Response as Progress, DownloadTaskRequest,
};
use hyper_util::rt::TokioIo;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

mod recursive;
mod source;

const DEFAULT_ENDPOINT: &str = "/var/run/dragonfly/dfdaemon.sock";

#[derive(Debug, Parser)]
#[command(
    name = "dfget",
    version,
    about = "dfget is a download command line based on P2P technology",
    after_help = "Exit codes: 0 ok, 1 other error, 2 invalid argument, 3 no dfdaemon, 4 origin error, \
                  5 digest mismatch, 6 output not writable or exists, 7 timeout"
)]
pub(crate) struct Args {
    /// The URL to download.
    url: String,

    /// Where to write the file.
    #[arg(short = 'O', long = "output")]
    output: PathBuf,

    /// Give up after this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2h", env = "DFGET_TIMEOUT")]
    timeout: Duration,

    /// Verify the file: <algorithm>:<value> with sha256, sha512 or crc32.
    #[arg(long)]
    digest: Option<String>,

    /// Scheduling priority (0-6).
    #[arg(short = 'p', long, default_value_t = 6, env = "DFGET_PRIORITY")]
    priority: i32,

    /// Piece length, e.g. 4mib (4MiB-64MiB); a different length is a different task.
    #[arg(long = "piece-length", env = "DFGET_PIECE_LENGTH")]
    piece_length: Option<ByteSize>,

    /// Different applications for the same URL are different tasks.
    #[arg(long, default_value = "", env = "DFGET_APPLICATION")]
    application: String,

    /// Different tags for the same URL are different tasks.
    #[arg(long, default_value = "", env = "DFGET_TAG")]
    tag: String,

    /// A request header for the origin, e.g. -H 'Authorization: Bearer x'. Repeatable.
    #[arg(short = 'H', long = "header")]
    header: Vec<String>,

    /// Query parameters ignored when identifying the task (signatures). Repeatable.
    #[arg(long = "filtered-query-param")]
    filtered_query_params: Vec<String>,

    /// Fail instead of downloading from the origin when no peer has the file.
    #[arg(long, env = "DFGET_DISABLE_BACK_TO_SOURCE")]
    disable_back_to_source: bool,

    /// Replace an existing output file.
    #[arg(long, env = "DFGET_OVERWRITE")]
    overwrite: bool,

    /// Fail unless the output can be hard-linked from the cache.
    #[arg(long = "force-hard-link", env = "DFGET_FORCE_HARD_LINK")]
    force_hard_link: bool,

    /// Derive the task ID from this content instead of the URL.
    #[arg(long = "content-for-calculating-task-id")]
    content_for_calculating_task_id: Option<String>,

    /// Derive an OCI blob URL's (`/v2/<name>/blobs/sha256:<hex>`) task ID from its URL, as
    /// upstream's dfget does, instead of from its digest (what the proxy and preheat jobs
    /// use, so a blob pulled or preheated once is shared whatever registry or tag it came
    /// through).
    #[arg(long = "disable-task-id-based-blob-digest")]
    disable_task_id_based_blob_digest: bool,

    /// Do not show a progress bar.
    #[arg(long, env = "DFGET_NO_PROGRESS")]
    no_progress: bool,

    /// Download a directory into -O (which becomes a directory): an object store prefix, an
    /// HDFS directory, or a model hub repo (or a directory in it), one task per file.
    #[arg(short = 'r', long)]
    recursive: bool,

    /// With -r: only files whose path below the URL matches one of these globs
    /// (`*.safetensors`, `tokenizer/**`). Repeatable.
    #[arg(short = 'I', long = "include-files")]
    include_files: Vec<String>,

    /// With -r: skip files whose path below the URL matches one of these globs. Repeatable.
    #[arg(long = "exclude-files")]
    exclude_files: Vec<String>,

    /// With -r: the most files to download; a larger directory is refused.
    #[arg(long, default_value_t = 100)]
    max_files: usize,

    /// With -r: files downloaded at once.
    #[arg(long, default_value_t = 5)]
    max_concurrent_requests: usize,

    #[command(flatten)]
    source: source::SourceArgs,

    /// The dfdaemon unix socket.
    #[arg(short = 'e', long, default_value = DEFAULT_ENDPOINT, env = "DFGET_ENDPOINT")]
    endpoint: PathBuf,

    /// Log level (accepted for compatibility; dfget prints only errors).
    #[arg(short = 'l', long, default_value = "info")]
    log_level: String,

    /// Accepted for compatibility.
    #[arg(long)]
    console: bool,
}

/// A failure with the exit code it maps to.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub(crate) struct Failure {
    pub code: u8,
    pub message: String,
}

pub(crate) fn fail(code: u8, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

pub(crate) const EXIT_OTHER: u8 = 1;
pub(crate) const EXIT_INVALID: u8 = 2;
const EXIT_NO_DAEMON: u8 = 3;
const EXIT_ORIGIN: u8 = 4;
const EXIT_DIGEST: u8 = 5;
pub(crate) const EXIT_OUTPUT: u8 = 6;
const EXIT_TIMEOUT: u8 = 7;

fn status_exit_code(code: Code) -> u8 {
    match code {
        Code::InvalidArgument => EXIT_INVALID,
        Code::NotFound | Code::FailedPrecondition | Code::Unavailable => EXIT_ORIGIN,
        Code::DataLoss => EXIT_DIGEST,
        Code::PermissionDenied | Code::AlreadyExists => EXIT_OUTPUT,
        Code::DeadlineExceeded => EXIT_TIMEOUT,
        _ => EXIT_OTHER,
    }
}

/// Checks the arguments and builds the request; nothing touches the network here.
fn build_download(args: &Args) -> Result<(Download, PathBuf), Failure> {
    let url = url::Url::parse(&args.url)
        .map_err(|e| fail(EXIT_INVALID, format!("invalid URL {:?}: {e}", args.url)))?;
    if !source::SCHEMES.contains(&url.scheme()) {
        return Err(fail(
            EXIT_INVALID,
            format!(
                "unsupported URL scheme {:?}: supported are {}",
                url.scheme(),
                source::SCHEMES.join(", ")
            ),
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(fail(
            EXIT_INVALID,
            format!("invalid URL {:?}: no host", args.url),
        ));
    }
    if let Some(digest) = &args.digest {
        digest
            .parse::<Digest>()
            .map_err(|e| fail(EXIT_INVALID, e.to_string()))?;
    }
    if let Some(length) = args.piece_length {
        d7y_types::piece::validate_piece_length(length.as_u64())
            .map_err(|e| fail(EXIT_INVALID, e.to_string()))?;
    }
    let mut headers = HashMap::new();
    for header in &args.header {
        let (name, value) = header.split_once(':').ok_or_else(|| {
            fail(
                EXIT_INVALID,
                format!("invalid header {header:?}: expected 'Name: value'"),
            )
        })?;
        let name = name.trim();
        if name.is_empty() {
            return Err(fail(
                EXIT_INVALID,
                format!("invalid header {header:?}: empty name"),
            ));
        }
        headers.insert(name.to_string(), value.trim().to_string());
    }
    let output = absolute(&args.output)?;
    if !args.recursive {
        check_output(&output, args.overwrite)?;
    }
    let download = Download {
        url: args.url.clone(),
        digest: args.digest.clone(),
        r#type: TaskType::Standard as i32,
        tag: Some(args.tag.clone()),
        application: Some(args.application.clone()),
        priority: args.priority,
        filtered_query_params: args.filtered_query_params.clone(),
        request_header: headers,
        piece_length: args.piece_length.map(|p| p.as_u64()),
        output_path: Some(output.display().to_string()),
        timeout: Some(prost_wkt_types::Duration {
            seconds: args.timeout.as_secs() as i64,
            nanos: args.timeout.subsec_nanos() as i32,
        }),
        disable_back_to_source: args.disable_back_to_source,
        force_hard_link: args.force_hard_link,
        overwrite: args.overwrite,
        content_for_calculating_task_id: args.content_for_calculating_task_id.clone(),
        enable_task_id_based_blob_digest: !args.disable_task_id_based_blob_digest,
        ..Default::default()
    };
    let download = args.source.attach(&url, download);
    Ok((download, output))
}

fn absolute(path: &Path) -> Result<PathBuf, Failure> {
    if path.as_os_str().is_empty() {
        return Err(fail(EXIT_INVALID, "the output path is empty"));
    }
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    let cwd = std::env::current_dir().map_err(|e| {
        fail(
            EXIT_OUTPUT,
            format!("cannot resolve {}: {e}", path.display()),
        )
    })?;
    Ok(cwd.join(path))
}

/// Fails early when the output cannot be written: missing or read-only directory, or an
/// existing file without --overwrite.
fn check_output(output: &Path, overwrite: bool) -> Result<(), Failure> {
    let parent = output.parent().unwrap_or(Path::new("/"));
    if output.is_dir() {
        return Err(fail(
            EXIT_OUTPUT,
            format!("output {} is a directory", output.display()),
        ));
    }
    if !parent.is_dir() {
        return Err(fail(
            EXIT_OUTPUT,
            format!("output directory {} does not exist", parent.display()),
        ));
    }
    if !overwrite && output.exists() {
        return Err(fail(
            EXIT_OUTPUT,
            format!(
                "output {} already exists; remove it or pass --overwrite",
                output.display()
            ),
        ));
    }
    let probe = parent.join(format!(".dfget-probe-{}", std::process::id()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(fail(
            EXIT_OUTPUT,
            format!("output directory {} is not writable: {e}", parent.display()),
        )),
    }
}

async fn connect(endpoint: &Path) -> Result<DfdaemonDownloadClient<Channel>, Failure> {
    let no_daemon = |reason: String| {
        fail(
            EXIT_NO_DAEMON,
            format!(
                "no dfdaemon is listening at {} ({reason}); start one with 'dfdaemon --config /etc/dragonfly/dfdaemon.yaml' or point -e/--endpoint at its socket",
                endpoint.display()
            ),
        )
    };
    // Probe first: tonic's lazy errors are less clear than a refused connect.
    tokio::net::UnixStream::connect(endpoint)
        .await
        .map_err(|e| no_daemon(e.to_string()))?;
    let path = endpoint.to_path_buf();
    let channel = Endpoint::try_from("http://dfdaemon.local")
        .expect("static uri")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await
        .map_err(|e| no_daemon(e.to_string()))?;
    Ok(DfdaemonDownloadClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX))
}

pub(crate) fn progress_bar(args: &Args) -> ProgressBar {
    if args.no_progress || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
        )
        .expect("valid template")
        .progress_chars("#>-"),
    );
    bar
}

/// Where a download's bytes came from, from its piece reports.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Traffic {
    pub from_peers: u64,
    pub from_origin: u64,
    pub from_cache: u64,
}

impl Traffic {
    pub fn total(&self) -> u64 {
        self.from_peers + self.from_origin + self.from_cache
    }

    pub fn add(&mut self, other: Traffic) {
        self.from_peers += other.from_peers;
        self.from_origin += other.from_origin;
        self.from_cache += other.from_cache;
    }
}

pub(crate) fn status_failure(status: tonic::Status) -> Failure {
    fail(
        status_exit_code(status.code()),
        status.message().to_string(),
    )
}

/// One file: asks the daemon, follows its progress, and checks the file is in place.
pub(crate) async fn download_one(
    client: &mut DfdaemonDownloadClient<Channel>,
    download: Download,
    output: &Path,
    bar: &ProgressBar,
) -> Result<Traffic, Failure> {
    use dragonfly_api::common::v2::TrafficType;
    let mut stream = client
        .download_task(DownloadTaskRequest {
            download: Some(download),
        })
        .await
        .map_err(status_failure)?
        .into_inner();
    let mut traffic = Traffic::default();
    loop {
        match stream.message().await {
            Ok(Some(message)) => match message.response {
                Some(Progress::DownloadTaskStartedResponse(started)) => {
                    bar.inc_length(started.content_length);
                    let already: u64 = started.pieces.iter().map(|p| p.length).sum();
                    traffic.from_cache += already;
                    bar.inc(already);
                }
                Some(Progress::DownloadPieceFinishedResponse(finished)) => {
                    if let Some(piece) = finished.piece {
                        bar.inc(piece.length);
                        match TrafficType::try_from(piece.traffic_type.unwrap_or_default()) {
                            Ok(TrafficType::BackToSource) => traffic.from_origin += piece.length,
                            Ok(TrafficType::LocalPeer) => traffic.from_cache += piece.length,
                            _ => traffic.from_peers += piece.length,
                        }
                    }
                }
                None => {}
            },
            Ok(None) => break,
            Err(status) => return Err(status_failure(status)),
        }
    }
    if !output.exists() {
        return Err(fail(
            EXIT_OTHER,
            format!(
                "dfdaemon reported success but {} is missing",
                output.display()
            ),
        ));
    }
    Ok(traffic)
}

async fn run(args: Args) -> Result<(), Failure> {
    let (download, output) = build_download(&args)?;
    let mut client = connect(&args.endpoint).await?;
    if args.recursive {
        return recursive::run(&args, &mut client, download, &output).await;
    }
    let bar = progress_bar(&args);
    let result = download_one(&mut client, download, &output, &bar).await;
    match &result {
        Ok(_) => bar.finish(),
        Err(_) => bar.abandon(),
    }
    result.map(|_| ())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let timeout = args.timeout;
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dfget: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_OTHER);
        }
    };
    // The daemon enforces the timeout too; this one covers an unresponsive daemon.
    let result = runtime.block_on(async {
        tokio::time::timeout(timeout + Duration::from_secs(5), run(args))
            .await
            .unwrap_or_else(|_| {
                Err(fail(
                    EXIT_TIMEOUT,
                    format!(
                        "download did not finish within {}",
                        humantime::format_duration(timeout)
                    ),
                ))
            })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("dfget: {failure}");
            ExitCode::from(failure.code)
        }
    }
}
