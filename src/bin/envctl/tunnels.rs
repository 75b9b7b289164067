//! `envctl proxy`, `envctl forward`, `envctl reverse` and `envctl ports`:
//! reaching into (and out of) a VM that may have no network.

use std::process::ExitCode;

use futures_util::StreamExt;

use crate::Ctx;

/// `envctl proxy`: runs until interrupted.
pub async fn proxy(url: &str, listen: &str) -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .try_init();
    let target: envd::client::Target = match url.parse() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("envctl: {e}");
            return ExitCode::from(2);
        }
    };
    match envd::client::proxy::Local::bind(listen).await {
        Ok((local, bound)) => {
            eprintln!("envctl: proxying {bound} to {url}");
            envd::client::proxy::serve(local, target).await;
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("envctl: {e}");
            ExitCode::from(2)
        }
    }
}

/// `envctl forward`: every spec at once, until interrupted.
pub async fn forward(url: &str, specs: &[String], token: Option<String>) -> ExitCode {
    serve_all(url, specs, token, envd::client::forward::serve).await
}

/// `envctl reverse`: every spec at once, until interrupted.
pub async fn reverse(url: &str, specs: &[String], token: Option<String>) -> ExitCode {
    serve_all(url, specs, token, envd::client::reverse::serve).await
}

/// Parses every spec, then serves each on a task of its own until
/// interrupted or one fails.
async fn serve_all<S, F, Fut>(
    url: &str,
    specs: &[String],
    token: Option<String>,
    serve: F,
) -> ExitCode
where
    S: std::str::FromStr<Err = String>,
    F: Fn(S, std::sync::Arc<envd::client::Target>, Option<String>) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let parsed: Result<Vec<S>, String> = specs.iter().map(|s| s.parse()).collect();
    let target: Result<envd::client::Target, String> = url.parse();
    let (specs, target) = match (parsed, target) {
        (Ok(s), Ok(t)) => (s, std::sync::Arc::new(t)),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("envctl: {e}");
            return ExitCode::from(2);
        }
    };
    let mut tasks = tokio::task::JoinSet::new();
    for spec in specs {
        tasks.spawn(serve(spec, target.clone(), token.clone()));
    }
    while let Some(done) = tasks.join_next().await {
        if let Ok(Err(e)) = done {
            eprintln!("envctl: {e}");
            return ExitCode::from(2);
        }
    }
    ExitCode::SUCCESS
}

/// `envctl ports`: one line per listening port; with `follow`, `+`/`-`
/// lines as they come and go.
pub async fn ports(ctx: &Ctx, follow: bool) -> Result<u8, String> {
    use envd::proto::ports::port_event::Event as PortEv;
    use envd::proto::ports::ports_client::PortsClient;
    use envd::proto::ports::{ListPortsRequest, Port, WatchPortsRequest};
    let line = |sign: &str, p: &Port| {
        let owner = p
            .command_pid
            .map_or_else(String::new, |c| format!(" (command {c})"));
        println!(
            "{sign}{} {}:{} pid {}{owner}",
            p.protocol, p.address, p.port, p.pid
        );
    };
    let mut c = PortsClient::new(ctx.channel.clone());
    if !follow {
        let list = c
            .list(ctx.req(ListPortsRequest {}))
            .await
            .map_err(|s| s.message().to_owned())?;
        for p in &list.into_inner().ports {
            line("", p);
        }
        return Ok(0);
    }
    let mut s = c
        .watch(ctx.req(WatchPortsRequest {}))
        .await
        .map_err(|s| s.message().to_owned())?
        .into_inner();
    while let Some(ev) = s.next().await {
        match ev.map_err(|s| s.message().to_owned())?.event {
            Some(PortEv::Added(p)) => line("+", &p),
            Some(PortEv::Removed(p)) => line("-", &p),
            _ => {}
        }
    }
    Ok(0)
}
