//! Model hubs as origins, with upstream's URL schemes:
//! `hf://[datasets/|spaces/]owner/repo[/path]` (the Hugging Face Hub) and
//! `modelscope://owner/repo[/path]` (ModelScope models).
//!
//! A file resolves to the hub's download URL at a revision (`resolve/<revision>/<path>`
//! on Hugging Face, `repo?Revision=&FilePath=` on ModelScope), fetched with the HTTP
//! backend; the hub's token goes to the hub's own host only (a redirect to its CDN drops
//! it, as every cross-origin redirect does). A repo (or a directory in it) lists through
//! the hub's API. The endpoint is the request's (`base_url`: a mirror or a self-hosted hub)
//! or the public hub's. Parsing and URL building are pure.

use crate::{BackendError, Entry, HubAuth};

/// Which hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hub {
    HuggingFace,
    ModelScope,
}

impl Hub {
    pub fn of(scheme: &str) -> Option<Hub> {
        match scheme {
            "hf" => Some(Hub::HuggingFace),
            "modelscope" => Some(Hub::ModelScope),
            _ => None,
        }
    }

    fn scheme(self) -> &'static str {
        match self {
            Hub::HuggingFace => "hf",
            Hub::ModelScope => "modelscope",
        }
    }

    pub fn default_base(self) -> &'static str {
        match self {
            Hub::HuggingFace => "https://huggingface.co",
            Hub::ModelScope => "https://modelscope.cn",
        }
    }

    pub fn default_revision(self) -> &'static str {
        match self {
            Hub::HuggingFace => "main",
            Hub::ModelScope => "master",
        }
    }
}

/// A repository's kind on the Hugging Face Hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    Model,
    Dataset,
    Space,
}

impl RepoKind {
    /// The path segment of the API (`/api/models/...`).
    fn api(self) -> &'static str {
        match self {
            RepoKind::Model => "models",
            RepoKind::Dataset => "datasets",
            RepoKind::Space => "spaces",
        }
    }

    /// The prefix of a resolve URL (models have none).
    fn prefix(self) -> &'static str {
        match self {
            RepoKind::Model => "",
            RepoKind::Dataset => "datasets/",
            RepoKind::Space => "spaces/",
        }
    }
}

/// A file or directory in a hub repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubLocation {
    pub hub: Hub,
    pub kind: RepoKind,
    /// `owner/repo`.
    pub repo: String,
    /// Inside the repo; empty for the whole repo.
    pub path: String,
}

