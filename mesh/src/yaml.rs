//! Policies from the YAML operators already write: a file of VirtualServices becomes a
//! [`RouteTable`](mesh_routing::RouteTable) for [`RoutingLayer`](mesh_routing::RoutingLayer),
//! and an Istio `retries` block a [`RetryPolicy`](mesh_resilience::retry::RetryPolicy), with
//! the same validation mesh-proxy applies.
//!
//! ```
//! let table = mesh::yaml::route_table(r#"
//! apiVersion: networking.istio.io/v1
//! kind: VirtualService
//! metadata: {name: reviews, namespace: shop}
//! spec:
//!   hosts: [reviews]
//!   http:
//!   - route:
//!     - {destination: {host: reviews, subset: v1}, weight: 90}
//!     - {destination: {host: reviews, subset: v2}, weight: 10}
//! "#)?;
//! let retries = mesh::yaml::retry_policy("{attempts: 3, perTryTimeout: 2s, retryOn: 5xx,reset}")?;
//! assert_eq!(retries.retries(), 3);
//! # let _ = table;
//! # Ok::<(), mesh::yaml::YamlError>(())
//! ```

use std::fmt;

/// Why YAML could not become a policy: the document (0-based, in the file) and the reason.
#[derive(Debug)]
pub struct YamlError {
    document: Option<usize>,
    reason: String,
}

impl YamlError {
    fn new(document: Option<usize>, reason: impl fmt::Display) -> Self {
        Self { document, reason: reason.to_string() }
    }
}

impl fmt::Display for YamlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.document {
            Some(d) => write!(f, "document {d}: {}", self.reason),
            None => f.write_str(&self.reason),
        }
    }
}

impl std::error::Error for YamlError {}

/// The routes of every `VirtualService` in `yaml` (one or more `---`-separated documents;
/// other kinds are skipped), first match first, as Istio orders them.
#[cfg(feature = "routing")]
pub fn route_table(yaml: &str) -> Result<mesh_routing::RouteTable, YamlError> {
    use serde::Deserialize as _;
    let mut hosts = Vec::new();
    for (i, doc) in yaml_serde::Deserializer::from_str(yaml).enumerate() {
        let value = yaml_serde::Value::deserialize(doc).map_err(|e| YamlError::new(Some(i), e))?;
        if value.is_null() || value["kind"].as_str() != Some("VirtualService") {
            continue;
        }
        let name = format!(
            "{}/{}",
            value["metadata"]["namespace"].as_str().unwrap_or("default"),
            value["metadata"]["name"].as_str().unwrap_or("unnamed"),
        );
        let spec: mesh_routing::model::VirtualServiceSpec = yaml_serde::from_value(value["spec"].clone())
            .map_err(|e| YamlError::new(Some(i), format_args!("VirtualService {name}: spec: {e}")))?;
        hosts.push(mesh_routing::VirtualHostConfig::new(name, spec.hosts, spec.http));
    }
    if hosts.is_empty() {
        return Err(YamlError::new(None, "no VirtualService in the YAML"));
    }
    mesh_routing::RouteTable::new(&hosts, &mesh_routing::RouteContext::default()).map_err(|e| YamlError::new(None, e))
}

/// An Istio HTTPRoute `retries` block (`{attempts: 3, perTryTimeout: 2s, retryOn: 5xx}`).
#[cfg(feature = "resilience")]
pub fn retry_policy(yaml: &str) -> Result<mesh_resilience::retry::RetryPolicy, YamlError> {
    let retries: mesh_resilience::retry::HttpRetry =
        yaml_serde::from_str(yaml).map_err(|e| YamlError::new(None, format_args!("retries: {e}")))?;
    mesh_resilience::retry::RetryPolicy::from_istio(&retries)
        .map_err(|e| YamlError::new(None, format_args!("retries: {e}")))
}

#[cfg(all(test, feature = "routing", feature = "resilience"))]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_document_and_the_field() {
        let two = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: r}\nspec: {host: r}\n---\nkind: VirtualService\nmetadata: {name: bad}\nspec:\n  hosts: [r]\n  http: [{route: [{destination: {host: r}, weight: many}]}]\n";
        let e = route_table(two).unwrap_err().to_string();
        assert!(e.starts_with("document 1: VirtualService default/bad: spec:"), "{e}");
        let none = route_table("kind: DestinationRule\nspec: {host: r}\n").unwrap_err().to_string();
        assert_eq!(none, "no VirtualService in the YAML");
        let retry = retry_policy("{attempts: 2, retryOn: sometimes}").unwrap_err().to_string();
        assert!(retry.starts_with("retries:") && retry.contains("sometimes"), "{retry}");
    }
}
