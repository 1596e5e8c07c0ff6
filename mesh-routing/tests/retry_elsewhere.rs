//! A retry goes to an endpoint no earlier try went to (Envoy's `previous_hosts` predicate):
//! mesh-resilience's retry layer over a `Balance`, for every balancing policy.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use mesh_core::TriedEndpoints;
use mesh_resilience::retry::{Attempts, ReplayBody, RetryLayer, RetryPolicy};
use mesh_routing::balance::{Balance, Balancer, Endpoint, HashKey, LbPolicy};
use mesh_routing::random::Random;
use tower::{Layer, ServiceExt, service_fn};

type Log = Arc<Mutex<BTreeMap<String, Vec<u32>>>>;

/// Three endpoints; `bad` answers 503, the others 200. Each try is logged by endpoint with
/// its try number (1 for a first try).
fn cluster(policy: LbPolicy, log: Log) -> Balance<impl Fn(&Endpoint) -> BoxedEndpoint> {
    let endpoints = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"].map(Endpoint::new).to_vec();
    let balancer = Balancer::new(policy, endpoints).unwrap().with_random(Arc::new(Random::seeded(11)));
    let balance = Balance::new(balancer, move |e: &Endpoint| -> BoxedEndpoint {
        let (address, log) = (e.address().to_string(), log.clone());
        tower::util::BoxCloneSyncService::new(service_fn(move |req: Request<ReplayBody<Full<Bytes>>>| {
            let tried = TriedEndpoints::of(req.extensions()).cloned();
            let (address, log) = (address.clone(), log.clone());
            async move {
                // The balancer recorded this try before sending it (when retries avoid
                // earlier endpoints, which is the default).
                assert!(tried.is_none_or(|t| t.contains(&address)));
                let attempt = req.headers().get("x-try").map_or(1, |_| 2);
                log.lock().unwrap().entry(address.clone()).or_default().push(attempt);
                let mut res = Response::new(Full::new(Bytes::from(address.clone())));
                if address == "10.0.0.1:80" {
                    *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                }
                Ok::<_, Infallible>(res)
            }
        }))
    });
    balance.with_hash_key(HashKey::Header(http::HeaderName::from_static("x-user")))
}

type BoxedEndpoint =
    tower::util::BoxCloneSyncService<Request<ReplayBody<Full<Bytes>>>, Response<Full<Bytes>>, Infallible>;

#[tokio::test(start_paused = true)]
async fn a_retry_never_goes_back_to_the_endpoint_that_failed() {
    let policies = [
        LbPolicy::RoundRobin,
        LbPolicy::LeastRequest,
        LbPolicy::Random,
        LbPolicy::RingHash { minimum_ring_size: 1024 },
        LbPolicy::Maglev { table_size: LbPolicy::DEFAULT_MAGLEV_TABLE_SIZE },
    ];
    for policy in policies {
        let log = Log::default();
        let balance = cluster(policy.clone(), log.clone());
        // One retry on 5xx: with the failing endpoint avoided, every request succeeds.
        let svc =
            RetryLayer::new(RetryPolicy::new(1, "5xx".parse().unwrap())).with_random(Random::seeded(5)).layer(balance);
        let mut retried = 0;
        for user in 0..300 {
            let req = Request::get("/").header("x-user", format!("user-{user}")).body(Full::new(Bytes::new())).unwrap();
            let res = svc.clone().oneshot(req).await.unwrap();
            assert_eq!(res.status(), 200, "{policy:?} user-{user}");
            retried += usize::from(res.extensions().get::<Attempts>().is_some());
        }
        let log = log.lock().unwrap();
        let bad = log.get("10.0.0.1:80").map_or(0, Vec::len);
        // Every try on the failing endpoint was a first try, and each cost one retry.
        assert_eq!(retried, bad, "{policy:?}: {log:?}");
        assert!(bad > 30, "{policy:?}: the failing endpoint got its share of first tries: {log:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn without_the_predicate_a_random_retry_lands_on_the_failed_endpoint_again() {
    let svc = RetryLayer::new(RetryPolicy::new(1, "5xx".parse().unwrap()).allowing_previous_hosts())
        .layer(cluster(LbPolicy::Random, Log::default()));
    let mut failed = 0;
    for _ in 0..300 {
        let res = svc.clone().oneshot(Request::new(Full::new(Bytes::new()))).await.unwrap();
        failed += usize::from(res.status() != 200);
    }
    // Each request fails with probability 1/9: none failing is a (8/9)^300 ≈ 4e-16 event.
    assert!(failed > 0);
}

#[tokio::test(start_paused = true)]
async fn a_hash_retry_moves_to_the_next_endpoint_on_the_ring_and_no_further() {
    // The same user twice: the first try lands on the same endpoint, and so does the retry.
    for policy in [LbPolicy::RingHash { minimum_ring_size: 1024 }, LbPolicy::Maglev { table_size: 65537 }] {
        let log = Log::default();
        let svc = RetryLayer::new(RetryPolicy::new(1, "5xx".parse().unwrap())).layer(cluster(policy, log.clone()));
        let mut moved = 0;
        for user in 0..100 {
            let mut pair = Vec::new();
            for _ in 0..2 {
                let req = Request::get("/").header("x-user", format!("u{user}")).body(Full::new(Bytes::new())).unwrap();
                let res = svc.clone().oneshot(req).await.unwrap();
                assert_eq!(res.status(), 200);
                moved += usize::from(res.extensions().get::<Attempts>().is_some());
                pair.push(res.into_body().collect().await.unwrap().to_bytes());
            }
            assert_eq!(pair[0], pair[1], "u{user} is retried to the same endpoint each time");
        }
        assert!(moved > 0, "some users hash to the failing endpoint");
    }
}

#[test]
fn with_every_endpoint_tried_the_balancer_picks_among_all_again() {
    let balancer = Balancer::new(LbPolicy::RoundRobin, vec![Endpoint::new("a:1"), Endpoint::new("b:1")]).unwrap();
    let tried = TriedEndpoints::default();
    let first = balancer.pick_avoiding(None, &(), Some(&tried)).unwrap();
    let second = balancer.pick_avoiding(None, &(), Some(&tried)).unwrap();
    assert_ne!(first.endpoint(), second.endpoint());
    // Both tried: a third try still goes somewhere.
    assert!(balancer.pick_avoiding(None, &(), Some(&tried)).is_some());
    // An endpoint the health view rejects stays rejected even when it is the only untried one.
    let only_a = |e: &Endpoint| &**e.address() == "a:1";
    let tried = TriedEndpoints::default();
    tried.record("a:1".into());
    assert_eq!(&**balancer.pick_avoiding(None, &only_a, Some(&tried)).unwrap().endpoint().address(), "a:1");
}
