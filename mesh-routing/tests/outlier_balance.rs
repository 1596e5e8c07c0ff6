//! Outlier detection as a library user wires it: a `Balance` whose health view is an
//! `OutlierDetector`, each endpoint's service wrapped in the detector's `MonitorLayer`, with
//! retries on top. The failing endpoint is ejected and then gets no traffic.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use mesh_resilience::outlier::{MonitorLayer, OutlierConfig, OutlierDetector};
use mesh_resilience::retry::{ReplayBody, RetryLayer, RetryPolicy};
use mesh_routing::balance::{Balance, Balancer, Endpoint, LbPolicy};
use mesh_routing::random::Random;
use tower::{Layer, ServiceExt, service_fn};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::test(start_paused = true)]
async fn an_ejected_endpoint_gets_no_traffic_until_it_returns() {
    let endpoints = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"].map(Endpoint::new).to_vec();
    let mut config = OutlierConfig::default();
    config.consecutive_5xx = 3;
    config.max_ejection_percent = 50;
    config.interval = Duration::from_secs(1);
    config.base_ejection_time = Duration::from_secs(10);
    let detector = OutlierDetector::new(config).unwrap();
    detector.set_hosts(endpoints.iter().map(|e| e.address().clone()));
    let seen: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();

    let balancer = Balancer::new(LbPolicy::RoundRobin, endpoints).unwrap().with_random(Arc::new(Random::seeded(3)));
    let (d, log) = (detector.clone(), seen.clone());
    let balance = Balance::new(balancer, move |e: &Endpoint| {
        let (address, log) = (e.address().to_string(), log.clone());
        let svc = service_fn(move |_req: Request<ReplayBody<Full<Bytes>>>| {
            *log.lock().unwrap().entry(address.clone()).or_default() += 1;
            let failing = address == "10.0.0.3:80";
            async move {
                let mut res = Response::new(Full::new(Bytes::new()));
                if failing {
                    *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                }
                Ok::<_, BoxError>(res)
            }
        });
        MonitorLayer::new(d.monitor(e.address()).expect("watched")).layer(svc)
    })
    .with_health(Arc::new(detector.clone()));
    let svc = RetryLayer::new(RetryPolicy::new(2, "5xx".parse().unwrap())).layer(balance);

    for _ in 0..30 {
        let res = svc.clone().oneshot(Request::new(Full::new(Bytes::new()))).await.unwrap();
        assert_eq!(res.status(), 200, "retries elsewhere cover the failing endpoint");
    }
    assert_eq!(detector.ejected(), 1);
    let before = seen.lock().unwrap()["10.0.0.3:80"];
    assert_eq!(before, 3, "ejected at its third 503");
    for _ in 0..30 {
        let res = svc.clone().oneshot(Request::new(Full::new(Bytes::new()))).await.unwrap();
        assert_eq!(res.status(), 200);
    }
    assert_eq!(seen.lock().unwrap()["10.0.0.3:80"], before, "nothing while ejected");
    // Back after the ejection time (on the next tick): it gets traffic again.
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(detector.ejected(), 0);
    for _ in 0..3 {
        let _ = svc.clone().oneshot(Request::new(Full::new(Bytes::new()))).await.unwrap();
    }
    assert!(seen.lock().unwrap()["10.0.0.3:80"] > before);
}
