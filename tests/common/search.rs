//! An in-memory OpenSearch-compatible server (osmem-server, installed from PyPI) on a free port,
//! one per test.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use serde_json::Value;

/// An in-memory OpenSearch-compatible server on a free port; it exits when dropped.
pub struct SearchPeer {
    pub url: String,
    process: Child,
    http: reqwest::Client,
}

impl SearchPeer {
    pub fn start() -> SearchPeer {
        let binary = super::tools::py_tools()
            .root()
            .join("osmem_server/bin/osmem-server");
        let mut process = Command::new(binary)
            .args(["--addr", "127.0.0.1:0", "--no-ja"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("osmem-server runs");
        let mut line = String::new();
        BufReader::new(process.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let ready: Value = serde_json::from_str(&line)
            .unwrap_or_else(|error| panic!("osmem-server did not start ({error}): {line:?}"));
        SearchPeer {
            url: ready["url"].as_str().unwrap().to_owned(),
            process,
            http: reqwest::Client::new(),
        }
    }

    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.url));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    /// The stored document, or `None`.
    pub async fn document(&self, index: &str, id: &str) -> Option<Value> {
        let (status, body) = self
            .request(reqwest::Method::GET, &format!("/{index}/_doc/{id}"), None)
            .await;
        (status == 200).then(|| body["_source"].clone())
    }
}

impl Drop for SearchPeer {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

impl SearchPeer {
    /// Stops the server's process (SIGSTOP): it accepts no more work and answers nothing, as a
    /// hung backend, until [`resume`](Self::resume).
    pub fn pause(&self) {
        signal(self.process.id(), "-STOP");
    }

    /// Lets a paused server run again (SIGCONT), its indices intact.
    pub fn resume(&self) {
        signal(self.process.id(), "-CONT");
    }

    /// The documents of the indices matching `pattern` (at most 10,000), by `_id`.
    pub async fn documents(&self, pattern: &str) -> std::collections::BTreeMap<String, Value> {
        let (status, body) = self
            .request(
                reqwest::Method::POST,
                &format!("/{pattern}/_search"),
                Some(serde_json::json!({"size": 10000, "query": {"match_all": {}}})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body["hits"]["hits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|hit| {
                (
                    hit["_id"].as_str().unwrap().to_owned(),
                    hit["_source"].clone(),
                )
            })
            .collect()
    }
}

fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill {signal} {pid} failed");
}
