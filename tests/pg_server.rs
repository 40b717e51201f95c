//! A private PostgreSQL server for the tests that stop, restart or crash one, and a TCP proxy that
//! counts what a server sends and the statements its clients send.
//!
//! The machine's own server (127.0.0.1:5432) is shared by every suite and never restarted;
//! [`PgServer`] runs another from the machine's binaries (`/usr/lib/postgresql/<version>/bin`,
//! or `PG_BINDIR`) on a free loopback port, with its data directory under the temporary directory,
//! removed on drop. `initdb` and `postgres` refuse to run as root, so as root they run as the
//! `postgres` user (through `runuser`). Without the binaries a test is skipped (or fails under
//! `CELERY_REQUIRE_SERVICES=1`).
//!
//! ```no_run
//! let Some(pg) = celery_tests::pg_server::PgServer::start("my_suite") else { return };
//! let url = pg.url("postgres", "visibility_timeout=5");
//! pg.stop(celery_tests::pg_server::Shutdown::Immediate);
//! pg.start_again();
//! ```

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::{free_port, services_required};

/// How `pg_ctl` stops the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// `-m fast`: sessions are ended (SQLSTATE 57P01), a checkpoint is written.
    Fast,
    /// `-m immediate`: every process is killed, as in a crash; the next start recovers from WAL.
    Immediate,
}

impl Shutdown {
    fn mode(self) -> &'static str {
        match self {
            Shutdown::Fast => "fast",
            Shutdown::Immediate => "immediate",
        }
    }
}

/// A PostgreSQL server of the test's own, stopped and deleted on drop.
#[derive(Debug)]
pub struct PgServer {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    as_postgres: bool,
}