fn segment_ok(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl HubLocation {
    pub fn parse(url: &url::Url) -> Result<HubLocation, BackendError> {
        let hub = Hub::of(url.scheme())
            .ok_or_else(|| BackendError::UnsupportedScheme(url.scheme().to_string()))?;
        let bad = |reason: &str| BackendError::InvalidUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let mut parts: Vec<String> = std::iter::once(url.host_str().unwrap_or("").to_string())
            .chain(url.path().split('/').filter(|s| !s.is_empty()).map(|s| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8_lossy()
                    .into_owned()
            }))
            .collect();
        let kind = match parts.first().map(String::as_str) {
            Some("datasets") if hub == Hub::HuggingFace => RepoKind::Dataset,
            Some("spaces") if hub == Hub::HuggingFace => RepoKind::Space,
            _ => RepoKind::Model,
        };
        if kind != RepoKind::Model {
            parts.remove(0);
        }
        if parts.len() < 2 || !segment_ok(&parts[0]) || !segment_ok(&parts[1]) {
            return Err(bad(match hub {
                Hub::HuggingFace => "expected hf://[datasets/|spaces/]owner/repo[/path]",
                Hub::ModelScope => "expected modelscope://owner/repo[/path]",
            }));
        }
        let path = parts[2..].join("/");
        if parts[2..].iter().any(|p| p == ".." || p == ".") {
            return Err(bad("the path must not contain . or .. segments"));
        }
        Ok(HubLocation {
            hub,
            kind,
            repo: format!("{}/{}", parts[0], parts[1]),
            path,
        })
    }

    /// The `hf://` (or `modelscope://`) URL of `path` in the same repo.
    pub fn url_of(&self, path: &str) -> String {
        let kind = match self.kind {
            RepoKind::Model => "",
            RepoKind::Dataset => "datasets/",
            RepoKind::Space => "spaces/",
        };
        let encoded: Vec<String> = path.split('/').map(encode).collect();
        format!(
            "{}://{kind}{}/{}",
            self.hub.scheme(),
            self.repo,
            encoded.join("/")
        )
    }

    /// Where the file's bytes are downloaded from.
    pub fn file_url(&self, base: &str, revision: &str) -> String {
        let base = base.trim_end_matches('/');
        let path: Vec<String> = self.path.split('/').map(encode).collect();
        match self.hub {
            Hub::HuggingFace => format!(
                "{base}/{}{}/resolve/{}/{}",
                self.kind.prefix(),
                self.repo,
                encode(revision),
                path.join("/")
            ),
            Hub::ModelScope => format!(
                "{base}/api/v1/models/{}/repo?Revision={}&FilePath={}",
                self.repo,
                encode(revision),
                path.join("%2F")
            ),
        }
    }

    /// Where the repo's files are listed.
    pub fn list_url(&self, base: &str, revision: &str) -> String {
        let base = base.trim_end_matches('/');
        match self.hub {
            Hub::HuggingFace => format!(
                "{base}/api/{}/{}/revision/{}?blobs=true",
                self.kind.api(),
                self.repo,
                encode(revision)
            ),
            Hub::ModelScope => format!(
                "{base}/api/v1/models/{}/repo/files?Revision={}&Recursive=true",
                self.repo,
                encode(revision)
            ),
        }
    }
}

/// Percent-encodes one path segment (or query value).
fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC)
        .to_string()
        .replace("%2D", "-")
        .replace("%2E", ".")
        .replace("%5F", "_")
        .replace("%7E", "~")
}

/// The files of a listing answer under the location's path: `(path, size)`.
pub fn parse_listing(loc: &HubLocation, body: &[u8]) -> Result<Vec<(String, u64)>, String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("the hub's answer is not JSON: {e}"))?;
    let mut files: Vec<(String, u64)> = match loc.hub {
        Hub::HuggingFace => value["siblings"]
            .as_array()
            .ok_or("the hub's answer has no siblings")?
            .iter()
            .filter_map(|s| {
                let name = s["rfilename"].as_str()?.to_string();
                let size = s["size"]
                    .as_u64()
                    .or_else(|| s["lfs"]["size"].as_u64())
                    .unwrap_or(0);
                Some((name, size))
            })
            .collect(),
        Hub::ModelScope => value["Data"]["Files"]
            .as_array()
            .ok_or("the hub's answer has no Data.Files")?
            .iter()
            .filter(|f| f["Type"].as_str() != Some("tree"))
            .filter_map(|f| {
                Some((
                    f["Path"].as_str()?.to_string(),
                    f["Size"].as_u64().unwrap_or(0),
                ))
            })
            .collect(),
    };
    // Only what lies under the asked path; no escaping names.
    let prefix = if loc.path.is_empty() {
        String::new()
    } else {
        format!("{}/", loc.path.trim_end_matches('/'))
    };
    files.retain(|(name, _)| {
        (prefix.is_empty() || name.starts_with(&prefix) || *name == loc.path)
            && !name.split('/').any(|p| p == ".." || p.is_empty())
    });
    files.sort();
    files.dedup();
    Ok(files)
}

/// The entries of a listing, as URLs of the same scheme.
pub fn entries(loc: &HubLocation, files: Vec<(String, u64)>) -> Vec<Entry> {
    files
        .into_iter()
        .map(|(path, size)| Entry {
            url: loc.url_of(&path),
            content_length: size,
            is_dir: false,
        })
        .collect()
}

