//! The Kubernetes manifests in `deploy/kubernetes` hold what mesh-proxy and Prometheus take:
//! the ConfigMap's files compile as the proxy's configuration, and the PrometheusRule carries
//! the same alert groups as `deploy/prometheus/mesh-alerts.yaml`, which the Prometheus tests
//! check against real series. (CI also validates the manifests with `kubernetes-validate
//! --strict`.)

use std::path::{Path, PathBuf};

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(file)
}

fn yaml(path: &Path) -> yaml_serde::Value {
    yaml_serde::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn the_configmap_files_compile_as_the_proxy_configuration() {
    let map = yaml(&deploy("kubernetes/mesh-config.yaml"));
    let dir = std::env::temp_dir().join(format!("mesh-deploy-configmap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let data = map["data"].as_mapping().expect("a ConfigMap with data");
    for (name, text) in data {
        std::fs::write(dir.join(name.as_str().unwrap()), text.as_str().unwrap()).unwrap();
    }
    assert_eq!(data.len(), 3);
    let (snapshot, warnings) = mesh_proxy::load_snapshot(std::slice::from_ref(&dir))
        .unwrap_or_else(|errors| panic!("{}", errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")));
    assert!(warnings.is_empty(), "{warnings:?}");
    let proxy = snapshot.resources.mesh_proxy.as_ref().expect("the MeshProxy resource");
    assert_eq!(proxy.spec.workload.name, "reviews-v1");
    assert_eq!(snapshot.security.mode, mesh_tls::MtlsMode::Strict);
    assert!(
        snapshot.clusters.keys().any(|k| &*k.host == "ratings.shop.svc.cluster.local"),
        "{:?}",
        snapshot.clusters.keys()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_prometheus_rule_carries_the_tested_alert_groups() {
    let rule = yaml(&deploy("kubernetes/prometheusrule.yaml"));
    let file = yaml(&deploy("prometheus/mesh-alerts.yaml"));
    assert_eq!(rule["kind"].as_str(), Some("PrometheusRule"));
    assert_eq!(rule["spec"]["groups"], file["groups"]);
}
