//! `filesystem.Filesystem` and `envd.transfer.Transfer` logic, written once
//! against the prost types.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};

use super::entry::{entry_info, Names};
use super::list::{list_dir, Listing};
use super::ops;
use super::stop::{Abandoned, Stop};
use super::transfer::{self, ReadStream};
use super::watch::{watch_dir, WatchOptions};
use super::watchers::Watchers;
use crate::defaults::Defaults;
use crate::paths;
use crate::proto::filesystem::watch_dir_response::{Event, KeepAlive, StartEvent};
use crate::proto::filesystem::*;
use crate::proto::transfer::{ReadFileRequest, WriteFileRequest, WriteFileResponse};
use crate::request::RequestContext;
use crate::status::{Error, Result};
use crate::streams::{framed, BoxStream, Pacing};

/// Tunables of the filesystem service.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Events buffered per polling watcher.
    pub watcher_buffer: usize,
    /// Polling watchers not polled for this long are removed.
    pub watcher_idle: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            watcher_buffer: 10_000,
            watcher_idle: Duration::from_secs(600),
        }
    }
}

pub type WatchStream = BoxStream<WatchDirResponse>;

#[derive(Debug)]
pub struct FilesystemService {
    watchers: Arc<Watchers>,
    /// For the default workdir `/init` sets (what an empty path means).
    defaults: Arc<Defaults>,
}

/// `path`, unless it is empty. An empty path means the default workdir or
/// the user's home ([`FilesystemService::resolve`]), which a Remove or Move should only touch
/// when asked by name: an empty string is what a client sends for a field it
/// left out or misnamed.
fn named<'a>(field: &str, path: &'a str) -> Result<&'a str> {
    if path.is_empty() {
        return Err(Error::invalid(format!(
            "{field} is empty; name the path (\"~\" is the user's home)"
        )));
    }
    Ok(path)
}

/// The watch options of WatchDir and CreateWatcher (same fields).
fn options(recursive: bool, include_entry: bool, allow_network_mounts: bool) -> WatchOptions {
    WatchOptions {
        recursive,
        include_entry,
        allow_network_mounts,
    }
}

/// Runs blocking filesystem work off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    super::pool::run(f).await?
}

/// As [`blocking`], for a walk over a whole tree: it is told to stop once
/// this future is dropped (the caller's deadline passed or it went away),
/// since a blocking thread is not stopped by that.
async fn walking<T: Send + 'static>(
    f: impl FnOnce(&Stop) -> Result<T> + Send + 'static,
) -> Result<T> {
    let abandoned = Abandoned::default();
    let _abandon_when_dropped = abandoned.guard();
    blocking(move || f(&Stop::when(abandoned))).await
}

fn entry(path: &std::path::Path) -> Result<EntryInfo> {
    entry_info(path, path, &mut Names::default())
}

impl FilesystemService {
    pub fn new(settings: Settings, defaults: Arc<Defaults>) -> Self {
        Self {
            watchers: Watchers::new(settings.watcher_buffer, settings.watcher_idle),
            defaults,
        }
    }

    /// `path` by E2B's rules: empty is the default working directory where
    /// `/init` set one, else (as any relative path) under the user's home.
    fn resolve(&self, ctx: &RequestContext, path: &str) -> Result<PathBuf> {
        let workdir = path.is_empty().then(|| self.defaults.workdir()).flatten();
        paths::resolve(workdir.as_deref().unwrap_or(path), &ctx.user)
    }

    pub async fn stat(&self, ctx: &RequestContext, req: StatRequest) -> Result<StatResponse> {
        let path = self.resolve(ctx, &req.path)?;
        blocking(move || {
            Ok(StatResponse {
                entry: Some(entry(&path)?),
            })
        })
        .await
    }

    pub async fn make_dir(
        &self,
        ctx: &RequestContext,
        req: MakeDirRequest,
    ) -> Result<MakeDirResponse> {
        let path = self.resolve(ctx, &req.path)?;
        let user = ctx.user.clone();
        blocking(move || {
            ops::make_dir(&path, &user)?;
            Ok(MakeDirResponse {
                entry: Some(entry(&path)?),
            })
        })
        .await
    }

    pub async fn move_entry(&self, ctx: &RequestContext, req: MoveRequest) -> Result<MoveResponse> {
        let src = self.resolve(ctx, named("source", &req.source)?)?;
        let dst = self.resolve(ctx, named("destination", &req.destination)?)?;
        let user = ctx.user.clone();
        walking(move |stop| {
            ops::move_path(&src, &dst, &user, stop)?;
            Ok(MoveResponse {
                entry: Some(entry(&dst)?),
            })
        })
        .await
    }

