//! Reading configuration files: multi-document YAML of Istio, SMI and the proxy's own kinds.
//!
//! [`load`] reads files and directories (every `*.yaml` / `*.yml` / `*.json` in a directory,
//! not recursing, in name order) into [`Resources`], and reports every problem as a
//! [`Diagnostic`] with file, line, column and field path. Errors make the whole set
//! unusable (a reload keeps the previous snapshot); warnings name what is accepted but not
//! acted on: unknown fields, kinds that later work will enforce, unknown kinds.
//!
//! | kind | group | what the proxy does with it |
//! |---|---|---|
//! | `VirtualService` | networking.istio.io | routes (`http`; `tls` on gateways, by SNI) |
//! | `Gateway` | networking.istio.io | ingress servers on the `MeshProxy`'s gateway listeners: hosts, HTTP, HTTPS with `tls.mode` SIMPLE / MUTUAL / PASSTHROUGH by SNI, `httpsRedirect` |
//! | `DestinationRule` | networking.istio.io | subsets, load balancer, retry budget, outlier detection, connection pool, port-level settings |
//! | `ServiceEntry` | networking.istio.io | services and their endpoints (static addresses with labels, or DNS names) |
//! | `TrafficSplit` | split.smi-spec.io | a weighted split of a service among backends |
//! | `ServiceProfile` | linkerd.io | routes of a service (conditions, response classes, `isRetryable`, timeouts) and its retry budget |
//! | `MeshProxy` | proxy.mesh.dev | the proxy's own settings: listener, admin, workload, inbound listener, identity, tracing (OTLP collector, propagators) |
//! | `EnvoyFilter` | networking.istio.io | local rate limits (`envoy.filters.http.local_ratelimit` patches) |
//! | `HTTPLocalRateLimitPolicy` | policy.linkerd.io | a total rate, a rate per client identity, overrides |
//! | `PeerAuthentication` | security.istio.io | the inbound listener's mTLS mode (STRICT, PERMISSIVE, DISABLE; port level) |
//! | `AuthorizationPolicy` | security.istio.io | inbound authorization (ALLOW, DENY, AUDIT; CUSTOM refused) |
//! | `RequestAuthentication` | security.istio.io | inbound JWT validation |
//! | `Telemetry` | telemetry.istio.io | tracing sampling, custom tags, span reporting, access logging on or off (metric overrides and CEL filters: not enforced) |
//! | `Sidecar`, `ProxyConfig`, `WorkloadEntry` | | parsed, warned about as not enforced yet |

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use mesh_routing::model::{DestinationRuleSpec, ServiceProfileSpec, TrafficSplitSpec, VirtualServiceSpec};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

// === diagnostics ===

/// How bad a [`Diagnostic`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The configuration cannot be used.
    Error,
    /// Accepted, but something in it is ignored.
    Warning,
}

/// One problem found in a file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    /// Error or warning.
    pub severity: Severity,
    /// The file.
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// The resource, as `Kind namespace/name`, when known.
    pub resource: Option<String>,
    /// The field path, like `spec.http[1].route[0].weight`, when known.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        let severity = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, ": {severity}: ")?;
        if let Some(r) = &self.resource {
            write!(f, "{r}: ")?;
        }
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        f.write_str(&self.message)
    }
}

// === resources ===

/// `metadata` of a resource.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct Metadata {
    /// The resource's name.
    pub name: String,
    /// Its namespace; unset is the proxy's namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Labels.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations. `mesh.dev/sticky-split: header:NAME` or `cookie:NAME` on a
    /// VirtualService makes its weighted choices sticky by that header or cookie.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A resource as read: where it came from, its metadata and its typed spec.
#[derive(Clone, Debug, Serialize)]
pub struct Resource<T> {
    /// The file it was read from.
    pub file: PathBuf,
    /// The line its document starts on.
    pub line: usize,
    /// Its metadata.
    pub metadata: Metadata,
    /// Its spec.
    pub spec: T,
}

impl<T> Resource<T> {
    /// Its namespace, or `default_ns`.
    pub fn namespace<'a>(&'a self, default_ns: &'a str) -> &'a str {
        self.metadata.namespace.as_deref().filter(|n| !n.is_empty()).unwrap_or(default_ns)
    }
}

/// Everything read from the configuration files.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    /// VirtualServices.
    pub virtual_services: Vec<Resource<VirtualServiceSpec>>,
    /// DestinationRules.
    pub destination_rules: Vec<Resource<DestinationRuleSpec>>,
    /// ServiceEntries.
    pub service_entries: Vec<Resource<ServiceEntrySpec>>,
    /// SMI TrafficSplits.
    pub traffic_splits: Vec<Resource<TrafficSplitSpec>>,
    /// Linkerd ServiceProfiles.
    pub service_profiles: Vec<Resource<ServiceProfileSpec>>,
    /// EnvoyFilters (their local rate limits).
    pub envoy_filters: Vec<Resource<EnvoyFilterSpec>>,
    /// Linkerd HTTPLocalRateLimitPolicies.
    pub rate_limit_policies: Vec<Resource<mesh_resilience::ratelimit::HttpLocalRateLimitPolicySpec>>,
    /// The proxy's own settings (the last one read wins).
    pub mesh_proxy: Option<Resource<MeshProxySpec>>,
    /// AuthorizationPolicies.
    pub authorization_policies: Vec<Resource<mesh_tls::authz::AuthorizationPolicySpec>>,
    /// PeerAuthentications.
    pub peer_authentications: Vec<Resource<mesh_tls::peer::PeerAuthenticationSpec>>,
    /// RequestAuthentications.
    pub request_authentications: Vec<Resource<mesh_tls::jwt::RequestAuthenticationSpec>>,
    /// Telemetry resources (their tracing sampling and access-log switch).
    pub telemetries: Vec<Resource<TelemetrySpec>>,
    /// Gateways (served by a proxy whose `MeshProxy` has gateway listeners).
    pub gateways: Vec<Resource<crate::gateway::GatewaySpec>>,
}

