//! A SQLite relay's proof that it is alive: an exclusive lock on a file of its own beside the database
//! (`<database>.relay-<id>.lock`), held for the relay's life. The operating system releases it the moment the
//! process dies, and nothing has to be written on time to keep it: a relay whose writes wait seconds behind other
//! connections' write locks (a loaded machine) is never taken for dead, which a heartbeat could not promise.
//!
//! Another relay *probes* a registered relay by trying to take its lock: taken means the owner is gone (its rows
//! are free), refused means it is alive. An in-memory database lives in one process, so there the proof is an
//! entry in a process-wide set, removed when the relay's lock is dropped.

use std::collections::HashSet;
use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex};

use uuid::Uuid;

/// Relays of in-memory databases that are alive in this process.
static IN_PROCESS: LazyLock<Mutex<HashSet<Uuid>>> = LazyLock::new(Mutex::default);

fn in_process() -> std::sync::MutexGuard<'static, HashSet<Uuid>> {
    IN_PROCESS.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Where the relays of one database keep their locks: beside the database file (its canonical path, so that
/// every process agrees), or nowhere for an in-memory database.
#[derive(Clone, Debug)]
pub(crate) struct LockPlace(Option<PathBuf>);

impl LockPlace {
    /// The place for the database at `filename` (as the pool opens it); an in-memory database has no file.
    pub fn of(filename: &Path) -> Self {
        Self(std::fs::canonicalize(filename).ok().filter(|path| path.is_file()))
    }

    fn path(&self, relay: Uuid) -> Option<PathBuf> {
        self.0.as_ref().map(|database| {
            let mut name = database.as_os_str().to_owned();
            name.push(format!(".relay-{relay}.lock"));
            PathBuf::from(name)
        })
    }

    /// Takes relay `relay`'s lock, for as long as the returned value lives.
    pub fn acquire(&self, relay: Uuid) -> std::io::Result<RelayLock> {
        let Some(path) = self.path(relay) else {
            in_process().insert(relay);
            return Ok(RelayLock { relay, file: None });
        };
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path)?;
        match file.try_lock() {
            Ok(()) => Ok(RelayLock { relay, file: Some((file, path)) }),
            Err(TryLockError::WouldBlock) => Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("the lock file {} is held by another relay", path.display()),
            )),
            Err(TryLockError::Error(error)) => Err(error),
        }
    }

    /// Whether relay `relay` is alive. Once the registration of a relay found dead is deleted, the caller
    /// removes its lock file with [`LockPlace::remove`].
    pub fn probe(&self, relay: Uuid) -> Liveness {
        let Some(path) = self.path(relay) else {
            return if in_process().contains(&relay) { Liveness::Alive } else { Liveness::Dead };
        };
        let file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Liveness::Unknown,
            Err(error) => {
                tracing::debug!(%relay, %error, "cannot open a relay's lock file");
                return Liveness::Unknown;
            }
        };
        match file.try_lock() {
            Ok(()) => Liveness::Dead,
            Err(TryLockError::WouldBlock) => Liveness::Alive,
            Err(TryLockError::Error(error)) => {
                tracing::debug!(%relay, %error, "cannot probe a relay's lock file");
                Liveness::Unknown
            }
        }
    }
}

impl LockPlace {
    /// Removes the lock file of relay `relay`, found dead and forgotten.
    pub fn remove(&self, relay: Uuid) {
        if let Some(path) = self.path(relay) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// What a probe found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Liveness {
    /// The relay holds its lock.
    Alive,
    /// Its lock was free: the relay is gone.
    Dead,
    /// No lock file to probe (removed by a relay that found it dead, or kept where this process cannot see it).
    Unknown,
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
        if let Some((file, path)) = self.file.take() {
            let _ = std::fs::remove_file(&path);
            drop(file);
        }
    }
}

impl Drop for RelayLock {
    fn drop(&mut self) {
        if self.file.is_none() {
            in_process().remove(&self.relay);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_reads_alive_and_a_dropped_one_dead() {
        let dir = std::env::temp_dir().join(format!("relay-lock-test-{}", Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let database = dir.join("db.sqlite");
        std::fs::write(&database, b"").unwrap();
        let place = LockPlace::of(&database);
        let relay = Uuid::now_v7();
        assert_eq!(place.probe(relay), Liveness::Unknown);
        let lock = place.acquire(relay).unwrap();
        assert_eq!(place.probe(relay), Liveness::Alive);
        drop(lock);
        assert_eq!(place.probe(relay), Liveness::Dead);
        assert_eq!(place.probe(relay), Liveness::Dead, "still dead");
        place.remove(relay);
        assert_eq!(place.probe(relay), Liveness::Unknown, "the dead relay's file is gone");
        let released = place.acquire(relay).unwrap();
        released.release();
        assert_eq!(place.probe(relay), Liveness::Unknown);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_in_memory_database_keeps_proofs_in_the_process() {
        let place = LockPlace::of(Path::new("file:sqlx-in-memory-test"));
        let relay = Uuid::now_v7();
        let lock = place.acquire(relay).unwrap();
        assert_eq!(place.probe(relay), Liveness::Alive);
        drop(lock);
        assert_eq!(place.probe(relay), Liveness::Dead);
    }
}
