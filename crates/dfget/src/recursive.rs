//! `dfget -r`: a directory (object store prefix, HDFS directory, hub repo) downloaded as one
//! task per file. The daemon lists it (`ListTaskEntries`); each file goes through the
//! swarm like any dfget, at most `--max-concurrent-requests` at once, placed atomically by
//! the daemon at its path below `-O`. A file already there with the listed size is kept,
//! so a second run fetches only what is missing. A listed path that would leave `-O`
//! (`..`, an absolute path) is refused.

use crate::{
    download_one, fail, status_failure, Args, Failure, Traffic, EXIT_INVALID, EXIT_OUTPUT,
};
use dragonfly_api::common::v2::Download;
use dragonfly_api::dfdaemon::v2::dfdaemon_download_client::DfdaemonDownloadClient;
use dragonfly_api::dfdaemon::v2::ListTaskEntriesRequest;
use futures_util::stream::{self, StreamExt};
use std::path::{Component, Path, PathBuf};
use tonic::transport::Channel;

/// A file of the listing, where it goes, and how big the listing says it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub url: String,
    pub relative: PathBuf,
    pub size: u64,
}

/// The path of `entry` below `base` (both URLs of the same scheme), decoded, or `None`
/// when it is not below it or would leave the output directory.
pub fn relative_path(base: &str, entry: &str) -> Option<PathBuf> {
    let base = base.trim_end_matches('/');
    let rest = entry.strip_prefix(base)?;
    let rest = rest
        .strip_prefix('/')
        .unwrap_or(if base.is_empty() { rest } else { "\u{0}" });
    if rest.is_empty() || rest.contains('\u{0}') {
        return None;
    }
    let decoded = percent_encoding::percent_decode_str(rest)
        .decode_utf8()
        .ok()?;
    let path = PathBuf::from(decoded.as_ref());
    let normal = path.components().all(|c| matches!(c, Component::Normal(_)));
    (normal && path.components().count() > 0).then_some(path)
}

/// Compiled include and exclude globs (matched against the path below the URL).
pub struct Filter {
    include: Vec<glob::Pattern>,
    exclude: Vec<glob::Pattern>,
}

impl Filter {
    pub fn new(include: &[String], exclude: &[String]) -> Result<Filter, Failure> {
        let compile = |list: &[String], flag: &str| -> Result<Vec<glob::Pattern>, Failure> {
            list.iter()
                .map(|p| {
                    glob::Pattern::new(p).map_err(|e| {
                        fail(EXIT_INVALID, format!("invalid {flag} pattern {p:?}: {e}"))
                    })
                })
                .collect()
        };
        Ok(Filter {
            include: compile(include, "--include-files")?,
            exclude: compile(exclude, "--exclude-files")?,
        })
    }

    pub fn keeps(&self, path: &Path) -> bool {
        let text = path.to_string_lossy();
        let options = glob::MatchOptions {
            case_sensitive: true,
            require_literal_separator: false,
            require_literal_leading_dot: false,
        };
        let matches = |p: &glob::Pattern| {
            p.matches_with(&text, options)
                || path
                    .file_name()
                    .is_some_and(|n| p.matches_with(&n.to_string_lossy(), options))
        };
        (self.include.is_empty() || self.include.iter().any(matches))
            && !self.exclude.iter().any(matches)
    }
}

/// Whether `path` already holds the whole file.
fn present(path: &Path, size: u64) -> bool {
    size > 0 && std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == size)
}

