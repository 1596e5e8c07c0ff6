//! Istio's metrics from a running mesh-proxy, read by the real Prometheus tools (Debian's
//! `prometheus` package; CI installs it and sets `MESH_REQUIRE_PROMTOOL`): a Prometheus
//! server on loopback scrapes the admin server's `/metrics` and answers `istio_requests_total`
//! through its HTTP API, with the mesh's alert rules (`deploy/prometheus/mesh-alerts.yaml`)
//! loaded; and `promtool test rules` fires those alerts on the label sets the proxy produced,
//! at the rates it measured.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use support::*;
use tokio::net::TcpListener;

/// `/ok` 200, `/fail` 503, `/slow` 200 after 1.1 s.
async fn workload() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let status = match req.uri().path() {
                        "/fail" => 503,
                        "/slow" => {
                            tokio::time::sleep(Duration::from_millis(1100)).await;
                            200
                        }
                        _ => 200,
                    };
                    Ok::<_, Infallible>(Response::builder().status(status).body(Full::new(Bytes::from("x"))).unwrap())
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    addr
}

fn rules_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus/mesh-alerts.yaml")
}

/// Whether the Prometheus tools are here (required in CI).
fn have(tool: &str) -> bool {
    let found = Command::new(tool).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
    if !found {
        assert!(std::env::var_os("MESH_REQUIRE_PROMTOOL").is_none(), "{tool} is required but missing");
        eprintln!("SKIPPED: {tool} not installed");
    }
    found
}

/// The proxy in front of `reviews` (namespace `shop`), after 30 fast 200s, 4 503s and 6
/// slow 200s through its inbound listener: 10 % errors, 15 % slower than a second.
async fn proxy_with_traffic(name: &str) -> Proxy {
    let app = workload().await;
    let dir = config_dir(name);
    let text = format!(
        "apiVersion: proxy.mesh.dev/v1alpha1\nkind: MeshProxy\nmetadata: {{name: reviews}}\nspec:\n  workload: {{name: reviews, namespace: shop, labels: {{app: reviews}}}}\n  inbound: {{listen: \"127.0.0.1:0\", app: \"{app}\"}}\n"
    );
    std::fs::write(dir.join("proxy.yaml"), text).unwrap();
    let proxy = Proxy::start(&dir);
    let inbound = proxy.inbound.unwrap();
    let mut client = Client::connect(inbound).await;
    for _ in 0..30 {
        assert_eq!(client.get("reviews", "/ok", &[]).await.0, StatusCode::OK);
    }
    for _ in 0..4 {
        assert_eq!(client.get("reviews", "/fail", &[]).await.0, StatusCode::SERVICE_UNAVAILABLE);
    }
    let slow: Vec<_> = (0..6)
        .map(|_| tokio::spawn(async move { Client::connect(inbound).await.get("reviews", "/slow", &[]).await.0 }))
        .collect();
    for s in slow {
        assert_eq!(s.await.unwrap(), StatusCode::OK);
    }
    proxy
}

