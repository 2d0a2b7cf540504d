//! The real `ferrohub` binary as a child process, for tests that must kill it (SIGKILL).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ferrohub::server::HubInfo;

use super::{HOST, R};

/// A port free right now (the OS picks it).
pub fn free_port() -> R<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub struct Server {
    pub child: Child,
    pub info: HubInfo,
}

/// The server is killed however the test ends, so a failing run leaves no process behind.
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `ferrohub serve` on a data directory and loopback ports; returns once it listens.
pub async fn spawn_server(data: &Path, mqtt: u16, https: u16) -> R<Server> {
    let _ = std::fs::remove_file(data.join("hub.json"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrohub"))
        .args(["serve", "--hostname", HOST])
        .arg("--data-dir")
        .arg(data)
        .arg("--mqtt-bind")
        .arg(format!("127.0.0.1:{mqtt}"))
        .arg("--https-bind")
        .arg(format!("127.0.0.1:{https}"))
        .args(["--amqp-bind", "127.0.0.1:0"])
        .env("FERROHUB_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    for _ in 0..200 {
        if let Ok(info) = HubInfo::load(data) {
            if info.pid == child.id()
                && tokio::net::TcpStream::connect(("127.0.0.1", mqtt))
                    .await
                    .is_ok()
            {
                return Ok(Server { child, info });
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    Err("server did not start".into())
}