/// The directory with `initdb`, `pg_ctl` and `postgres`: `PG_BINDIR`, else the newest
/// `/usr/lib/postgresql/*/bin`.
fn bindir() -> Option<PathBuf> {
    if let Ok(d) = std::env::var("PG_BINDIR") {
        return Some(PathBuf::from(d));
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("pg_ctl").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

impl PgServer {
    /// Initializes and starts a server (trust authentication for `postgres`, database
    /// `postgres`), or None (skipped, with a line saying why) without the binaries.
    pub fn start(suite: &str) -> Option<PgServer> {
        let Some(bin) = bindir() else {
            let why = "no PostgreSQL binaries in /usr/lib/postgresql/*/bin (set PG_BINDIR)";
            assert!(!services_required(), "{suite}: {why}");
            eprintln!("SKIPPED {suite}: {why}");
            return None;
        };
        let dir = std::env::temp_dir().join(format!("pgserver-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("server directory");
        let as_postgres = is_root();
        let server = PgServer { bin, dir, port: free_port(), as_postgres };
        if as_postgres {
            let status = Command::new("chown").arg("postgres:postgres").arg(&server.dir).status().expect("chown");
            assert!(status.success(), "chown postgres {}", server.dir.display());
        }
        let data = server.data();
        let out =
            server.run("initdb", &["-D", path(&data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"]);
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        server.start_again();
        Some(server)
    }

    /// `SCHEME://postgres@127.0.0.1:PORT/postgres[?query]`.
    pub fn url(&self, scheme: &str, query: &str) -> String {
        let sep = if query.is_empty() { "" } else { "?" };
        format!("{scheme}://postgres@127.0.0.1:{}/postgres{sep}{query}", self.port)
    }

    /// The server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server (`pg_ctl stop -m <mode>`), waiting until it is down.
    pub fn stop(&self, how: Shutdown) {
        let out = self.run("pg_ctl", &["-D", path(&self.data()), "-m", how.mode(), "-w", "-t", "60", "stop"]);
        assert!(out.status.success(), "pg_ctl stop: {}\n{}", String::from_utf8_lossy(&out.stderr), self.log());
    }

    /// Starts the stopped server on the same port, waiting until it takes connections (after a
    /// crash, once it has recovered).
    pub fn start_again(&self) {
        // Unix sockets in the server's directory (not /var/run/postgresql, which the machine's
        // server owns); fsync off: a test stops processes, not the machine, and the WAL a commit
        // wrote is in the kernel's cache, so nothing committed is lost.
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            path(&self.dir)
        );
        let log = self.dir.join("server.log");
        let out = self
            .run("pg_ctl", &["-D", path(&self.data()), "-l", path(&log), "-o", &options, "-w", "-t", "60", "start"]);
        assert!(out.status.success(), "pg_ctl start: {}\n{}", String::from_utf8_lossy(&out.stderr), self.log());
    }

    /// Stops the server and starts it again.
    pub fn restart(&self, how: Shutdown) {
        self.stop(how);
        self.start_again();
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn run(&self, tool: &str, args: &[&str]) -> Output {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        cmd.args(args).current_dir(&self.dir).output().unwrap_or_else(|e| panic!("{}: {e}", exe.display()))
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 temporary path")
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = self.run("pg_ctl", &["-D", path(&self.data()), "-m", "immediate", "-w", "stop"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP proxy on a free loopback port that forwards to `upstream` and counts the bytes the
/// upstream sends back (what a client read from the server) and the statements clients send
/// (round trips: each `Sync` of the extended protocol and each simple `Query`; connections without
/// TLS only, whose messages it can read). Stopped on drop.
#[derive(Debug)]
pub struct CountingProxy {
    /// `127.0.0.1:PORT`, to connect to instead of the upstream.
    pub addr: String,
    from_server: Arc<AtomicU64>,
    statements: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingProxy {
    /// Starts forwarding to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> CountingProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address").to_string();
        let from_server = Arc::new(AtomicU64::new(0));
        let statements = Arc::new(AtomicU64::new(0));
        let (count, sent, upstream) = (from_server.clone(), statements.clone(), upstream.to_owned());
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let (count, sent, upstream) = (count.clone(), sent.clone(), upstream.clone());
                conns.spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else { return };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = async {
                        let mut frames = Frames::default();
                        let mut buf = vec![0; 64 * 1024];
                        loop {
                            match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    sent.fetch_add(frames.statements(&buf[..n]), Ordering::Relaxed);
                                    if sw.write_all(&buf[..n]).await.is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                    };
                    let down = async {
                        let mut buf = vec![0; 64 * 1024];
                        loop {
                            match sr.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    count.fetch_add(n as u64, Ordering::Relaxed);
                                    if cw.write_all(&buf[..n]).await.is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                    };
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                    }
                });
            }
        });
        CountingProxy { addr, from_server, statements, task }
    }

    /// Bytes the upstream has sent so far, over every connection.
    pub fn from_server(&self) -> u64 {
        self.from_server.load(Ordering::Relaxed)
    }

    /// Statements (round trips) clients have sent so far, over every connection.
    pub fn statements(&self) -> u64 {
        self.statements.load(Ordering::Relaxed)
    }
}

/// Reads a client's side of the PostgreSQL protocol as it passes: the untyped start-up messages
/// (a TLS or GSS request, then the start-up packet), then typed messages (a type byte and a
/// length that counts itself).
#[derive(Debug, Default)]
struct Frames {
    /// The start-up packet was read.
    started: bool,
    /// The header read so far of the next message.
    header: Vec<u8>,
    /// Bytes of the current message's body still to pass.
    body: usize,
}

impl Frames {
    /// `SSLRequest` and `GSSENCRequest`: another untyped message follows.
    const REQUESTS: [u32; 2] = [80_877_103, 80_877_104];

    /// Reads `data`: how many `Sync` (`S`) and `Query` (`Q`) messages it finished.
    fn statements(&mut self, mut data: &[u8]) -> u64 {
        let mut n = 0;
        while !data.is_empty() {
            if self.body > 0 {
                let k = self.body.min(data.len());
                self.body -= k;
                data = &data[k..];
                continue;
            }
            let need = if self.started { 5 } else { 8 };
            let k = (need - self.header.len()).min(data.len());
            self.header.extend_from_slice(&data[..k]);
            data = &data[k..];
            if self.header.len() < need {
                break;
            }
            let word = |at: usize| u32::from_be_bytes(self.header[at..at + 4].try_into().expect("four bytes"));
            if self.started {
                self.body = (word(1) as usize).saturating_sub(4);
                n += u64::from(matches!(self.header[0], b'S' | b'Q'));
            } else {
                self.body = (word(0) as usize).saturating_sub(8);
                self.started = !Self::REQUESTS.contains(&word(4));
            }
            self.header.clear();
        }
        n
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
