//! `dfdaemon.v2.DfdaemonDownload` on the unix socket, for dfget and other local tools.

use super::{stat_local, task_to_proto, unimplemented, BoxStream};
use crate::host::HostInfo;
use crate::task::TaskManager;
use dragonfly_api::common::v2::{CacheTask, PersistentCacheTask, PersistentTask, Task};
use dragonfly_api::dfdaemon::v2::dfdaemon_download_server::DfdaemonDownload;
use dragonfly_api::dfdaemon::v2::*;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct DownloadService {
    pub manager: Arc<TaskManager>,
    pub host: Arc<HostInfo>,
}

pub(crate) async fn stat_task_impl(manager: &TaskManager, task_id: &str) -> Result<Task, Status> {
    manager
        .metrics
        .stat_task_total
        .with_label_values(&["STANDARD"])
        .inc();
    let meta = manager
        .storage()
        .task(task_id)
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .ok_or_else(|| Status::not_found(format!("task {task_id} not found")))?;
    let pieces = manager
        .storage()
        .pieces(task_id)
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
    Ok(task_to_proto(&meta, &pieces))
}

pub(crate) async fn stat_local_impl(
    manager: &TaskManager,
    task_id: &str,
) -> Result<StatLocalTaskResponse, Status> {
    let meta = manager
        .storage()
        .task(task_id)
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .ok_or_else(|| Status::not_found(format!("task {task_id} not found")))?;
    Ok(stat_local(&meta))
}

/// ListTaskEntries on either service (`local`: the unix socket).
pub(crate) async fn list_entries_impl(
    manager: &TaskManager,
    request: &ListTaskEntriesRequest,
    local: bool,
) -> Result<Response<ListTaskEntriesResponse>, Status> {
    let entries = manager
        .list_entries(request, local)
        .await
        .map_err(|e| e.to_status())?;
    Ok(Response::new(ListTaskEntriesResponse {
        content_length: 0,
        response_header: Default::default(),
        status_code: None,
        entries: entries
            .into_iter()
            .map(|e| Entry {
                url: e.url,
                content_length: e.content_length,
                is_dir: e.is_dir,
            })
            .collect(),
    }))
}

pub(crate) async fn delete_impl(manager: &TaskManager, task_id: &str) -> Result<(), Status> {
    manager
        .metrics
        .delete_task_total
        .with_label_values(&["STANDARD"])
        .inc();
    manager.delete(task_id).await.map_err(|e| e.to_status())
}

#[tonic::async_trait]
impl DfdaemonDownload for DownloadService {
    type DownloadTaskStream = BoxStream<DownloadTaskResponse>;

    async fn download_task(
        &self,
        request: Request<DownloadTaskRequest>,
    ) -> Result<Response<Self::DownloadTaskStream>, Status> {
        super::download_task(&self.manager, &self.host, request.into_inner(), true).await
    }

    async fn stat_task(&self, request: Request<StatTaskRequest>) -> Result<Response<Task>, Status> {
        Ok(Response::new(
            stat_task_impl(&self.manager, &request.into_inner().task_id).await?,
        ))
    }

    async fn stat_local_task(
        &self,
        request: Request<StatLocalTaskRequest>,
    ) -> Result<Response<StatLocalTaskResponse>, Status> {
        Ok(Response::new(
            stat_local_impl(&self.manager, &request.into_inner().task_id).await?,
        ))
    }

