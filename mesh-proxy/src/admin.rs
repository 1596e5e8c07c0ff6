//! The admin server: `/ready`, `/live`, and with a configuration `/config_dump`, `/routes`,
//! `/clusters` and `/stats`.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use mesh_routing::Action;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};

use crate::routes::Routes;

pub(crate) async fn serve(
    listener: TcpListener,
    draining: Arc<AtomicBool>,
    routes: Option<Arc<Routes>>,
    telemetry: Option<Arc<crate::telemetry::Telemetry>>,
) {
    // Each connection holds a clone: the count of clones is the count of connections.
    let open = Arc::new(());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if Arc::strong_count(&open) > crate::config::ADMIN_MAX_CONNECTIONS {
            crate::REFUSED_CONNECTIONS.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let held = open.clone();
        let (draining, routes, telemetry) = (draining.clone(), routes.clone(), telemetry.clone());
        tokio::spawn(async move {
            serve_conn(stream, draining, routes, telemetry).await;
            drop(held);
        });
    }
}

async fn serve_conn(
    stream: TcpStream,
    draining: Arc<AtomicBool>,
    routes: Option<Arc<Routes>>,
    telemetry: Option<Arc<crate::telemetry::Telemetry>>,
) {
    let service = service_fn(move |req: Request<Incoming>| {
        let draining = draining.load(Ordering::Acquire);
        let res = respond(&req, draining, routes.as_deref(), telemetry.as_deref());
        async move { Ok::<_, Infallible>(res) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(TokioIo::new(stream), service);
    let _ = conn.await;
}

const INDEX: &str = "mesh-proxy admin
  /ready        200 while serving, 503 while draining
  /live         200 while the process runs
  /config_dump  the resources the running configuration was compiled from (JSON)
  /routes       virtual hosts and routes (JSON)
  /clusters     destinations, their endpoints, labels and health (JSON)
  /stats        configuration reloads and reload failures
  /certs        the workload certificate: SPIFFE ID, expiry, rotations (JSON)
  /metrics      Istio's request metrics (Prometheus text format)
  /logging      the log filter; POST /logging?level=FILTER changes it (tracing EnvFilter syntax)
";

/// Changes the process's log filter: given a filter (`debug`, `mesh_proxy=trace,info`), the
/// filter now in force, or why it was refused.
pub type LogFilterHook = Box<dyn Fn(Option<&str>) -> Result<String, String> + Send + Sync>;

static LOG_FILTER: std::sync::OnceLock<LogFilterHook> = std::sync::OnceLock::new();

/// Lets the admin server's `/logging` read and change the log filter (the binary installs
/// its subscriber's reload handle here; a library user may install their own). Only the first
/// call takes effect.
pub fn set_log_filter_hook(hook: LogFilterHook) {
    let _ = LOG_FILTER.set(hook);
}

/// `/logging`: GET shows the filter, POST `?level=FILTER` sets it (Envoy's admin endpoint has
/// the same name and verb).
fn logging(req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let Some(hook) = LOG_FILTER.get() else {
        return text(StatusCode::NOT_FOUND, "the log filter cannot be changed in this process\n".into());
    };
    let level = req.uri().query().into_iter().flat_map(|q| q.split('&')).find_map(|p| p.strip_prefix("level="));
    let wanted = match (req.method(), level) {
        (&Method::POST, Some(level)) => match percent_decode(level) {
            Some(level) => Some(level),
            None => return text(StatusCode::BAD_REQUEST, "level: not valid percent-encoded UTF-8\n".into()),
        },
        (&Method::POST, None) => return text(StatusCode::BAD_REQUEST, "POST /logging?level=FILTER\n".into()),
        _ => None,
    };
    match hook(wanted.as_deref()) {
        Ok(now) => text(StatusCode::OK, format!("log filter: {now}\n")),
        Err(why) => text(StatusCode::BAD_REQUEST, format!("log filter refused: {why}\n")),
    }
}

/// `%XX` escapes and `+` (a space) decoded.
fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'%' => {
                let hex = [bytes.next()?, bytes.next()?];
                out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
    }
    String::from_utf8(out).ok()
}

fn respond(
    req: &Request<Incoming>,
    draining: bool,
    routes: Option<&Routes>,
    telemetry: Option<&crate::telemetry::Telemetry>,
) -> Response<Full<Bytes>> {
    if req.uri().path() == "/logging" && matches!(*req.method(), Method::GET | Method::POST) {
        return logging(req);
    }
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n".into());
    }
    let configured = |f: fn(&Routes) -> serde_json::Value| match routes {
        Some(r) => {
            let mut body = serde_json::to_string_pretty(&f(r)).unwrap_or_default();
            body.push('\n');
            let mut res = text(StatusCode::OK, body);
            res.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
            res
        }
        None => text(StatusCode::NOT_FOUND, "no configuration loaded (run with --config)\n".into()),
    };
    match req.uri().path() {
        "/live" => text(StatusCode::OK, "live\n".into()),
        "/ready" if draining => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n".into()),
        "/ready" => text(StatusCode::OK, "ready\n".into()),
        "/" => text(StatusCode::OK, INDEX.into()),
        "/config_dump" => configured(config_dump),
        "/routes" => configured(route_dump),
        "/clusters" => configured(cluster_dump),
        "/certs" => configured(cert_dump),
        "/metrics" => match telemetry {
            Some(t) => {
                let mut res = text(StatusCode::OK, t.encode());
                res.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static(mesh_telemetry::metrics::CONTENT_TYPE),
                );
                res
            }
            None => text(StatusCode::NOT_FOUND, "no configuration loaded (run with --config)\n".into()),
        },
        "/stats" => match routes {
            Some(r) => {
                let mut out = format!(
                    "config_reloads {}\nconfig_reload_failures {}\n",
                    r.reloads.load(Ordering::Relaxed),
                    r.reload_failures.load(Ordering::Relaxed)
                );
                // Envoy's local rate limit counters.
                if let Some(limit) = r.rate_limit() {
                    let stats = limit.limiter().stats();
                    for (name, counter) in [
                        ("enabled", &stats.enabled),
                        ("ok", &stats.ok),
                        ("rate_limited", &stats.rate_limited),
                        ("enforced", &stats.enforced),
                    ] {
                        out.push_str(&format!("http_local_rate_limit.{name} {}\n", counter.load(Ordering::Relaxed)));
                    }
                }
                out.push_str(&overload_stats());
                // Envoy's names for the TLS inspector's and the listener's counters.
                out.push_str(&format!(
                    "inbound.plaintext_refused {}\ninbound.ssl.handshake_error {}\n",
                    crate::INBOUND_PLAINTEXT_REFUSED.load(Ordering::Relaxed),
                    crate::INBOUND_HANDSHAKE_FAILURES.load(Ordering::Relaxed)
                ));
                if let Some(log) = telemetry.and_then(|t| t.access_log.as_ref()) {
                    out.push_str(&format!("access_log.dropped {}\n", log.dropped()));
                }
                if let Some(identity) = &r.config().identity {
                    let status = identity.status();
                    let left = status.not_after.duration_since(std::time::SystemTime::now()).map_or(0, |d| d.as_secs());
                    out.push_str(&format!(
                        "workload_cert.seconds_until_expiry {left}\nworkload_cert.rotations {}\nworkload_cert.rotation_failures {}\n",
                        status.reloads, status.failures
                    ));
                }
                text(StatusCode::OK, out)
            }
            None => text(StatusCode::OK, format!("config_reloads 0\nconfig_reload_failures 0\n{}", overload_stats())),
        },
        _ => text(StatusCode::NOT_FOUND, "not found; try /\n".into()),
    }
}

