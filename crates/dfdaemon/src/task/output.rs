//! Delivering a finished task to the user's output path, atomically.
//!
//! The content is hard-linked (same filesystem) or copied to a hidden temporary file beside
//! the output, verified against the requested digest, then renamed into place. On any
//! failure the temporary file is removed, so nothing is ever left half-written at the path.

use crate::error::TaskError;
use d7y_types::{Digest, Hasher};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Fails early when the output cannot be written (called before downloading).
pub fn check_output(output: &Path, overwrite: bool) -> Result<(), TaskError> {
    let parent = parent_dir(output)?;
    let meta = std::fs::metadata(&parent).map_err(|e| TaskError::Output {
        path: output.display().to_string(),
        reason: format!("directory {} is not accessible: {e}", parent.display()),
    })?;
    if !meta.is_dir() {
        return Err(TaskError::Output {
            path: output.display().to_string(),
            reason: format!("{} is not a directory", parent.display()),
        });
    }
    if output.is_dir() {
        return Err(TaskError::Output {
            path: output.display().to_string(),
            reason: "it is a directory".into(),
        });
    }
    if !overwrite && output.exists() {
        return Err(TaskError::OutputExists(output.display().to_string()));
    }
    Ok(())
}

fn parent_dir(output: &Path) -> Result<PathBuf, TaskError> {
    output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .ok_or_else(|| TaskError::Output {
            path: output.display().to_string(),
            reason: "it has no parent directory".into(),
        })
}

/// Computes the digest of a file with the digest's algorithm.
pub fn file_digest(path: &Path, like: &Digest) -> std::io::Result<Digest> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Hasher::new(like.algorithm());
    let mut buf = vec![0u8; 1024 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(hasher.finalize());
        }
        hasher.update(&buf[..n]);
    }
}

/// Places `content` at `output`; see the module docs.
pub async fn place_output(
    content: PathBuf,
    output: PathBuf,
    force_hard_link: bool,
    overwrite: bool,
    digest: Option<Digest>,
    url: String,
) -> Result<(), TaskError> {
    tokio::task::spawn_blocking(move || {
        place_output_blocking(
            &content,
            &output,
            force_hard_link,
            overwrite,
            digest.as_ref(),
            &url,
        )
    })
    .await
    .map_err(|e| TaskError::Internal(e.to_string()))?
}

fn place_output_blocking(
    content: &Path,
    output: &Path,
    force_hard_link: bool,
    overwrite: bool,
    digest: Option<&Digest>,
    url: &str,
) -> Result<(), TaskError> {
    check_output(output, overwrite)?;
    let parent = parent_dir(output)?;
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".into());
    let tmp = parent.join(format!(".{name}.dfget-{:016x}.tmp", rand::random::<u64>()));
    let out_err = |reason: String| TaskError::Output {
        path: output.display().to_string(),
        reason,
    };
    let result = (|| {
        if let Err(link_err) = std::fs::hard_link(content, &tmp) {
            if force_hard_link {
                return Err(out_err(format!("hard link failed: {link_err}")));
            }
            std::fs::copy(content, &tmp).map_err(|e| out_err(e.to_string()))?;
            // A copy is new data: on disk before it takes the output's name.
            std::fs::File::open(&tmp)
                .and_then(|f| f.sync_data())
                .map_err(|e| out_err(format!("sync: {e}")))?;
        }
        if let Some(expected) = digest {
            let actual = file_digest(&tmp, expected).map_err(|e| out_err(e.to_string()))?;
            if &actual != expected {
                return Err(TaskError::DigestMismatch {
                    url: url.to_string(),
                    expected: expected.to_string(),
                    actual: actual.to_string(),
                });
            }
        }
        if !overwrite && output.exists() {
            return Err(TaskError::OutputExists(output.display().to_string()));
        }
        std::fs::rename(&tmp, output).map_err(|e| out_err(e.to_string()))?;
        // The rename itself is durable once the directory is synced.
        std::fs::File::open(&parent)
            .and_then(|d| d.sync_all())
            .map_err(|e| out_err(format!("sync of {}: {e}", parent.display())))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use d7y_types::Algorithm;

    #[tokio::test]
    async fn places_atomically_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let content = dir.path().join("content");
        std::fs::write(&content, b"hello").unwrap();
        let out = dir.path().join("out");
        let good = Digest::of(Algorithm::Sha256, b"hello");
        place_output(
            content.clone(),
            out.clone(),
            false,
            false,
            Some(good),
            "u".into(),
        )
        .await
        .unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"hello");

        // exists, no overwrite
        let err = place_output(content.clone(), out.clone(), false, false, None, "u".into())
            .await
            .unwrap_err();
        assert!(matches!(err, TaskError::OutputExists(_)));

        // digest mismatch leaves nothing behind
        let out2 = dir.path().join("out2");
        let bad = Digest::of(Algorithm::Sha256, b"other");
        let err = place_output(
            content.clone(),
            out2.clone(),
            false,
            false,
            Some(bad),
            "u".into(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, TaskError::DigestMismatch { .. }), "{err}");
        assert!(!out2.exists());
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 2, "only content and out remain");

        // missing directory
        let err = place_output(
            content,
            dir.path().join("nope/out"),
            false,
            false,
            None,
            "u".into(),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("not accessible"), "{err}");
    }
}