    pub async fn list_dir(
        &self,
        ctx: &RequestContext,
        req: ListDirRequest,
    ) -> Result<ListDirResponse> {
        let shown = self.resolve(ctx, &req.path)?;
        let list = |alone: bool| {
            let (shown, answer) = (shown.clone(), ctx.answer.clone());
            walking(move |stop| Self::list_blocking(&shown, req.depth, &answer, alone, stop))
        };
        let entries = match list(false).await? {
            Listing::Done(entries) => entries,
            Listing::Large => {
                // What the first try counted went with it.
                ctx.answer.hold(0)?;
                let _alone =
                    tokio::time::timeout(super::list::ALONE_WAIT, super::list::ALONE.acquire())
                        .await;
                match list(true).await? {
                    Listing::Done(entries) => entries,
                    Listing::Large => return Err(Error::internal("a listing alone was not done")),
                }
            }
        };
        Ok(ListDirResponse { entries })
    }

    fn list_blocking(
        shown: &std::path::Path,
        depth: u32,
        answer: &crate::answers::Share,
        alone: bool,
        stop: &Stop,
    ) -> Result<Listing> {
        // A symlinked root is followed (only the root).
        let real = std::fs::canonicalize(shown).map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => {
                Error::precondition(format!("'{}': symlink loop", shown.display()))
            }
            _ => Error::io(shown.display(), &e),
        })?;
        list_dir(&real, shown, depth, answer, alone, stop)
    }

    pub async fn remove(&self, ctx: &RequestContext, req: RemoveRequest) -> Result<RemoveResponse> {
        let path = self.resolve(ctx, named("path", &req.path)?)?;
        if path == std::path::Path::new("/") {
            return Err(Error::invalid("refusing to remove '/'"));
        }
        walking(move |stop| ops::remove_path(&path, stop)).await?;
        Ok(RemoveResponse {})
    }

    /// The polling watchers, for a live upgrade.
    pub fn watchers_image(&self) -> Vec<crate::proto::envd::handover::Watcher> {
        self.watchers.image()
    }

    /// Re-arms a previous image's polling watchers; returns how many failed.
    pub async fn restore_watchers(&self, w: Vec<crate::proto::envd::handover::Watcher>) -> usize {
        self.watchers.restore(w).await
    }

    /// `start` once the watch is armed, then events and keepalives; an error
    /// (overflow, limits) ends the stream.
    pub async fn watch_dir(
        &self,
        ctx: &RequestContext,
        req: WatchDirRequest,
    ) -> Result<WatchStream> {
        let path = self.resolve(ctx, &req.path)?;
        let watch = watch_dir(
            path,
            options(req.recursive, req.include_entry, req.allow_network_mounts),
        )
        .await?;
        let msg = |e: Event| WatchDirResponse { event: Some(e) };
        let pacing = Pacing {
            keepalive: ctx.keepalive,
            keepalive_item: || WatchDirResponse {
                event: Some(Event::Keepalive(KeepAlive {})),
            },
            deadline: ctx.deadline,
            deadline_message: "watch deadline exceeded",
        };
        // The watch lives as long as the stream (dropping it stops watching).
        let mut watch = watch;
        let events = futures_util::stream::poll_fn(move |cx| watch.events.poll_recv(cx))
            .map(move |item| item.map(|ev| msg(Event::Filesystem(ev))));
        Ok(framed(msg(Event::Start(StartEvent {})), events, pacing))
    }

    pub async fn create_watcher(
        &self,
        ctx: &RequestContext,
        req: CreateWatcherRequest,
    ) -> Result<CreateWatcherResponse> {
        let path = self.resolve(ctx, &req.path)?;
        let id = self
            .watchers
            .create(
                path,
                options(req.recursive, req.include_entry, req.allow_network_mounts),
            )
            .await?;
        Ok(CreateWatcherResponse { watcher_id: id })
    }

    pub fn get_watcher_events(
        &self,
        ctx: &RequestContext,
        req: GetWatcherEventsRequest,
    ) -> Result<GetWatcherEventsResponse> {
        Ok(GetWatcherEventsResponse {
            events: self.watchers.poll(&req.watcher_id, &ctx.answer)?,
        })
    }

    pub fn remove_watcher(&self, req: RemoveWatcherRequest) -> Result<RemoveWatcherResponse> {
        self.watchers.remove(&req.watcher_id)?;
        Ok(RemoveWatcherResponse {})
    }

    pub async fn read_file(
        &self,
        ctx: &RequestContext,
        req: ReadFileRequest,
    ) -> Result<ReadStream> {
        let path = self.resolve(ctx, &req.path)?;
        transfer::read_file(path, req.offset.unwrap_or(0), req.length).await
    }

    pub async fn write_file<S>(&self, ctx: &RequestContext, input: S) -> Result<WriteFileResponse>
    where
        S: Stream<Item = Result<WriteFileRequest>> + Unpin + Send,
    {
        transfer::write_file(input, &ctx.user, |p| self.resolve(ctx, p)).await
    }
}
