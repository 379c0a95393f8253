//! Test harness for Bulkhead's end-to-end tests: start the real binaries as child processes
//! (killed on drop, logs kept for failure messages), wait for their ready files, and talk
//! to them with deliberately simple HTTP and TLS clients.
#![allow(clippy::unwrap_used)]

use bulkhead_identity::tls::{ExpectedServer, client_config, server_name};
use bulkhead_identity::{Ca, SpiffeId, TrustBundle};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

pub use tempfile::TempDir;

pub mod etcd;
pub mod kubeapi;
pub mod mesh;
pub mod netns;
pub mod prometheus;
#[cfg(test)]
mod tidy;
pub mod tokenreview;

/// Where the real binaries are: next to the `bulkhead` binary cargo built for this test.
pub struct Bins {
    pub bulkhead: PathBuf,
    pub proxy: PathBuf,
}

impl Bins {
    /// The binaries cargo built beside the running test executable (`target/*/deps/..`).
    pub fn of_test() -> Bins {
        let exe = std::env::current_exe().expect("the test executable's path");
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test executables live in target/<profile>/deps");
        Bins::next_to(dir.join("bulkhead").to_str().expect("a UTF-8 target path"))
    }

    pub fn next_to(bulkhead: &str) -> Bins {
        let bulkhead = PathBuf::from(bulkhead);
        let proxy = bulkhead.with_file_name("bulkhead-proxy");
        assert!(
            proxy.exists(),
            "{} is missing: build the binaries first (`cargo build --bins`; ./dev/test does)",
            proxy.display()
        );
        Bins { bulkhead, proxy }
    }
}

