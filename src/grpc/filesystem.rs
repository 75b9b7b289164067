//! `filesystem.Filesystem` and `envd.transfer.Transfer` over tonic.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::{client_stream, context};
use crate::defaults::Defaults;
use crate::filesystem::FilesystemService;
use crate::proto::filesystem::filesystem_server::{Filesystem, FilesystemServer};
use crate::proto::filesystem::*;
use crate::proto::transfer::transfer_server::{Transfer, TransferServer};
use crate::proto::transfer::*;

type RpcStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[derive(Debug, Clone)]
pub struct FilesystemGrpc {
    svc: Arc<FilesystemService>,
    defaults: Arc<Defaults>,
}

impl FilesystemGrpc {
    pub fn new(svc: Arc<FilesystemService>, defaults: Arc<Defaults>) -> Self {
        Self { svc, defaults }
    }

    pub fn filesystem_server(&self) -> FilesystemServer<FilesystemGrpc> {
        FilesystemServer::new(self.clone())
            .max_decoding_message_size(crate::wire::MAX_DECODE)
            .max_encoding_message_size(crate::wire::MAX_ENCODE)
    }

    pub fn transfer_server(&self) -> TransferServer<FilesystemGrpc> {
        TransferServer::new(self.clone())
            .max_decoding_message_size(crate::wire::MAX_DECODE)
            .max_encoding_message_size(crate::wire::MAX_ENCODE)
    }
}

#[tonic::async_trait]
impl Filesystem for FilesystemGrpc {
    async fn stat(&self, req: Request<StatRequest>) -> Result<Response<StatResponse>, Status> {
        let ctx = context(&req, &self.defaults)?;
        Ok(Response::new(self.svc.stat(&ctx, req.into_inner()).await?))
    }

    async fn make_dir(
        &self,
        req: Request<MakeDirRequest>,
    ) -> Result<Response<MakeDirResponse>, Status> {
        let ctx = context(&req, &self.defaults)?;
        Ok(Response::new(
            self.svc.make_dir(&ctx, req.into_inner()).await?,
        ))
    }

    async fn r#move(&self, req: Request<MoveRequest>) -> Result<Response<MoveResponse>, Status> {
        let ctx = context(&req, &self.defaults)?;
        Ok(Response::new(
            self.svc.move_entry(&ctx, req.into_inner()).await?,
        ))
    }

    async fn list_dir(
        &self,
        req: Request<ListDirRequest>,
    ) -> Result<Response<ListDirResponse>, Status> {
        let ctx = context(&req, &self.defaults)?;
        Ok(Response::new(
            self.svc.list_dir(&ctx, req.into_inner()).await?,
        ))
    }

    async fn remove(
        &self,
        req: Request<RemoveRequest>,
    ) -> Result<Response<RemoveResponse>, Status> {
        let ctx = context(&req, &self.defaults)?;
        Ok(Response::new(
            self.svc.remove(&ctx, req.into_inner()).await?,
        ))
    }

    type WatchDirStream = RpcStream<WatchDirResponse>;

    async fn watch_dir(
        &self,
        req: Request<WatchDirRequest>,
    ) -> Result<Response<Self::WatchDirStream>, Status> {
        let ctx = context(&req, &self.defaults)?;
        let s = self.svc.watch_dir(&ctx, req.into_inner()).await?;
        Ok(Response::new(Box::pin(s.map(|r| r.map_err(Status::from)))))
    }

    async fn create_watcher(
        &self,
        req: Request<CreateWatcherRequest>,
    ) -> Result<Response<CreateWatcherResponse>, Status> {
        let ctx = context(&req, &self.defaults)?;
        Ok(Response::new(
            self.svc.create_watcher(&ctx, req.into_inner()).await?,
        ))
    }

    async fn get_watcher_events(
        &self,
        req: Request<GetWatcherEventsRequest>,
    ) -> Result<Response<GetWatcherEventsResponse>, Status> {
        let ctx = context(&req, &self.defaults)?;
        Ok(Response::new(
            self.svc.get_watcher_events(&ctx, req.into_inner())?,
        ))
    }

    async fn remove_watcher(
        &self,
        req: Request<RemoveWatcherRequest>,
    ) -> Result<Response<RemoveWatcherResponse>, Status> {
        context(&req, &self.defaults)?;
        Ok(Response::new(self.svc.remove_watcher(req.into_inner())?))
    }
}

#[tonic::async_trait]
impl Transfer for FilesystemGrpc {
    type ReadFileStream = RpcStream<ReadFileResponse>;

    async fn read_file(
        &self,
        req: Request<ReadFileRequest>,
    ) -> Result<Response<Self::ReadFileStream>, Status> {
        let ctx = context(&req, &self.defaults)?;
        let s = self.svc.read_file(&ctx, req.into_inner()).await?;
        Ok(Response::new(Box::pin(s.map(|r| r.map_err(Status::from)))))
    }

    async fn write_file(
        &self,
        req: Request<Streaming<WriteFileRequest>>,
    ) -> Result<Response<WriteFileResponse>, Status> {
        let ctx = context(&req, &self.defaults)?;
        let input = client_stream(req.into_inner());
        Ok(Response::new(self.svc.write_file(&ctx, input).await?))
    }
}
