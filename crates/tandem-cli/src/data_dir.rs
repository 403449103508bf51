//! The data directory of `tandem up`: its databases and the event log hold
//! names, emails and addresses, so it is this user's alone.
//!
//! - Missing: created with mode 0700 (whatever the umask).
//! - Owned by another user, or writable by group or others: refused, since
//!   whoever can write there can plant links or files for the services to
//!   open. (The stores also refuse a link in a database's place.)
//! - Readable by others (a directory older versions made 0755): made 0700,
//!   which hides the files in it.
//! - The path itself may be a link (to a disk mounted elsewhere, say) if
//!   this user or root made it; a link someone else planted is refused.
//!   The checks above apply to the directory it leads to.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// Makes `path` ready as a private data directory (see the module
/// documentation); returns it resolved.
pub fn prepare(path: &Path) -> anyhow::Result<PathBuf> {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    match std::fs::symlink_metadata(path) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(path)
                .with_context(|| format!("cannot create data directory {}", path.display()))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("cannot make {} private", path.display()))?;
        }
        Err(error) => {
            return Err(error).with_context(|| format!("cannot look at {}", path.display()))
        }
        Ok(link) if link.file_type().is_symlink() && link.uid() != me && link.uid() != 0 => bail!(
            "data directory {} is a symbolic link made by uid {}, not by this user (uid {me}) or root",
            path.display(),
            link.uid()
        ),
        Ok(_) => {}
    }
    let resolved = std::fs::canonicalize(path)
        .with_context(|| format!("cannot resolve {}", path.display()))?;
    let metadata = std::fs::metadata(&resolved)
        .with_context(|| format!("cannot look at {}", resolved.display()))?;
    let shown = resolved.display();
    if !metadata.is_dir() {
        bail!("data directory {shown} is not a directory");
    }
    if metadata.uid() != me {
        bail!(
            "data directory {shown} is owned by uid {}, not by this user (uid {me})",
            metadata.uid()
        );
    }
    let mode = metadata.mode() & 0o7777;
    if mode & 0o022 != 0 {
        bail!(
            "data directory {shown} is writable by others (mode {mode:04o}); make it private first, e.g. chmod 700 {shown}"
        );
    }
    if mode & 0o077 != 0 {
        std::fs::set_permissions(&resolved, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot make {shown} private"))?;
        tracing::warn!(
            data_dir = %shown,
            was = format!("{mode:04o}"),
            "the data directory was readable by others; made it private (0700)"
        );
    }
    Ok(resolved)
}
