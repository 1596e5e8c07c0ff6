//! Per-request cost of mesh-routing's load balancers (`Balancer::pick`, every endpoint
//! available, the `Picked` dropped at once) at 3, 100 and 10,000 endpoints, next to tower's
//! `p2c::Balance` over the same number of always-ready services.
//!
//! Run with `cargo bench -p mesh-benches --bench balancers`.
//!
//! The tower figure is one `poll_ready` (which makes the P2C choice) and one `call` per
//! iteration, the least a request through `p2c::Balance` costs: after a call its ready cache
//! moves the service to the pending set, and the next `poll_ready` polls it back, so the
//! readiness bookkeeping is part of every request. Its services are `service_fn`s wrapped in
//! `load::Constant` (all loads equal, as for an idle mesh `LeastRequest`), polled with a no-op
//! waker: every service is always ready, so nothing ever waits and no runtime is needed. The
//! call's future is dropped unpolled. The comparison is fair for `LeastRequest` (the same
//! algorithm); the other rows show what a policy costs by itself.

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use criterion::{Criterion, criterion_group, criterion_main};
use mesh_routing::balance::{Balancer, Endpoint, LbPolicy};
use mesh_routing::random::Random;
use tower::balance::p2c::Balance;
use tower::discover::ServiceList;
use tower::load::Constant;
use tower::{Service, service_fn};

const SIZES: [usize; 3] = [3, 100, 10_000];

fn endpoints(n: usize, weighted: bool) -> Vec<Endpoint> {
    (0..n)
        .map(|i| {
            let e = Endpoint::new(format!("10.{}.{}.{}:8080", i >> 16, (i >> 8) & 0xff, i & 0xff));
            if weighted { e.with_weight(i as u32 % 4 + 1) } else { e }
        })
        .collect()
}

fn pick(c: &mut Criterion) {
    for n in SIZES {
        let mut g = c.benchmark_group(format!("pick over {n} endpoints"));
        let policies = [
            ("mesh RoundRobin", LbPolicy::RoundRobin, false),
            ("mesh RoundRobin weighted", LbPolicy::RoundRobin, true),
            ("mesh LeastRequest (P2C)", LbPolicy::LeastRequest, false),
            ("mesh LeastRequest weighted", LbPolicy::LeastRequest, true),
            ("mesh Random", LbPolicy::Random, false),
            ("mesh RingHash (ring 1024)", LbPolicy::RingHash { minimum_ring_size: 1024 }, false),
            ("mesh Maglev (65537)", LbPolicy::Maglev { table_size: 65537 }, false),
        ];
        for (name, policy, weighted) in policies {
            let balancer = Balancer::new(policy, endpoints(n, weighted))
                .expect("valid balancer")
                .with_random(Arc::new(Random::seeded(1)));
            // A new key every pick (a Weyl sequence), so hash lookups land all over the table.
            let mut key = 0u64;
            g.bench_function(name, |b| {
                b.iter(|| {
                    key = key.wrapping_add(0x9e37_79b9_7f4a_7c15);
                    black_box(balancer.pick(black_box(Some(key)), &()))
                })
            });
        }

        let services: Vec<_> =
            (0..n).map(|_| Constant::new(service_fn(|(): ()| async { Ok::<_, Infallible>(()) }), 0u32)).collect();
        let mut balance = Balance::new(ServiceList::new::<()>(services));
        let mut cx = Context::from_waker(Waker::noop());
        g.bench_function("tower p2c::Balance poll_ready+call", |b| {
            b.iter(|| {
                match balance.poll_ready(&mut cx) {
                    Poll::Ready(Ok(())) => {}
                    _ => panic!("an always-ready service list is ready"),
                }
                black_box(balance.call(()))
            })
        });
        g.finish();
    }
}

criterion_group!(benches, pick);
criterion_main!(benches);
