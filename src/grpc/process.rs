//! `process.Process` over tonic.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::{client_stream, context};
use crate::defaults::Defaults;
use crate::process::ProcessService;
use crate::proto::process::process_server::{Process, ProcessServer};
use crate::proto::process::*;

type RpcStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[derive(Debug, Clone)]
pub struct ProcessGrpc {
    svc: Arc<ProcessService>,
    defaults: Arc<Defaults>,
}

impl ProcessGrpc {
    pub fn server(svc: Arc<ProcessService>, defaults: Arc<Defaults>) -> ProcessServer<ProcessGrpc> {
        ProcessServer::new(ProcessGrpc { svc, defaults })
            .max_decoding_message_size(crate::wire::MAX_DECODE)
            .max_encoding_message_size(crate::wire::MAX_ENCODE)
    }
}

fn events<T: Send + 'static>(
    s: crate::process::events::EventStream,
    wrap: fn(ProcessEvent) -> T,
) -> RpcStream<T> {
    Box::pin(s.map(move |r| r.map(wrap).map_err(Status::from)))
}

#[tonic::async_trait]
impl Process for ProcessGrpc {
    async fn list(&self, req: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let ctx = context(&req, &self.defaults)?;
        Ok(Response::new(self.svc.list(&ctx)?))
    }

    type ConnectStream = RpcStream<ConnectResponse>;

    async fn connect(
        &self,
        req: Request<ConnectRequest>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let ctx = context(&req, &self.defaults)?;
        let s = self.svc.connect(&ctx, req.into_inner())?;
        Ok(Response::new(events(s, |e| ConnectResponse {
            event: Some(e),
        })))
    }

    type StartStream = RpcStream<StartResponse>;

    async fn start(
        &self,
        req: Request<StartRequest>,
    ) -> Result<Response<Self::StartStream>, Status> {
        let ctx = context(&req, &self.defaults)?;
        let s = self.svc.start(&ctx, req.into_inner()).await?;
        Ok(Response::new(events(s, |e| StartResponse {
            event: Some(e),
        })))
    }

    async fn update(
        &self,
        req: Request<UpdateRequest>,
    ) -> Result<Response<UpdateResponse>, Status> {
        context(&req, &self.defaults)?;
        Ok(Response::new(self.svc.update(req.into_inner())?))
    }

    async fn stream_input(
        &self,
        req: Request<Streaming<StreamInputRequest>>,
    ) -> Result<Response<StreamInputResponse>, Status> {
        context(&req, &self.defaults)?;
        let input = client_stream(req.into_inner());
        Ok(Response::new(self.svc.stream_input(input).await?))
    }

    async fn send_input(
        &self,
        req: Request<SendInputRequest>,
    ) -> Result<Response<SendInputResponse>, Status> {
        context(&req, &self.defaults)?;
        Ok(Response::new(self.svc.send_input(req.into_inner()).await?))
    }

    async fn send_signal(
        &self,
        req: Request<SendSignalRequest>,
    ) -> Result<Response<SendSignalResponse>, Status> {
        context(&req, &self.defaults)?;
        Ok(Response::new(self.svc.send_signal(req.into_inner()).await?))
    }

    async fn close_stdin(
        &self,
        req: Request<CloseStdinRequest>,
    ) -> Result<Response<CloseStdinResponse>, Status> {
        context(&req, &self.defaults)?;
        Ok(Response::new(self.svc.close_stdin(req.into_inner()).await?))
    }
}
