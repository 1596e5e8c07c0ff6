//! The proxy's own series on `/metrics`, beside Istio's request metrics: retries and retry
//! budget refusals, outlier ejections and pool overflows per destination, rate-limit
//! rejections, requests in flight, inbound TLS refusals, the workload certificate's expiry
//! and rotations, configuration reloads, and the defences' counters. They are read at each
//! scrape from the counters the layers keep anyway (a prometheus-client `Collector`), so the
//! request path pays nothing for them. Per-destination series follow the current snapshot:
//! a destination's counters restart when a reload recompiles it (which `rate()` handles).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use mesh_telemetry::prometheus_client::collector::Collector;
use mesh_telemetry::prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use mesh_telemetry::prometheus_client::metrics::counter::ConstCounter;
use mesh_telemetry::prometheus_client::metrics::gauge::ConstGauge;

use crate::routes::Routes;

/// Reads the proxy's counters at each scrape.
pub(crate) struct ProxyCollector {
    pub(crate) routes: Arc<Routes>,
    pub(crate) in_flight: Arc<[std::sync::atomic::AtomicI64; 2]>,
    pub(crate) access_log: Option<mesh_telemetry::access_log::AccessLog>,
}

impl fmt::Debug for ProxyCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyCollector").finish_non_exhaustive()
    }
}

type Labels = Vec<(&'static str, String)>;

/// One metric's samples.
fn samples<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: Vec<(Labels, M)>,
) -> Result<(), fmt::Error> {
    let Some(first) = samples.first() else { return Ok(()) };
    let mut metric = encoder.encode_descriptor(name, help, None, first.1.metric_type())?;
    for (labels, value) in &samples {
        value.encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

fn counter(value: u64) -> Vec<(Labels, ConstCounter)> {
    vec![(Vec::new(), ConstCounter::new(value))]
}

impl Collector for ProxyCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), fmt::Error> {
        let r = &self.routes;
        samples(
            &mut e,
            "mesh_config_reloads",
            "Configuration snapshots swapped in",
            counter(r.reloads.load(Ordering::Relaxed)),
        )?;
        samples(
            &mut e,
            "mesh_config_reload_failures",
            "Configuration changes refused (the running configuration kept serving)",
            counter(r.reload_failures.load(Ordering::Relaxed)),
        )?;
        let in_flight = ["outbound", "inbound"]
            .iter()
            .zip(self.in_flight.iter())
            .map(|(d, n)| (vec![("direction", (*d).to_owned())], ConstGauge::new(n.load(Ordering::Relaxed))))
            .collect();
        samples(
            &mut e,
            "mesh_requests_in_flight",
            "Requests between their head and the end of their response",
            in_flight,
        )?;

        let snapshot = r.snapshot();
        let mut clusters: Vec<_> = snapshot.clusters.values().collect();
        clusters.sort_by(|a, b| a.key.cmp(&b.key));
        let per = |f: &dyn Fn(&crate::snapshot::Cluster) -> Option<u64>| -> Vec<(Labels, ConstCounter)> {
            clusters
                .iter()
                .filter_map(|c| Some((vec![("cluster_name", c.key.to_string())], ConstCounter::new(f(c)?))))
                .collect()
        };
        samples(
            &mut e,
            "mesh_retries",
            "Retries sent, by destination",
            per(&|c| Some(c.retries.load(Ordering::Relaxed))),
        )?;
        samples(
            &mut e,
            "mesh_retry_overflow",
            "Retries the destination's retry budget refused (Envoy's upstream_rq_retry_overflow)",
            per(&|c| Some(c.retry_budget.as_ref()?.refused())),
        )?;
        samples(
            &mut e,
            "mesh_outlier_ejections",
            "Endpoint ejections by outlier detection, by destination",
            per(&|c| Some(c.outlier.as_ref()?.status().iter().map(|h| u64::from(h.times_ejected)).sum())),
        )?;
        let active = clusters
            .iter()
            .filter_map(|c| {
                let d = c.outlier.as_ref()?;
                Some((vec![("cluster_name", c.key.to_string())], ConstGauge::new(d.ejected() as i64)))
            })
            .collect();
        samples(&mut e, "mesh_outlier_ejections_active", "Endpoints ejected now, by destination", active)?;
        samples(
            &mut e,
            "mesh_pool_overflow",
            "Requests refused by the destination's connection-pool limits (503 UO)",
            per(&|c| Some(c.breaker.as_ref()?.overflows())),
        )?;
        if let Some(limit) = r.rate_limit() {
            let rejected = limit.limiter().stats().rate_limited.load(Ordering::Relaxed);
            samples(&mut e, "mesh_rate_limited", "Requests answered 429 by the local rate limit", counter(rejected))?;
        }

        samples(
            &mut e,
            "mesh_inbound_plaintext_refused",
            "Plaintext inbound connections closed under STRICT mTLS",
            counter(crate::INBOUND_PLAINTEXT_REFUSED.load(Ordering::Relaxed)),
        )?;
        samples(
            &mut e,
            "mesh_inbound_tls_handshake_failures",
            "Inbound TLS handshakes that failed (bad or missing client certificates)",
            counter(crate::INBOUND_HANDSHAKE_FAILURES.load(Ordering::Relaxed)),
        )?;
        if let Some(identity) = &r.config().identity {
            let status = identity.status();
            let expiry = status.not_after.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            samples(
                &mut e,
                "mesh_workload_certificate_expiry_timestamp_seconds",
                "When the workload certificate in use expires (Unix time)",
                vec![(vec![("identity", status.id.to_string())], ConstGauge::new(expiry as i64))],
            )?;
            samples(
                &mut e,
                "mesh_workload_certificate_rotations",
                "Certificate sets loaded after the first",
                counter(status.reloads),
            )?;
            samples(
                &mut e,
                "mesh_workload_certificate_rotation_failures",
                "Certificate sets refused (the last good one kept serving)",
                counter(status.failures),
            )?;
        }
        if let Some(log) = &self.access_log {
            samples(
                &mut e,
                "mesh_access_log_dropped",
                "Access log lines dropped because the writer was behind",
                counter(log.dropped()),
            )?;
        }
        samples(
            &mut e,
            "mesh_h2_premature_reset_goaways",
            "HTTP/2 client connections sent GOAWAY for cancelling too many streams",
            counter(crate::h2server::PREMATURE_RESET_GOAWAYS.load(Ordering::Relaxed)),
        )?;
        samples(
            &mut e,
            "mesh_downstream_connections_refused",
            "Client connections refused at accept for the connection cap",
            counter(crate::REFUSED_CONNECTIONS.load(Ordering::Relaxed)),
        )?;
        Ok(())
    }
}
