//! A file dfinit wants to write: shown as a diff (`--dry-run`) or written atomically (a
//! temporary file beside it, synced, renamed over it, the directory synced), so a crash
//! never leaves a half-written runtime config.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The new content of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileChange {
    pub path: PathBuf,
    /// What is there now (`None`: no such file).
    pub before: Option<String>,
    pub after: String,
}

impl FileChange {
    pub fn is_noop(&self) -> bool {
        self.before.as_deref() == Some(self.after.as_str())
    }

    /// A unified diff of the change.
    pub fn diff(&self) -> String {
        let before = self.before.as_deref().unwrap_or("");
        let old_name = if self.before.is_some() {
            format!("a{}", self.path.display())
        } else {
            "/dev/null".to_string()
        };
        similar::TextDiff::from_lines(before, self.after.as_str())
            .unified_diff()
            .context_radius(3)
            .header(&old_name, &format!("b{}", self.path.display()))
            .to_string()
    }

    /// Writes the new content atomically, keeping the file's permissions.
    pub fn apply(&self) -> std::io::Result<()> {
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(".{name}.dfinit-{}", std::process::id()));
        let result = (|| {
            let mut file = std::fs::File::create(&tmp)?;
            if let Ok(meta) = std::fs::metadata(&self.path) {
                file.set_permissions(meta.permissions())?;
            }
            file.write_all(self.after.as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            std::fs::File::open(dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

/// Reads a file that may be absent.
pub fn read_optional(path: &Path) -> std::io::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applies_atomically_and_keeps_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/config.toml");
        let change = FileChange {
            path: path.clone(),
            before: None,
            after: "a = 1\n".into(),
        };
        assert!(change.diff().contains("+a = 1"));
        change.apply().unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let change = FileChange {
            path: path.clone(),
            before: read_optional(&path).unwrap(),
            after: "a = 2\n".into(),
        };
        assert!(
            change.diff().contains("-a = 1\n+a = 2"),
            "{}",
            change.diff()
        );
        change.apply().unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a = 2\n");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640);
        let left: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file left");
        assert!(FileChange {
            path,
            before: Some("x".into()),
            after: "x".into()
        }
        .is_noop());
    }
}
