//! `scheduler.v2.Scheduler` over gRPC: translates messages and calls [`Service`].
//! Standard tasks are served; the cache, persistent and preheat families answer
//! Unimplemented with a message saying so.

use crate::service::Service;
use dragonfly_api::common::v2::{
    CachePeer, CacheTask, Peer, PersistentCachePeer, PersistentCacheTask, PersistentPeer,
    PersistentTask, Task,
};
use dragonfly_api::scheduler::v2::scheduler_server::Scheduler;
use dragonfly_api::scheduler::v2::*;
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Responses buffered per AnnouncePeer stream.
const REPLY_BUFFER: usize = 64;

pub struct SchedulerService {
    pub service: Arc<Service>,
}

/// The address a request's connection comes from.
fn origin<T>(request: &Request<T>) -> Option<std::net::IpAddr> {
    request.remote_addr().map(|a| a.ip().to_canonical())
}

fn unimplemented(what: &str) -> Status {
    Status::unimplemented(format!(
        "{what} is not supported by this scheduler; only standard tasks (AnnouncePeer) are"
    ))
}

fn empty_stream<T: Send + 'static>(what: &str) -> Result<Response<BoxStream<T>>, Status> {
    Err(unimplemented(what))
}

#[tonic::async_trait]
impl Scheduler for SchedulerService {
    type AnnouncePeerStream = BoxStream<AnnouncePeerResponse>;

