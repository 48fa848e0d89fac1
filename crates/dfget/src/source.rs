//! The origin-specific flags, as upstream's dfget names them: object storage
//! (`--storage-*`), HDFS (`--hdfs-delegation-token`) and the model hubs (`--hf-*`,
//! `--ms-*`), turned into the request's `object_storage`, `hdfs`, `hugging_face` and
//! `model_scope` fields.

use dragonfly_api::common::v2::{Download, Hdfs, HuggingFace, ModelScope, ObjectStorage};

/// The schemes dfdaemon fetches.
pub const SCHEMES: &[&str] = &[
    "http",
    "https",
    "s3",
    "gs",
    "abs",
    "oss",
    "obs",
    "cos",
    "hdfs",
    "hf",
    "modelscope",
];

const OBJECT_STORAGE: &[&str] = &["s3", "gs", "abs", "oss", "obs", "cos"];

#[derive(Debug, Clone, Default, clap::Args)]
pub struct SourceArgs {
    /// Object storage region (s3://...).
    #[arg(long = "storage-region")]
    storage_region: Option<String>,
    /// Object storage endpoint, for S3-compatible stores (http://host:port).
    #[arg(long = "storage-endpoint")]
    storage_endpoint: Option<String>,
    /// Object storage access key ID.
    #[arg(long = "storage-access-key-id", env = "DFGET_STORAGE_ACCESS_KEY_ID")]
    storage_access_key_id: Option<String>,
    /// Object storage access key secret.
    #[arg(
        long = "storage-access-key-secret",
        env = "DFGET_STORAGE_ACCESS_KEY_SECRET",
        hide_env_values = true
    )]
    storage_access_key_secret: Option<String>,
    /// Object storage session token (S3).
    #[arg(long = "storage-session-token", hide_env_values = true)]
    storage_session_token: Option<String>,
    /// Google Cloud Storage credential file.
    #[arg(long = "storage-credential-path")]
    storage_credential_path: Option<String>,
    /// Predefined ACL (GCS).
    #[arg(long = "storage-predefined-acl")]
    storage_predefined_acl: Option<String>,
    /// Temporary STS security token (OSS), or the SAS token (Azure Blob).
    #[arg(long = "storage-security-token", hide_env_values = true)]
    storage_security_token: Option<String>,
    /// Skip verifying the object store's certificate.
    #[arg(long = "storage-insecure-skip-verify")]
    storage_insecure_skip_verify: bool,
    /// WebHDFS delegation token (hdfs://...).
    #[arg(long = "hdfs-delegation-token", hide_env_values = true)]
    hdfs_delegation_token: Option<String>,
    /// Hugging Face token (sent to the hub's own host only).
    #[arg(long = "hf-token", env = "HF_TOKEN", hide_env_values = true)]
    hf_token: Option<String>,
    /// Hugging Face revision: a branch, tag or commit.
    #[arg(long = "hf-revision", default_value = "main")]
    hf_revision: String,
    /// Hugging Face Hub endpoint (a mirror or a self-hosted hub).
    #[arg(long = "hf-base-url", env = "HF_ENDPOINT")]
    hf_base_url: Option<String>,
    /// ModelScope token.
    #[arg(
        long = "ms-token",
        env = "MODELSCOPE_API_TOKEN",
        hide_env_values = true
    )]
    ms_token: Option<String>,
    /// ModelScope revision.
    #[arg(long = "ms-revision", default_value = "master")]
    ms_revision: String,
    /// ModelScope endpoint.
    #[arg(long = "ms-base-url")]
    ms_base_url: Option<String>,
}

impl SourceArgs {
    pub fn object_storage(&self) -> Option<ObjectStorage> {
        let o = ObjectStorage {
            region: self.storage_region.clone(),
            endpoint: self.storage_endpoint.clone(),
            access_key_id: self.storage_access_key_id.clone(),
            access_key_secret: self.storage_access_key_secret.clone(),
            session_token: self.storage_session_token.clone(),
            credential_path: self.storage_credential_path.clone(),
            predefined_acl: self.storage_predefined_acl.clone(),
            security_token: self.storage_security_token.clone(),
            insecure_skip_verify: Some(self.storage_insecure_skip_verify),
        };
        Some(o)
    }

    pub fn hdfs(&self) -> Option<Hdfs> {
        Some(Hdfs {
            delegation_token: self.hdfs_delegation_token.clone(),
        })
    }

    pub fn hugging_face(&self) -> Option<HuggingFace> {
        Some(HuggingFace {
            token: self.hf_token.clone(),
            revision: self.hf_revision.clone(),
            base_url: self.hf_base_url.clone(),
        })
    }

    pub fn model_scope(&self) -> Option<ModelScope> {
        Some(ModelScope {
            token: self.ms_token.clone(),
            revision: self.ms_revision.clone(),
            base_url: self.ms_base_url.clone(),
        })
    }

    /// The request with the fields its scheme uses.
    pub fn attach(&self, url: &url::Url, mut download: Download) -> Download {
        match url.scheme() {
            s if OBJECT_STORAGE.contains(&s) => download.object_storage = self.object_storage(),
            "hdfs" => download.hdfs = self.hdfs(),
            "hf" => download.hugging_face = self.hugging_face(),
            "modelscope" => download.model_scope = self.model_scope(),
            _ => {}
        }
        download
    }
}
