//! A SQLite relay's proof that it is alive: an exclusive lock on a file of its own beside the database
//! (`<database>.relay-<id>.lock`), held for the relay's life. The operating system releases it the moment the
//! process dies, and nothing has to be written on time to keep it: a relay whose writes wait seconds behind other
//! connections' write locks (a loaded machine) is never taken for dead, which a heartbeat could not promise.
//!
//! Another relay *probes* a registered relay by trying to take its lock: refused means it is alive; taken means
//! the owner is gone, and the prober keeps the lock ([`DeadRelay`]) until it has deleted the dead relay's
//! registration and removed its file ([`DeadRelay::bury`]), so that a relay coming back under the same id waits
//! for the burial and registers after it, never before (its new registration is never the one deleted). A lock is
//! only trusted while the file it was taken on is still the one at the path: a file removed (or replaced) between
//! open and lock is opened again.
//!
//! The database file is the one SQLite itself opened (`PRAGMA database_list`), so every process agrees on the
//! place whatever URL, URI or relative path it was given. An in-memory database lives in one process, so there the
//! proofs are entries in a process-wide table with the same states (held, released, being buried).

use std::collections::HashMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Error, ErrorKind};
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex};

use uuid::Uuid;

/// The proofs of relays of in-memory databases of this process.
static IN_PROCESS: LazyLock<Mutex<HashMap<Uuid, InProcess>>> = LazyLock::new(Mutex::default);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum InProcess {
    /// A live relay holds it.
    Held,
    /// Its relay let it go without deleting its registration: dead for the others.
    Released,
    /// A prober found it released and is deleting the registration.
    Burying,
}

fn in_process() -> std::sync::MutexGuard<'static, HashMap<Uuid, InProcess>> {
    IN_PROCESS.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Where the relays of one database keep their locks: beside the database file, or in this process for an
/// in-memory database.
#[derive(Clone, Debug)]
pub(crate) struct LockPlace(Option<PathBuf>);

impl LockPlace {
    /// The place for the database whose main file SQLite reports as `database_file` (`PRAGMA database_list`;
    /// empty for an in-memory database). A file that cannot be resolved is an error: guessing would put the
    /// locks where other processes do not look.
    pub fn beside(database_file: &str) -> std::io::Result<Self> {
        if database_file.is_empty() {
            return Ok(Self(None));
        }
        let path = std::fs::canonicalize(database_file).map_err(|error| {
            Error::new(error.kind(), format!("cannot resolve the database file {database_file:?}: {error}"))
        })?;
        Ok(Self(Some(path)))
    }

    fn path(&self, relay: Uuid) -> Option<PathBuf> {
        self.0.as_ref().map(|database| {
            let mut name = database.as_os_str().to_owned();
            name.push(format!(".relay-{relay}.lock"));
            PathBuf::from(name)
        })
    }

