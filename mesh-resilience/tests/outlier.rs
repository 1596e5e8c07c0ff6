//! SEMANTICS.md Appendix A, vectors 19–23 (outlier detection), on paused time, with the
//! ejection bound as a property and the per-endpoint monitor layer over real services.

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use mesh_core::classify::Failure;
use mesh_resilience::outlier::{
    EjectionReason, FailurePercentage, HostMonitor, OutlierConfig, OutlierDetector, OutlierEvent, SuccessRate,
};
use proptest::prelude::*;

fn hosts(n: usize) -> Vec<Arc<str>> {
    (0..n).map(|i| Arc::from(format!("10.0.0.{i}:80"))).collect()
}

fn detector(n: usize, config: OutlierConfig) -> (OutlierDetector, Vec<HostMonitor>) {
    let d = OutlierDetector::new(config).unwrap();
    let hosts = hosts(n);
    d.set_hosts(hosts.clone());
    let monitors = hosts.iter().map(|h| d.monitor(h).unwrap()).collect();
    (d, monitors)
}

fn status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap()
}

fn config(f: impl FnOnce(&mut OutlierConfig)) -> OutlierConfig {
    let mut c = OutlierConfig::default();
    f(&mut c);
    c
}

#[tokio::test(start_paused = true)]
async fn v19_third_error_ejects_and_a_second_ejection_overflows_10_percent() {
    let (d, m) = detector(10, config(|c| c.consecutive_5xx = 3));
    let mut events = d.subscribe();
    for code in [503, 500] {
        m[0].record_status(status(code));
        assert!(!m[0].is_ejected());
    }
    m[0].record_status(status(502));
    assert!(m[0].is_ejected(), "ejected at the third");
    assert!(matches!(
        events.recv().await.unwrap(),
        OutlierEvent::Ejected { reason: EjectionReason::Consecutive5xx, times: 1, .. }
    ));
    for _ in 0..3 {
        m[1].record_status(status(500));
    }
    assert!(!m[1].is_ejected(), "20 % > 10 %");
    assert!(matches!(events.recv().await.unwrap(), OutlierEvent::Overflow { .. }));
    assert_eq!(d.ejected(), 1);
}

#[tokio::test(start_paused = true)]
async fn v20_five_hosts_at_the_default_10_percent_never_eject() {
    let (d, m) = detector(5, OutlierConfig::default());
    for _ in 0..50 {
        m[2].record_status(status(503));
    }
    assert_eq!(d.ejected(), 0);
    // The switch that lets small clusters eject one.
    let (d, m) = detector(5, config(|c| c.always_eject_one = true));
    for _ in 0..5 {
        m[2].record_status(status(503));
    }
    assert_eq!(d.ejected(), 1);
    for _ in 0..5 {
        m[3].record_status(status(503));
    }
    assert_eq!(d.ejected(), 1, "one, not two");
    // The rounding rule: 3 hosts need 34 % to eject one and 67 % to eject two.
    for (pct, most) in [(33, 0), (34, 1), (66, 1), (67, 2), (100, 3)] {
        let (d, m) = detector(3, config(|c| c.max_ejection_percent = pct));
        for host in &m {
            for _ in 0..5 {
                host.record_status(status(500));
            }
        }
        assert_eq!(d.ejected(), most, "{pct} %");
    }
}

#[tokio::test(start_paused = true)]
async fn v21_a_500_resets_the_gateway_run_but_not_the_5xx_run() {
    let (d, m) = detector(
        2,
        config(|c| {
            c.consecutive_gateway = 2;
            c.consecutive_5xx = 4;
            c.max_ejection_percent = 100;
        }),
    );
    let mut events = d.subscribe();
    for code in [502, 500, 502] {
        m[0].record_status(status(code));
    }
    // Gateway run 1, 5xx run 3: nothing yet.
    assert!(!m[0].is_ejected());
    m[0].record_status(status(504));
    assert!(matches!(
        events.recv().await.unwrap(),
        OutlierEvent::Ejected { reason: EjectionReason::ConsecutiveGateway, .. }
    ));
    // A success resets both.
    for code in [500, 500, 500, 200, 500] {
        m[1].record_status(status(code));
    }
    assert!(!m[1].is_ejected());
}