/// `Telemetry.spec` (telemetry.istio.io): what the proxy acts on is the tracing sampling
/// percentage, custom tags and span reporting switch, and whether access logging is
/// disabled; metrics overrides and providers are accepted and reported as not enforced
/// (spans go to the `MeshProxy`'s collector).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct TelemetrySpec {
    /// The workloads it applies to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<mesh_tls::authz::WorkloadSelector>,
    /// Tracing settings (the first entry's sampling applies).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tracing: Vec<TracingSpec>,
    /// Metrics overrides (not enforced: Istio's standard metrics are always on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<serde_json::Value>,
    /// Access logging (the first entry's `disabled` applies).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub access_logging: Vec<AccessLoggingSpec>,
}

/// One `tracing` entry.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct TracingSpec {
    /// The share of new traces sampled, 0–100.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub random_sampling_percentage: Option<f64>,
    /// Span attributes added to each server span: a literal, an environment variable of the
    /// proxy's, or a request header.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub custom_tags: BTreeMap<String, CustomTag>,
    /// Providers (accepted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub providers: Option<serde_json::Value>,
    /// No spans from this workload (trace context is still propagated).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disable_span_reporting: Option<bool>,
}

/// One `customTags` value: exactly one of its fields.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct CustomTag {
    /// A fixed value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub literal: Option<LiteralTag>,
    /// The proxy's environment variable `name` (or `defaultValue`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub environment: Option<NamedTag>,
    /// The request header `name` (or `defaultValue`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header: Option<NamedTag>,
}

/// `customTags.*.literal`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct LiteralTag {
    /// The value.
    pub value: String,
}

/// `customTags.*.environment` and `.header`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct NamedTag {
    /// The variable or header.
    pub name: String,
    /// The value when it is absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_value: Option<String>,
}

/// One `accessLogging` entry.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct AccessLoggingSpec {
    /// No access log for this workload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
    /// Providers (accepted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub providers: Option<serde_json::Value>,
    /// A CEL filter (not enforced).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter: Option<serde_json::Value>,
}

/// An EnvoyFilter's `spec`: the proxy acts on patches that insert Envoy's local rate limit
/// filter (`envoy.filters.http.local_ratelimit`); others are reported as not enforced.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct EnvoyFilterSpec {
    /// Which workloads it applies to (by labels).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<WorkloadSelector>,
    /// Accepted (the proxy applies the patches it understands in order).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// The patches.
    pub config_patches: Vec<EnvoyConfigPatch>,
    /// Accepted (`targetRefs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_refs: Option<serde_json::Value>,
}

/// A workload selector: labels a workload must carry.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct WorkloadSelector {
    /// The labels.
    pub labels: BTreeMap<String, String>,
}

/// One `configPatches` entry.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct EnvoyConfigPatch {
    /// `HTTP_FILTER`, …
    pub apply_to: String,
    /// Where it applies (`context`: `SIDECAR_INBOUND`, `SIDECAR_OUTBOUND`, `GATEWAY`, `ANY`);
    /// the listener path is accepted as it is.
    #[serde(rename = "match")]
    pub matches: Option<serde_json::Value>,
    /// The patch: `operation` and `value` (Envoy configuration, accepted as it is).
    pub patch: Option<serde_json::Value>,
}

impl EnvoyConfigPatch {
    /// The patch's `match.context`, `ANY` when unset.
    pub fn context(&self) -> &str {
        self.matches.as_ref().and_then(|m| m.get("context")).and_then(|c| c.as_str()).unwrap_or("ANY")
    }

    /// The local rate limit configuration this patch inserts, if it inserts one: from a
    /// `TypedStruct`'s `value` or from the typed config itself.
    pub fn local_rate_limit(&self) -> Option<Result<mesh_resilience::ratelimit::LocalRateLimitConfig, String>> {
        let value = self.patch.as_ref()?.get("value")?;
        if value.get("name").and_then(|n| n.as_str()) != Some("envoy.filters.http.local_ratelimit") {
            return None;
        }
        let typed = value.get("typed_config").or_else(|| value.get("typedConfig"))?;
        let config = typed.get("value").unwrap_or(typed).clone();
        Some(serde_json::from_value(config).map_err(|e| e.to_string()))
    }
}

/// A ServiceEntry's `spec` (the fields the proxy uses).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct ServiceEntrySpec {
    /// The service's host names (taken as written: not expanded with the namespace).
    pub hosts: Vec<String>,
    /// Virtual IPs (accepted, unused).
    pub addresses: Vec<String>,
    /// The service's ports.
    pub ports: Vec<ServicePort>,
    /// `MESH_INTERNAL` or `MESH_EXTERNAL` (accepted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// `NONE`, `STATIC`, `DNS` or `DNS_ROUND_ROBIN`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolution: Option<String>,
    /// The endpoints.
    pub endpoints: Vec<WorkloadEntry>,
    /// Visibility (accepted).
    pub export_to: Vec<String>,
    /// Selects workloads instead of listing endpoints (not supported).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<mesh_routing::model::NotEnforced>,
    /// The SPIFFE IDs the service's endpoints may present under mTLS origination.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
}

/// A port of a ServiceEntry.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct ServicePort {
    /// The service port.
    pub number: u32,
    /// `HTTP`, `HTTP2`, `GRPC`, `TCP`, … (accepted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// The port's name, which endpoints' `ports` refer to.
    pub name: String,
    /// The port on the endpoints, when it differs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u32>,
}

/// An endpoint of a ServiceEntry.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct WorkloadEntry {
    /// An IP address or a DNS name.
    pub address: String,
    /// Port overrides by service port name.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u32>,
    /// Labels, which subsets select on.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Load-balancing weight (default 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Network (accepted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Locality (accepted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub locality: Option<String>,
    /// The endpoint's service account: with mTLS origination, the SPIFFE ID its sidecar must
    /// present (`spiffe://<trust domain>/ns/<namespace>/sa/<account>`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
}

/// The `MeshProxy` kind's `spec`: the proxy's own settings.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct MeshProxySpec {
    /// The outbound listener (`--listen` overrides it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// The admin listener, or `off` (`--admin` overrides it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin: Option<String>,
    /// The local application's address (for the inbound side, later).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    /// The workload this proxy runs beside.
    pub workload: Workload,
    /// The DNS domain suffix of the cluster (default `cluster.local`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain_suffix: Option<String>,
    /// The inbound listener: peers (other sidecars) to the local application, through
    /// PeerAuthentication, mTLS, JWT validation and authorization.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inbound: Option<InboundSpec>,
    /// The workload's certificate, key and trust bundle (PEM files, re-read when they
    /// change). Paths are relative to the file that names them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentitySpec>,
    /// The mesh's root namespace (default `istio-system`): its policies apply mesh-wide.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub root_namespace: Option<String>,
    /// Where spans go (Istio's OpenTelemetry extension provider, for this proxy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracing: Option<ExportSpec>,
    /// Gateway listeners: this proxy is then an ingress gateway too, serving the `Gateway`
    /// resources whose `selector` its workload's labels satisfy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewayProxySpec>,
}

