//! [`Endpoint`] and the [`HealthView`] hook.

use std::collections::BTreeMap;
use std::sync::Arc;

/// The label set of an endpoint without labels; `BTreeMap::new` allocates nothing.
static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

/// One upstream endpoint: an address, a load-balancing weight and labels. See the module docs.
///
/// Cheap to clone: the address and the labels are reference counted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    address: Arc<str>,
    weight: u32,
    // `None` stands for "no labels", so that label-less endpoints share no reference count.
    labels: Option<Arc<BTreeMap<String, String>>>,
}

impl Endpoint {
    /// An endpoint at `address` (`"host:port"`) with weight 1 and no labels.
    pub fn new(address: impl Into<Arc<str>>) -> Self {
        Self { address: address.into(), weight: 1, labels: None }
    }

    /// Sets the load-balancing weight. A weight of 0 is rejected by [`Balancer::new`] and
    /// [`Balancer::update`] ([`InvalidBalancer::ZeroWeight`]).
    ///
    /// [`Balancer::new`]: super::Balancer::new
    /// [`Balancer::update`]: super::Balancer::update
    /// [`InvalidBalancer::ZeroWeight`]: super::InvalidBalancer::ZeroWeight
    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// Sets the labels (the pod labels an Istio subset selects on).
    pub fn with_labels(mut self, labels: BTreeMap<String, String>) -> Self {
        self.labels = if labels.is_empty() { None } else { Some(Arc::new(labels)) };
        self
    }

    /// The address, `"host:port"`.
    pub fn address(&self) -> &Arc<str> {
        &self.address
    }

    /// The load-balancing weight.
    pub fn weight(&self) -> u32 {
        self.weight
    }

    /// The labels (empty when none were set).
    pub fn labels(&self) -> &BTreeMap<String, String> {
        self.labels.as_deref().unwrap_or(&NO_LABELS)
    }

    /// Whether every `(key, value)` of `selector` is among the labels, as an Istio subset's
    /// `labels` select endpoints. An empty selector matches every endpoint.
    pub fn matches_labels(&self, selector: &BTreeMap<String, String>) -> bool {
        let labels = self.labels();
        selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// Which endpoints may take traffic. See the module docs.
///
/// `()` says every endpoint is available; a closure `Fn(&Endpoint) -> bool` answers per
/// endpoint. Outlier detection implements it to eject failing endpoints.
pub trait HealthView: Send + Sync {
    /// Whether `endpoint` may be picked.
    fn is_available(&self, endpoint: &Endpoint) -> bool;
}

impl HealthView for () {
    fn is_available(&self, _: &Endpoint) -> bool {
        true
    }
}

impl<F> HealthView for F
where
    F: Fn(&Endpoint) -> bool + Send + Sync,
{
    fn is_available(&self, endpoint: &Endpoint) -> bool {
        self(endpoint)
    }
}

impl<H: HealthView + ?Sized> HealthView for Arc<H> {
    fn is_available(&self, endpoint: &Endpoint) -> bool {
        (**self).is_available(endpoint)
    }
}

/// Outlier detection's view: an endpoint it ejected is unavailable (unless the cluster is in
/// panic mode). Costs two atomic loads while nothing is ejected.
impl HealthView for mesh_resilience::outlier::OutlierDetector {
    fn is_available(&self, endpoint: &Endpoint) -> bool {
        mesh_resilience::outlier::OutlierDetector::is_available(self, endpoint.address())
    }
}
