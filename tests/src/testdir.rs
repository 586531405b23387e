use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// A directory for one test's files and logs under `target/test-runs/`. Removed on drop when
/// the test passed; kept, with its path printed, when the test is panicking, so the nginx error
/// log, Consul's output and the generated configs can be read after a failure.
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    /// A fresh directory named after `name` (use the test's name).
    pub fn new(name: &str) -> TestDir {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let path = crate::paths::repo_root().join("target/test-runs").join(format!("{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        TestDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory (not created).
    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.path.join(rel)
    }

    /// A subdirectory, created.
    pub fn subdir(&self, rel: &str) -> PathBuf {
        let p = self.path.join(rel);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()));
        p
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("UPSYNC_KEEP_TEST_DIRS").is_some() {
            eprintln!("test files and logs kept in {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
