//! Commands envd runs for itself rather than for a client: `mount` for NFS
//! volumes and the `-cmd` start command. They go through the same start path
//! (and so the same reaper) as every client's command, as root.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

use super::service::ProcessService;
use crate::proto::process::process_event::{data_event::Output, Event};
use crate::proto::process::{ProcessConfig, StartRequest};
use crate::request::{RequestContext, DEFAULT_KEEPALIVE};
use crate::status::{Error, Result};
use crate::users::User;

/// Output kept from a system command (for its error message).
const KEPT_OUTPUT: usize = 4096;

/// How a system command ended.
#[derive(Debug)]
pub struct SystemRun {
    pub exit_code: i32,
    /// stdout and stderr, interleaved, at most 4 KiB.
    pub output: String,
}

impl ProcessService {
    /// Runs `argv` as root to its end; killed after `timeout`.
    pub async fn run_system(
        self: &Arc<Self>,
        argv: &[&str],
        timeout: Duration,
    ) -> Result<SystemRun> {
        let (cmd, args) = argv
            .split_first()
            .ok_or_else(|| Error::internal("empty system command"))?;
        let ctx = root_context(Some(timeout))?;
        let mut events = self.start(&ctx, request(cmd, args, None)).await?;
        let mut output = Vec::new();
        let mut exit_code = -1;
        while let Some(item) = events.next().await {
            match item?.event {
                Some(Event::Data(d)) => {
                    if let Some(Output::Stdout(b) | Output::Stderr(b)) = d.output {
                        let room = KEPT_OUTPUT.saturating_sub(output.len());
                        output.extend_from_slice(&b[..b.len().min(room)]);
                    }
                }
                Some(Event::End(end)) => exit_code = end.exit_code,
                _ => {}
            }
        }
        Ok(SystemRun {
            exit_code,
            output: String::from_utf8_lossy(&output).trim().to_owned(),
        })
    }

    /// Starts upstream's `-cmd`: `/bin/bash -l -c <cmd>` as root with tag
    /// "startCmd" in `/home/user` (or `/` when that does not exist).
    pub async fn start_command(self: &Arc<Self>, cmd: &str) -> Result<()> {
        let ctx = root_context(None)?;
        let cwd = if std::path::Path::new("/home/user").is_dir() {
            "/home/user"
        } else {
            "/"
        };
        let mut req = request("/bin/bash", &["-l", "-c", cmd], Some(cwd));
        req.tag = Some("startCmd".to_owned());
        // The process outlives its event stream, as any other.
        drop(self.start(&ctx, req).await?);
        Ok(())
    }
}

fn root_context(timeout: Option<Duration>) -> Result<RequestContext> {
    Ok(RequestContext {
        // Root in a VM; a developer's unprivileged envd runs them as itself.
        user: if nix::unistd::geteuid().is_root() {
            User::lookup("root")?
        } else {
            User::current()?
        },
        keepalive: DEFAULT_KEEPALIVE,
        deadline: timeout.and_then(|t| tokio::time::Instant::now().checked_add(t)),
        answer: Default::default(),
    })
}

fn request(cmd: &str, args: &[&str], cwd: Option<&str>) -> StartRequest {
    StartRequest {
        process: Some(ProcessConfig {
            cmd: cmd.to_owned(),
            args: args.iter().map(|a| a.to_string()).collect(),
            envs: Default::default(),
            cwd: cwd.map(str::to_owned),
        }),
        stdin: Some(false),
        ..Default::default()
    }
}