    /// Takes relay `relay`'s lock, for as long as the returned value lives. An error of kind
    /// [`ErrorKind::WouldBlock`] means someone holds it: another relay with this id, or a prober burying this
    /// id's previous life (for a moment); try again.
    pub fn acquire(&self, relay: Uuid) -> std::io::Result<RelayLock> {
        let Some(path) = self.path(relay) else {
            let mut table = in_process();
            return match table.get(&relay) {
                Some(InProcess::Held | InProcess::Burying) => Err(held(relay)),
                _ => {
                    table.insert(relay, InProcess::Held);
                    Ok(RelayLock { relay, file: None })
                }
            };
        };
        // A file removed by its burier between our open and our lock is not the file others probe: open again.
        for _ in 0..8 {
            let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path)?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => return Err(held(relay)),
                Err(TryLockError::Error(error)) => return Err(error),
            }
            if is_at(&file, &path) {
                return Ok(RelayLock { relay, file: Some((file, path)) });
            }
        }
        Err(Error::other(format!("the lock file {} keeps being replaced", path.display())))
    }

    /// Whether relay `relay` is alive. A relay found dead stays locked by the returned [`DeadRelay`] until it is
    /// buried (or dropped, which leaves it dead for the next prober).
    pub fn probe(&self, relay: Uuid) -> Probe {
        let Some(path) = self.path(relay) else {
            let mut table = in_process();
            return match table.get(&relay) {
                Some(InProcess::Held) => Probe::Alive,
                Some(InProcess::Released) => {
                    table.insert(relay, InProcess::Burying);
                    Probe::Dead(DeadRelay { relay, file: None, buried: false })
                }
                // Being buried by another prober, or never seen by this process.
                Some(InProcess::Burying) | None => Probe::Unknown,
            };
        };
        // Read-write where we may (network file systems lock exclusively only through a writable descriptor),
        // else read-only, which is enough for a local lock on a file another user created.
        let opened = OpenOptions::new().read(true).write(true).open(&path);
        let opened = match opened {
            Err(error) if error.kind() == ErrorKind::PermissionDenied => File::open(&path),
            other => other,
        };
        let file = match opened {
            Ok(file) => file,
            Err(error) if error.kind() == ErrorKind::NotFound => return Probe::Unknown,
            Err(error) => {
                tracing::debug!(%relay, %error, "cannot open a relay's lock file");
                return Probe::Unknown;
            }
        };
        match file.try_lock() {
            // The file may have been buried (and a new one made by the relay come back) since we opened it.
            Ok(()) if is_at(&file, &path) => Probe::Dead(DeadRelay { relay, file: Some((file, path)), buried: false }),
            Ok(()) => Probe::Unknown,
            Err(TryLockError::WouldBlock) => Probe::Alive,
            Err(TryLockError::Error(error)) => {
                tracing::debug!(%relay, %error, "cannot probe a relay's lock file");
                Probe::Unknown
            }
        }
    }
}

fn held(relay: Uuid) -> Error {
    Error::new(ErrorKind::WouldBlock, format!("the lock of relay {relay} is held by someone else"))
}

/// Whether `file` is still the file at `path` (not removed, not replaced).
#[cfg(unix)]
fn is_at(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(open), Ok(named)) => open.dev() == named.dev() && open.ino() == named.ino(),
        _ => false,
    }
}

/// Without inode numbers there is no telling: never (a probe then finds nothing to decide from, and only the
/// lease or the minute without refresh frees a dead relay's rows).
#[cfg(not(unix))]
fn is_at(_file: &File, _path: &Path) -> bool {
    false
}

/// Removes relay `relay`'s lock file while its lock is held (`file`), then lets the lock go; in memory, its entry.
fn remove_while_held(relay: Uuid, file: Option<(File, PathBuf)>) {
    match file {
        Some((file, path)) => {
            let _ = std::fs::remove_file(&path);
            drop(file);
        }
        None => {
            in_process().remove(&relay);
        }
    }
}

/// What a probe found.
#[derive(Debug)]
pub(crate) enum Probe {
    /// The relay holds its lock.
    Alive,
    /// Its lock was free: the relay is gone. Its lock is now held by the prober.
    Dead(DeadRelay),
    /// Nothing to decide from: no lock file (buried already, or kept where this process cannot see it), or
    /// another prober is burying the relay.
    Unknown,
}

/// A relay found dead, its lock held by the prober: delete its registration, then [`DeadRelay::bury`] it.
#[derive(Debug)]
pub(crate) struct DeadRelay {
    relay: Uuid,
    file: Option<(File, PathBuf)>,
    buried: bool,
}

impl DeadRelay {
    /// Removes the dead relay's lock file (then lets the lock go): only once its registration is deleted.
    pub fn bury(mut self) {
        self.buried = true;
        remove_while_held(self.relay, self.file.take());
    }
}

impl Drop for DeadRelay {
    fn drop(&mut self) {
        if !self.buried && self.file.is_none() {
            let mut table = in_process();
            if table.get(&self.relay) == Some(&InProcess::Burying) {
                table.insert(self.relay, InProcess::Released);
            }
        }
    }
}

/// A held relay lock; dropping it releases the lock (the file stays for others to find the relay dead, unless
/// [`RelayLock::release`] removes it after the relay's registration is gone).
#[derive(Debug)]
pub(crate) struct RelayLock {
    relay: Uuid,
    file: Option<(File, PathBuf)>,
}

