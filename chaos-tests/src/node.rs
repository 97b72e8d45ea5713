//! One `fraiseql-observers run` process: the release binary, started, signalled and killed.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::process::{Child, Command};

/// How every node of a scenario runs.
#[derive(Clone, Debug)]
pub struct NodeSettings {
    pub partitions: u32,
    pub node_timeout: Duration,
    pub breaker_open_for: Duration,
}

impl Default for NodeSettings {
    fn default() -> Self {
        NodeSettings {
            partitions: 8,
            node_timeout: Duration::from_secs(3),
            breaker_open_for: Duration::from_secs(2),
        }
    }
}

/// Where one node connects and logs.
pub struct NodeSpec {
    pub id: String,
    pub database_url: String,
    pub redis_url: String,
    pub config: PathBuf,
    pub log: PathBuf,
}

pub struct NodeProcess {
    spec: NodeSpec,
    settings: NodeSettings,
    child: Option<Child>,
}

impl NodeProcess {
    #[must_use]
    pub fn spawn(spec: NodeSpec, settings: &NodeSettings) -> NodeProcess {
        let mut node = NodeProcess {
            spec,
            settings: settings.clone(),
            child: None,
        };
        node.start();
        node
    }

    #[must_use]
    pub fn id(&self) -> &str {
        &self.spec.id
    }

    #[must_use]
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts the process (again), appending to the same log.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} is running already", self.spec.id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.spec.log)
            .expect("node log file");
        let child = Command::new(binary())
            .arg("run")
            .arg("--config")
            .arg(&self.spec.config)
            .args(["--node-id", &self.spec.id])
            .args(["--partitions", &self.settings.partitions.to_string()])
            .args(["--node-timeout", &humantime(self.settings.node_timeout)])
            .args([
                "--grpc-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
            ])
            .args([
                "--breaker-open-for",
                &humantime(self.settings.breaker_open_for),
            ])
            .args(["--shutdown-timeout", "20s"])
            .env("DATABASE_URL", &self.spec.database_url)
            .env("REDIS_URL", &self.spec.redis_url)
            .env("RUST_LOG", "info,sqlx=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {}: {error}", binary().display()));
        self.child = Some(child);
    }

    fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .and_then(Child::id)
            .unwrap_or_else(|| panic!("{} is not running", self.spec.id))
    }

    /// `kill -9`, and reaps it.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Sends a signal by name (`STOP`, `CONT`, `TERM`).
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill(1)");
        assert!(status.success(), "kill -{signal} {} failed", self.spec.id);
    }

    /// SIGTERM, as Kubernetes stops a pod, and waits for the process to exit by itself.
    pub async fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        self.signal("TERM");
        let mut child = self.child.take().expect("running");
        let Ok(status) = tokio::time::timeout(within, child.wait()).await else {
            let _ = child.kill().await;
            panic!(
                "{} did not exit within {within:?} of SIGTERM; log:\n{}",
                self.spec.id,
                crate::postgres::tail(&self.spec.log, 40)
            );
        };
        status.expect("wait")
    }

    /// Whether the process exited by itself (a crash), with its status.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|child| child.try_wait().ok().flatten())
    }

    #[must_use]
    pub fn log_tail(&self) -> String {
        crate::postgres::tail(&self.spec.log, 30)
    }
}

fn humantime(duration: Duration) -> String {
    format!("{}ms", duration.as_millis())
}

/// The release binary, built once per test process (a no-op when it is up to date).
///
/// `FRAISEQL_OBSERVERS_BIN` names another binary to test instead.
pub fn binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        if let Some(path) = std::env::var_os("FRAISEQL_OBSERVERS_BIN") {
            return PathBuf::from(path);
        }
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        // Its own target directory: `cargo test` runs this with an environment of its own, and
        // build scripts that watch it would otherwise rebuild units the test build shares.
        let target = crate::target_dir().join("chaos-bin");
        let status = std::process::Command::new(env!("CARGO"))
            .args([
                "build",
                "--release",
                "--locked",
                "--bin",
                "fraiseql-observers",
            ])
            .arg("--manifest-path")
            .arg(&manifest)
            .arg("--target-dir")
            .arg(&target)
            .status()
            .expect("cargo build of the release binary");
        assert!(status.success(), "building the release binary failed");
        target.join("release").join("fraiseql-observers")
    })
}
