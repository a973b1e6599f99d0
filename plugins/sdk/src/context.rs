//! What the host hands a plugin: identity, mesh updates, config, cancellation and metrics.

use crate::mesh::{MeshView, NodeIdentity};
use std::sync::Arc;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Everything a plugin may touch. Cheap to clone.
#[derive(Clone)]
pub struct PluginContext {
    node: Arc<NodeIdentity>,
    instance: Arc<str>,
    config: Arc<toml::Table>,
    mesh: watch::Receiver<MeshView>,
    cancel: CancellationToken,
}

impl PluginContext {
    /// Built by the plugin host (or by a plugin's own tests).
    pub fn new(
        node: NodeIdentity,
        instance: &str,
        config: toml::Table,
        mesh: watch::Receiver<MeshView>,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            node: Arc::new(node),
            instance: Arc::from(instance),
            config: Arc::new(config),
            mesh,
            cancel,
        }
    }

    /// This node's name, public key and overlay addresses.
    pub fn node(&self) -> &NodeIdentity {
        &self.node
    }

    /// The instance name: the `<name>` of `[plugins.<name>]`, also the HTTP prefix.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The plugin's own config section, host keys removed.
    pub fn config(&self) -> &toml::Table {
        &self.config
    }

    /// A fresh receiver of mesh updates; it starts marked as seen.
    pub fn mesh(&self) -> watch::Receiver<MeshView> {
        self.mesh.clone()
    }

    /// Fires when the plugin is being stopped.
    pub fn cancellation(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Metrics labelled with this plugin instance; they reach the node's one Prometheus output.
    pub fn metrics(&self) -> PluginMetrics {
        PluginMetrics {
            plugin: self.instance.clone(),
        }
    }
}

/// Creates metrics carrying a `plugin="<instance>"` label, through the `metrics` facade.
#[derive(Clone)]
pub struct PluginMetrics {
    plugin: Arc<str>,
}

impl PluginMetrics {
    pub fn counter(&self, name: &str) -> metrics::Counter {
        self.counter_with(name, &[])
    }

    pub fn gauge(&self, name: &str) -> metrics::Gauge {
        self.gauge_with(name, &[])
    }

    pub fn histogram(&self, name: &str) -> metrics::Histogram {
        self.histogram_with(name, &[])
    }

    pub fn counter_with(&self, name: &str, labels: &[(&str, &str)]) -> metrics::Counter {
        metrics::counter!(name.to_string(), self.labels(labels))
    }

    pub fn gauge_with(&self, name: &str, labels: &[(&str, &str)]) -> metrics::Gauge {
        metrics::gauge!(name.to_string(), self.labels(labels))
    }

    pub fn histogram_with(&self, name: &str, labels: &[(&str, &str)]) -> metrics::Histogram {
        metrics::histogram!(name.to_string(), self.labels(labels))
    }

    fn labels(&self, extra: &[(&str, &str)]) -> Vec<metrics::Label> {
        let mut labels = vec![metrics::Label::new("plugin", self.plugin.to_string())];
        labels.extend(
            extra
                .iter()
                .map(|(k, v)| metrics::Label::new(k.to_string(), v.to_string())),
        );
        labels
    }
}
