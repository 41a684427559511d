//! A throwaway Postgres cluster of the run's own: `initdb` into a temporary directory,
//! started on a free loopback port with its socket in that directory. Restarting the
//! machine's shared Postgres would break every other test running at the time, so the
//! run never touches it. The cluster is stopped and deleted when [`PrivatePostgres`] is
//! dropped, on success, on failure and on Ctrl-C alike.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Where Debian's postgresql-15 package puts the server binaries; `HERALD_CHAOS_PG_BIN`
/// points elsewhere.
const DEFAULT_PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// How long `pg_ctl` may wait for a start or a stop.
const PG_CTL_WAIT_SECS: &str = "60";

pub struct PrivatePostgres {
    /// Holds the data directory, the socket and the server log; deleted on drop.
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// `postgres` when we are root (the server refuses to run as root), else nobody.
    run_as: Option<String>,
    pub port: u16,
    running: bool,
}

/// How long one restart took, in its two halves.
pub struct Restart {
    pub stop: Duration,
    pub start: Duration,
}

impl PrivatePostgres {
    /// `initdb` and start a cluster; fails with the tool's output when either step does.
    pub async fn start() -> anyhow::Result<PrivatePostgres> {
        let bin = std::env::var_os("HERALD_CHAOS_PG_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_PG_BIN));
        if !bin.join("initdb").is_file() {
            bail!(
                "{} not found: install postgresql-15 or set HERALD_CHAOS_PG_BIN to the \
                 directory holding initdb and pg_ctl",
                bin.join("initdb").display()
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("herald-chaos-pg-")
            .tempdir()
            .context("creating the private cluster's directory")?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        let run_as = root.then(|| "postgres".to_string());
        if let Some(user) = &run_as {
            give_to(dir.path(), user).await?;
        }
        let mut cluster = PrivatePostgres {
            dir,
            bin,
            run_as,
            port: free_port()?,
            running: false,
        };
        let data = cluster.data_dir();
        cluster
            .tool(
                "initdb",
                &[
                    "-D",
                    path_str(&data)?,
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-instructions",
                ],
            )
            .await?;
        cluster.pg_ctl_start().await?;
        Ok(cluster)
    }

    /// Superuser URL over TCP to the cluster's `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// What `pg_ctlcluster VERSION NAME restart` does: `pg_ctl stop -w -m fast` (its
    /// default mode: active sessions are disconnected, transactions rolled back, a
    /// checkpoint written), then `pg_ctl start -w` with the same options.
    pub async fn restart(&mut self) -> anyhow::Result<Restart> {
        let started = Instant::now();
        self.pg_ctl_stop("fast").await?;
        let stop = started.elapsed();
        let starting = Instant::now();
        self.pg_ctl_start().await?;
        Ok(Restart {
            stop,
            start: starting.elapsed(),
        })
    }

    /// Stop the cluster now (fast); the directory goes when `self` is dropped.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if self.running {
            self.pg_ctl_stop("fast").await?;
        }
        Ok(())
    }

    /// The end of the server log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_file()).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(lines).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    async fn pg_ctl_start(&mut self) -> anyhow::Result<()> {
        let data = self.data_dir();
        let log = self.log_file();
        // Loopback TCP only, and the socket in our own directory instead of
        // /var/run/postgresql, where the machine's cluster has its own.
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {}",
            self.port,
            path_str(self.dir.path())?
        );
        self.tool(
            "pg_ctl",
            &[
                "start",
                "-w",
                "-t",
                PG_CTL_WAIT_SECS,
                "-D",
                path_str(&data)?,
                "-l",
                path_str(&log)?,
                "-o",
                &options,
            ],
        )
        .await
        .with_context(|| format!("server log:\n{}", self.log_tail(20)))?;
        self.running = true;
        Ok(())
    }

    async fn pg_ctl_stop(&mut self, mode: &str) -> anyhow::Result<()> {
        let data = self.data_dir();
        self.tool(
            "pg_ctl",
            &[
                "stop",
                "-w",
                "-t",
                PG_CTL_WAIT_SECS,
                "-m",
                mode,
                "-D",
                path_str(&data)?,
            ],
        )
        .await?;
        self.running = false;
        Ok(())
    }

    /// Run one of the server's tools (as `postgres` when we are root), failing with its
    /// output when it fails.
    async fn tool(&self, name: &str, args: &[&str]) -> anyhow::Result<()> {
        let output = self
            .command(name, args)
            .output()
            .await
            .with_context(|| format!("running {name}"))?;
        if !output.status.success() {
            bail!(
                "{name} {} failed ({}): {}{}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    fn command(&self, name: &str, args: &[&str]) -> tokio::process::Command {
        let program = self.bin.join(name);
        let mut command = match &self.run_as {
            Some(user) => {
                let mut command = tokio::process::Command::new("runuser");
                command.args(["-u", user, "--"]).arg(program);
                command
            }
            None => tokio::process::Command::new(program),
        };
        command
            .args(args)
            .stdin(Stdio::null())
            // pg_ctl's server inherits the working directory; ours may not be readable by
            // the postgres user.
            .current_dir(self.dir.path());
        command
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_file(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }
}

impl Drop for PrivatePostgres {
    /// Stop the server before its directory is deleted; `immediate`, because nothing in
    /// a throwaway cluster needs a checkpoint. Blocking is fine here: this runs once, at
    /// the end.
    fn drop(&mut self) {
        if !self.running {
            return;
        }
        let data = self.data_dir();
        let mut command = match &self.run_as {
            Some(user) => {
                let mut command = std::process::Command::new("runuser");
                command
                    .args(["-u", user, "--"])
                    .arg(self.bin.join("pg_ctl"));
                command
            }
            None => std::process::Command::new(self.bin.join("pg_ctl")),
        };
        let stopped = command
            .args([
                "stop",
                "-w",
                "-t",
                PG_CTL_WAIT_SECS,
                "-m",
                "immediate",
                "-D",
            ])
            .arg(&data)
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !stopped.is_ok_and(|status| status.success()) {
            eprintln!(
                "herald-chaos: could not stop the private Postgres in {}; stop it with \
                 `pg_ctl stop -D {}`",
                self.dir.path().display(),
                data.display()
            );
        }
    }
}

/// A loopback port nobody listens on right now. (Another process could take it before
/// Postgres binds it; then the start fails with a clear message and the run is repeated.)
fn free_port() -> anyhow::Result<u16> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(listener.local_addr()?.port())
}

/// Hand the directory to `user`, who runs the server.
async fn give_to(dir: &Path, user: &str) -> anyhow::Result<()> {
    let status = tokio::process::Command::new("chown")
        .arg(format!("{user}:{user}"))
        .arg(dir)
        .status()
        .await
        .context("running chown")?;
    if !status.success() {
        bail!("chown {user} {} failed ({status})", dir.display());
    }
    Ok(())
}

fn path_str(path: &Path) -> anyhow::Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not valid UTF-8", path.display()))
}