/// Counters of the defences against hostile clients.
fn overload_stats() -> String {
    format!(
        "h2_premature_reset_goaways {}\ndownstream_cx_overflow {}\n",
        crate::h2server::PREMATURE_RESET_GOAWAYS.load(Ordering::Relaxed),
        crate::REFUSED_CONNECTIONS.load(Ordering::Relaxed)
    )
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from(body)));
    *res.status_mut() = status;
    res.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain"));
    res
}

fn cert_dump(routes: &Routes) -> serde_json::Value {
    let Some(identity) = &routes.config().identity else { return json!({ "identity": null }) };
    let status = identity.status();
    let unix = |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let left = |t: std::time::SystemTime| t.duration_since(std::time::SystemTime::now()).map_or(0, |d| d.as_secs());
    json!({
        "identity": status.id.as_str(),
        "not_after": unix(status.not_after),
        "seconds_until_expiry": left(status.not_after),
        "bundle_not_after": status.bundle_not_after.map(unix),
        "rotations": status.reloads,
        "rotation_failures": status.failures,
        "last_rotation_error": status.last_error,
        "inbound_mtls_mode": format!("{:?}", routes.snapshot().security.mode).to_uppercase(),
    })
}

fn config_dump(routes: &Routes) -> serde_json::Value {
    let snapshot = routes.snapshot();
    json!({ "resources": &snapshot.resources, "notes": &snapshot.notes })
}

