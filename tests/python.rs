//! Python Celery and Flower from PyPI, for the suites that run the real Python tools against ours
//! (`python_interop`, `celery_tools`).
//!
//! [`venv`] installs [`REQUIREMENTS`] once into a virtualenv at `$HOME/.cache/celery-rs-test-venv`
//! and reuses it while `import celery, redis, flower, sqlalchemy, psycopg2, psycopg` works there;
//! otherwise it installs what is missing into it, and recreates it only when that fails. When
//! that fails, [`venv_or_skip`] prints why and the suite is skipped, or fails under
//! `CELERY_REQUIRE_SERVICES=1`. [`command`] runs that Python in `tests/python/` (the apps and
//! scripts the suites use); [`Service`] keeps a long-running one (a worker, Flower, an event dump)
//! with its output in a log file.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use crate::{services_required, wait_until};

/// What the virtualenv installs (Kombu's AMQP transport, py-amqp, comes with Celery). SQLAlchemy
/// and a PostgreSQL driver serve Celery's database result backend (`db+postgresql://`, which
/// SQLAlchemy 2.1 reads with psycopg 3; `db+postgresql+psycopg2://` with psycopg2).
pub const REQUIREMENTS: &[&str] = &[
    "celery[redis]>=5.3,<6",
    "flower>=2,<3",
    "sqlalchemy>=2,<3",
    "psycopg2-binary>=2.9,<3",
    "psycopg[binary]>=3.1,<4",
];

/// The imports that prove the virtualenv is complete.
const IMPORTS: &str = "import celery, redis, flower, sqlalchemy, psycopg2, psycopg";

/// The virtualenv's Python with [`REQUIREMENTS`] importable, installed at most once per test binary.
pub fn venv() -> Result<&'static Path, &'static String> {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PYTHON.get_or_init(install).as_deref()
}

/// The virtualenv's Python, or `None` after printing why `suite` is skipped (a panic under
/// `CELERY_REQUIRE_SERVICES=1`).
pub fn venv_or_skip(suite: &str) -> Option<&'static Path> {
    match venv() {
        Ok(python) => Some(python),
        Err(why) if services_required() => panic!("{suite}: cannot install Python Celery and Flower: {why}"),
        Err(why) => {
            eprintln!("SKIPPED {suite}: cannot install Python Celery and Flower: {why}");
            None
        }
    }
}

/// Reuses the cached virtualenv when everything imports there, else (re)creates it and installs.
fn install() -> Result<PathBuf, String> {
    let home = std::env::var_os("HOME").map_or_else(std::env::temp_dir, PathBuf::from);
    let venv = home.join(".cache").join("celery-rs-test-venv");
    let python = venv.join("bin").join("python");
    if imports(&python) {
        return Ok(python);
    }
    // An older virtualenv lacks a requirement added since: install into it, without removing it
    // from under another suite that may be using it.
    if python.exists()
        && run(Command::new(&python).args(["-m", "pip", "install", "-q"]).args(REQUIREMENTS)).is_ok()
        && imports(&python)
    {
        return Ok(python);
    }
    run(Command::new("python3").args(["-m", "venv", "--clear"]).arg(&venv))?;
    run(Command::new(&python).args(["-m", "pip", "install", "-q"]).args(REQUIREMENTS))?;
    if imports(&python) {
        Ok(python)
    } else {
        Err(format!("`{IMPORTS}` fails in {}", venv.display()))
    }
}

fn imports(python: &Path) -> bool {
    Command::new(python)
        .args(["-c", IMPORTS])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `cmd` to completion; on failure, its output is the error.
fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// The directory of the Python apps and scripts (`tests/python`).
pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python")
}

/// `python <args>` in [`dir`], unbuffered and writing no bytecode there.
pub fn command(python: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(python);
    cmd.args(args).current_dir(dir()).env("PYTHONDONTWRITEBYTECODE", "1").env("PYTHONUNBUFFERED", "1");
    cmd
}

/// `python <args>` for `pg_app.py` (results in PostgreSQL at `backend`): its broker is the test
/// Redis database with `redis`'s key prefix.
pub fn pg_app_command(python: &Path, redis: &crate::RedisEnv, backend: &str, args: &[&str]) -> Command {
    let mut cmd = command(python, args);
    cmd.env("CELERY_BROKER_URL", format!("{}/{}", crate::REDIS, crate::TEST_DB))
        .env("CELERY_RS_KEYPREFIX", &redis.prefix)
        .env("CELERY_RESULT_BACKEND", backend);
    cmd
}

/// A long-running process (a worker, Flower, an event dump), killed when dropped; its stdout and
/// stderr go to one log file.
#[derive(Debug)]
pub struct Service {
    /// The process.
    pub child: Child,
    log: PathBuf,
}

impl Service {
    /// Starts `cmd` with its output in a fresh log file.
    pub fn start(cmd: &mut Command) -> Service {
        let log = std::env::temp_dir().join(format!("service-{}.log", uuid::Uuid::new_v4().simple()));
        let file = File::create(&log).expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("start {cmd:?}: {e}"));
        Service { child, log }
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.log().contains(needle))
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}
