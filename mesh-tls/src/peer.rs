//! PeerAuthentication: which mTLS mode a workload's port takes (SEMANTICS.md 6.1).
//!
//! [`resolve_mode`] applies Istio's precedence: the port-level setting of a workload policy
//! (one with a selector), then the workload policy, then the namespace's policy (no
//! selector), then the mesh's (no selector, in the root namespace); `UNSET` inherits from the
//! next level, and nothing set means PERMISSIVE. Where several policies compete at one level,
//! the first given wins (Istio takes the oldest; a file-based proxy takes them in file
//! order). Selector policies in the root namespace are ignored, as Istio ignores them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::accept::MtlsMode;
use crate::authz::WorkloadSelector;

/// `PeerAuthentication.spec`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    /// The workloads it applies to (none: the namespace, or the mesh in the root namespace).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// The mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MutualTls>,
    /// Per workload port (only with a selector).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub port_level_mtls: BTreeMap<u32, MutualTls>,
}

/// An `mtls` block.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, rename_all = "camelCase")]
pub struct MutualTls {
    /// The mode.
    pub mode: ModeSetting,
}

/// A mode as written.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum ModeSetting {
    /// Inherit.
    #[default]
    Unset,
    /// Plaintext.
    Disable,
    /// Both.
    Permissive,
    /// mTLS only.
    Strict,
}

impl ModeSetting {
    fn mode(self) -> Option<MtlsMode> {
        match self {
            ModeSetting::Unset => None,
            ModeSetting::Disable => Some(MtlsMode::Disable),
            ModeSetting::Permissive => Some(MtlsMode::Permissive),
            ModeSetting::Strict => Some(MtlsMode::Strict),
        }
    }
}

/// A PeerAuthentication with its namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAuthentication {
    /// Its namespace.
    pub namespace: String,
    /// Its spec.
    pub spec: PeerAuthenticationSpec,
}

/// The mode of `port` for a workload of `namespace` with `labels`.
pub fn resolve_mode(
    policies: &[PeerAuthentication],
    namespace: &str,
    labels: &BTreeMap<String, String>,
    root_namespace: &str,
    port: Option<u16>,
) -> MtlsMode {
    let workload = policies.iter().find(|p| {
        p.namespace == namespace
            && namespace != root_namespace
            && p.spec.selector.as_ref().is_some_and(|s| s.selects(labels))
    });
    let namespace_wide = policies.iter().find(|p| p.namespace == namespace && p.spec.selector.is_none());
    let mesh = policies.iter().find(|p| p.namespace == root_namespace && p.spec.selector.is_none());
    let port_level = workload
        .zip(port)
        .and_then(|(p, port)| p.spec.port_level_mtls.get(&u32::from(port)))
        .and_then(|m| m.mode.mode());
    let level = |p: Option<&PeerAuthentication>| p.and_then(|p| p.spec.mtls.as_ref()).and_then(|m| m.mode.mode());
    port_level.or_else(|| level(workload)).or_else(|| level(namespace_wide)).or_else(|| level(mesh)).unwrap_or_default()
}
