//! Compose (`POST /files/compose`): concatenates regular files into a
//! destination, atomically, then removes the sources.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::ops::{chown_to, ensure_dir, sibling_temp};
use super::transfer::{open_regular, write_target};
use crate::status::{Error, Result};
use crate::users::User;

/// Most sources one compose takes: each is held open until the copy, so the
/// count a caller sends must not be able to exhaust envd's fds.
pub const MAX_SOURCES: usize = 1000;

/// Concatenates `sources` into `dest` (created for `user`) through a
/// temporary file renamed over it, then removes the sources. Sources must be
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
    let target = write_target(dest)?;
    let dest_id = target.existing.as_ref().map(|m| (m.dev(), m.ino()));
    let dest = target.path;
    let mut opened = Vec::with_capacity(sources.len());
    for s in sources {
        let f = open_regular(s)?;
        let meta = f.file.metadata().map_err(|e| Error::io(s.display(), &e))?;
        if *s == dest || dest_id == Some((meta.dev(), meta.ino())) {
            return Err(Error::invalid(format!(
                "source '{}' is the destination",
                s.display()
            )));
        }
        opened.push(f);
    }
    if let Some(parent) = dest.parent() {
        ensure_dir(parent, user)?;
    }
    let tmp = sibling_temp(&dest);
    let result = (|| {
        let mut out = std::fs::File::create_new(&tmp).map_err(|e| Error::io(tmp.display(), &e))?;
        for (f, s) in opened.iter_mut().zip(sources) {
            // Exactly the size seen at open: a source that grows meanwhile
            // cannot fill the disk.
            let mut limited = std::io::Read::take(&mut f.file, f.size);
            std::io::copy(&mut limited, &mut out).map_err(|e| {
                Error::io(format!("copy {} to {}", s.display(), dest.display()), &e)
            })?;
        }
        drop(out);
        chown_to(&tmp, user)?;
        std::fs::rename(&tmp, &dest).map_err(|e| Error::io(dest.display(), &e))
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    for s in sources {
        let _ = std::fs::remove_file(s);
    }
    Ok(dest)
}