/// `MeshProxy.spec.gateway`: where this proxy serves its Gateways' ports.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct GatewayProxySpec {
    /// One listener per Gateway port served: Istio's `port.number` (the Service's port) and
    /// the local address that stands for it (as a Service's `targetPort` does).
    pub listeners: Vec<GatewayListenerSpec>,
    /// Where `tls.credentialName` is looked up: `DIR/NAME/tls.crt`, `tls.key` and, for
    /// MUTUAL, `ca.crt` (or `DIR/NAME-cacert/ca.crt`): the files of a mounted
    /// `kubernetes.io/tls` Secret. Relative to the file that names it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials_dir: Option<String>,
}

/// One gateway listener.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct GatewayListenerSpec {
    /// The Gateway port number served here.
    pub port: u32,
    /// The local address, like `0.0.0.0:8443`.
    pub listen: String,
}

/// `MeshProxy.spec.tracing`: span export.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct ExportSpec {
    /// OTLP export (none: trace context is propagated, spans are not recorded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp: Option<OtlpSpec>,
    /// The trace context formats read and written, in order: `tracecontext` (W3C, the
    /// default first) and `b3` (Zipkin; read as single or multi header, written as multi).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub propagators: Vec<String>,
    /// The spans' `service.name` (default: the workload's `app` label, else its name, then
    /// `.namespace`, as Istio's `APP_LABEL_AND_NAMESPACE`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,
}

/// `MeshProxy.spec.tracing.otlp`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct OtlpSpec {
    /// The collector's URL: `http://host:4317` (gRPC) or `http://host:4318` (HTTP).
    pub endpoint: String,
    /// `grpc` (default) or `http/protobuf`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

/// The inbound listener.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct InboundSpec {
    /// Where peers connect (`0.0.0.0:15006` in a pod).
    pub listen: String,
    /// The local application (default: the MeshProxy's `app`, else `127.0.0.1:8080`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    /// The workload port PeerAuthentication's `portLevelMtls` keys refer to (default: the
    /// application's port).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// What the application speaks: `http1` (default), `h2`, or `downstream` (as the peer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
}

/// Where the workload's credentials are: the three files, or a directory in the Kubernetes
/// Secret layout (`tls.crt`, `tls.key`, `ca.crt`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct IdentitySpec {
    /// A directory holding `tls.crt`, `tls.key` and `ca.crt`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_dir: Option<String>,
    /// The certificate chain, leaf first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_chain: Option<String>,
    /// The private key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
    /// The trust bundle.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trust_bundle: Option<String>,
}

impl IdentitySpec {
    /// The files, relative paths taken from `base` (the directory of the file that named
    /// them); an error names the missing field.
    pub fn files(&self, base: &Path) -> Result<mesh_tls::CredentialFiles, String> {
        let at = |p: &str| base.join(p);
        if let Some(dir) = &self.secret_dir {
            return Ok(mesh_tls::CredentialFiles::kubernetes_secret(at(dir)));
        }
        match (&self.cert_chain, &self.private_key, &self.trust_bundle) {
            (Some(c), Some(k), Some(b)) => {
                Ok(mesh_tls::CredentialFiles { cert_chain: at(c), private_key: at(k), trust_bundle: at(b) })
            }
            _ => Err("give `secretDir`, or all of `certChain`, `privateKey` and `trustBundle`".into()),
        }
    }
}

/// The workload a proxy runs beside.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct Workload {
    /// Its name.
    pub name: String,
    /// Its namespace (default `default`): the namespace of resources that name none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Its labels (for `sourceLabels`, and the selectors of security policies).
    pub labels: BTreeMap<String, String>,
    /// Its service account (default `default`): with the trust domain of its certificate,
    /// its SPIFFE ID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
}

/// Kinds that are recognised and parsed but not enforced yet, with their API groups.
const NOT_ENFORCED: &[(&str, &str)] = &[
    ("Sidecar", "networking.istio.io"),
    ("ProxyConfig", "networking.istio.io"),
    ("WorkloadEntry", "networking.istio.io"),
    ("WorkloadGroup", "networking.istio.io"),
];

// === loading ===

/// What [`load`] found: the resources, and every diagnostic.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The resources read.
    pub resources: Resources,
    /// Errors and warnings, in file order.
    pub diagnostics: Vec<Diagnostic>,
}

impl Loaded {
    /// Whether any diagnostic is an error.
    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(|d| d.severity == Severity::Error)
    }

    /// The errors.
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics.iter().filter(|d| d.severity == Severity::Error)
    }

    pub(crate) fn error(
        &mut self,
        file: &Path,
        line: Option<usize>,
        resource: Option<String>,
        field: Option<String>,
        message: String,
    ) {
        self.diagnostics.push(Diagnostic {
            severity: Severity::Error,
            file: file.into(),
            line,
            column: None,
            resource,
            field,
            message,
        });
    }

    pub(crate) fn warn(
        &mut self,
        file: &Path,
        line: Option<usize>,
        resource: Option<String>,
        field: Option<String>,
        message: String,
    ) {
        self.diagnostics.push(Diagnostic {
            severity: Severity::Warning,
            file: file.into(),
            line,
            column: None,
            resource,
            field,
            message,
        });
    }
}

/// The files `paths` stand for: files as given, directories' `*.yaml`, `*.yml` and `*.json`
/// files in name order.
pub fn expand(paths: &[PathBuf]) -> Result<Vec<PathBuf>, Box<Diagnostic>> {
    let mut files = Vec::new();
    for path in paths {
        let io_error = |e: std::io::Error| {
            Box::new(Diagnostic {
                severity: Severity::Error,
                file: path.clone(),
                line: None,
                column: None,
                resource: None,
                field: None,
                message: format!("cannot read: {e}"),
            })
        };
        if std::fs::metadata(path).map_err(io_error)?.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(io_error)?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    // Kubernetes volume internals (`..data`, `..2024_…`) are skipped.
                    let hidden = p.file_name().and_then(|n| n.to_str()).is_none_or(|n| n.starts_with('.'));
                    let yaml =
                        p.extension().and_then(|e| e.to_str()).is_some_and(|e| matches!(e, "yaml" | "yml" | "json"));
                    !hidden && yaml && p.is_file()
                })
                .collect();
            found.sort();
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    Ok(files)
}