#[tokio::test(start_paused = true)]
async fn v22_ejections_end_on_ticks_double_when_repeated_and_decay() {
    let (d, m) = detector(
        2,
        config(|c| {
            c.consecutive_5xx = 1;
            c.max_ejection_percent = 100;
            c.interval = Duration::from_secs(10);
            c.base_ejection_time = Duration::from_secs(30);
        }),
    );
    let start = tokio::time::Instant::now();
    let mut events = d.subscribe();
    m[0].record_status(status(500));
    assert!(m[0].is_ejected());
    let _ejected = events.recv().await.unwrap();
    // Ticks at 10, 20, 30 s: back at the first tick at least 30 s after.
    let back = events.recv().await.unwrap();
    assert!(matches!(back, OutlierEvent::Returned { .. }));
    assert_eq!(start.elapsed(), Duration::from_secs(30));
    // Ejected again at once, before any decay: 60 s.
    m[0].record_status(status(500));
    match events.recv().await.unwrap() {
        OutlierEvent::Ejected { times, duration, .. } => {
            assert_eq!((times, duration), (2, Duration::from_secs(60)));
        }
        other => panic!("{other:?}"),
    }
    let _back = events.recv().await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(90));
    // Back at 90 s with back-off 2. The tick at 100 s decrements it (to 1), the one at 110 s
    // too (to 0): an ejection at 111 s lasts the base again.
    tokio::time::sleep(Duration::from_secs(21)).await;
    m[0].record_status(status(500));
    match events.recv().await.unwrap() {
        OutlierEvent::Ejected { times, duration, .. } => {
            assert_eq!((times, duration), (3, Duration::from_secs(30)));
        }
        other => panic!("{other:?}"),
    }
    // Only one tick of decay (back-off 2 -> 1 at 100 s) before an ejection at 101 s: that
    // ejection takes it back to 2, so it lasts 60 s.
    let (d, m) = detector(
        2,
        config(|c| {
            c.consecutive_5xx = 1;
            c.max_ejection_percent = 100;
        }),
    );
    let mut events = d.subscribe();
    let start = tokio::time::Instant::now();
    for _ in 0..2 {
        m[1].record_status(status(500));
        let _ = events.recv().await.unwrap();
        let _ = events.recv().await.unwrap();
    }
    assert_eq!(start.elapsed(), Duration::from_secs(90));
    tokio::time::sleep(Duration::from_secs(11)).await;
    m[1].record_status(status(500));
    match events.recv().await.unwrap() {
        OutlierEvent::Ejected { times, duration, .. } => assert_eq!((times, duration), (3, Duration::from_secs(60))),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn v23_panic_mode_below_min_health_percent() {
    let all = |min_health: u32| {
        config(move |c| {
            c.consecutive_5xx = 1;
            c.max_ejection_percent = 100;
            c.min_health_percent = min_health;
        })
    };
    // Every host ejected, no panic threshold: none is available.
    let (d, m) = detector(4, all(0));
    for host in &m {
        host.record_status(status(500));
    }
    assert!(hosts(4).iter().all(|h| !d.is_available(h)));
    // Threshold 50: exactly half ejected is not panic...
    let (d, m) = detector(4, all(50));
    m[0].record_status(status(500));
    m[1].record_status(status(500));
    assert!(!d.is_available(m[0].address()) && d.is_available(m[2].address()));
    // ...more than half is: every host takes traffic again.
    m[2].record_status(status(500));
    assert!(hosts(4).iter().all(|h| d.is_available(h)));
}

#[tokio::test(start_paused = true)]
async fn split_local_origin_failures_count_on_their_own() {
    let (_, m) = detector(
        2,
        config(|c| {
            c.split_local_origin = true;
            c.consecutive_local_origin = 3;
            c.consecutive_5xx = 3;
            c.max_ejection_percent = 100;
        }),
    );
    m[0].record_failure(Failure::ConnectFailure);
    m[0].record_failure(Failure::Timeout);
    m[0].record_status(status(500)); // A response: the connection worked, the local run resets.
    m[0].record_failure(Failure::ConnectFailure);
    m[0].record_failure(Failure::ConnectFailure);
    assert!(!m[0].is_ejected());
    m[0].record_failure(Failure::ConnectFailure);
    assert!(m[0].is_ejected());
    // Not split: a connect failure is a 503, a timeout a 504.
    let (_, m) = detector(
        2,
        config(|c| {
            c.consecutive_gateway = 2;
            c.max_ejection_percent = 100;
        }),
    );
    m[1].record_failure(Failure::ConnectFailure);
    m[1].record_failure(Failure::Timeout);
    assert!(m[1].is_ejected());
    // A failure that is not the upstream's counts for nothing.
    let (d, m) = detector(2, config(|c| c.consecutive_5xx = 1));
    m[0].record_failure(Failure::Other);
    assert_eq!(d.ejected(), 0);
}

#[tokio::test(start_paused = true)]
async fn success_rate_and_failure_percentage_eject_on_the_tick() {
    // Envoy's vector: rates {50, 100, 100, 100, 100}: mean 90, stdev 20, threshold 52.
    let (d, m) = detector(
        5,
        config(|c| {
            c.consecutive_5xx = 0;
            c.max_ejection_percent = 100;
            c.success_rate = Some(SuccessRate::default());
        }),
    );
    for (i, host) in m.iter().enumerate() {
        for k in 0..100 {
            host.record_status(status(if i == 0 && k % 2 == 0 { 503 } else { 200 }));
        }
    }
    // The tick at 10 s analyses the interval that just ended.
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert!(m[0].is_ejected());
    assert_eq!(d.ejected(), 1);
    let rates: Vec<_> = d.status().iter().map(|s| s.success_rate).collect();
    assert_eq!(rates[1], Some(1.0));

    let (d, m) = detector(
        5,
        config(|c| {
            c.consecutive_5xx = 0;
            c.max_ejection_percent = 100;
            c.failure_percentage = Some(FailurePercentage::default());
        }),
    );
    for (i, host) in m.iter().enumerate() {
        for k in 0..60 {
            host.record_status(status(if i < 2 && k % 10 != 0 { 500 } else { 200 }));
        }
    }
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(d.ejected(), 2, "90 % failures >= 85 %");
}

#[test]
fn invalid_configs_name_the_field() {
    let bad = |f: fn(&mut OutlierConfig)| OutlierDetector::new(config(f)).unwrap_err().field().to_owned();
    assert_eq!(bad(|c| c.interval = Duration::ZERO), "interval");
    assert_eq!(bad(|c| c.max_ejection_percent = 101), "maxEjectionPercent");
    assert_eq!(bad(|c| c.max_ejection_time = Some(Duration::from_secs(1))), "maxEjectionTime");
    assert_eq!(bad(|c| c.error_codes = vec![700]), "outlierDetectionHttpErrorCodes");
}

proptest! {
    /// Over any sequence of outcomes and ticks, the ejected endpoints never exceed what
    /// `maxEjectionPercent` allows (plus one with `always_eject_one`).
    #[test]
    fn ejections_stay_within_max_ejection_percent(
        n in 1usize..20,
        pct in 0u32..=100,
        one in any::<bool>(),
        steps in proptest::collection::vec((0usize..20, 0u8..4), 1..300),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        rt.block_on(async {
            let (d, m) = detector(n, config(|c| {
                c.consecutive_5xx = 2;
                c.max_ejection_percent = pct;
                c.always_eject_one = one;
                c.base_ejection_time = Duration::from_secs(10);
            }));
            let bound = (pct as usize * n / 100).max(usize::from(one));
            for (host, what) in steps {
                match what {
                    0 => tokio::time::sleep(Duration::from_secs(10)).await,
                    1 => m[host % n].record_status(StatusCode::OK),
                    _ => m[host % n].record_status(StatusCode::SERVICE_UNAVAILABLE),
                }
                prop_assert!(d.ejected() <= bound, "{} > {}", d.ejected(), bound);
            }
            Ok(())
        })?;
    }
}

#[tokio::test(start_paused = true)]
async fn the_monitor_layer_records_statuses_errors_and_grpc_trailers() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use mesh_resilience::outlier::MonitorLayer;
    use tower::{Layer, ServiceExt, service_fn};

    type BoxError = Box<dyn std::error::Error + Send + Sync>;
    let (d, m) = detector(
        2,
        config(|c| {
            c.consecutive_5xx = 2;
            c.max_ejection_percent = 100;
        }),
    );
    // A gRPC endpoint whose calls fail in the trailers (UNAVAILABLE).
    let grpc = MonitorLayer::new(m[0].clone()).layer(service_fn(|_req: http::Request<()>| async {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "14".parse().unwrap());
        let body = Full::new(Bytes::from_static(b"\0\0\0\0\0")).with_trailers(async { Some(Ok(trailers)) });
        let res = http::Response::builder().header("content-type", "application/grpc").body(body).unwrap();
        Ok::<_, BoxError>(res)
    }));
    let call = || http::Request::post("/pkg.Svc/M").header("content-type", "application/grpc").body(()).unwrap();
    for _ in 0..2 {
        let res = grpc.clone().oneshot(call()).await.unwrap();
        assert!(!m[0].is_ejected(), "the status is in the trailers, not read yet");
        let _ = res.into_body().collect().await.unwrap();
    }
    assert!(m[0].is_ejected(), "two UNAVAILABLE calls (503)");

    // An endpoint that cannot be reached: connect failures count as 503.
    let refused = MonitorLayer::new(m[1].clone()).layer(service_fn(|_req: http::Request<()>| async {
        let e = mesh_core::classify::ConnectError::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        Err::<http::Response<Full<Bytes>>, BoxError>(Box::new(e))
    }));
    for _ in 0..2 {
        assert!(refused.clone().oneshot(http::Request::new(())).await.is_err());
    }
    assert_eq!(d.ejected(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_try_dropped_at_its_deadline_is_a_timeout_and_one_abandoned_before_is_nothing() {
    use bytes::Bytes;
    use http_body_util::Full;
    use mesh_resilience::outlier::MonitorLayer;
    use tower::{Layer, ServiceExt, service_fn};

    type BoxError = Box<dyn std::error::Error + Send + Sync>;
    let (d, m) = detector(
        2,
        config(|c| {
            c.consecutive_5xx = 1;
            c.max_ejection_percent = 100;
        }),
    );
    let hanging = |monitor: HostMonitor| {
        MonitorLayer::new(monitor).layer(service_fn(|_req: http::Request<()>| async {
            std::future::pending::<()>().await;
            Ok::<http::Response<Full<Bytes>>, BoxError>(http::Response::new(Full::new(Bytes::new())))
        }))
    };
    let with_deadline = |after: Duration| {
        let mut req = http::Request::new(());
        let deadline = (tokio::time::Instant::now() + after).into_std();
        mesh_core::TryDeadline::tighten(req.extensions_mut(), deadline);
        req
    };
    // The client gives up after 1 s, before the try's 5 s deadline: nothing recorded.
    let abandoned = tokio::time::timeout(
        Duration::from_secs(1),
        hanging(m[0].clone()).oneshot(with_deadline(Duration::from_secs(5))),
    );
    assert!(abandoned.await.is_err());
    assert_eq!(d.ejected(), 0);
    // The per-try timeout drops it at its deadline: a timeout (504), which ejects.
    let timed_out = tokio::time::timeout(
        Duration::from_secs(2),
        hanging(m[1].clone()).oneshot(with_deadline(Duration::from_secs(2))),
    );
    assert!(timed_out.await.is_err());
    assert!(m[1].is_ejected());
}

#[tokio::test(start_paused = true)]
async fn a_grpc_body_the_client_drops_records_nothing() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use mesh_resilience::outlier::MonitorLayer;
    use tower::{Layer, ServiceExt, service_fn};

    type BoxError = Box<dyn std::error::Error + Send + Sync>;
    let (d, m) = detector(
        2,
        config(|c| {
            c.consecutive_5xx = 1;
            c.max_ejection_percent = 100;
        }),
    );
    let svc = MonitorLayer::new(m[0].clone()).layer(service_fn(|_req: http::Request<()>| async {
        let body = Full::new(Bytes::from_static(b"\0\0\0\0\0")).with_trailers(async { None });
        Ok::<_, BoxError>(http::Response::builder().header("content-type", "application/grpc").body(body).unwrap())
    }));
    let call = || http::Request::post("/p.S/M").header("content-type", "application/grpc").body(()).unwrap();
    // Dropped unread: the client went away.
    drop(svc.clone().oneshot(call()).await.unwrap());
    assert_eq!(d.ejected(), 0);
    // Read to its end without a status: the upstream failed the call.
    let _ = svc.clone().oneshot(call()).await.unwrap().into_body().collect().await.unwrap();
    assert!(m[0].is_ejected());
}
