//! Access log lines and the writer that never blocks a request.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime};

use mesh_core::ResponseFlags;
use mesh_telemetry::access_log::{AccessLog, Entry};

#[test]
fn a_line_has_istios_fields_and_the_trace_and_peer() {
    let mut e = Entry::new("POST", "/api/orders?x=1", "HTTP/2");
    e.start_time = SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_831_134_123);
    e.response_code = 503;
    e.response_flags = ResponseFlags::UPSTREAM_CONNECTION_FAILURE | ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED;
    e.bytes_received = 12;
    e.bytes_sent = 19;
    e.duration = Duration::from_millis(250);
    e.upstream_host = Some("10.0.0.7:8080".into());
    e.request_id = Some("8f1c0c4e-5d5a-4c6e-9b0a-2f7c8f1d9e3a".into());
    e.authority = Some("orders".into());
    e.trace_id = Some("4bf92f3577b34da6a3ce929d0e0e4736".into());
    e.peer_identity = Some("spiffe://cluster.local/ns/shop/sa/frontend".into());
    let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
    assert_eq!(v["start_time"], "2025-12-04T06:52:14.123Z");
    assert_eq!(v["method"], "POST");
    assert_eq!(v["path"], "/api/orders?x=1");
    assert_eq!(v["protocol"], "HTTP/2");
    assert_eq!(v["response_code"], 503);
    assert_eq!(v["response_flags"], "UF,URX");
    assert_eq!(
        (v["bytes_received"].as_u64(), v["bytes_sent"].as_u64(), v["duration"].as_u64()),
        (Some(12), Some(19), Some(250))
    );
    assert_eq!(v["upstream_host"], "10.0.0.7:8080");
    assert_eq!(v["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(v["downstream_peer_uri_san"], "spiffe://cluster.local/ns/shop/sa/frontend");
    assert!(v["user_agent"].is_null());
}

/// A sink that blocks until released.
#[derive(Clone)]
struct Gate(Arc<(Mutex<bool>, Condvar)>, Arc<Mutex<Vec<u8>>>);

impl Write for Gate {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let (open, cv) = &*self.0;
        let mut open = open.lock().unwrap();
        while !*open {
            open = cv.wait(open).unwrap();
        }
        self.1.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_stalled_writer_drops_and_counts_instead_of_blocking() {
    let gate = Gate(Arc::new((Mutex::new(false), Condvar::new())), Arc::default());
    let log = AccessLog::to_writer(gate.clone(), 4);
    let entry = Entry::new("GET", "/", "HTTP/1.1");
    for _ in 0..100 {
        log.log(Box::new(entry.clone()));
    }
    // Every call returned while the sink was stalled. What got through: the channel's 4,
    // and what the writer took into its 8 KiB buffer before the sink stopped it (lines of
    // about 400 bytes: some 20).
    let dropped = log.dropped();
    assert!((70..=96).contains(&dropped), "{dropped}");
    *gate.0.0.lock().unwrap() = true;
    gate.0.1.notify_all();
    log.flush();
    let written = String::from_utf8(gate.1.lock().unwrap().clone()).unwrap();
    assert_eq!(written.lines().count() as u64, 100 - dropped);
}

#[test]
fn sampling_logs_a_share() {
    let (none, _) = AccessLog::to_memory(1);
    let none = none.sampling_percentage(0.0);
    assert!((0..1000).all(|_| !none.sampled()));
    let (all, _) = AccessLog::to_memory(1);
    assert!((0..1000).all(|_| all.sampled()));
}
