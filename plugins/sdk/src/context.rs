//! What the host hands a plugin: identity, mesh updates, config, cancellation and metrics.

use crate::mesh::{MeshView, NodeIdentity};
use std::path::{Path, PathBuf};
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
    state_dir: Option<Arc<PathBuf>>,
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
            state_dir: None,
        }
    }

    /// Gives the plugin a persistent directory of its own (the host makes it, mode 0700, owned
    /// by the plugin's user).
    pub fn with_state_dir(mut self, dir: PathBuf) -> Self {
        self.state_dir = Some(Arc::new(dir));
        self
    }

    /// This instance's persistent directory (`[plugins].state_dir/<instance>`): for state that
    /// must outlive a restart of the plugin, the node or the machine. `None` only in contexts
    /// built without one (a plugin's own tests).
    pub fn state_dir(&self) -> Option<&Path> {
        self.state_dir.as_deref().map(PathBuf::as_path)
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
