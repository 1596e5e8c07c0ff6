//! DestinationRule policy merging (SEMANTICS.md 2.1): port-level entries replace blocks
//! wholesale, subsets override block by block (all four blocks when they have a port-level
//! entry), and `connectionPool` compiles into circuit-breaker limits.

use mesh_routing::model::{DestinationRuleSpec, TrafficPolicy};

fn rule(yaml: &str) -> DestinationRuleSpec {
    yaml_serde::from_str(yaml).unwrap()
}

const RULE: &str = r#"
host: payments
trafficPolicy:
  loadBalancer: {simple: ROUND_ROBIN}
  connectionPool: {tcp: {maxConnections: 100}}
  outlierDetection: {consecutive5xxErrors: 7}
  portLevelSettings:
  - port: {number: 9080}
    loadBalancer: {simple: RANDOM}
subsets:
- name: v1
  labels: {version: v1}
  trafficPolicy:
    connectionPool: {http: {http1MaxPendingRequests: 1}}
- name: v2
  labels: {version: v2}
  trafficPolicy:
    portLevelSettings:
    - port: {number: 80}
      outlierDetection: {consecutive5xxErrors: 2}
"#;

#[test]
fn port_level_entries_replace_blocks_and_subsets_override_them() {
    let dr = rule(RULE);
    let top = dr.traffic_policy.as_ref();
    let subset = |name: &str| dr.subsets.iter().find(|s| s.name == name).unwrap().traffic_policy.as_ref();

    // The rule on port 80: its own blocks.
    let m = TrafficPolicy::merged(top, None, Some(80));
    assert!(m.load_balancer.is_some() && m.connection_pool.is_some());
    assert_eq!(m.outlier_detection.unwrap().consecutive_5xx_errors, Some(7));
    // On port 9080 the entry replaces all three blocks: only its load balancer is left.
    let m = TrafficPolicy::merged(top, None, Some(9080));
    assert!(m.load_balancer.is_some());
    assert!(m.connection_pool.is_none() && m.outlier_detection.is_none(), "not inherited: {m:?}");

    // Subset v1 replaces the connection pool block, keeps the rest.
    let m = TrafficPolicy::merged(top, subset("v1"), Some(80));
    let pool = m.connection_pool.unwrap();
    assert!(pool.tcp.is_none(), "the block is replaced whole, not merged");
    assert_eq!(pool.limits().unwrap().max_pending, Some(1));
    assert_eq!(m.outlier_detection.unwrap().consecutive_5xx_errors, Some(7));

    // Subset v2 has an entry for port 80: all its blocks replace the rule's, even the unset.
    let m = TrafficPolicy::merged(top, subset("v2"), Some(80));
    assert!(m.load_balancer.is_none() && m.connection_pool.is_none());
    assert_eq!(m.outlier_detection.unwrap().consecutive_5xx_errors, Some(2));
    // On another port v2 sets nothing: the rule's blocks stay.
    let m = TrafficPolicy::merged(top, subset("v2"), Some(81));
    assert_eq!(m.outlier_detection.unwrap().consecutive_5xx_errors, Some(7));
}

#[test]
fn connection_pool_limits_follow_istio() {
    let pool = |yaml: &str| rule(&format!("host: h\ntrafficPolicy:\n  connectionPool: {yaml}\n"));
    let limits = |yaml: &str| pool(yaml).traffic_policy.unwrap().connection_pool.unwrap().limits();
    let l = limits("{tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1, http2MaxRequests: 50}}").unwrap();
    assert_eq!((l.max_connections, l.max_pending, l.max_requests), (Some(1), Some(1), Some(50)));
    // 0 is "not set" (unlimited), as Istio leaves Envoy's thresholds at 2^32 - 1.
    let l = limits("{tcp: {maxConnections: 0}}").unwrap();
    assert_eq!(l.max_connections, None);
    assert_eq!(limits("{tcp: {maxConnections: -1}}").unwrap_err().field(), "tcp.maxConnections");
    assert_eq!(limits("{}").unwrap_err().reason(), "needs `tcp` or `http`");
    assert_eq!(limits("{http: {h2UpgradePolicy: SOMETIMES}}").unwrap_err().field(), "http.h2UpgradePolicy");
}