/// Reads every file of `paths` (see [`expand`]).
pub fn load(paths: &[PathBuf]) -> Loaded {
    let mut loaded = Loaded::default();
    let files = match expand(paths) {
        Ok(files) => files,
        Err(d) => {
            loaded.diagnostics.push(*d);
            return loaded;
        }
    };
    for file in files {
        match std::fs::read_to_string(&file) {
            Ok(text) => load_text(&file, &text, &mut loaded),
            Err(e) => loaded.error(&file, None, None, None, format!("cannot read: {e}")),
        }
    }
    loaded
}

/// The header every document must have.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Header {
    #[serde(default)]
    api_version: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    metadata: Metadata,
}

/// A whole document of one kind.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document<T> {
    #[serde(rename = "apiVersion")]
    _api_version: Option<serde::de::IgnoredAny>,
    #[serde(rename = "kind")]
    _kind: Option<serde::de::IgnoredAny>,
    metadata: Metadata,
    #[serde(default)]
    spec: T,
    #[serde(default, rename = "status")]
    _status: Option<serde::de::IgnoredAny>,
}

/// Reads the documents of one file's text.
pub fn load_text(file: &Path, text: &str, loaded: &mut Loaded) {
    // The first pass checks the YAML and reads each document's header; a file with any
    // syntax error contributes nothing.
    let mut headers = Vec::new();
    for de in yaml_serde::Deserializer::from_str(text) {
        match Option::<yaml_serde::Value>::deserialize(de) {
            Ok(None) => headers.push(None),
            Ok(Some(value)) => headers.push(Some(value)),
            Err(e) => {
                let (line, column) = e.location().map_or((None, None), |l| (Some(l.line()), Some(l.column())));
                loaded.diagnostics.push(Diagnostic {
                    severity: Severity::Error,
                    file: file.into(),
                    line,
                    column,
                    resource: None,
                    field: None,
                    message: format!("invalid YAML: {}", strip_location(&e.to_string())),
                });
                return;
            }
        }
    }
    let starts = document_lines(text);
    for (i, value) in headers.into_iter().enumerate() {
        let Some(value) = value else { continue };
        let (line, end) = starts.get(i).copied().unwrap_or((1, usize::MAX));
        let header: Header = match yaml_serde::from_value(value) {
            Ok(h) => h,
            Err(e) => {
                loaded.error(file, Some(line), None, None, format!("not a Kubernetes-style resource: {e}"));
                continue;
            }
        };
        let Some(kind) = header.kind.clone() else {
            loaded.error(file, Some(line), None, Some("kind".into()), "every document needs a `kind`".into());
            continue;
        };
        let api = header.api_version.clone().unwrap_or_default();
        let group = api.split('/').next().unwrap_or("");
        let name = match &header.metadata.namespace {
            Some(ns) => format!("{kind} {ns}/{}", header.metadata.name),
            None => format!("{kind} {}", header.metadata.name),
        };
        if header.api_version.is_none() {
            loaded.warn(file, Some(line), Some(name.clone()), Some("apiVersion".into()), "missing".into());
        }
        let doc = || yaml_serde::Deserializer::from_str(text).nth(i).expect("the document was read once already");
        let mut ctx = Ctx { file, text, line, end, name: &name, loaded };
        match (kind.as_str(), group) {
            ("VirtualService", "networking.istio.io") => {
                if let Some(r) = ctx.typed(doc()) {
                    let r: Resource<VirtualServiceSpec> = r;
                    ctx.check_virtual_service(&r);
                    ctx.loaded.resources.virtual_services.push(r);
                }
            }
            ("DestinationRule", "networking.istio.io") => {
                if let Some(r) = ctx.typed::<DestinationRuleSpec>(doc()) {
                    if r.spec.host.is_empty() {
                        ctx.error_at("spec.host", "a DestinationRule needs a `host`");
                    }
                    ctx.check_destination_rule(&r);
                    ctx.loaded.resources.destination_rules.push(r);
                }
            }
            ("ServiceEntry", "networking.istio.io") => {
                if let Some(r) = ctx.typed::<ServiceEntrySpec>(doc()) {
                    ctx.check_service_entry(&r);
                    ctx.loaded.resources.service_entries.push(r);
                }
            }
            ("TrafficSplit", "split.smi-spec.io") => {
                if let Some(r) = ctx.typed::<TrafficSplitSpec>(doc()) {
                    if r.spec.service.is_empty() {
                        ctx.error_at("spec.service", "a TrafficSplit needs a `service`");
                    }
                    ctx.loaded.resources.traffic_splits.push(r);
                }
            }
            ("EnvoyFilter", "networking.istio.io") => {
                if let Some(r) = ctx.typed::<EnvoyFilterSpec>(doc()) {
                    ctx.check_envoy_filter(&r);
                    ctx.loaded.resources.envoy_filters.push(r);
                }
            }
            ("HTTPLocalRateLimitPolicy", "policy.linkerd.io") => {
                if let Some(r) = ctx.typed::<mesh_resilience::ratelimit::HttpLocalRateLimitPolicySpec>(doc()) {
                    if let Err(e) = r.spec.to_layer("cluster.local", "default") {
                        ctx.error_at(&format!("spec.{}", e.field()), e.reason());
                    }
                    ctx.loaded.resources.rate_limit_policies.push(r);
                }
            }
            ("ServiceProfile", "linkerd.io") => {
                if let Some(r) = ctx.typed::<ServiceProfileSpec>(doc()) {
                    ctx.check_service_profile(&r);
                    ctx.loaded.resources.service_profiles.push(r);
                }
            }
            ("AuthorizationPolicy", "security.istio.io") => {
                if let Some(r) = ctx.typed::<mesh_tls::authz::AuthorizationPolicySpec>(doc()) {
                    ctx.check_authorization_policy(&r);
                    ctx.loaded.resources.authorization_policies.push(r);
                }
            }
            ("PeerAuthentication", "security.istio.io") => {
                if let Some(r) = ctx.typed::<mesh_tls::peer::PeerAuthenticationSpec>(doc()) {
                    if !r.spec.port_level_mtls.is_empty() && r.spec.selector.is_none() {
                        ctx.warn_at("spec.portLevelMtls", "only honoured with a `selector`, as in Istio; ignored");
                    }
                    ctx.loaded.resources.peer_authentications.push(r);
                }
            }
            ("RequestAuthentication", "security.istio.io") => {
                if let Some(r) = ctx.typed::<mesh_tls::jwt::RequestAuthenticationSpec>(doc()) {
                    for (i, rule) in r.spec.jwt_rules.iter().enumerate() {
                        if let Err(e) = rule.check(i) {
                            ctx.error_at(&format!("spec.{}", e.field), &e.reason);
                        }
                    }
                    ctx.loaded.resources.request_authentications.push(r);
                }
            }
            ("Telemetry", "telemetry.istio.io") => {
                if let Some(r) = ctx.typed::<TelemetrySpec>(doc()) {
                    for (i, t) in r.spec.tracing.iter().enumerate() {
                        if t.random_sampling_percentage.is_some_and(|p| !(0.0..=100.0).contains(&p)) {
                            ctx.error_at(
                                &format!("spec.tracing[{i}].randomSamplingPercentage"),
                                "must be between 0 and 100",
                            );
                        }
                        if i > 0 {
                            ctx.warn_at(
                                &format!("spec.tracing[{i}]"),
                                "only the first tracing entry applies (one provider: the MeshProxy's collector)",
                            );
                        }
                    }
                    if r.spec.metrics.is_some() {
                        ctx.warn_at("spec.metrics", "metric overrides: parsed, but not enforced yet (Istio's standard metrics are served as they are)");
                    }
                    for (i, a) in r.spec.access_logging.iter().enumerate() {
                        if a.filter.is_some() {
                            ctx.warn_at(
                                &format!("spec.accessLogging[{i}].filter"),
                                "CEL filters: parsed, but not enforced yet",
                            );
                        }
                    }
                    ctx.loaded.resources.telemetries.push(r);
                }
            }
            ("Gateway", "networking.istio.io") => {
                if let Some(r) = ctx.typed::<crate::gateway::GatewaySpec>(doc()) {
                    for (field, severity, message) in crate::gateway::check(&r.spec) {
                        ctx.at(severity, &field, &message);
                    }
                    ctx.loaded.resources.gateways.push(r);
                }
            }
            ("MeshProxy", "proxy.mesh.dev") => {
                if let Some(r) = ctx.typed::<MeshProxySpec>(doc()) {
                    ctx.loaded.resources.mesh_proxy = Some(r);
                }
            }
            (k, g) if NOT_ENFORCED.iter().any(|(nk, ng)| *nk == k && *ng == g) => {
                ctx.loaded.warn(file, Some(line), Some(name.clone()), None, "parsed, but not enforced yet".into());
            }
            (k, g) => {
                let what = if NOT_ENFORCED.iter().any(|(nk, _)| *nk == k)
                    || [
                        "VirtualService",
                        "DestinationRule",
                        "ServiceEntry",
                        "TrafficSplit",
                        "ServiceProfile",
                        "EnvoyFilter",
                        "HTTPLocalRateLimitPolicy",
                        "MeshProxy",
                        "Gateway",
                        "AuthorizationPolicy",
                        "PeerAuthentication",
                        "RequestAuthentication",
                        "Telemetry",
                    ]
                    .contains(&k)
                {
                    format!("unknown API group `{g}` for kind {k}; ignored")
                } else {
                    format!("unknown kind `{k}` ({api}); ignored")
                };
                ctx.loaded.warn(file, Some(line), Some(name.clone()), None, what);
            }
        }
    }
}

