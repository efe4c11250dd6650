//! A throw-away PostgreSQL server that accepts TLS connections only, for the TLS
//! tests: its own data directory, CA and certificate, so that what is tested does
//! not depend on how the machine's server happens to be configured.
//!
//! - `initdb` into a temporary directory, with the binaries of the newest
//!   PostgreSQL under `/usr/lib/postgresql/*/bin` (Debian's layout; `PG_BIN`
//!   overrides). `initdb` refuses to run as root, so a root test process runs the
//!   server as `postgres` (`runuser`), which Debian's package creates.
//! - A CA and a certificate for `DNS:localhost` only (no IP address), made by
//!   rcgen for each server; a second CA with the same name but another key, to
//!   check that a name alone is not trusted.
//! - `pg_hba.conf`: trust over `hostssl` and the Unix socket, `hostnossl ... reject`,
//!   so a TCP connection without TLS is refused by the server itself.
//! - Started with `pg_ctl -w` (bounded by [`START_TIMEOUT`]; `initdb` and
//!   `pg_ctl` are killed after [`COMMAND_LIMIT`]), stopped (`-m immediate`) and
//!   deleted on drop, also when the test panics. A test process that is killed
//!   outright leaves its server running (its directory is `md-pgtls-*` in the
//!   temporary directory).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// How long `pg_ctl` may wait for the server to accept connections.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How long `initdb` or `pg_ctl` may run before it is killed and the test fails.
const COMMAND_LIMIT: Duration = Duration::from_secs(60);

/// The superuser `initdb` creates (trusted over the socket and over TLS).
const SUPERUSER: &str = "postgres";

/// The account a root process runs the server as.
const SERVER_ACCOUNT: &str = "postgres";

/// A running PostgreSQL server with TLS required; stopped and deleted on drop.
#[derive(Debug)]
pub struct PgTlsServer {
    root: PathBuf,
    data: PathBuf,
    bin: PathBuf,
    port: u16,
    /// `Some(account)` when the server runs as another account than this process.
    run_as: Option<String>,
    ca: PathBuf,
    foreign_ca: PathBuf,
}

impl PgTlsServer {
    /// Initialises and starts a server. Panics (with the server's log) if it does
    /// not come up: the test cannot run without it.
    pub async fn start() -> PgTlsServer {
        match tokio::task::spawn_blocking(Self::start_blocking).await {
            Ok(server) => server,
            // The test fails with start-up's own message (the server's log).
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    fn start_blocking() -> PgTlsServer {
        let bin = postgres_bin();
        let run_as = running_as_root().then(|| SERVER_ACCOUNT.to_owned());
        let root = std::env::temp_dir().join(crate::unique("md-pgtls-"));
        std::fs::create_dir(&root).expect("create the server's directory");
        let mut server = PgTlsServer {
            data: root.join("data"),
            root,
            bin,
            port: 0,
            run_as,
            ca: PathBuf::new(),
            foreign_ca: PathBuf::new(),
        };
        // From here on, Drop cleans up whatever was made.
        if let Some(account) = &server.run_as {
            chown(&server.root, account);
        }
        server.run(
            "initdb",
            &[
                "--no-sync",
                "--no-instructions",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                &format!("--username={SUPERUSER}"),
                "-D",
                path_str(&server.data),
            ],
        );
        server.write_certificates();
        std::fs::write(
            server.data.join("pg_hba.conf"),
            "# type     database user address      method\n\
             local      all      all               trust\n\
             hostssl    all      all  127.0.0.1/32 trust\n\
             hostnossl  all      all  127.0.0.1/32 reject\n",
        )
        .expect("write pg_hba.conf");

        // A port taken between our probe and the server's bind fails the start:
        // try a few.
        let mut last_error = String::new();
        for _ in 0..3 {
            server.port = free_port();
            let conf = format!(
                "listen_addresses = '127.0.0.1'\n\
                 port = {port}\n\
                 unix_socket_directories = '{socket}'\n\
                 ssl = on\n\
                 ssl_cert_file = 'server.crt'\n\
                 ssl_key_file = 'server.key'\n\
                 max_connections = 100\n\
                 fsync = off\n\
                 full_page_writes = off\n",
                port = server.port,
                socket = path_str(&server.root),
            );
            // postgresql.auto.conf is read last: these settings win.
            std::fs::write(server.data.join("postgresql.auto.conf"), conf)
                .expect("write postgresql.auto.conf");
            let log = server.root.join("server.log");
            let timeout = START_TIMEOUT.as_secs().to_string();
            let started = server.try_run(
                "pg_ctl",
                &[
                    "-D",
                    path_str(&server.data),
                    "-l",
                    path_str(&log),
                    "-w",
                    "-t",
                    &timeout,
                    "start",
                ],
            );
            match started {
                Ok(()) => return server,
                Err(e) => {
                    let log = std::fs::read_to_string(&log).unwrap_or_default();
                    last_error = format!("{e}\n--- server log ---\n{log}");
                }
            }
        }
        panic!("the PostgreSQL TLS server did not start: {last_error}");
    }

    /// A CA, a `localhost` certificate it signs (key 0600, the server's), and a
    /// foreign CA with the same name.
    fn write_certificates(&mut self) {
        let ca_params = || {
            let mut params = CertificateParams::default();
            params
                .distinguished_name
                .push(DnType::CommonName, "mail-dispatch test CA");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            params
        };
        let ca_key = KeyPair::generate().expect("CA key");
        let ca_cert = ca_params().self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::new(ca_params(), ca_key);
        let foreign_key = KeyPair::generate().expect("foreign CA key");
        let foreign_cert = ca_params()
            .self_signed(&foreign_key)
            .expect("foreign CA certificate");

        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("a DNS name");
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().expect("server key");
        let cert = params.signed_by(&key, &issuer).expect("server certificate");

        self.ca = self.root.join("ca.pem");
        self.foreign_ca = self.root.join("foreign-ca.pem");
        std::fs::write(&self.ca, ca_cert.pem()).expect("write ca.pem");
        std::fs::write(&self.foreign_ca, foreign_cert.pem()).expect("write foreign-ca.pem");
        let crt = self.data.join("server.crt");
        let key_file = self.data.join("server.key");
        std::fs::write(&crt, cert.pem()).expect("write server.crt");
        std::fs::write(&key_file, key.serialize_pem()).expect("write server.key");
        // PostgreSQL refuses a key file others may read, or owned by another
        // account than the server's (root aside).
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))
            .expect("chmod server.key");
        if let Some(account) = &self.run_as {
            chown(&crt, account);
            chown(&key_file, account);
        }
    }

