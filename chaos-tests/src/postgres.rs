//! A private PostgreSQL 15 server in a temporary directory, on a free port: the suite stops,
//! restarts and cuts it off, so it is never the shared server.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::free_port;

/// Where Debian puts the server binaries (`initdb`, `pg_ctl`).
const BIN_DIRS: [&str; 2] = ["/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin"];

/// A running private server; stopped (immediately) and deleted on drop.
pub struct PrivatePostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

impl PrivatePostgres {
    /// `initdb` + `pg_ctl start` on a free port, listening on 127.0.0.1 only.
    ///
    /// `fsync` is off: the faults here are of processes and connections, not of the disk, and
    /// every stop of this server is a clean one.
    #[must_use]
    pub fn start() -> PrivatePostgres {
        let bin = BIN_DIRS
            .iter()
            .map(PathBuf::from)
            .find(|dir| dir.join("initdb").exists())
            .unwrap_or_else(|| panic!("no initdb in any of {BIN_DIRS:?}: install postgresql-15"));
        let dir = tempfile::Builder::new()
            .prefix("chaos-postgres-")
            .tempdir()
            .expect("temporary directory for the private PostgreSQL");
        let server = PrivatePostgres {
            dir,
            bin,
            port: free_port(),
        };
        // The server refuses to run as root: hand the directory to `postgres`.
        if running_as_root() {
            run(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(server.dir.path()));
        }
        run(&mut server.as_owner(
            "initdb",
            &[
                "-D",
                &server.data().display().to_string(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        ));
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off \
             -c max_connections=300 -c shared_buffers=128MB",
            server.port,
            server.dir.path().display()
        );
        run(&mut server.pg_ctl(&["-w", "-t", "60", "-o", &options, "start"]));
        server
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `pg_ctl restart -m fast`: every session is ended, the server is back when this returns.
    pub fn restart_fast(&self) {
        run(&mut self.pg_ctl(&["-w", "-t", "60", "-m", "fast", "restart"]));
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn pg_ctl(&self, args: &[&str]) -> Command {
        let data = self.data().display().to_string();
        let log = self.log().display().to_string();
        let mut full = vec!["-D", &data, "-l", &log];
        full.extend_from_slice(args);
        self.as_owner("pg_ctl", &full)
    }

    fn as_owner(&self, program: &str, args: &[&str]) -> Command {
        let program = self.bin.join(program);
        if running_as_root() {
            let mut command = Command::new("runuser");
            command
                .args(["-u", "postgres", "--"])
                .arg(program)
                .args(args);
            command
        } else {
            let mut command = Command::new(program);
            command.args(args);
            command
        }
    }

    /// The server's own log, for a failure message.
    #[must_use]
    pub fn log_tail(&self) -> String {
        tail(&self.log(), 40)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self
            .pg_ctl(&["-w", "-t", "30", "-m", "immediate", "stop"])
            .output();
    }
}

fn running_as_root() -> bool {
    // The effective uid, without libc: `id -u` is on every machine this runs on.
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|output| output.stdout.trim_ascii() == b"0")
}

fn run(command: &mut Command) {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("cannot run {command:?}: {error}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The last `lines` lines of a text file ("" when unreadable).
#[must_use]
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
