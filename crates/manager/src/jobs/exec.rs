//! How a job reaches a cluster: the cluster's scheduler says which hosts are alive
//! (`ListHosts`), and each chosen host is asked over its DfdaemonUpload service to download
//! a task into its own storage (`DownloadTask`), to say whether it holds one (`StatTask`),
//! or to drop one (`DeleteTask`, which a dfdaemon accepts from the network only from its
//! manager's and schedulers' addresses).

use super::targets::Host;
use dragonfly_api::common::v2::Download;
use dragonfly_api::dfdaemon::v2::dfdaemon_upload_client::DfdaemonUploadClient;
use dragonfly_api::dfdaemon::v2::{DeleteTaskRequest, DownloadTaskRequest, StatTaskRequest};
use dragonfly_api::scheduler::v2::scheduler_client::SchedulerClient;
use dragonfly_api::scheduler::v2::ListHostsRequest;
use std::time::Duration;
use tonic::transport::Channel;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const UNARY_TIMEOUT: Duration = Duration::from_secs(30);
/// The most hosts taken from one scheduler's answer.
const MAX_HOSTS: usize = 100_000;

async fn channel(addr: &str) -> Result<Channel, String> {
    d7y_net::channel(
        addr,
        &d7y_net::ChannelOptions {
            tls: None,
            local: None,
            connect_timeout: Some(CONNECT_TIMEOUT),
            keepalive: Some((Duration::from_secs(10), Duration::from_secs(10))),
        },
    )
    .await
    .map_err(|e| format!("cannot connect to {addr}: {e}"))
}

fn addr(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// The hosts a scheduler knows, seed peers marked.
pub async fn list_hosts(scheduler_ip: &str, scheduler_port: u16) -> Result<Vec<Host>, String> {
    let target = addr(scheduler_ip, scheduler_port);
    let mut client = SchedulerClient::new(channel(&target).await?);
    let mut request = tonic::Request::new(ListHostsRequest { r#type: None });
    request.set_timeout(UNARY_TIMEOUT);
    let hosts = client
        .list_hosts(request)
        .await
        .map_err(|s| format!("scheduler {target} did not list its hosts: {}", s.message()))?
        .into_inner()
        .hosts;
    Ok(hosts
        .into_iter()
        .take(MAX_HOSTS)
        .filter(|h| (1..=65535).contains(&h.port) && h.ip.parse::<std::net::IpAddr>().is_ok())
        .map(|h| Host {
            id: h.id,
            hostname: h.hostname,
            ip: h.ip,
            port: h.port as u16,
            is_seed: h.r#type != 0,
        })
        .collect())
}

fn upload_client(channel: Channel) -> DfdaemonUploadClient<Channel> {
    // Task answers carry piece lists; leave room for the largest tasks.
    DfdaemonUploadClient::new(channel).max_decoding_message_size(64 << 20)
}

/// Has `host` download `download` into its storage; returns when it has the whole task.
pub async fn download(host: &Host, download: Download, timeout: Duration) -> Result<(), String> {
    let target = host.upload_addr();
    let run = async {
        let mut client = upload_client(channel(&target).await?);
        let mut stream = client
            .download_task(DownloadTaskRequest {
                download: Some(download),
            })
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner();
        let mut started = false;
        loop {
            match stream.message().await {
                Ok(Some(_)) => started = true,
                Ok(None) if started => return Ok(()),
                Ok(None) => return Err("the download ended before it started".to_string()),
                Err(s) => return Err(s.message().to_string()),
            }
        }
    };
    tokio::time::timeout(timeout, run).await.map_err(|_| {
        format!(
            "did not finish within {}",
            humantime::format_duration(timeout)
        )
    })?
}

/// Whether `host` holds all of `task_id` (`Some(true)`), part of it (`Some(false)`), or
/// nothing (`None`).
pub async fn stat(host: &Host, task_id: &str) -> Result<Option<bool>, String> {
    let mut client = upload_client(channel(&host.upload_addr()).await?);
    let mut request = tonic::Request::new(StatTaskRequest {
        task_id: task_id.to_string(),
        remote_ip: None,
    });
    request.set_timeout(UNARY_TIMEOUT);
    match client.stat_task(request).await {
        Ok(task) => Ok(Some(task.into_inner().state == "Succeeded")),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
        Err(s) => Err(s.message().to_string()),
    }
}

/// Has `host` drop `task_id`.
pub async fn delete(host: &Host, task_id: &str) -> Result<(), String> {
    let mut client = upload_client(channel(&host.upload_addr()).await?);
    let mut request = tonic::Request::new(DeleteTaskRequest {
        task_id: task_id.to_string(),
        remote_ip: None,
    });
    request.set_timeout(UNARY_TIMEOUT);
    client
        .delete_task(request)
        .await
        .map(|_| ())
        .map_err(|s| s.message().to_string())
}