/// A child process, killed when dropped; its stderr goes to a log file.
pub struct Proc {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(
        name: &str,
        dir: &Path,
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Proc {
        let mut cmd = Command::new(program);
        cmd.args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Proc::from_command(name, dir, cmd)
    }

    /// Starts a prepared command, e.g. one run in a network namespace
    /// ([`netns::Lab::command`]): stdin and stdout null, stderr to `dir/<name>.log`.
    pub fn from_command(name: &str, dir: &Path, mut cmd: Command) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let stderr = std::fs::File::create(&log).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot start {}: {e}", cmd.get_program().to_string_lossy())
        });
        Proc {
            name: name.to_string(),
            child,
            log,
        }
    }

    /// The process id (for reading its /proc entries).
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics (with the log) if the process has exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "{} exited with {status}; its log:\n{}",
                self.name,
                self.log_text()
            );
        }
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit on its own; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Waits until `path` exists (written atomically by the process) and returns its text.
    pub fn wait_for_file(&mut self, path: &Path, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(text) = std::fs::read_to_string(path) {
                return text;
            }
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "{} did not write {} within {timeout:?}; its log:\n{}",
                self.name,
                path.display(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a command to completion; returns (exit code, stdout, stderr).
pub fn run(program: &Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `cmd`, which must succeed (`what` names it when it does not); returns its standard
/// output.
pub fn stdout_of(cmd: &mut Command, what: &str) -> Vec<u8> {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A parsed HTTP/1.1 response.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One plain HTTP/1.1 request with `Connection: close`; the raw bytes of the answer.
pub fn http_raw(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<Vec<u8>> {
    let mut tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        tcp,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    tcp.read_to_end(&mut buf)?;
    Ok(buf)
}

/// One plain HTTP/1.1 request, parsed. Panics if the answer is not HTTP.
pub fn http(addr: SocketAddr, method: &str, path: &str) -> HttpResponse {
    let raw = http_raw(addr, method, path).unwrap_or_else(|e| panic!("{method} {addr}{path}: {e}"));
    parse_response(&raw).unwrap_or_else(|| {
        panic!(
            "{method} {addr}{path}: not an HTTP response: {:?}",
            String::from_utf8_lossy(&raw)
        )
    })
}

pub fn parse_response(raw: &[u8]) -> Option<HttpResponse> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()?
        .strip_prefix("HTTP/1.1 ")?
        .get(..3)?
        .parse()
        .ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    let body = match chunked {
        true => dechunk(body)?,
        false => body.to_string(),
    };
    Some(HttpResponse {
        status,
        headers,
        body,
    })
}

/// A chunked body's data (RFC 9112 §7.1); `None` if it is malformed or cut short.
fn dechunk(mut body: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..size)?);
        body = rest.get(size..)?.strip_prefix("\r\n")?;
    }
}

/// One HTTP/1.1 keep-alive connection, for many requests in a row.
pub struct KeepAlive {
    tcp: TcpStream,
    buf: Vec<u8>,
}

impl KeepAlive {
    pub fn connect(addr: SocketAddr) -> std::io::Result<KeepAlive> {
        let tcp = TcpStream::connect(addr)?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(KeepAlive {
            tcp,
            buf: Vec::new(),
        })
    }

    /// Sends one request and reads one response (which must carry Content-Length).
    pub fn request(&mut self, method: &str, path: &str) -> std::io::Result<HttpResponse> {
        write!(
            self.tcp,
            "{method} {path} HTTP/1.1\r\nHost: keepalive\r\n\r\n"
        )?;
        let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_string();
                let len =
                    content_length(&head).ok_or_else(|| bad("response without content-length"))?;
                let total = end + 4 + len;
                while self.buf.len() < total {
                    self.fill()?;
                }
                let raw: Vec<u8> = self.buf.drain(..total).collect();
                return parse_response(&raw).ok_or_else(|| bad("not an HTTP response"));
            }
            self.fill()?;
        }
    }

    fn fill(&mut self) -> std::io::Result<()> {
        let mut chunk = [0u8; 4096];
        let n = self.tcp.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

/// Requests at a fixed rate on a thread until stopped: one every 20 ms, each `GET
/// {prefix}{n}` on a new connection. What an app sees while its sidecar's control plane goes
/// away or moves.
pub struct FixedRate {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Tally>,
}

/// How many requests a [`FixedRate`] sent, each answer that was not a 200 (with when it
/// came, from the start), and how long it ran.
pub type Tally = (u32, Vec<(Duration, u16)>, Duration);

impl FixedRate {
    pub fn start(to: SocketAddr, prefix: &str) -> FixedRate {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (halt, prefix) = (stop.clone(), prefix.to_string());
        let thread = std::thread::spawn(move || {
            let (mut sent, mut failed) = (0u32, Vec::new());
            let start = Instant::now();
            while !halt.load(std::sync::atomic::Ordering::Relaxed) {
                let status = http(to, "GET", &format!("{prefix}{sent}")).status;
                if status != 200 {
                    failed.push((start.elapsed(), status));
                }
                sent += 1;
                let next = Duration::from_millis(20) * sent;
                std::thread::sleep(next.saturating_sub(start.elapsed()));
            }
            (sent, failed, start.elapsed())
        });
        FixedRate { stop, thread }
    }

    /// Stops, and says how it went.
    pub fn stop(self) -> Tally {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// Connects with mTLS presenting `client` and returns the serial of the server's leaf.
pub fn server_serial(
    addr: SocketAddr,
    bundle_pem: &str,
    server_id: &str,
    client: &bulkhead_identity::Svid,
) -> Result<String, String> {
    let bundle = TrustBundle::from_pem(bundle_pem).map_err(|e| e.to_string())?;
    let expected = ExpectedServer::Exact(SpiffeId::parse(server_id).map_err(|e| e.to_string())?);
    let config = client_config(Some(client), &bundle, expected, &[b"http/1.1"])
        .map_err(|e| e.to_string())?;
    let mut conn = rustls::ClientConnection::new(Arc::new(config), server_name())
        .map_err(|e| e.to_string())?;
    let mut tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).map_err(|e| e.to_string())?;
    }
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or("no server certificate")?;
    bulkhead_identity::serial_of(leaf).ok_or_else(|| "unparsable server certificate".to_string())
}

/// A certificate authority that is not the mesh's, with one SVID it issued, as PEM.
pub struct ForeignIdentity {
    pub chain_pem: String,
    pub key_pem: String,
}

pub fn foreign_identity(trust_domain: &str, id: &str) -> ForeignIdentity {
    let ca = Ca::generate(trust_domain, SystemTime::now()).unwrap();
    let svid = ca
        .issue_local(
            &SpiffeId::parse(id).unwrap(),
            Duration::from_secs(3600),
            SystemTime::now(),
        )
        .unwrap();
    let (chain_pem, key_pem) = svid.to_pem();
    ForeignIdentity { chain_pem, key_pem }
}

/// Sends one HTTP request over mTLS presenting `client` (chain and key PEM), verifying the
/// server against `bundle_pem` and `server_id`. Returns the raw answer, or the error that
/// ended the exchange.
pub fn mtls_raw(
    addr: SocketAddr,
    bundle_pem: &str,
    server_id: &str,
    client: &ForeignIdentity,
    path: &str,
) -> Result<Vec<u8>, String> {
    let svid = bulkhead_identity::Svid::from_pem(&client.chain_pem, &client.key_pem)
        .map_err(|e| e.to_string())?;
    let bundle = TrustBundle::from_pem(bundle_pem).map_err(|e| e.to_string())?;
    let expected = ExpectedServer::Exact(SpiffeId::parse(server_id).map_err(|e| e.to_string())?);
    let config =
        client_config(Some(&svid), &bundle, expected, &[b"http/1.1"]).map_err(|e| e.to_string())?;
    tls_get(config, addr, path)
}

/// One `GET path` (Connection: close) over TLS made with `config` to `addr` (server name
/// [`server_name`]): the raw answer, or the error that ended the exchange. A config rustls
/// cannot start a connection with is the test's own fault: a panic, never an `Err` a test
/// could take for a refusal.
pub fn tls_get(
    config: rustls::ClientConfig,
    addr: SocketAddr,
    path: &str,
) -> Result<Vec<u8>, String> {
    let conn = rustls::ClientConnection::new(Arc::new(config), server_name())
        .expect("a client connection from the test's config");
    let tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    write!(
        tls,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    tls.read_to_end(&mut buf).map_err(|e| e.to_string())?;
    Ok(buf)
}

/// The path of a program a test needs that is not about root (`promtool`, `bash`): `None`
/// (and a `skipped:` line) when it is missing, a panic under `BULKHEAD_STRICT=1`, where
/// `./dev/test` has installed it.
pub fn tool(test: &str, program: &str) -> Option<std::path::PathBuf> {
    if let Some(path) = netns::find_program(program) {
        return Some(path);
    }
    let needs = format!("needs {program}");
    let fix = " (./dev/test installs it on Debian)";
    cannot_run(test, &format!("it {needs}"), fix, &needs);
    None
}

/// `test` cannot run here, because `why`: a panic under `BULKHEAD_STRICT=1`, where
/// `./dev/test` has installed what the tests need (`fix` says how), else a `skipped:` line
/// that says what it `needs`.
fn cannot_run(test: &str, why: &str, fix: &str, needs: &str) {
    if std::env::var("BULKHEAD_STRICT").as_deref() == Ok("1") {
        panic!("{test} cannot run: {why}, and BULKHEAD_STRICT=1 forbids skipping{fix}");
    }
    eprintln!("skipped: {test}: {needs}");
}

/// `python3`, if it can import `module` (the SPIFFE project's client, `spiffe`): `None` (and
/// a `skipped:` line) when either is missing, a panic under `BULKHEAD_STRICT=1`, where
/// `./dev/test` has installed them.
pub fn python_with(test: &str, module: &str) -> Option<std::path::PathBuf> {
    let python = tool(test, "python3")?;
    let imports = Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success());
    if imports {
        return Some(python);
    }
    let why = format!("python3 cannot import {module}");
    let needs = format!("needs the python module {module}");
    cannot_run(test, &why, " (./dev/test installs it)", &needs);
    None
}

/// Runs `promtool check metrics` on a `/metrics` page and returns its complaints; empty
/// when the page passes (or, outside CI, when promtool is not installed).
pub fn promtool_check_metrics(test: &str, page: &str) -> String {
    use std::io::Write;
    let Some(promtool) = tool(test, "promtool") else {
        return String::new();
    };
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool starts");
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(page.as_bytes())
        .expect("promtool reads the page");
    let out = child.wait_with_output().expect("promtool finishes");
    match out.status.success() {
        true => String::new(),
        false => format!(
            "promtool check metrics exited {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// The Content-Length an HTTP head declares (its header name in any case), if it declares one.
pub fn content_length(head: &str) -> Option<usize> {
    head.lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().to_string())
        })
        .and_then(|v| v.parse().ok())
}

/// An HTTP head read from `s` a byte at a time, so that nothing after it is consumed: up to
/// and including the blank line, or what came before the connection ended or failed.
pub fn read_head(s: &mut impl Read) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// A loopback port nothing listens on now (the listener is dropped before the caller's
/// server binds it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Opens a WebSocket-style upgrade of `GET path` (Host: orders, `extra` header lines, each
/// ending in CRLF) through `to`; returns the connection and the response head.
pub fn websocket(to: SocketAddr, path: &str, extra: &str) -> (TcpStream, String) {
    let mut ws = TcpStream::connect(to).unwrap();
    ws.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    ws.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: orders\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n{extra}\r\n")
            .as_bytes(),
    )
    .unwrap();
    let head = read_head(&mut ws);
    (ws, head)
}
