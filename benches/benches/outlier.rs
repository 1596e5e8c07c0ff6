//! Outlier detection's per-request costs: recording an outcome on an endpoint's monitor, and a
//! balancer pick that consults the detector as its health view, at 3 and 1,000 endpoints,
//! next to the same pick with no health view, in the same run.
//!
//! Run with `cargo bench -p mesh-benches --bench outlier`.
//!
//! Recording is atomics on the endpoint's own counters (no lookup, no lock while nothing is
//! ejected). The pick rows show the health view's cost with nothing ejected (two atomic loads
//! per candidate) and with a tenth of the endpoints ejected (a hash lookup per candidate).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use http::StatusCode;
use mesh_resilience::outlier::{OutlierConfig, OutlierDetector};
use mesh_routing::balance::{Balancer, Endpoint, HealthView, LbPolicy};
use mesh_routing::random::Random;

fn endpoints(n: usize) -> Vec<Endpoint> {
    (0..n).map(|i| Endpoint::new(format!("10.0.{}.{}:8080", i >> 8, i & 0xff))).collect()
}

fn detector(endpoints: &[Endpoint], eject_tenth: bool) -> OutlierDetector {
    let mut config = OutlierConfig::default();
    config.consecutive_5xx = 1;
    config.max_ejection_percent = 100;
    let d = OutlierDetector::new(config).expect("valid");
    d.set_hosts(endpoints.iter().map(|e| e.address().clone()));
    if eject_tenth {
        for e in endpoints.iter().step_by(10) {
            d.monitor(e.address()).expect("watched").record_status(StatusCode::SERVICE_UNAVAILABLE);
        }
    }
    d
}

fn record(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    let _guard = rt.enter();
    let mut g = c.benchmark_group("outlier: record one outcome");
    let eps = endpoints(3);
    let d = detector(&eps, false);
    let monitor = d.monitor(eps[0].address()).expect("watched");
    g.bench_function("a 200", |b| b.iter(|| monitor.record_status(black_box(StatusCode::OK))));
    // Alternating 503 and 200: the 5xx run grows and is reset, never reaching the threshold.
    let mut config = OutlierConfig::default();
    config.consecutive_5xx = 5;
    let d5 = OutlierDetector::new(config).expect("valid");
    d5.set_hosts(eps.iter().map(|e| e.address().clone()));
    let m5 = d5.monitor(eps[1].address()).expect("watched");
    g.bench_function("a 503 then a 200 (two records)", |b| {
        b.iter(|| {
            m5.record_status(black_box(StatusCode::SERVICE_UNAVAILABLE));
            m5.record_status(black_box(StatusCode::OK));
        })
    });
    g.finish();
}

fn pick(c: &mut Criterion) {
    for n in [3, 1_000] {
        let mut g = c.benchmark_group(format!("outlier: least-request pick over {n} endpoints"));
        let eps = endpoints(n);
        let balancer =
            Balancer::new(LbPolicy::LeastRequest, eps.clone()).expect("valid").with_random(Arc::new(Random::seeded(7)));
        g.bench_function("no health view", |b| b.iter(|| black_box(balancer.pick(None, &()))));
        let healthy = detector(&eps, false);
        g.bench_function("detector, nothing ejected", |b| {
            b.iter(|| black_box(balancer.pick(None, &healthy as &dyn HealthView)))
        });
        if n >= 10 {
            let some_out = detector(&eps, true);
            g.bench_function("detector, a tenth ejected", |b| {
                b.iter(|| black_box(balancer.pick(None, &some_out as &dyn HealthView)))
            });
        }
        g.finish();
    }
}

criterion_group!(benches, record, pick);
criterion_main!(benches);