/// `…from[N].principals` → (`principals`, `source`); `…to[N].methods` → (`methods`,
/// `operation`): an AuthorizationPolicy field written beside its block instead of inside.
fn misplaced_policy_field(path: &str) -> Option<(&str, &'static str)> {
    let (head, field) = path.rsplit_once('.')?;
    let parent = if head.ends_with(']') && head.contains(".from[") && head.rsplit_once(".from[")?.1.ends_with(']') {
        "source"
    } else if head.ends_with(']') && head.contains(".to[") && head.rsplit_once(".to[")?.1.ends_with(']') {
        "operation"
    } else {
        return None;
    };
    let last = head.rsplit_once('.').map_or(head, |(_, l)| l);
    (last.starts_with("from[") || last.starts_with("to[")).then_some((field, parent))
}

/// Each document's lines: the 1-based line it starts on (its first content line, or the line
/// after its `---` when it has none) and the line after its last; one entry per document the
/// YAML stream yields: an empty document between two `---` is one, what precedes a first
/// `---` is one only when it has content, and nothing after a final `---` is none.
fn document_lines(text: &str) -> Vec<(usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let is_separator = |l: &str| {
        let t = l.trim_end();
        t == "---" || t.starts_with("--- ")
    };
    let is_content = |l: &str| {
        let t = l.trim();
        !t.is_empty() && !t.starts_with('#')
    };
    let mut docs = Vec::new();
    let mut segment_start = 0;
    let mut opened_by_separator = false;
    for i in 0..=lines.len() {
        if i < lines.len() && !is_separator(lines[i]) {
            continue;
        }
        let content = lines[segment_start..i].iter().position(|l| is_content(l));
        let last = i == lines.len();
        if content.is_some() || (opened_by_separator && !last) {
            let start = content.map_or(segment_start + 1, |c| segment_start + c + 1);
            docs.push((start, i + 1));
        }
        opened_by_separator = true;
        segment_start = i + 1;
    }
    docs
}

/// `spec.http.0.route` as `spec.http[0].route`.
fn bracket_indices(path: &str) -> String {
    let mut out = String::with_capacity(path.len() + 4);
    for (i, part) in path.split('.').enumerate() {
        if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
            out.push('[');
            out.push_str(part);
            out.push(']');
        } else {
            if i > 0 {
                out.push('.');
            }
            out.push_str(part);
        }
    }
    out
}

/// `… at line 3 column 5` is said by the diagnostic's position already.
fn strip_location(message: &str) -> &str {
    match message.rfind(" at line ") {
        Some(i) => &message[..i],
        None => message,
    }
}

