//! Test fixtures shared by this crate's tests and other crates' end-to-end tests: a throwaway
//! Postgres cluster (initdb + pg_ctl on a free loopback port, one per test binary, one database
//! per test) and token helpers.

use std::{
    path::PathBuf,
    process::Command,
    sync::{
        OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
};

/// A Postgres cluster owned by this test process; a watchdog stops it when the process exits.
#[derive(Debug)]
pub struct PgCluster {
    dir: PathBuf,
    port: u16,
    next_db: AtomicUsize,
}

fn pg_bin(name: &str) -> String {
    let candidate = format!("/usr/lib/postgresql/15/bin/{name}");
    if std::path::Path::new(&candidate).exists() {
        candidate
    } else {
        name.to_owned()
    }
}

fn as_postgres(args: &[&str]) -> std::io::Result<std::process::Output> {
    // Postgres refuses to run as root; these machines run tests as root.
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false);
    if is_root {
        Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .args(args)
            .output()
    } else {
        Command::new(args[0]).args(&args[1..]).output()
    }
}

impl PgCluster {
    /// The process-wide cluster, started on first use.
    pub fn shared() -> &'static PgCluster {
        static CLUSTER: OnceLock<PgCluster> = OnceLock::new();
        CLUSTER.get_or_init(|| Self::start().expect("start a throwaway Postgres cluster"))
    }

    fn start() -> Result<Self, String> {
        let base = std::env::temp_dir().join(format!(
            "meridian-pg-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&base).map_err(|e| e.to_string())?;
        let _ = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&base)
            .status();
        let dir = base.to_string_lossy().to_string();
        let out = as_postgres(&[
            &pg_bin("initdb"),
            "-D",
            &dir,
            "-A",
            "trust",
            "-U",
            "postgres",
        ])
        .map_err(|e| format!("initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        // Pick a free port, then let Postgres bind it (a tiny race, retried).
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| e.to_string())?
                .port();
            let opts = format!("-p {port} -k {dir} -c listen_addresses=127.0.0.1 -c fsync=off");
            let log = format!("{dir}/log");
            let out = as_postgres(&[
                &pg_bin("pg_ctl"),
                "-D",
                &dir,
                "-o",
                &opts,
                "-l",
                &log,
                "-w",
                "start",
            ])
            .map_err(|e| format!("pg_ctl: {e}"))?;
            if out.status.success() {
                // The static cluster is never dropped, so a watchdog stops it (and removes its
                // directory) once this test process has exited.
                let pg_ctl = pg_bin("pg_ctl");
                let script = format!(
                    "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
                     runuser -u postgres -- {pg_ctl} -D {dir} -m immediate stop >/dev/null 2>&1 \
                     || {pg_ctl} -D {dir} -m immediate stop >/dev/null 2>&1; rm -rf {dir}",
                    pid = std::process::id()
                );
                let _ = Command::new("sh")
                    .args(["-c", &script])
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn();
                return Ok(Self {
                    dir: base,
                    port,
                    next_db: AtomicUsize::new(0),
                });
            }
        }
        Err(format!("pg_ctl start failed; see {dir}/log"))
    }

    /// Creates a fresh database and returns its URL.
    pub async fn fresh_database(&self) -> String {
        use sqlx::Executor;
        let n = self.next_db.fetch_add(1, Ordering::SeqCst);
        let name = format!("t{}_{n}", std::process::id());
        let admin = format!("postgres://postgres@127.0.0.1:{}/postgres", self.port);
        let pool = sqlx::PgPool::connect(&admin)
            .await
            .expect("connect to the test cluster");
        pool.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
            .expect("create test database");
        pool.close().await;
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Stops the cluster (tests may call it at the end; leftover clusters die with their dir).
    pub fn stop(&self) {
        let dir = self.dir.to_string_lossy().to_string();
        let _ = as_postgres(&[&pg_bin("pg_ctl"), "-D", &dir, "-m", "fast", "stop"]);
    }
}
