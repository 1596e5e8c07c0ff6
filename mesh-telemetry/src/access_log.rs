//! Access logs: one JSON line per request with the fields of Istio's JSON access log (Envoy's
//! default format's), plus the trace id and the peer's identity, written by a thread of its
//! own. A request never waits for the log: when the writer falls behind, lines are dropped
//! and counted ([`AccessLog::dropped`]).
//!
//! ```
//! use mesh_telemetry::access_log::{AccessLog, Entry};
//!
//! let (log, lines) = AccessLog::to_memory(16);
//! let mut entry = Entry::new("GET", "/reviews/1", "HTTP/1.1");
//! entry.response_code = 200;
//! log.log(Box::new(entry));
//! log.flush();
//! let line = lines.lock().unwrap().pop().unwrap();
//! assert!(line.contains(r#""method":"GET""#) && line.contains(r#""response_flags":"-""#));
//! ```

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use mesh_core::ResponseFlags;

/// One request, as logged.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Entry {
    /// When the request started.
    pub start_time: SystemTime,
    /// `:method`.
    pub method: String,
    /// The path (with the query, as Envoy logs it).
    pub path: String,
    /// `HTTP/1.1`, `HTTP/2`.
    pub protocol: &'static str,
    /// The status sent (0: none).
    pub response_code: u16,
    /// The response flags.
    pub response_flags: ResponseFlags,
    /// Request body bytes.
    pub bytes_received: u64,
    /// Response body bytes.
    pub bytes_sent: u64,
    /// From the request to the end of the response.
    pub duration: Duration,
    /// The endpoint that answered.
    pub upstream_host: Option<Arc<str>>,
    /// `x-request-id`.
    pub request_id: Option<Arc<str>>,
    /// `:authority`.
    pub authority: Option<String>,
    /// `user-agent`.
    pub user_agent: Option<String>,
    /// `x-forwarded-for`.
    pub x_forwarded_for: Option<String>,
    /// The trace id (32 hex digits).
    pub trace_id: Option<String>,
    /// The peer's SPIFFE ID (mTLS).
    pub peer_identity: Option<String>,
    /// The client's address.
    pub downstream_remote_address: Option<SocketAddr>,
    /// The local address the request arrived on.
    pub downstream_local_address: Option<SocketAddr>,
}

impl Entry {
    /// An entry for a request line, starting now.
    pub fn new(method: &str, path: &str, protocol: &'static str) -> Self {
        Self {
            start_time: SystemTime::now(),
            method: method.into(),
            path: path.into(),
            protocol,
            response_code: 0,
            response_flags: ResponseFlags::empty(),
            bytes_received: 0,
            bytes_sent: 0,
            duration: Duration::ZERO,
            upstream_host: None,
            request_id: None,
            authority: None,
            user_agent: None,
            x_forwarded_for: None,
            trace_id: None,
            peer_identity: None,
            downstream_remote_address: None,
            downstream_local_address: None,
        }
    }

    /// The JSON line (without the newline), keys as Istio's JSON access log names them;
    /// absent values are `null`, as Envoy writes `-` for them in text.
    pub fn to_json(&self) -> String {
        let mut out = Vec::with_capacity(512);
        self.write_json(&mut out).expect("writing to memory");
        String::from_utf8(out).expect("JSON is UTF-8")
    }

    /// Writes the JSON line (without the newline) to `out`: Istio's field names, in order.
    pub fn write_json(&self, out: &mut impl Write) -> std::io::Result<()> {
        let flags = if self.response_flags.is_empty() {
            "-".to_owned()
        } else {
            self.response_flags.names().collect::<Vec<_>>().join(",")
        };
        let line = Line {
            start_time: rfc3339(self.start_time),
            method: &self.method,
            path: &self.path,
            protocol: self.protocol,
            response_code: self.response_code,
            response_flags: flags,
            bytes_received: self.bytes_received,
            bytes_sent: self.bytes_sent,
            duration: self.duration.as_millis() as u64,
            upstream_host: self.upstream_host.as_deref(),
            x_forwarded_for: self.x_forwarded_for.as_deref(),
            user_agent: self.user_agent.as_deref(),
            request_id: self.request_id.as_deref(),
            authority: self.authority.as_deref(),
            trace_id: self.trace_id.as_deref(),
            downstream_peer_uri_san: self.peer_identity.as_deref(),
            downstream_remote_address: self.downstream_remote_address,
            downstream_local_address: self.downstream_local_address,
        };
        serde_json::to_writer(out, &line).map_err(std::io::Error::other)
    }
}