    async fn list_local_tasks(
        &self,
        _request: Request<ListLocalTasksRequest>,
    ) -> Result<Response<ListLocalTasksResponse>, Status> {
        self.manager
            .metrics
            .list_local_tasks_total
            .with_label_values(&["STANDARD"])
            .inc();
        let tasks = self
            .manager
            .storage()
            .list_tasks()
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(ListLocalTasksResponse {
            tasks: tasks.iter().map(stat_local).collect(),
        }))
    }

    async fn list_task_entries(
        &self,
        request: Request<ListTaskEntriesRequest>,
    ) -> Result<Response<ListTaskEntriesResponse>, Status> {
        list_entries_impl(&self.manager, &request.into_inner(), true).await
    }

    async fn delete_task(
        &self,
        request: Request<DeleteTaskRequest>,
    ) -> Result<Response<()>, Status> {
        delete_impl(&self.manager, &request.into_inner().task_id).await?;
        Ok(Response::new(()))
    }

    async fn delete_local_task(
        &self,
        request: Request<DeleteLocalTaskRequest>,
    ) -> Result<Response<()>, Status> {
        delete_impl(&self.manager, &request.into_inner().task_id).await?;
        Ok(Response::new(()))
    }

    async fn delete_host(&self, _request: Request<()>) -> Result<Response<()>, Status> {
        Err(unimplemented("DeleteHost"))
    }

    type DownloadCacheTaskStream = BoxStream<DownloadCacheTaskResponse>;

    async fn download_cache_task(
        &self,
        _request: Request<DownloadCacheTaskRequest>,
    ) -> Result<Response<Self::DownloadCacheTaskStream>, Status> {
        Err(unimplemented("DownloadCacheTask"))
    }

    async fn stat_cache_task(
        &self,
        _request: Request<StatCacheTaskRequest>,
    ) -> Result<Response<CacheTask>, Status> {
        Err(unimplemented("StatCacheTask"))
    }

    async fn delete_cache_task(
        &self,
        _request: Request<DeleteCacheTaskRequest>,
    ) -> Result<Response<()>, Status> {
        Err(unimplemented("DeleteCacheTask"))
    }

    type DownloadPersistentTaskStream = BoxStream<DownloadPersistentTaskResponse>;

    async fn download_persistent_task(
        &self,
        _request: Request<DownloadPersistentTaskRequest>,
    ) -> Result<Response<Self::DownloadPersistentTaskStream>, Status> {
        Err(unimplemented("DownloadPersistentTask"))
    }

    async fn upload_persistent_task(
        &self,
        _request: Request<UploadPersistentTaskRequest>,
    ) -> Result<Response<PersistentTask>, Status> {
        Err(unimplemented("UploadPersistentTask"))
    }

    async fn stat_persistent_task(
        &self,
        _request: Request<StatPersistentTaskRequest>,
    ) -> Result<Response<PersistentTask>, Status> {
        Err(unimplemented("StatPersistentTask"))
    }

    async fn stat_local_persistent_task(
        &self,
        _request: Request<StatLocalPersistentTaskRequest>,
    ) -> Result<Response<StatLocalPersistentTaskResponse>, Status> {
        Err(unimplemented("StatLocalPersistentTask"))
    }

    async fn list_local_persistent_tasks(
        &self,
        _request: Request<ListLocalPersistentTasksRequest>,
    ) -> Result<Response<ListLocalPersistentTasksResponse>, Status> {
        Err(unimplemented("ListLocalPersistentTasks"))
    }

    type DownloadPersistentCacheTaskStream = BoxStream<DownloadPersistentCacheTaskResponse>;

    async fn download_persistent_cache_task(
        &self,
        _request: Request<DownloadPersistentCacheTaskRequest>,
    ) -> Result<Response<Self::DownloadPersistentCacheTaskStream>, Status> {
        Err(unimplemented("DownloadPersistentCacheTask"))
    }

    async fn upload_persistent_cache_task(
        &self,
        _request: Request<UploadPersistentCacheTaskRequest>,
    ) -> Result<Response<PersistentCacheTask>, Status> {
        Err(unimplemented("UploadPersistentCacheTask"))
    }

    async fn stat_persistent_cache_task(
        &self,
        _request: Request<StatPersistentCacheTaskRequest>,
    ) -> Result<Response<PersistentCacheTask>, Status> {
        Err(unimplemented("StatPersistentCacheTask"))
    }

    async fn stat_local_persistent_cache_task(
        &self,
        _request: Request<StatLocalPersistentCacheTaskRequest>,
    ) -> Result<Response<StatLocalPersistentCacheTaskResponse>, Status> {
        Err(unimplemented("StatLocalPersistentCacheTask"))
    }

    async fn list_local_persistent_cache_tasks(
        &self,
        _request: Request<ListLocalPersistentCacheTasksRequest>,
    ) -> Result<Response<ListLocalPersistentCacheTasksResponse>, Status> {
        Err(unimplemented("ListLocalPersistentCacheTasks"))
    }
}
