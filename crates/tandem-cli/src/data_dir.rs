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

/// The file in a data directory that holds `tandem up`'s admin token.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";

/// The admin token kept in `dir` (prepared), made on first use: 32 random
/// bytes as hex, written to a new file of mode 0600. Returns it, and
/// whether it was made now (the only time it is printed). A token file
/// that others can read is refused.
pub fn admin_token(dir: &Path) -> anyhow::Result<(String, bool)> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(ADMIN_TOKEN_FILE);
    match std::fs::symlink_metadata(&path) {
        Ok(metadata) => {
            if !metadata.is_file() {
                bail!("{} is not a regular file", path.display());
            }
            if metadata.mode() & 0o077 != 0 {
                bail!(
                    "{} can be read by others (mode {:o}); make it 0600 (chmod 600) or delete it for a new token",
                    path.display(),
                    metadata.mode() & 0o777
                );
            }
            let token = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?
                .trim()
                .to_owned();
            if token.len() < tandem_service::admin::MIN_SECRET_LEN {
                bail!(
                    "{} holds no usable token; delete it for a new one",
                    path.display()
                );
            }
            Ok((token, false))
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let mut bytes = [0u8; 32];
            getrandom::fill(&mut bytes)
                .map_err(|error| anyhow::anyhow!("no randomness for the admin token: {error}"))?;
            let token: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            writeln!(file, "{token}")
                .with_context(|| format!("cannot write {}", path.display()))?;
            file.sync_all()
                .with_context(|| format!("cannot write {}", path.display()))?;
            Ok((token, true))
        }
        Err(error) => Err(error).with_context(|| format!("cannot look at {}", path.display())),
    }
}