struct Ctx<'a> {
    file: &'a Path,
    text: &'a str,
    line: usize,
    /// The line after the document's last.
    end: usize,
    name: &'a str,
    loaded: &'a mut Loaded,
}

impl Ctx<'_> {
    /// Deserializes a document as `Document<T>`, reporting type errors with their position
    /// and path, and ignored fields as warnings.
    fn typed<T: DeserializeOwned + Default>(&mut self, de: yaml_serde::Deserializer<'_>) -> Option<Resource<T>> {
        let mut ignored = Vec::new();
        let result: Result<Document<T>, _> = serde_ignored::deserialize(de, |path| ignored.push(path.to_string()));
        match result {
            Ok(doc) => {
                // A path ending in `?` is a whole value accepted as it is (a block not enforced
                // yet, the header); a `?` inside one stands for an optional block: dropped.
                for path in ignored.iter().filter(|p| !p.ends_with('?')).map(|p| bracket_indices(&p.replace(".?", "")))
                {
                    if path.ends_with(".destination.weight") {
                        // Istio refuses unknown fields; this one is a common slip worth naming.
                        self.error_at(&path, "unknown field: `weight` belongs beside `destination`, not inside it");
                        continue;
                    }
                    // `from: [{source:, principals: …}]`: a source's field indented one level
                    // too shallow (so `source` is empty); Istio refuses both.
                    if let Some(inner) = misplaced_policy_field(&path) {
                        let (field, parent) = inner;
                        self.error_at(
                            &path,
                            &format!("unknown field: `{field}` belongs inside `{parent}`, not beside it"),
                        );
                        continue;
                    }
                    self.warn_at(&path, "unknown field, ignored");
                }
                self.note_not_enforced_later();
                Some(Resource { file: self.file.into(), line: self.line, metadata: doc.metadata, spec: doc.spec })
            }
            Err(e) => {
                let (line, column) = e.location().map_or((None, None), |l| (Some(l.line()), Some(l.column())));
                let message = strip_location(&e.to_string()).to_owned();
                // yaml_serde says `spec.http[1].route[0].weight: invalid type: …`.
                let (field, message) = match message.split_once(": ") {
                    Some((path, rest)) if !path.contains(' ') => (Some(path.to_owned()), rest.to_owned()),
                    _ => (None, message),
                };
                self.loaded.diagnostics.push(Diagnostic {
                    severity: Severity::Error,
                    file: self.file.into(),
                    line: line.or(Some(self.line)),
                    column,
                    resource: Some(self.name.into()),
                    field,
                    message,
                });
                None
            }
        }
    }

    fn error_at(&mut self, field: &str, message: &str) {
        self.at(Severity::Error, field, message);
    }

    fn warn_at(&mut self, field: &str, message: &str) {
        self.at(Severity::Warning, field, message);
    }

    fn at(&mut self, severity: Severity, field: &str, message: &str) {
        let (line, column) = self.locate(field);
        self.loaded.diagnostics.push(Diagnostic {
            severity,
            file: self.file.into(),
            line: Some(line),
            column,
            resource: Some(self.name.into()),
            field: Some(field.into()),
            message: message.into(),
        });
    }

    /// Where `field` (a path like `spec.http[1].route[0].weight`) is in this document: the line
    /// and column of its last key or list item, found by walking the block-style YAML by
    /// indentation; as far as the walk got when the rest is in flow style or absent.
    fn locate(&self, field: &str) -> (usize, Option<usize>) {
        let lines: Vec<&str> = self.text.lines().collect();
        let end = self.end.saturating_sub(1).min(lines.len());
        let indent = |l: &str| l.len() - l.trim_start().len();
        let is_content = |l: &str| {
            let t = l.trim();
            !t.is_empty() && !t.starts_with('#')
        };
        let mut found = (self.line, None);
        let mut pos = self.line.saturating_sub(1);
        // Where the enclosing key or item starts; its children sit further right.
        let mut parent: Option<usize> = None;
        for segment in field.split('.') {
            let (key, indices) = match segment.find('[') {
                Some(i) => (&segment[..i], &segment[i..]),
                None => (segment, ""),
            };
            let mut hit = None;
            for (i, line) in lines.iter().enumerate().take(end).skip(pos) {
                if !is_content(line) {
                    continue;
                }
                // The block ends at a line no deeper than its parent.
                if i > pos && parent.is_some_and(|p| indent(line) <= p) {
                    break;
                }
                let mut offset = indent(line);
                let mut rest = &line[offset..];
                while let Some(after) = rest.strip_prefix("- ") {
                    offset += 2;
                    rest = after;
                }
                let named = rest.strip_prefix(key).is_some_and(|r| r.starts_with(':'))
                    || rest.strip_prefix(&format!("\"{key}\"")).is_some_and(|r| r.starts_with(':'));
                if named && parent.is_none_or(|p| offset > p) {
                    hit = Some((i, offset));
                    break;
                }
            }
            let Some((line, offset)) = hit else { return found };
            found = (line + 1, Some(offset + 1));
            parent = Some(offset);
            pos = line;
            // `[n]`: the n-th `-` at the first item's indentation under the key.
            for index in indices.split(']').filter_map(|i| i.strip_prefix('[')).filter_map(|i| i.parse::<usize>().ok())
            {
                let mut dash: Option<usize> = None;
                let mut seen = 0;
                let mut item = None;
                for (i, line) in lines.iter().enumerate().take(end).skip(pos + 1) {
                    if !is_content(line) {
                        continue;
                    }
                    let at = indent(line);
                    let is_dash = line[at..].starts_with('-');
                    match dash {
                        None if is_dash && parent.is_none_or(|p| at >= p) => dash = Some(at),
                        None => break,
                        Some(d) if at < d || (at == d && !is_dash) => break,
                        Some(_) => {}
                    }
                    if dash == Some(at) && is_dash {
                        if seen == index {
                            item = Some((i, at));
                            break;
                        }
                        seen += 1;
                    }
                }
                let Some((line, at)) = item else { return found };
                found = (line + 1, Some(at + 1));
                // The item's keys sit right of its dash (the first one on the dash's line).
                parent = Some(at);
                pos = line;
            }
        }
        found
    }

    /// Warns about fields present in the document that are accepted but not enforced yet.
    fn note_not_enforced_later(&mut self) {
        let end = {
            let rest = &self.text.lines().skip(self.line).position(|l| l.trim_end() == "---");
            rest.map_or(usize::MAX, |n| self.line + n)
        };
        const LATER: &[(&str, &str)] = &[
            ("corsPolicy:", "CORS"),
            ("localityLbSetting:", "locality load balancing"),
            ("warmup:", "slow start"),
            ("delegate:", "delegation"),
            ("workloadSelector:", "workload selectors"),
            ("maxConnectionDuration:", "connection lifetimes"),
            ("useClientProtocol:", "the client's protocol upstream"),
            ("dstOverrides:", "traffic shifting by dstOverrides (use a TrafficSplit)"),
            ("opaquePorts:", "opaque ports"),
        ];
        let mut found = Vec::new();
        for (n, l) in self.text.lines().enumerate().skip(self.line.saturating_sub(1)) {
            if n + 1 >= end {
                break;
            }
            let t = l.trim_start().trim_start_matches("- ");
            for (key, what) in LATER {
                if t.starts_with(key) && !found.iter().any(|(k, _)| k == key) {
                    found.push((*key, n + 1));
                    let _ = what;
                }
            }
        }
        for (key, line) in found {
            let what = LATER.iter().find(|(k, _)| *k == key).map_or("", |(_, w)| w);
            self.loaded.warn(
                self.file,
                Some(line),
                Some(self.name.into()),
                Some(key.trim_end_matches(':').into()),
                format!("{what}: parsed, but not enforced yet"),
            );
        }
    }

    fn check_authorization_policy(&mut self, r: &Resource<mesh_tls::authz::AuthorizationPolicySpec>) {
        let policy = mesh_tls::authz::Policy::new(r.namespace("default"), &r.metadata.name, r.spec.clone());
        match mesh_tls::authz::Authorizer::new([policy]) {
            Ok(a) => {
                for w in a.warnings() {
                    let field = w.split(": ").nth(1).unwrap_or("spec.rules").to_owned();
                    self.warn_at(&field, w.rsplit(": ").next().unwrap_or(w));
                }
            }
            Err(e) => self.error_at(&e.field, &e.reason),
        }
        if r.spec.target_refs.is_some() {
            self.warn_at(
                "spec.targetRefs",
                "binds to gateways and services, not to this sidecar; the policy does not apply here",
            );
        }
    }

    fn check_virtual_service(&mut self, r: &Resource<VirtualServiceSpec>) {
        if r.spec.hosts.is_empty() {
            let hosts: std::collections::BTreeSet<&str> =
                r.spec.http.iter().flat_map(|h| h.route.iter().map(|d| d.destination.host.as_str())).collect();
            let hint = match hosts.len() {
                1 => format!(" (all its routes go to `{0}`: add `hosts: [{0}]`)", hosts.first().expect("one host")),
                _ => String::new(),
            };
            let (line, column) = self.locate("spec");
            self.loaded.diagnostics.push(Diagnostic {
                severity: Severity::Error,
                file: self.file.into(),
                line: Some(line),
                column,
                resource: Some(self.name.into()),
                field: Some("spec.hosts".into()),
                message: format!("a VirtualService needs at least one host, as Istio requires{hint}"),
            });
        }
        if !r.spec.gateways.is_empty() && !r.spec.gateways.iter().any(|g| g == "mesh") {
            self.warn_at(
                "spec.gateways",
                "bound to gateways only (no `mesh`): a sidecar does not apply it, a gateway proxy does",
            );
        }
        for (i, route) in r.spec.tls.iter().enumerate() {
            if route.matches.is_empty() {
                self.error_at(&format!("spec.tls[{i}].match"), "a TLS route needs at least one match block");
            }
            for (j, m) in route.matches.iter().enumerate() {
                if m.sni_hosts.is_empty() {
                    self.error_at(&format!("spec.tls[{i}].match[{j}].sniHosts"), "a TLS match needs `sniHosts`");
                }
                if !m.destination_subnets.is_empty() {
                    self.warn_at(
                        &format!("spec.tls[{i}].match[{j}].destinationSubnets"),
                        "parsed, but not enforced yet",
                    );
                }
            }
            if route.route.is_empty() {
                self.error_at(&format!("spec.tls[{i}].route"), "a TLS route needs at least one destination");
            }
            for (j, d) in route.route.iter().enumerate() {
                if d.destination.host.is_empty() {
                    self.error_at(&format!("spec.tls[{i}].route[{j}].destination.host"), "a destination needs a host");
                }
                if d.weight.is_some_and(|w| !(0..=100).contains(&w)) {
                    self.error_at(&format!("spec.tls[{i}].route[{j}].weight"), "must be between 0 and 100");
                }
            }
        }
        if !r.spec.tls.is_empty() && (r.spec.gateways.is_empty() || r.spec.gateways.iter().any(|g| g == "mesh")) {
            self.warn_at("spec.tls", "TLS routes are served by gateway proxies; a sidecar passes TLS through as it is");
        }
        for (i, route) in r.spec.http.iter().enumerate() {
            for (j, m) in route.matches.iter().enumerate() {
                for key in m.pseudo_header_keys() {
                    self.warn_at(
                        &format!("spec.http[{i}].match[{j}].headers.{key}"),
                        "matches a header of this literal name (as Istio does); use the match field of this name instead",
                    );
                }
            }
        }
        // Compiling the routes finds the rest (weights, rewrites, regexes…), with field paths.
        let host = mesh_routing::VirtualHostConfig::new(self.name, vec!["*".into()], r.spec.http.clone());
        if let Err(e) = mesh_routing::RouteTable::new(&[host], &mesh_routing::RouteContext::default()) {
            let field = format!("spec.{}", e.field());
            self.error_at(&field, e.reason());
        }
    }

    fn check_destination_rule(&mut self, r: &Resource<DestinationRuleSpec>) {
        use mesh_routing::model::{ConnectionPoolSettings, OutlierDetectionSpec};
        let policies = std::iter::once(("spec.trafficPolicy".to_owned(), r.spec.traffic_policy.as_ref())).chain(
            r.spec
                .subsets
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("spec.subsets[{i}].trafficPolicy"), s.traffic_policy.as_ref())),
        );
        // Each policy's blocks, and its port-level entries' blocks, with their paths.
        let mut blocks: Vec<(String, Option<&ConnectionPoolSettings>, Option<&OutlierDetectionSpec>)> = Vec::new();
        for (path, policy) in policies {
            let Some(policy) = policy else { continue };
            blocks.push((path.clone(), policy.connection_pool.as_ref(), policy.outlier_detection.as_ref()));
            for (j, entry) in policy.port_level_settings.iter().enumerate() {
                let at = format!("{path}.portLevelSettings[{j}]");
                if entry.port.as_ref().is_none_or(|p| p.number == 0 || p.number > 65535) {
                    self.error_at(&format!("{at}.port"), "needs a port number from 1 to 65535");
                }
                blocks.push((at, entry.connection_pool.as_ref(), entry.outlier_detection.as_ref()));
            }
        }
        for (path, pool, outlier) in blocks {
            if let Some(pool) = pool
                && let Err(e) = pool.limits()
            {
                let field = match e.field() {
                    "" => format!("{path}.connectionPool"),
                    f => format!("{path}.connectionPool.{f}"),
                };
                self.error_at(&field, e.reason());
            }
            let Some(outlier) = outlier else { continue };
            if outlier.consecutive_errors.is_some() {
                self.warn_at(
                    &format!("{path}.outlierDetection.consecutiveErrors"),
                    "deprecated: Istio ignores it (before 1.7 it meant consecutiveGatewayErrors); use consecutive5xxErrors or consecutiveGatewayErrors",
                );
            }
            if let Err(e) = outlier.to_config() {
                self.error_at(&format!("{path}.outlierDetection.{}", e.field()), e.reason());
            }
        }
    }

    fn check_envoy_filter(&mut self, r: &Resource<EnvoyFilterSpec>) {
        for (i, patch) in r.spec.config_patches.iter().enumerate() {
            let at = format!("spec.configPatches[{i}]");
            match patch.local_rate_limit() {
                None => self.warn_at(&at, "parsed, but not enforced: the proxy acts only on local rate limit filters"),
                Some(Err(e)) => self.error_at(&format!("{at}.patch.value"), &format!("not a local rate limit: {e}")),
                Some(Ok(config)) => {
                    if let Err(e) = config.to_layer() {
                        self.error_at(&format!("{at}.patch.value.typed_config.value.{}", e.field()), e.reason());
                    }
                }
            }
        }
    }

    fn check_service_profile(&mut self, r: &Resource<ServiceProfileSpec>) {
        // Compiling the routes finds what is wrong (conditions, classes, timeouts), with
        // field paths.
        let template = mesh_routing::model::HttpRoute::named("service").to(self.name, None, 1);
        let compiled = r.spec.routes(&template).and_then(|routes| {
            let host = mesh_routing::VirtualHostConfig::new(self.name, vec!["*".into()], routes);
            mesh_routing::RouteTable::new(&[host], &mesh_routing::RouteContext::default())
        });
        if let Err(e) = compiled {
            self.error_at(&format!("spec.{}", e.field()), e.reason());
        }
        if let Err(e) = r.spec.retry_budget() {
            self.error_at(&format!("spec.retryBudget.{}", e.field()), e.reason());
        }
    }

    fn check_service_entry(&mut self, r: &Resource<ServiceEntrySpec>) {
        if r.spec.hosts.is_empty() {
            self.error_at("spec.hosts", "a ServiceEntry needs at least one host");
        }
        match r.spec.resolution.as_deref() {
            None | Some("NONE" | "STATIC" | "DNS" | "DNS_ROUND_ROBIN") => {}
            Some(other) => {
                self.error_at("spec.resolution", &format!("`{other}` is not one of NONE, STATIC, DNS, DNS_ROUND_ROBIN"))
            }
        }
        for (i, p) in r.spec.ports.iter().enumerate() {
            if p.number == 0 || p.number > 65535 {
                self.error_at(&format!("spec.ports[{i}].number"), "must be a port from 1 to 65535");
            }
        }
        for (i, e) in r.spec.endpoints.iter().enumerate() {
            if e.address.is_empty() {
                self.error_at(&format!("spec.endpoints[{i}].address"), "an endpoint needs an address");
            }
            if e.weight == Some(0) {
                self.error_at(&format!("spec.endpoints[{i}].weight"), "must be at least 1");
            }
        }
        if r.spec.ports.is_empty() {
            self.error_at("spec.ports", "a ServiceEntry needs at least one port");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diagnostics(text: &str) -> Vec<String> {
        let mut loaded = Loaded::default();
        load_text(Path::new("t.yaml"), text, &mut loaded);
        loaded.diagnostics.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn documents_are_numbered_as_the_yaml_stream_yields_them() {
        assert_eq!(document_lines("a: 1\n"), [(1, 2)]);
        assert_eq!(document_lines("# c\n---\na: 1\n---\n"), [(3, 4)]);
        assert_eq!(document_lines("a: 1\n---\n# only a comment\n---\nb: 2\n"), [(1, 2), (3, 4), (5, 6)]);
    }

    #[test]
    fn errors_point_at_their_field_after_an_empty_document() {
        let text = "kind: X\napiVersion: x/v1\n---\n# nothing\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: b\nspec:\n  hosts: [b]\n  http:\n  - route:\n    - destination:\n        host: b\n      weight: 1\n  - route:\n    - destination:\n        host: b\n      weight: 5\n    - destination:\n        host: c\n      weight: -1\n";
        let found = diagnostics(text);
        assert!(
            found.iter().any(
                |d| d == "t.yaml:23:7: error: VirtualService b: spec.http[1].route[1].weight: must not be negative"
            ),
            "{found:?}"
        );
    }

    #[test]
    fn unknown_fields_inside_optional_blocks_are_reported() {
        let text = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: r\nspec:\n  host: r\n  trafficPolicy:\n    loadBalancer:\n      simpel: ROUND_ROBIN\n    connectionPool:\n      tcp: {maxConnections: 1}\n";
        let found = diagnostics(text);
        assert!(found.iter().any(|d| d == "t.yaml:9:7: warning: DestinationRule r: spec.trafficPolicy.loadBalancer.simpel: unknown field, ignored"), "{found:?}");
        // A block accepted but not enforced yet is one warning, not one per field inside it.
        assert!(!found.iter().any(|d| d.contains("maxConnections")), "{found:?}");
    }
}