/// An entry as its JSON line has it.
#[derive(serde::Serialize)]
struct Line<'a> {
    start_time: String,
    method: &'a str,
    path: &'a str,
    protocol: &'a str,
    response_code: u16,
    response_flags: String,
    bytes_received: u64,
    bytes_sent: u64,
    duration: u64,
    upstream_host: Option<&'a str>,
    x_forwarded_for: Option<&'a str>,
    user_agent: Option<&'a str>,
    request_id: Option<&'a str>,
    authority: Option<&'a str>,
    trace_id: Option<&'a str>,
    downstream_peer_uri_san: Option<&'a str>,
    downstream_remote_address: Option<SocketAddr>,
    downstream_local_address: Option<SocketAddr>,
}

/// `2026-12-04T06:52:14.123Z` (UTC, milliseconds), as Envoy's `%START_TIME%`.
fn rfc3339(t: SystemTime) -> String {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// How long the writer waits after a batch before taking the next: lines reach the output
/// at most this late (plus the time to write them).
const BATCH_PAUSE: Duration = Duration::from_millis(5);

enum Message {
    Line(Box<Entry>),
    Flush(SyncSender<()>),
}

/// A non-blocking access log writer. Clones share it.
#[derive(Clone, Debug)]
pub struct AccessLog {
    tx: SyncSender<Message>,
    dropped: Arc<AtomicU64>,
    /// Requests logged, in parts per million.
    sampling_ppm: u32,
    random: Arc<mesh_core::random::Random>,
}

impl AccessLog {
    /// Writes lines to `out` from a thread of its own; at most `capacity` lines wait.
    pub fn to_writer(out: impl Write + Send + 'static, capacity: usize) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Message>(capacity.max(1));
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
                while let Ok(msg) = rx.recv() {
                    let mut next = Some(msg);
                    // Write what is queued, then flush once.
                    while let Some(msg) = next.take() {
                        match msg {
                            Message::Line(entry) => {
                                let _ = entry.write_json(&mut out);
                                let _ = out.write_all(b"\n");
                            }
                            Message::Flush(done) => {
                                let _ = out.flush();
                                let _ = done.send(());
                            }
                        }
                        next = rx.try_recv().ok();
                    }
                    let _ = out.flush();
                    // Let lines gather before the next batch: a request then only queues
                    // its entry, where waking a parked writer per line would cost it a
                    // system call (the queue holds far more than this pause brings).
                    std::thread::sleep(BATCH_PAUSE);
                }
            })
            .expect("spawn the access log thread");
        Self {
            tx,
            dropped: Arc::default(),
            sampling_ppm: 1_000_000,
            random: Arc::new(mesh_core::random::Random::from_entropy()),
        }
    }

    /// Writes to standard output.
    pub fn to_stdout(capacity: usize) -> Self {
        Self::to_writer(std::io::stdout(), capacity)
    }

    /// Keeps lines in memory (for tests).
    pub fn to_memory(capacity: usize) -> (Self, Arc<Mutex<Vec<String>>>) {
        struct Lines(Arc<Mutex<Vec<String>>>, Vec<u8>);
        impl Write for Lines {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.1.extend_from_slice(buf);
                while let Some(i) = self.1.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = self.1.drain(..=i).collect();
                    self.0
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(String::from_utf8_lossy(&line[..i]).into_owned());
                }
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let lines = Arc::new(Mutex::new(Vec::new()));
        (Self::to_writer(Lines(lines.clone(), Vec::new()), capacity), lines)
    }

    /// Logs only this share of requests (Telemetry's access-log sampling), 0–100.
    pub fn sampling_percentage(mut self, percent: f64) -> Self {
        self.sampling_ppm = (percent.clamp(0.0, 100.0) * 10_000.0).round() as u32;
        self
    }

    /// Whether the next request is to be logged (the sampling decision).
    pub fn sampled(&self) -> bool {
        self.sampling_ppm >= 1_000_000 || self.random.below(1_000_000) < u64::from(self.sampling_ppm)
    }

    /// Queues `entry`'s line, or drops and counts it when the writer is behind.
    pub fn log(&self, entry: Box<Entry>) {
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.tx.try_send(Message::Line(entry)) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Lines dropped because the writer was behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Waits until every line queued so far is written.
    pub fn flush(&self) {
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        if self.tx.send(Message::Flush(done)).is_ok() {
            let _ = wait.recv();
        }
    }
}