impl RelayLock {
    /// Releases the lock and removes its file: only once the relay's registration is deleted, so that nobody
    /// is left with a registration to probe and no file.
    pub fn release(mut self) {
        remove_while_held(self.relay, self.file.take());
    }
}

impl Drop for RelayLock {
    fn drop(&mut self) {
        if self.file.is_none() {
            let mut table = in_process();
            if table.get(&self.relay) == Some(&InProcess::Held) {
                table.insert(self.relay, InProcess::Released);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            let dir = std::env::temp_dir().join(format!("relay-lock-test-{}", Uuid::now_v7()));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn database(&self) -> LockPlace {
            let database = self.0.join("db.sqlite");
            std::fs::write(&database, b"").unwrap();
            LockPlace::beside(database.to_str().unwrap()).unwrap()
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn is_dead(probe: Probe) -> DeadRelay {
        match probe {
            Probe::Dead(dead) => dead,
            other => panic!("expected dead, found {other:?}"),
        }
    }

    #[test]
    fn a_held_lock_reads_alive_and_a_dropped_one_dead() {
        let dir = TempDir::new();
        let place = dir.database();
        let relay = Uuid::now_v7();
        assert!(matches!(place.probe(relay), Probe::Unknown));
        let lock = place.acquire(relay).unwrap();
        assert!(matches!(place.probe(relay), Probe::Alive));
        drop(lock);
        drop(is_dead(place.probe(relay)));
        is_dead(place.probe(relay)).bury();
        assert!(matches!(place.probe(relay), Probe::Unknown), "the dead relay's file is gone");
        let released = place.acquire(relay).unwrap();
        released.release();
        assert!(matches!(place.probe(relay), Probe::Unknown));
    }

    #[test]
    fn a_relay_coming_back_waits_for_its_burial_and_is_not_buried_by_it() {
        let dir = TempDir::new();
        let place = dir.database();
        let relay = Uuid::now_v7();
        drop(place.acquire(relay).unwrap());
        let dead = is_dead(place.probe(relay));
        let refused = place.acquire(relay).unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::WouldBlock, "{refused}");
        dead.bury();
        let back = place.acquire(relay).unwrap();
        assert!(matches!(place.probe(relay), Probe::Alive), "its new file is the one probed");
        drop(back);
    }

    #[test]
    fn a_probe_of_a_file_replaced_after_it_was_opened_finds_nothing() {
        let dir = TempDir::new();
        let place = dir.database();
        let relay = Uuid::now_v7();
        let path = place.path(relay).unwrap();
        drop(place.acquire(relay).unwrap());
        // Opened by a prober before a burial and a return; locked only after them.
        let stale = File::open(&path).unwrap();
        is_dead(place.probe(relay)).bury();
        let back = place.acquire(relay).unwrap();
        stale.try_lock().unwrap();
        assert!(!is_at(&stale, &path), "the stale file is not the one at the path");
        assert!(matches!(place.probe(relay), Probe::Alive));
        drop(back);
    }

    #[test]
    fn a_database_file_that_cannot_be_resolved_is_refused() {
        let error = LockPlace::beside("/nonexistent/dir/app.db").unwrap_err();
        assert!(error.to_string().contains("/nonexistent/dir/app.db"), "{error}");
    }

    #[test]
    fn an_in_memory_database_keeps_proofs_in_the_process() {
        let place = LockPlace::beside("").unwrap();
        let relay = Uuid::now_v7();
        assert!(matches!(place.probe(relay), Probe::Unknown), "never seen here");
        let lock = place.acquire(relay).unwrap();
        assert!(matches!(place.probe(relay), Probe::Alive));
        drop(lock);
        let dead = is_dead(place.probe(relay));
        assert!(matches!(place.probe(relay), Probe::Unknown), "being buried by someone else");
        assert_eq!(place.acquire(relay).unwrap_err().kind(), ErrorKind::WouldBlock);
        drop(dead);
        is_dead(place.probe(relay)).bury();
        assert!(matches!(place.probe(relay), Probe::Unknown));
        place.acquire(relay).unwrap().release();
        assert!(matches!(place.probe(relay), Probe::Unknown));
    }
}
