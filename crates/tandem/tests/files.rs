//! The files Tandem keeps on disk hold personal data (names, emails,
//! addresses): a store, the embedded log and their lease files are created
//! readable by their owner only (directory 0700, files 0600, whatever the
//! umask), and a symbolic link planted where one of them belongs is never
//! followed: opening fails and the link's target stays as it was.

use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::Path;

use tandem::embedded::{EmbeddedLog, EmbeddedOptions};
use tandem::sqlite::{SqliteOptions, SqliteStore};
use tandem::store::Store;

/// The most permissive umask, so that only modes chosen by Tandem count.
/// Every test of this binary runs with it.
fn permissive_umask() {
    static SET: std::sync::Once = std::sync::Once::new();
    // SAFETY: umask(2) only swaps the process's file mode mask.
    SET.call_once(|| unsafe {
        libc::umask(0);
    });
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

#[tokio::test]
async fn stores_logs_and_leases_are_private_whatever_the_umask() {
    permissive_umask();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let store = SqliteStore::open(data.join("order.db"), SqliteOptions::default())
        .await
        .expect("open store");
    let log = EmbeddedLog::open(data.join("bus.db"), EmbeddedOptions::default())
        .await
        .expect("open log");
    let lease = store.try_lead("order-relay").await.expect("try lead");
    assert!(lease.is_some(), "the only contender leads");
    assert_eq!(mode(&data), 0o700, "the directory the store created");
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        assert_eq!(
            mode(&path),
            0o600,
            "{} is readable or writable by others",
            path.display()
        );
        checked.push(path.file_name().unwrap().to_string_lossy().into_owned());
    }
    checked.sort();
    for expected in [
        "bus.db",
        "bus.db-shm",
        "bus.db-wal",
        "order.db",
        "order.db-shm",
        "order.db-wal",
        "order.db.order-relay.lease",
    ] {
        assert!(
            checked.iter().any(|name| name == expected),
            "{expected} missing among {checked:?}"
        );
    }
    drop((lease, store, log));
}

/// A file outside the data directory that a planted link points at.
struct Target {
    _dir: tempfile::TempDir,
    existing: std::path::PathBuf,
    absent: std::path::PathBuf,
}

const TARGET_BYTES: &[u8] = b"not yours\n";

fn target() -> Target {
    let dir = tempfile::tempdir().unwrap();
    let existing = dir.path().join("precious");
    std::fs::write(&existing, TARGET_BYTES).unwrap();
    let absent = dir.path().join("absent.db");
    Target {
        existing,
        absent,
        _dir: dir,
    }
}

impl Target {
    fn untouched(&self, what: &str) {
        assert_eq!(
            std::fs::read(&self.existing).unwrap(),
            TARGET_BYTES,
            "{what}: the link's existing target was written"
        );
        assert_eq!(
            mode(&self.existing),
            0o644,
            "{what}: the link's existing target had its mode changed"
        );
        assert!(
            !self.absent.exists(),
            "{what}: the link's absent target was created"
        );
    }
}

fn private_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

#[tokio::test]
async fn a_link_planted_as_a_store_or_log_file_is_not_followed() {
    permissive_umask();
    let target = target();
    std::fs::set_permissions(&target.existing, std::fs::Permissions::from_mode(0o644)).unwrap();
    for (link_to, what) in [(&target.existing, "existing"), (&target.absent, "absent")] {
        let dir = private_dir();
        let db = dir.path().join("order.db");
        symlink(link_to, &db).unwrap();
        let error = SqliteStore::open(&db, SqliteOptions::default())
            .await
            .expect_err("a store on a planted link must not open");
        assert!(
            error.to_string().contains("symbolic link"),
            "the error names the link: {error}"
        );
        target.untouched(&format!("store on a link to an {what} file"));

        let bus = dir.path().join("bus.db");
        symlink(link_to, &bus).unwrap();
        let error = EmbeddedLog::open(&bus, EmbeddedOptions::default())
            .await
            .err()
            .expect("a log on a planted link must not open");
        assert!(
            error.to_string().contains("symbolic link"),
            "the error names the link: {error}"
        );
        target.untouched(&format!("log on a link to an {what} file"));
    }
}

#[tokio::test]
async fn a_link_planted_as_a_wal_or_lease_file_is_not_followed() {
    permissive_umask();
    let target = target();
    std::fs::set_permissions(&target.existing, std::fs::Permissions::from_mode(0o644)).unwrap();
    for (link_to, what) in [(&target.existing, "existing"), (&target.absent, "absent")] {
        for suffix in ["-wal", "-shm"] {
            // SQLite opens these with O_NOFOLLOW: it refuses the link or
            // replaces it with a file of its own, and never writes through it.
            let dir = private_dir();
            let db = dir.path().join("order.db");
            symlink(link_to, dir.path().join(format!("order.db{suffix}"))).unwrap();
            if let Ok(store) = SqliteStore::open(&db, SqliteOptions::default()).await {
                store
                    .write(|tx| tx.execute_batch("CREATE TABLE t (a); INSERT INTO t VALUES (1)"))
                    .await
                    .expect("a write through the store");
            }
            target.untouched(&format!("order.db{suffix} linked to an {what} file"));
        }

        let dir = private_dir();
        let db = dir.path().join("order.db");
        let store = SqliteStore::open(&db, SqliteOptions::default())
            .await
            .expect("open store");
        symlink(link_to, dir.path().join("order.db.order-relay.lease")).unwrap();
        let error = store
            .try_lead("order-relay")
            .await
            .err()
            .expect("a lease on a planted link must not be taken");
        assert!(
            error.to_string().contains("symbolic link"),
            "the error names the link: {error}"
        );
        target.untouched(&format!("lease linked to an {what} file"));
        assert_eq!(
            std::fs::symlink_metadata(&db).unwrap().uid(),
            unsafe { libc::geteuid() },
            "the store file is this user's"
        );
    }
}