    /// The TCP port (on 127.0.0.1 only).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The CA that signed the server's certificate (PEM file), for `sslrootcert`.
    pub fn ca_file(&self) -> &Path {
        &self.ca
    }

    /// A CA with the same name as [`Self::ca_file`]'s but another key: it signed
    /// nothing of the server's.
    pub fn foreign_ca_file(&self) -> &Path {
        &self.foreign_ca
    }

    /// The maintenance database over the Unix socket (no TLS there), for setting
    /// up databases: `TempDatabase::create_on`, `TestAppOptions::database_server`.
    pub fn socket_url(&self) -> String {
        let socket: String =
            url::form_urlencoded::byte_serialize(path_str(&self.root).as_bytes()).collect();
        format!("postgres://{SUPERUSER}@{socket}:{}/postgres", self.port)
    }

    /// `database` over TCP at `host` (`localhost`, `127.0.0.1`), with `query`
    /// (`sslmode=…&…`) appended when not empty.
    pub fn tcp_url(&self, host: &str, database: &str, query: &str) -> String {
        let url = format!("postgres://{SUPERUSER}@{host}:{}/{database}", self.port);
        if query.is_empty() {
            url
        } else {
            format!("{url}?{query}")
        }
    }

    fn run(&self, program: &str, args: &[&str]) {
        if let Err(e) = self.try_run(program, args) {
            panic!("{e}");
        }
    }

    /// Runs one of PostgreSQL's programs, as the server's account, killed after
    /// [`COMMAND_LIMIT`] (coreutils' `timeout`: it runs under `runuser`, so the
    /// program itself is what it kills).
    fn try_run(&self, program: &str, args: &[&str]) -> Result<(), String> {
        let exe = self.bin.join(program);
        let mut command = match &self.run_as {
            Some(account) => {
                let mut c = Command::new("runuser");
                c.args(["-u", account, "--", "timeout"]);
                c
            }
            None => Command::new("timeout"),
        };
        command
            .args(["--kill-after=5", &COMMAND_LIMIT.as_secs().to_string()])
            .arg(&exe);
        // The server inherits the working directory: one its account can enter.
        command.args(args).current_dir(&self.root);
        let out = command
            .output()
            .map_err(|e| format!("{program} could not run: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{program} failed ({}; 124: killed after {COMMAND_LIMIT:?}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }
}

impl Drop for PgTlsServer {
    fn drop(&mut self) {
        if self.port != 0 {
            // Immediate: nothing on this server is worth a clean shutdown.
            let _ = self.try_run(
                "pg_ctl",
                &[
                    "-D",
                    path_str(&self.data),
                    "-m",
                    "immediate",
                    "-w",
                    "-t",
                    "10",
                    "stop",
                ],
            );
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// `PG_BIN`, else the newest `/usr/lib/postgresql/<major>/bin` with `initdb`.
fn postgres_bin() -> PathBuf {
    if let Some(dir) = std::env::var_os("PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let major = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((major, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).expect(
        "PostgreSQL's server binaries (initdb, pg_ctl) under /usr/lib/postgresql/*/bin, or PG_BIN",
    )
}

/// Whether this process runs as root (whose `initdb` refuses to run).
fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    // /proc/self belongs to the process's effective user.
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn chown(path: &Path, account: &str) {
    let id = |flag: &str| -> u32 {
        let out = Command::new("id")
            .args([flag, account])
            .output()
            .expect("id runs");
        assert!(
            out.status.success(),
            "the account {account} must exist to run PostgreSQL as root"
        );
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("a numeric id")
    };
    std::os::unix::fs::chown(path, Some(id("-u")), Some(id("-g"))).expect("chown");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 temporary path")
}