pub async fn run(
    args: &Args,
    client: &mut DfdaemonDownloadClient<Channel>,
    template: Download,
    output: &Path,
) -> Result<(), Failure> {
    if output.is_file() {
        return Err(fail(
            EXIT_OUTPUT,
            format!(
                "output {} is a file; -r needs a directory",
                output.display()
            ),
        ));
    }
    std::fs::create_dir_all(output).map_err(|e| {
        fail(
            EXIT_OUTPUT,
            format!("cannot create output directory {}: {e}", output.display()),
        )
    })?;
    let listed = client
        .list_task_entries(ListTaskEntriesRequest {
            task_id: String::new(),
            url: template.url.clone(),
            request_header: template.request_header.clone(),
            timeout: template.timeout,
            certificate_chain: template.certificate_chain.clone(),
            object_storage: template.object_storage.clone(),
            hdfs: template.hdfs.clone(),
            remote_ip: None,
            hugging_face: template.hugging_face.clone(),
            model_scope: template.model_scope.clone(),
            open_csg: None,
        })
        .await
        .map_err(status_failure)?
        .into_inner()
        .entries;
    let filter = Filter::new(&args.include_files, &args.exclude_files)?;
    let mut planned = Vec::new();
    let mut refused = 0;
    for entry in listed.into_iter().filter(|e| !e.is_dir) {
        match relative_path(&template.url, &entry.url) {
            Some(relative) if filter.keeps(&relative) => planned.push(Planned {
                url: entry.url,
                relative,
                size: entry.content_length,
            }),
            Some(_) => {}
            None => refused += 1,
        }
    }
    if refused > 0 {
        eprintln!(
            "dfget: skipped {refused} listed entries whose paths are not below {}",
            template.url
        );
    }
    if planned.len() > args.max_files {
        return Err(fail(
            EXIT_INVALID,
            format!(
                "{} holds {} files (after filters), more than --max-files {}; raise --max-files or narrow it with --include-files",
                template.url,
                planned.len(),
                args.max_files
            ),
        ));
    }
    let (skip, todo): (Vec<Planned>, Vec<Planned>) = planned
        .into_iter()
        .partition(|p| present(&output.join(&p.relative), p.size));
    let bar = crate::progress_bar(args);
    let skipped_bytes: u64 = skip.iter().map(|p| p.size).sum();
    let results: Vec<(Planned, Result<Traffic, Failure>)> = stream::iter(todo)
        .map(|p| {
            let mut client = client.clone();
            let bar = bar.clone();
            let mut download = template.clone();
            let target = output.join(&p.relative);
            async move {
                if let Some(parent) = target.parent() {
                    if let Err(e) = std::fs::create_dir_all(parent) {
                        return (
                            p,
                            Err(fail(
                                EXIT_OUTPUT,
                                format!("cannot create {}: {e}", parent.display()),
                            )),
                        );
                    }
                }
                download.url = p.url.clone();
                download.output_path = Some(target.display().to_string());
                // A partial or older copy is replaced (atomically, by the daemon).
                download.overwrite = true;
                let r = download_one(&mut client, download, &target, &bar).await;
                (p, r)
            }
        })
        .buffer_unordered(args.max_concurrent_requests.max(1))
        .collect()
        .await;
    bar.finish_and_clear();
    let mut traffic = Traffic::default();
    let mut failed: Vec<(Planned, Failure)> = Vec::new();
    let mut done = 0;
    for (p, r) in results {
        match r {
            Ok(t) => {
                done += 1;
                traffic.add(t);
            }
            Err(f) => failed.push((p, f)),
        }
    }
    let mib = |b: u64| b as f64 / 1048576.0;
    eprintln!(
        "dfget: {done} files downloaded ({:.1} MiB: {:.1} from peers, {:.1} from the origin, {:.1} from the local cache), {} already present ({:.1} MiB), {} failed",
        mib(traffic.total()),
        mib(traffic.from_peers),
        mib(traffic.from_origin),
        mib(traffic.from_cache),
        skip.len(),
        mib(skipped_bytes),
        failed.len()
    );
    if let Some((p, first)) = failed.into_iter().next() {
        return Err(fail(
            first.code,
            format!("{}: {}", p.relative.display(), first.message),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_table() {
        let cases: [(&str, &str, Option<&str>); 9] = [
            ("s3://b/models", "s3://b/models/a.bin", Some("a.bin")),
            (
                "s3://b/models/",
                "s3://b/models/sub/a%20b.bin",
                Some("sub/a b.bin"),
            ),
            ("hf://o/m", "hf://o/m/config.json", Some("config.json")),
            ("s3://b/models", "s3://b/modelsX/a.bin", None),
            ("s3://b/models", "s3://b/models/../etc/passwd", None),
            ("s3://b/models", "s3://b/models/%2E%2E/x", None),
            ("s3://b/models", "s3://b/models/", None),
            ("s3://b/models", "s3://other/models/a", None),
            ("s3://b/models", "s3://b/models//abs", None),
        ];
        for (base, entry, want) in cases {
            assert_eq!(
                relative_path(base, entry),
                want.map(PathBuf::from),
                "{base} {entry}"
            );
        }
    }

    #[test]
    fn filters_table() {
        let f = Filter::new(
            &["*.safetensors".into(), "tokenizer/**".into()],
            &["*-00002-*".into()],
        )
        .unwrap();
        for (path, keep) in [
            ("model-00001-of-00002.safetensors", true),
            ("model-00002-of-00002.safetensors", false),
            ("sub/model.safetensors", true),
            ("tokenizer/vocab.json", true),
            ("README.md", false),
        ] {
            assert_eq!(f.keeps(Path::new(path)), keep, "{path}");
        }
        assert!(Filter::new(&[], &[]).unwrap().keeps(Path::new("anything")));
        assert!(Filter::new(&["[".into()], &[]).is_err());
    }
}