/// The hub's endpoint and the revision for a request.
pub fn endpoint(loc: &HubLocation, auth: Option<&HubAuth>) -> (String, String) {
    let base = auth
        .and_then(|a| a.base_url.clone())
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| loc.hub.default_base().to_string());
    let revision = auth
        .map(|a| a.revision.clone())
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| loc.hub.default_revision().to_string());
    (base, revision)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(url: &str) -> HubLocation {
        HubLocation::parse(&url::Url::parse(url).unwrap()).unwrap()
    }

    #[test]
    fn urls_table() {
        let cases = [
            (
                "hf://owner/model/config.json",
                "https://huggingface.co/owner/model/resolve/main/config.json",
            ),
            (
                "hf://datasets/owner/set/data/train-00001.parquet",
                "https://huggingface.co/datasets/owner/set/resolve/main/data/train-00001.parquet",
            ),
            (
                "hf://spaces/o/s/app.py",
                "https://huggingface.co/spaces/o/s/resolve/main/app.py",
            ),
            (
                "modelscope://qwen/Qwen-7B/model.safetensors",
                "https://modelscope.cn/api/v1/models/qwen/Qwen-7B/repo?Revision=master&FilePath=model.safetensors",
            ),
        ];
        for (url, want) in cases {
            let l = loc(url);
            let (base, rev) = endpoint(&l, None);
            assert_eq!(l.file_url(&base, &rev), want, "{url}");
        }
        let l = loc("hf://owner/model");
        assert_eq!(l.path, "");
        assert_eq!(
            l.list_url("http://127.0.0.1:9/", "v1.0"),
            "http://127.0.0.1:9/api/models/owner/model/revision/v1.0?blobs=true"
        );
        assert_eq!(l.url_of("dir/a b.bin"), "hf://owner/model/dir/a%20b.bin");
        let auth = HubAuth {
            token: Some("t".into()),
            revision: "refs/pr/1".into(),
            base_url: Some("http://mirror:8080".into()),
        };
        let l = loc("hf://o/m/f.bin");
        let (base, rev) = endpoint(&l, Some(&auth));
        assert_eq!(
            l.file_url(&base, &rev),
            "http://mirror:8080/o/m/resolve/refs%2Fpr%2F1/f.bin"
        );
        // (The URL parser already resolves `..` segments: hf://o/m/../x is hf://o/x.)
        for bad in [
            "hf://only",
            "hf://datasets/x",
            "hf://o/m%2F..",
            "modelscope://a",
        ] {
            assert!(
                HubLocation::parse(&url::Url::parse(bad).unwrap()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn listings_keep_what_is_under_the_path() {
        let body = br#"{"id":"o/m","siblings":[{"rfilename":"config.json","size":10},{"rfilename":"weights/a.safetensors","lfs":{"size":2048}},{"rfilename":"weights/b.safetensors","size":4096},{"rfilename":"../escape"}]}"#;
        let all = parse_listing(&loc("hf://o/m"), body).unwrap();
        assert_eq!(
            all,
            [
                ("config.json".to_string(), 10),
                ("weights/a.safetensors".to_string(), 2048),
                ("weights/b.safetensors".to_string(), 4096)
            ]
        );
        let sub = parse_listing(&loc("hf://o/m/weights"), body).unwrap();
        assert_eq!(sub.len(), 2);
        let ms = br#"{"Code":200,"Data":{"Files":[{"Path":"a.bin","Size":5,"Type":"blob"},{"Path":"d","Type":"tree"},{"Path":"d/b.bin","Size":7,"Type":"blob"}]}}"#;
        assert_eq!(
            parse_listing(&loc("modelscope://o/m"), ms).unwrap(),
            [("a.bin".to_string(), 5), ("d/b.bin".to_string(), 7)]
        );
        assert!(parse_listing(&loc("hf://o/m"), b"<html>").is_err());
    }
}
