//! `envd.ports.Ports` over tonic.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::context;
use crate::defaults::Defaults;
use crate::ports::api::PortsService;
use crate::proto::ports::ports_server::{Ports, PortsServer};
use crate::proto::ports::*;

#[derive(Debug, Clone)]
pub struct PortsGrpc {
    svc: Arc<PortsService>,
    defaults: Arc<Defaults>,
}

impl PortsGrpc {
    pub fn server(svc: Arc<PortsService>, defaults: Arc<Defaults>) -> PortsServer<PortsGrpc> {
        PortsServer::new(PortsGrpc { svc, defaults })
    }
}

#[tonic::async_trait]
impl Ports for PortsGrpc {
    async fn list(
        &self,
        _req: Request<ListPortsRequest>,
    ) -> Result<Response<ListPortsResponse>, Status> {
        Ok(Response::new(self.svc.list().await?))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<PortEvent, Status>> + Send>>;

    async fn watch(
        &self,
        req: Request<WatchPortsRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let ctx = context(&req, &self.defaults)?;
        let s = self.svc.watch(ctx.keepalive)?;
        Ok(Response::new(Box::pin(s.map(|r| r.map_err(Status::from)))))
    }
}