/// A free loopback port (bound, then released for the server that takes it).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.ok()?;
    tokio::spawn(conn);
    let req = Request::get(path).header("host", "prometheus").body(http_body_util::Empty::<Bytes>::new()).unwrap();
    let res = tx.send_request(req).await.ok()?;
    let body = http_body_util::BodyExt::collect(res.into_body()).await.ok()?.to_bytes();
    Some(String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prometheus_server_scrapes_the_proxy_and_answers_istio_requests_total() {
    if !have("prometheus") {
        return;
    }
    let proxy = proxy_with_traffic("prometheus-scrape").await;
    let dir = config_dir("prometheus-server");
    let config = format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: [\"{}\"]\nscrape_configs:\n- job_name: mesh-proxy\n  metrics_path: /metrics\n  static_configs: [{{targets: [\"{}\"]}}]\n",
        rules_file().display(),
        proxy.admin
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let web = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut server = Command::new("prometheus")
        .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
        .spawn()
        .unwrap();
    // Up to 30 s for the server to start, scrape and answer.
    let mut answer = None;
    for _ in 0..300 {
        if let Some(body) = http_get(web, "/api/v1/query?query=istio_requests_total").await {
            let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            if json["data"]["result"].as_array().is_some_and(|r| !r.is_empty()) {
                answer = Some(json);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rules = http_get(web, "/api/v1/rules").await.unwrap_or_default();
    let _ = server.kill();
    let _ = server.wait();
    let log = std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default();
    let answer = answer.unwrap_or_else(|| panic!("Prometheus never had istio_requests_total; its log:\n{log}"));
    let results = answer["data"]["result"].as_array().unwrap();
    let count = |code: &str| -> f64 {
        results
            .iter()
            .filter(|r| r["metric"]["response_code"] == code)
            .map(|r| {
                assert_eq!(r["metric"]["reporter"], "destination");
                assert_eq!(r["metric"]["destination_workload"], "reviews");
                assert_eq!(r["metric"]["destination_workload_namespace"], "shop");
                assert_eq!(r["metric"]["job"], "mesh-proxy");
                r["value"][1].as_str().unwrap().parse::<f64>().unwrap()
            })
            .sum()
    };
    assert_eq!((count("200"), count("503")), (36.0, 4.0), "{answer}");
    // The alert rules loaded and evaluate without error.
    let rules: serde_json::Value = serde_json::from_str(&rules).unwrap();
    let loaded: Vec<(&str, &str)> = rules["data"]["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["name"].as_str().unwrap(), r["health"].as_str().unwrap()))
        .collect();
    assert_eq!(loaded.len(), 2, "{rules}");
    assert!(loaded.iter().all(|(_, health)| *health == "ok" || *health == "unknown"), "{rules}");
}

/// The exposition's series of `metric` (with the reporter given), as `promtool` input: the
/// label set as the proxy wrote it, growing by the count it reported every minute.
fn input_series(exposition: &str, metric: &str) -> Vec<String> {
    exposition
        .lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")) && l.contains("reporter=\"destination\""))
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            let value: f64 = value.parse().unwrap();
            format!("      - series: '{series}'\n        values: '0+{value}x15'\n")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alert_rules_fire_on_the_series_the_proxy_produced() {
    if !have("promtool") {
        return;
    }
    let proxy = proxy_with_traffic("prometheus-rules").await;
    let exposition = admin(proxy.admin, "/metrics").await;
    // The proxy's own series sit beside Istio's, and promtool accepts the whole page.
    assert_eq!(metric(proxy.admin, "mesh_requests_in_flight").await, 0.0);
    assert!(exposition.contains("mesh_config_reloads_total 0"), "{exposition}");
    assert!(exposition.contains("# TYPE mesh_requests_in_flight gauge"), "{exposition}");
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut check.stdin.take().unwrap(), exposition.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // The one lint allowed: Istio's own metric name, in milliseconds as its dashboards need.
    assert!(
        out.status.success()
            || report
                .lines()
                .filter(|l| !l.trim().is_empty())
                .all(|l| l.contains("istio_request_duration_milliseconds")),
        "promtool check metrics: {report}"
    );
    let mut series = input_series(&exposition, "istio_requests_total");
    assert!(series.len() >= 2, "{exposition}");
    series.extend(input_series(&exposition, "istio_request_duration_milliseconds_bucket"));
    let labels = "destination_workload: reviews\n              destination_workload_namespace: shop";
    let test = format!(
        r#"rule_files: ["{rules}"]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
{series}    alert_rule_test:
      # Not yet: the conditions must hold for 5 minutes.
      - eval_time: 3m
        alertname: MeshWorkloadHighErrorRate
        exp_alerts: []
      - eval_time: 10m
        alertname: MeshWorkloadHighErrorRate
        exp_alerts:
          - exp_labels:
              severity: critical
              {labels}
            exp_annotations:
              summary: "reviews.shop: 10% of requests fail with 5xx"
      - eval_time: 10m
        alertname: MeshWorkloadHighLatency
        exp_alerts:
          - exp_labels:
              severity: warning
              {labels}
            exp_annotations:
              summary: "reviews.shop: p95 latency {p95} ms"
"#,
        rules = rules_file().display(),
        series = series.concat(),
        p95 = p95(&exposition),
    );
    let dir = config_dir("prometheus-rules-test");
    std::fs::write(dir.join("test.yaml"), &test).unwrap();
    let out = Command::new("promtool").args(["test", "rules"]).arg(dir.join("test.yaml")).output().unwrap();
    assert!(
        out.status.success(),
        "promtool test rules:\n{}{}\n{test}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The 95th percentile `histogram_quantile` computes from the proxy's buckets: linear within
/// the bucket the rank falls in.
fn p95(exposition: &str) -> String {
    let mut buckets: Vec<(f64, f64)> = exposition
        .lines()
        .filter(|l| {
            l.starts_with("istio_request_duration_milliseconds_bucket{") && l.contains("reporter=\"destination\"")
        })
        .map(|l| {
            let le = l.split("le=\"").nth(1).unwrap().split('"').next().unwrap();
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap() };
            (le, l.rsplit_once(' ').unwrap().1.parse().unwrap())
        })
        .fold(Vec::new(), |mut acc: Vec<(f64, f64)>, (le, n)| {
            match acc.iter_mut().find(|(b, _)| *b == le) {
                Some(slot) => slot.1 += n,
                None => acc.push((le, n)),
            }
            acc
        });
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last().unwrap().1;
    let rank = 0.95 * total;
    let i = buckets.iter().position(|(_, n)| *n >= rank).unwrap();
    let (lower, below) = if i == 0 { (0.0, 0.0) } else { buckets[i - 1] };
    let (upper, count) = buckets[i];
    let value = lower + (upper - lower) * (rank - below) / (count - below);
    format!("{value:.0}")
}
