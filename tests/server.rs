//! What every listener offers besides the services: gRPC reflection (what
//! `grpcurl -plaintext HOST:PORT list` uses) and the standard health service.

mod common;

use common::*;
use futures_util::StreamExt;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

#[tokio::test]
async fn reflection_lists_every_service_on_tcp_and_unix() {
    let envd = Envd::start(&[]);
    for url in [&envd.tcp, &envd.unix] {
        let ch = envd::client::dial(url).await.unwrap();
        let mut r = ServerReflectionClient::new(ch);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut s = r
            .server_reflection_info(futures_util::stream::iter([req]))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            s.next().await.unwrap().unwrap().message_response
        else {
            panic!("no service list");
        };
        let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        names.sort();
        for want in [
            "envd.transfer.Transfer",
            "filesystem.Filesystem",
            "grpc.health.v1.Health",
            "process.Process",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "{want} missing from {names:?} on {url}"
            );
        }
    }
}

#[tokio::test]
async fn health_reports_serving() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let envd = Envd::start(&[]);
    let mut h = HealthClient::new(envd::client::dial(&envd.tcp).await.unwrap());
    for service in ["", "process.Process", "filesystem.Filesystem"] {
        let r = h
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status, 1, "{service:?} is not SERVING");
    }
}
