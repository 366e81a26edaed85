//! Real `sparky-worker` / `sparky-ingress` processes for the multi-process tests.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;

use crate::helpers::TestApp;

/// The workspace's binaries, (re)built once per test run so a stale binary from another checkout
/// sharing the target directory is never tested (a no-op when `scripts/test` built them already).
pub async fn bin(name: &str) -> PathBuf {
    static BUILT: OnceCell<PathBuf> = OnceCell::const_new();
    let dir = BUILT
        .get_or_init(|| async {
            // <target>/debug/deps/it-<hash> -> <target>/debug
            let exe = std::env::current_exe().unwrap();
            let dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let st = tokio::process::Command::new(cargo)
                .args(["build", "-p", "sparky-worker", "-p", "sparky-ingress"])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .await
                .unwrap();
            assert!(st.success(), "building the binaries failed");
            dir
        })
        .await;
    dir.join(name)
}

pub struct WorkerProc {
    pub child: Child,
    pub log: PathBuf,
}

impl WorkerProc {
    /// The worker's consumer id, from its start-up log line.
    pub async fn id(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if let Some(i) = text.find("\"consumer\":\"") {
                let rest = &text[i + 12..];
                return rest[..rest.find('"').unwrap()].to_string();
            }
            assert!(Instant::now() < deadline, "worker did not start:\n{text}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGSTOP: frozen where it is (it acks, commits and renews nothing until [`Self::resume`]).
    pub fn freeze(&self) {
        let pid = self.child.id().to_string();
        let st = Command::new("kill").args(["-STOP", &pid]).status().unwrap();
        assert!(st.success(), "SIGSTOP {pid}");
    }

    /// SIGCONT after [`Self::freeze`].
    pub fn resume(&self) {
        let pid = self.child.id().to_string();
        let st = Command::new("kill").args(["-CONT", &pid]).status().unwrap();
        assert!(st.success(), "SIGCONT {pid}");
    }

    /// SIGTERM, then wait for the exit code.
    pub async fn terminate(&mut self) -> i32 {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "worker did not stop after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The process is killed; its log directory is removed unless the test is failing, when its path
/// is printed (the log is what tells why).
impl Drop for WorkerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let Some(dir) = self.log.parent() else { return };
        if std::thread::panicking() {
            eprintln!(
                "log of a process of the failing test: {}",
                self.log.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Start a `sparky-worker` process on the test's database and namespace.
pub async fn spawn_worker(app: &TestApp, env: &[(&str, String)]) -> WorkerProc {
    spawn(app, "sparky-worker", env).await
}

/// Start a `sparky-ingress` process on the test's database and namespace; returns it and its port.
pub async fn spawn_ingress(app: &TestApp, env: &[(&str, String)]) -> (WorkerProc, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut env = env.to_vec();
    env.push(("PORT", port.to_string()));
    let proc = spawn(app, "sparky-ingress", &env).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "sparky-ingress did not start:\n{}",
            std::fs::read_to_string(&proc.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (proc, port)
}

async fn spawn(app: &TestApp, name: &str, env: &[(&str, String)]) -> WorkerProc {
    let bin = bin(name).await;
    let dir = std::env::temp_dir().join(format!("sparky-it-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join(format!("{name}.log"));
    let out = std::fs::File::create(&log).unwrap();
    let mut cmd = Command::new(bin);
    cmd.current_dir(&dir) // no stray .env
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &app.config.database_url)
        .env("REDIS_URL", &app.config.redis_url)
        .env(
            "REDIS_CLUSTER_URLS",
            app.config.redis_cluster_urls.join(","),
        )
        .env(
            "SPARKY_REDIS_WAIT_REPLICAS",
            app.config.redis_wait_replicas.to_string(),
        )
        .env("SPARKY_NAMESPACE", &app.config.namespace)
        .env("SPARKY_PARTITIONS", app.config.partitions.to_string())
        .env("SPARKY_MAX_SIGNAL_AGE_SECS", "600")
        .env("WORKER_PORT", "0")
        .env("LOG_FORMAT", "json")
        .env("LOG_LEVEL", "info,sqlx=warn")
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out));
    for (k, v) in env {
        cmd.env(k, v);
    }
    WorkerProc {
        child: cmd.spawn().expect("spawn sparky-worker"),
        log,
    }
}
