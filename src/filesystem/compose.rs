//! Compose (`POST /files/compose`): concatenates regular files into a
//! destination, atomically, then removes the sources.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::ops::chown_file;
use super::pin;
use super::staged::{overwrite, Published, Staged};
use super::stop::Stop;
use super::transfer::OpenedFile;
use crate::status::{Error, Result};
use crate::users::User;

/// Most sources one compose takes: each is held open until the copy, so the
/// count a caller sends must not be able to exhaust envd's fds.
pub const MAX_SOURCES: usize = 1000;

/// Concatenates `sources` into `dest` (created for `user`) through a
/// temporary file renamed over it (or copied into it where it is a mount
/// point: see [`Staged`]), then removes the sources. Sources must be
/// regular files (a device or FIFO could block or never end) and none may be
/// the destination. Returns the path written (a symlinked destination is
/// written through).
pub fn compose(sources: &[PathBuf], dest: &Path, user: &User) -> Result<PathBuf> {
    if sources.is_empty() {
        return Err(Error::invalid("source_paths is empty"));
    }
    if sources.len() > MAX_SOURCES {
        return Err(Error::invalid(format!(
            "source_paths has {} paths; at most {MAX_SOURCES} are allowed",
            sources.len()
        )));
    }
    let mut opened = Vec::with_capacity(sources.len());
    for s in sources {
        opened.push(open_source(s)?);
    }
    let target = pin::file_target(dest, Some(user))?;
    let dest_id = target.existing.as_ref().map(|m| (m.dev(), m.ino()));
    let dest = target.shown();
    for ((_, id), s) in opened.iter().zip(sources) {
        if *s == dest || dest_id == Some(*id) {
            return Err(Error::invalid(format!(
                "source '{}' is the destination",
                s.display()
            )));
        }
    }
    let (staged, mut out) = Staged::create(&target.dir, 0o644)
        .map_err(|e| Error::io(format!("create a file beside {}", dest.display()), &e))?;
    for ((f, _), s) in opened.iter_mut().zip(sources) {
        // Exactly the size seen at open: a source that grows meanwhile
        // cannot fill the disk.
        let mut limited = std::io::Read::take(&mut f.file, f.size);
        std::io::copy(&mut limited, &mut out)
            .map_err(|e| Error::io(format!("copy {} to {}", s.display(), dest.display()), &e))?;
    }
    chown_file(&out, user, &dest)?;
    let published = staged
        .publish(&out, &target.dir, &target.name)
        .map_err(|e| Error::io(dest.display(), &e))?;
    if let Published::MountPoint(f) = published {
        overwrite(&out, &f).map_err(|e| Error::io(dest.display(), &e))?;
        chown_file(&f, user, &dest)?;
    }
    // Each source's parent is pinned too: a directory swapped for a symlink
    // since the copy cannot turn this into a removal elsewhere. And a source
    // goes only if its name still leads to the file that was read: a newer
    // file saved under that name since (by rename, as editors save) stays.
    // One put there between that check and the unlink still goes; no more
    // than a user may do itself, since removing a file takes write access to
    // its directory, not to the file.
    for ((_, id), s) in opened.iter().zip(sources) {
        if let Ok((dir, name)) = pin::parent(s, None) {
            let _ = super::tree::remove_entry_at(dir.fd(), &name, Some(*id), &Stop::after(1));
        }
    }
    Ok(dest)
}

/// Opens a source by [`pin`]'s rules (its bytes go into a file given to the
/// user, so a user's symlink may lead only to what that user owns), never
/// through a symlink swapped in since, and only a regular file. Returns it
/// with its identity.
fn open_source(s: &Path) -> Result<(OpenedFile, (u64, u64))> {
    let t = pin::file_target(s, None)?;
    let Some(seen) = t.existing.as_ref() else {
        return Err(Error::io(
            s.display(),
            &std::io::Error::from_raw_os_error(libc::ENOENT),
        ));
    };
    let (file, meta) = pin::open_seen(t.dir.fd(), &t.name, seen).map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidInput => Error::invalid(format!(
            "source '{}' changed while it was opened",
            s.display()
        )),
        _ => Error::io(s.display(), &e),
    })?;
    if super::transfer::generated(&file, meta.len()) {
        // Its size says nothing of its bytes, and it cannot be removed.
        return Err(Error::invalid(format!(
            "source '{}' is made by the kernel as it is read (its size says nothing of it); \
             compose takes files it can copy and remove",
            s.display()
        )));
    }
    let id = (meta.dev(), meta.ino());
    Ok((
        OpenedFile {
            file,
            size: meta.len(),
            generated: false,
        },
        id,
    ))
}