    async fn announce_peer(
        &self,
        request: Request<Streaming<AnnouncePeerRequest>>,
    ) -> Result<Response<Self::AnnouncePeerStream>, Status> {
        let origin = origin(&request);
        let inbound = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(REPLY_BUFFER);
        tokio::spawn(self.service.clone().serve_stream(inbound, tx, origin));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn stat_peer(&self, request: Request<StatPeerRequest>) -> Result<Response<Peer>, Status> {
        let r = request.into_inner();
        self.service
            .stat_peer(&r.peer_id)
            .map(Response::new)
            .map_err(|e| e.to_status())
    }

    async fn delete_peer(
        &self,
        request: Request<DeletePeerRequest>,
    ) -> Result<Response<()>, Status> {
        let origin = origin(&request);
        let r = request.into_inner();
        self.service
            .delete_peer(&r.peer_id, origin)
            .map(Response::new)
            .map_err(|e| e.to_status())
    }

    async fn stat_task(&self, request: Request<StatTaskRequest>) -> Result<Response<Task>, Status> {
        let r = request.into_inner();
        self.service
            .stat_task(&r.task_id)
            .map(Response::new)
            .map_err(|e| e.to_status())
    }

    async fn delete_task(
        &self,
        request: Request<DeleteTaskRequest>,
    ) -> Result<Response<()>, Status> {
        let origin = origin(&request);
        let r = request.into_inner();
        self.service
            .delete_task(&r.host_id, &r.task_id, origin)
            .map(Response::new)
            .map_err(|e| e.to_status())
    }

    async fn announce_host(
        &self,
        request: Request<AnnounceHostRequest>,
    ) -> Result<Response<()>, Status> {
        let origin = origin(&request);
        self.service
            .announce_host(request.into_inner().host, origin)
            .map(Response::new)
            .map_err(|e| e.to_status())
    }

    async fn list_hosts(
        &self,
        request: Request<ListHostsRequest>,
    ) -> Result<Response<ListHostsResponse>, Status> {
        let hosts = self.service.list_hosts(request.into_inner().r#type);
        Ok(Response::new(ListHostsResponse { hosts }))
    }

    async fn delete_host(
        &self,
        request: Request<DeleteHostRequest>,
    ) -> Result<Response<()>, Status> {
        let origin = origin(&request);
        self.service
            .delete_host(&request.into_inner().host_id, origin)
            .map(Response::new)
            .map_err(|e| e.to_status())
    }

    type AnnounceCachePeerStream = BoxStream<AnnounceCachePeerResponse>;

    async fn announce_cache_peer(
        &self,
        _request: Request<Streaming<AnnounceCachePeerRequest>>,
    ) -> Result<Response<Self::AnnounceCachePeerStream>, Status> {
        empty_stream("AnnounceCachePeer")
    }

    async fn stat_cache_peer(
        &self,
        _request: Request<StatCachePeerRequest>,
    ) -> Result<Response<CachePeer>, Status> {
        Err(unimplemented("StatCachePeer"))
    }

    async fn delete_cache_peer(
        &self,
        _request: Request<DeleteCachePeerRequest>,
    ) -> Result<Response<()>, Status> {
        Err(unimplemented("DeleteCachePeer"))
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

    type AnnouncePersistentPeerStream = BoxStream<AnnouncePersistentPeerResponse>;

    async fn announce_persistent_peer(
        &self,
        _request: Request<Streaming<AnnouncePersistentPeerRequest>>,
    ) -> Result<Response<Self::AnnouncePersistentPeerStream>, Status> {
        empty_stream("AnnouncePersistentPeer")
    }

    async fn stat_persistent_peer(
        &self,
        _request: Request<StatPersistentPeerRequest>,
    ) -> Result<Response<PersistentPeer>, Status> {
        Err(unimplemented("StatPersistentPeer"))
    }

    async fn delete_persistent_peer(
        &self,
        _request: Request<DeletePersistentPeerRequest>,
    ) -> Result<Response<()>, Status> {
        Err(unimplemented("DeletePersistentPeer"))
    }

    async fn upload_persistent_task_started(
        &self,
        _request: Request<UploadPersistentTaskStartedRequest>,
    ) -> Result<Response<()>, Status> {
        Err(unimplemented("UploadPersistentTaskStarted"))
    }

    async fn upload_persistent_task_finished(
        &self,
        _request: Request<UploadPersistentTaskFinishedRequest>,
    ) -> Result<Response<PersistentTask>, Status> {
        Err(unimplemented("UploadPersistentTaskFinished"))
    }

    async fn upload_persistent_task_failed(
        &self,
        _request: Request<UploadPersistentTaskFailedRequest>,
    ) -> Result<Response<()>, Status> {
        Err(unimplemented("UploadPersistentTaskFailed"))
    }

    async fn stat_persistent_task(
        &self,
        _request: Request<StatPersistentTaskRequest>,
    ) -> Result<Response<PersistentTask>, Status> {
        Err(unimplemented("StatPersistentTask"))
    }

    async fn delete_persistent_task(
        &self,
        _request: Request<DeletePersistentTaskRequest>,
    ) -> Result<Response<()>, Status> {
        Err(unimplemented("DeletePersistentTask"))
    }

    type AnnouncePersistentCachePeerStream = BoxStream<AnnouncePersistentCachePeerResponse>;

    async fn announce_persistent_cache_peer(
        &self,
        _request: Request<Streaming<AnnouncePersistentCachePeerRequest>>,
    ) -> Result<Response<Self::AnnouncePersistentCachePeerStream>, Status> {
        empty_stream("AnnouncePersistentCachePeer")
    }

    async fn stat_persistent_cache_peer(
        &self,
        _request: Request<StatPersistentCachePeerRequest>,
    ) -> Result<Response<PersistentCachePeer>, Status> {
        Err(unimplemented("StatPersistentCachePeer"))
    }

    async fn delete_persistent_cache_peer(
        &self,
        _request: Request<DeletePersistentCachePeerRequest>,
    ) -> Result<Response<()>, Status> {
        Err(unimplemented("DeletePersistentCachePeer"))
    }

    async fn upload_persistent_cache_task_started(
        &self,
        _request: Request<UploadPersistentCacheTaskStartedRequest>,
    ) -> Result<Response<()>, Status> {
        Err(unimplemented("UploadPersistentCacheTaskStarted"))
    }

    async fn upload_persistent_cache_task_finished(
        &self,
        _request: Request<UploadPersistentCacheTaskFinishedRequest>,
    ) -> Result<Response<PersistentCacheTask>, Status> {
        Err(unimplemented("UploadPersistentCacheTaskFinished"))
    }

    async fn upload_persistent_cache_task_failed(
        &self,
        _request: Request<UploadPersistentCacheTaskFailedRequest>,
    ) -> Result<Response<()>, Status> {
        Err(unimplemented("UploadPersistentCacheTaskFailed"))
    }

    async fn stat_persistent_cache_task(
        &self,
        _request: Request<StatPersistentCacheTaskRequest>,
    ) -> Result<Response<PersistentCacheTask>, Status> {
        Err(unimplemented("StatPersistentCacheTask"))
    }

    async fn delete_persistent_cache_task(
        &self,
        _request: Request<DeletePersistentCacheTaskRequest>,
    ) -> Result<Response<()>, Status> {
        Err(unimplemented("DeletePersistentCacheTask"))
    }

    async fn preheat_image(
        &self,
        _request: Request<PreheatImageRequest>,
    ) -> Result<Response<()>, Status> {
        Err(unimplemented("PreheatImage"))
    }

    async fn stat_image(
        &self,
        _request: Request<StatImageRequest>,
    ) -> Result<Response<StatImageResponse>, Status> {
        Err(unimplemented("StatImage"))
    }

    async fn preheat_file(
        &self,
        _request: Request<PreheatFileRequest>,
    ) -> Result<Response<()>, Status> {
        Err(unimplemented("PreheatFile"))
    }

    async fn stat_file(
        &self,
        _request: Request<StatFileRequest>,
    ) -> Result<Response<StatFileResponse>, Status> {
        Err(unimplemented("StatFile"))
    }
}
