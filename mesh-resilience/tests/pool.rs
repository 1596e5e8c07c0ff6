//! SEMANTICS.md Appendix A, vector 16 (connection-pool circuit breaking), and the layer's
//! admission held until the response body ends.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use mesh_resilience::pool::{CircuitBreaker, CircuitBreakerLayer, Overflow, Overloaded, PoolLimits};
use tower::{Layer, ServiceExt, service_fn};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn limits(connections: Option<usize>, pending: Option<usize>, requests: Option<usize>) -> PoolLimits {
    let mut l = PoolLimits::default();
    l.max_connections = connections;
    l.max_pending = pending;
    l.max_requests = requests;
    l
}

/// An upstream that answers after 1 s, counting the requests it saw.
fn slow(
    seen: Arc<AtomicUsize>,
) -> impl tower::Service<Request<()>, Response = Response<Full<Bytes>>, Error = BoxError, Future: Send>
+ Clone
+ Send
+ 'static {
    service_fn(move |_req: Request<()>| {
        let seen = seen.clone();
        async move {
            seen.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok::<_, BoxError>(Response::new(Full::new(Bytes::from_static(b"done"))))
        }
    })
}

#[tokio::test(start_paused = true)]
async fn v16_one_connection_one_pending_the_third_overflows_at_once() {
    let seen = Arc::new(AtomicUsize::new(0));
    let breaker = CircuitBreaker::new(limits(Some(1), Some(1), None));
    let svc = CircuitBreakerLayer::new(breaker.clone()).layer(slow(seen.clone()));
    let start = tokio::time::Instant::now();
    let first = tokio::spawn(svc.clone().oneshot(Request::new(())));
    tokio::task::yield_now().await;
    let second = tokio::spawn(svc.clone().oneshot(Request::new(())));
    tokio::task::yield_now().await;
    // One in flight; one queued (in flight once it has its connection).
    assert_eq!((breaker.requests(), breaker.pending()), (1, 1));
    let third = svc.clone().oneshot(Request::new(())).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO, "refused at once");
    assert_eq!(third.downcast_ref::<Overloaded>(), Some(&Overloaded(Overflow::Pending)));
    // The first's connection is busy until its body is read: the second starts then.
    let first = first.await.unwrap().unwrap();
    assert_eq!(seen.load(Ordering::SeqCst), 1);
    let _ = first.into_body().collect().await.unwrap();
    let second = second.await.unwrap().unwrap();
    let _ = second.into_body().collect().await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(2), "the second waited for the first");
    assert_eq!((breaker.requests(), breaker.pending(), breaker.overflows()), (0, 0, 1));
}

#[tokio::test(start_paused = true)]
async fn max_requests_bounds_what_is_in_flight() {
    let breaker = CircuitBreaker::new(limits(None, None, Some(2)));
    let held: Vec<_> = vec![breaker.admit().await.unwrap(), breaker.admit().await.unwrap()];
    assert_eq!(breaker.admit().await.unwrap_err(), Overloaded(Overflow::Requests));
    assert_eq!(breaker.requests(), 2, "a refusal leaves no trace");
    drop(held);
    assert!(breaker.admit().await.is_ok());
    // No limits: everything is admitted.
    let open = CircuitBreaker::new(PoolLimits::default());
    let all: Vec<_> = futures_join(&open, 1000).await;
    assert_eq!(all.len(), 1000);
}

async fn futures_join(breaker: &CircuitBreaker, n: usize) -> Vec<mesh_resilience::pool::Admission> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(breaker.admit().await.unwrap());
    }
    out
}

#[tokio::test(start_paused = true)]
async fn a_waiting_request_that_is_dropped_leaves_the_queue() {
    let breaker = CircuitBreaker::new(limits(Some(1), Some(1), None));
    let held = breaker.admit().await.unwrap();
    let waiting = tokio::spawn({
        let b = breaker.clone();
        async move { b.admit().await.map(drop) }
    });
    tokio::task::yield_now().await;
    assert_eq!(breaker.pending(), 1);
    waiting.abort();
    let _ = waiting.await;
    assert_eq!((breaker.pending(), breaker.requests()), (0, 1));
    drop(held);
}
