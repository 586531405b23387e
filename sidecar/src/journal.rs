//! The durable record of API calls answered but not yet held by Consul.
//!
//! A `PUT` or `DELETE` on the scheduler API is answered 2xx only once it is recorded here: the
//! whole set of pending calls is written to a temporary file, fsync'd, renamed over
//! `STATE_DIR/NODE.pending.json` and the directory fsync'd. A call leaves the record once
//! Consul holds its result (the applier wrote it, or a reconcile found it there). At start the
//! record is read back before anything else, so a call answered while Consul was unreachable
//! is applied after any restart, `kill -9` included.
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::model::EndpointSpec;

/// One pending API call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "call", rename_all = "lowercase")]
pub enum Intent {
    /// `PUT`: the endpoint as accepted.
    Put { spec: Box<EndpointSpec> },
    /// `DELETE` (with or without a drain).
    Delete { service: String },
}

#[derive(Serialize, Deserialize)]
struct Contents {
    node: String,
    pending: BTreeMap<String, Intent>,
}

/// The file and the version of the pending set last written to it.
pub struct Journal {
    path: PathBuf,
    dir: PathBuf,
    node: String,
    written: Mutex<u64>,
}

impl Journal {
    /// Opens (creating the directory, mode 0700, if needed) and reads back what was pending.
    /// Fails, naming the path, when the directory cannot be created or written.
    pub fn open(dir: &Path, node: &str) -> anyhow::Result<(Journal, BTreeMap<String, Intent>)> {
        use std::os::unix::fs::DirBuilderExt;
        let hint = "create it (writable by the sidecar's user) or choose another --state-dir";
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| anyhow::anyhow!("state directory {}: {e}; {hint}", dir.display()))?;
        let path = dir.join(format!("{node}.pending.json"));
        let journal = Journal { path: path.clone(), dir: dir.to_path_buf(), node: node.to_string(), written: Mutex::new(0) };
        let pending = match std::fs::read(&path) {
            Ok(bytes) => {
                let c: Contents = serde_json::from_slice(&bytes).map_err(|e| {
                    anyhow::anyhow!("{}: unreadable ({e}); move it aside to start without the API calls it records", path.display())
                })?;
                if c.node != node {
                    anyhow::bail!("{} records calls of node `{}`, not `{node}`; give each node id its own file", path.display(), c.node);
                }
                c.pending
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => anyhow::bail!("reading {}: {e}; {hint}", path.display()),
        };
        // Writable now, not at the first API call.
        journal.write(0, &pending).map_err(|e| anyhow::anyhow!("{e}; {hint}"))?;
        Ok((journal, pending))
    }

    /// The version of the pending set last written.
    pub fn written_version(&self) -> u64 {
        *self.written.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `pending` (version `version` of the set) unless a newer version was written
    /// already. Callers hold no other lock: `snapshot` is taken under this file's lock, so
    /// versions are written in order.
    pub fn persist(&self, snapshot: impl FnOnce() -> (u64, BTreeMap<String, Intent>)) -> Result<(), String> {
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        let (version, pending) = snapshot();
        if version <= *written {
            return Ok(());
        }
        self.write_locked(&pending)?;
        *written = version;
        Ok(())
    }

    fn write(&self, version: u64, pending: &BTreeMap<String, Intent>) -> Result<(), String> {
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        self.write_locked(pending)?;
        *written = version;
        Ok(())
    }

    /// Temporary file, fsync, rename, fsync of the directory.
    fn write_locked(&self, pending: &BTreeMap<String, Intent>) -> Result<(), String> {
        use std::os::unix::fs::OpenOptionsExt;
        let fail = |what: &str, e: std::io::Error| format!("cannot record the API calls in {}: {what}: {e}", self.path.display());
        let body = serde_json::to_vec(&Contents { node: self.node.clone(), pending: pending.clone() })
            .map_err(|e| format!("encoding the API calls: {e}"))?;
        let tmp = self.dir.join(format!(".{}.pending.json.tmp", self.node));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| fail("creating the temporary file", e))?;
        f.write_all(&body).map_err(|e| fail("writing", e))?;
        f.sync_all().map_err(|e| fail("fsync", e))?;
        drop(f);
        std::fs::rename(&tmp, &self.path).map_err(|e| fail("rename", e))?;
        std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(|e| fail("fsync of the directory", e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::tests::spec;

    #[test]
    fn pending_calls_survive_a_reopen() {
        let dir = std::env::temp_dir().join(format!("upsync-sidecar-journal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (j, pending) = Journal::open(&dir, "node-a").unwrap();
        assert!(pending.is_empty());
        let mut set = BTreeMap::new();
        set.insert("a".to_string(), Intent::Put { spec: Box::new(spec("a", "10.0.0.1", 80)) });
        set.insert("b".to_string(), Intent::Delete { service: "web".into() });
        j.persist(|| (2, set.clone())).unwrap();
        // An older version is not written over a newer one.
        j.persist(|| (1, BTreeMap::new())).unwrap();
        let (_, back) = Journal::open(&dir, "node-a").unwrap();
        assert_eq!(back, set);
        assert!(Journal::open(&dir.join(format!("{}.pending.json", "node-a")), "x").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
