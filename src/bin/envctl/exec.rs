//! `envctl run` and `envctl exec`: a command's output streamed to the
//! terminal, an interactive pty session.

use std::io::{IsTerminal, Read, Write};

use envd::proto::process::process_client::ProcessClient;
use envd::proto::process::process_event::{data_event::Output, Event};
use envd::proto::process::*;
use futures_util::StreamExt;

use crate::Ctx;

/// A command line as a process config: the program, then its arguments.
fn config(command: Vec<String>) -> ProcessConfig {
    let mut it = command.into_iter();
    ProcessConfig {
        cmd: it.next().unwrap_or_default(),
        args: it.collect(),
        ..Default::default()
    }
}

/// Exit code of an end event: the code, or 128 + signal like a shell (from
/// the structured fields; 255 when envd could not tell).
fn exit_code(end: &process_event::EndEvent) -> u8 {
    let code = match (end.exited, end.signal) {
        (true, _) => end.exit_code,
        (false, Some(sig)) => 128 + sig,
        (false, None) => 255,
    };
    u8::try_from(code.clamp(0, 255)).unwrap_or(255)
}

/// Prints a process's output until its end; returns its exit code. With
/// `merged`, stderr goes to stdout too (a terminal session).
async fn follow<T>(
    mut s: tonic::Streaming<T>,
    event: fn(T) -> Option<ProcessEvent>,
    merged: bool,
) -> Result<u8, String> {
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    while let Some(msg) = s.next().await {
        let msg = msg.map_err(|e| e.message().to_owned())?;
        match event(msg).and_then(|e| e.event) {
            Some(Event::Data(d)) => match d.output {
                Some(Output::Stderr(b)) if !merged => {
                    let _ = err.write_all(&b);
                }
                Some(Output::Stdout(b) | Output::Pty(b) | Output::Stderr(b)) => {
                    let _ = out.write_all(&b);
                    let _ = out.flush();
                }
                None => {}
            },
            Some(Event::End(end)) => return Ok(exit_code(&end)),
            _ => {}
        }
    }
    Err("the stream ended without an end event".into())
}

/// `envctl run` (and `exec` without `-it`): starts the command, prints its
/// output, returns its exit code.
pub async fn run(ctx: &Ctx, command: Vec<String>, pty: Option<(u32, u32)>) -> Result<u8, String> {
    let mut p = ProcessClient::new(ctx.channel.clone());
    let req = StartRequest {
        process: Some(config(command)),
        pty: pty.map(|(cols, rows)| Pty {
            size: Some(pty::Size { cols, rows }),
        }),
        stdin: Some(false),
        tag: None,
        limits: None,
    };
    let s = p
        .start(ctx.req(req))
        .await
        .map_err(|e| e.message().to_owned())?
        .into_inner();
    follow(s, |m: StartResponse| m.event, false).await
}

/// The terminal's size (columns, rows) on stdout, else 80x24.
pub fn terminal_size() -> (u32, u32) {
    // SAFETY: an all-zero winsize is a valid value.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one winsize into a valid struct.
    let ok = unsafe { libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_col > 0 && ws.ws_row > 0 {
        (u32::from(ws.ws_col), u32::from(ws.ws_row))
    } else {
        (80, 24)
    }
}

/// Interactive pty session: local terminal in raw mode, stdin streamed as
/// pty input, window size changes forwarded.
pub async fn interactive(
    ctx: &Ctx,
    command: Vec<String>,
    (cols, rows): (u32, u32),
) -> Result<u8, String> {
    use nix::sys::termios;
    let stdin = std::io::stdin();
    let saved = if stdin.is_terminal() {
        termios::tcgetattr(&stdin).ok()
    } else {
        None
    };
    if let Some(t) = &saved {
        let mut raw = t.clone();
        termios::cfmakeraw(&mut raw);
        let _ = termios::tcsetattr(&stdin, termios::SetArg::TCSANOW, &raw);
    }
    let result = exec_session(ctx, command, cols, rows).await;
    if let Some(t) = &saved {
        let _ = termios::tcsetattr(std::io::stdin(), termios::SetArg::TCSANOW, t);
    }
    result
}

/// The pty command itself: keyboard and window size changes in, output out.
async fn exec_session(ctx: &Ctx, command: Vec<String>, cols: u32, rows: u32) -> Result<u8, String> {
    let mut p = ProcessClient::new(ctx.channel.clone());
    let req = StartRequest {
        process: Some(config(command)),
        pty: Some(Pty {
            size: Some(pty::Size { cols, rows }),
        }),
        ..Default::default()
    };
    let mut s = p
        .start(ctx.req(req))
        .await
        .map_err(|e| e.message().to_owned())?
        .into_inner();
    let pid = match s
        .next()
        .await
        .and_then(|m| m.ok())
        .and_then(|m| m.event)
        .and_then(|e| e.event)
    {
        Some(Event::Start(st)) => st.pid,
        _ => return Err("no start event".into()),
    };
    let sel = move || {
        Some(ProcessSelector {
            selector: Some(process_selector::Selector::Pid(pid)),
        })
    };
    // Keyboard → pty input.
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut stdin = std::io::stdin();
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 || tx.blocking_send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    use stream_input_request::{DataEvent, Event as In, StartEvent};
    let first = StreamInputRequest {
        event: Some(In::Start(StartEvent { process: sel() })),
    };
    let data = tokio_stream_from(rx).map(|b| StreamInputRequest {
        event: Some(In::Data(DataEvent {
            input: Some(ProcessInput {
                input: Some(process_input::Input::Pty(b.into())),
            }),
        })),
    });
    let input = futures_util::stream::iter([first]).chain(data);
    let mut p2 = p.clone();
    let input_req = ctx.req(input);
    tokio::spawn(async move {
        let _ = p2.stream_input(input_req).await;
    });
    // Window size changes.
    let mut p3 = p.clone();
    let resize_req = move |cols, rows| UpdateRequest {
        process: sel(),
        pty: Some(Pty {
            size: Some(pty::Size { cols, rows }),
        }),
    };
    let id = ctx.id.clone();
    tokio::spawn(async move {
        let Ok(mut winch) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
        else {
            return;
        };
        while winch.recv().await.is_some() {
            let (c, r) = terminal_size();
            let _ = p3.update(id.req(resize_req(c, r))).await;
        }
    });
    follow(s, |m: StartResponse| m.event, true).await
}

/// A stream of what `rx` receives.
pub fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