fn route_dump(routes: &Routes) -> serde_json::Value {
    let snapshot = routes.snapshot();
    let hosts: Vec<_> = snapshot
        .table
        .virtual_hosts()
        .map(|(name, domains, routes)| {
            let routes: Vec<_> = routes
                .iter()
                .map(|r| {
                    let action = match r.action() {
                        Action::Forward(split) => json!({
                            "forward": split.targets().iter().map(|t| json!({
                                "cluster": t.key().to_string(), "weight": t.weight(),
                            })).collect::<Vec<_>>(),
                        }),
                        Action::Redirect(_) => json!("redirect"),
                        Action::Direct(_) => json!("directResponse"),
                        _ => json!("other"),
                    };
                    let retry = r.retry_policy();
                    let retries = match retry.retries() {
                        u32::MAX => json!("until the budget refuses"),
                        n => json!(n),
                    };
                    json!({
                        "name": &**r.name(),
                        "condition": r.condition().map(ToString::to_string),
                        "action": action,
                        "timeout": r.timeout().map(|t| format!("{t:?}")),
                        "retries": {
                            "retries": retries,
                            "retryOn": retry.retry_on().to_string(),
                            "perTryTimeout": retry.per_try_timeout().map(|t| format!("{t:?}")),
                        },
                    })
                })
                .collect();
            json!({ "name": name, "domains": domains, "routes": routes })
        })
        .collect();
    json!({ "virtualHosts": hosts })
}

fn cluster_dump(routes: &Routes) -> serde_json::Value {
    let snapshot = routes.snapshot();
    let pooled = routes.pooled();
    let mut clusters: Vec<_> = snapshot.clusters.values().collect();
    clusters.sort_by(|a, b| a.key.cmp(&b.key));
    let clusters: Vec<_> = clusters
        .into_iter()
        .map(|c| {
            let outlier = c.outlier.as_ref().map(|d| d.status()).unwrap_or_default();
            let endpoints: Vec<_> = c
                .balancer
                .endpoints()
                .iter()
                .map(|e| {
                    let status = outlier.iter().find(|s| s.address == *e.address());
                    json!({
                        "address": &**e.address(),
                        "labels": e.labels(),
                        "weight": e.weight(),
                        "health": if status.is_some_and(|s| s.ejected) { "ejected" } else { "healthy" },
                        "timesEjected": status.map(|s| s.times_ejected),
                        "successRate": status.and_then(|s| s.success_rate),
                        "activeRequests": c.balancer.active_requests(e.address()),
                        "pooled": pooled.contains(e.address()),
                    })
                })
                .collect();
            json!({
                "name": c.key.to_string(),
                "policy": format!("{:?}", c.balancer.policy()),
                "retryBudget": c.retry_budget.as_ref().map(|b| format!("{b:?}")),
                "circuitBreaker": c.breaker.as_ref().map(|b| json!({
                    "maxConnections": b.limits().max_connections,
                    "maxPendingRequests": b.limits().max_pending,
                    "maxRequests": b.limits().max_requests,
                    "requests": b.requests(),
                    "pending": b.pending(),
                    "overflows": b.overflows(),
                })),
                "outlierDetection": c.outlier.as_ref().map(|d| json!({
                    "ejected": d.ejected(),
                    "panic": d.in_panic(d.ejected()),
                })),
                "endpoints": endpoints,
            })
        })
        .collect();
    json!({ "clusters": clusters })
}
