//! Carries a plugin child's metrics to the node: the child records through the `metrics`
//! facade into [`ForwardingRecorder`], snapshots travel over the plugin channel, and the host
//! replays them into its own recorder, so every plugin's metrics reach the one Prometheus output.

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Samples a histogram keeps between two snapshots; older ones are dropped, counted.
const MAX_SAMPLES: usize = 10_000;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricKey {
    pub name: String,
    pub labels: Vec<(String, String)>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricsSnapshot {
    pub counters: Vec<(MetricKey, u64)>,
    pub gauges: Vec<(MetricKey, f64)>,
    /// Samples recorded since the previous snapshot.
    pub histograms: Vec<(MetricKey, Vec<f64>)>,
    /// HELP texts described since the previous snapshot.
    #[serde(default)]
    pub descriptions: Vec<Description>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Description {
    pub name: String,
    pub kind: MetricKind,
    pub text: String,
}

impl MetricsSnapshot {
    pub fn is_empty(&self) -> bool {
        self.counters.is_empty()
            && self.gauges.is_empty()
            && self.histograms.is_empty()
            && self.descriptions.is_empty()
    }
}

#[derive(Default)]
struct Samples(Mutex<Vec<f64>>);

impl metrics::HistogramFn for Samples {
    fn record(&self, value: f64) {
        if let Ok(mut v) = self.0.lock() {
            if v.len() < MAX_SAMPLES {
                v.push(value);
            }
        }
    }
}

#[derive(Default)]
struct Store {
    counters: HashMap<Key, Arc<AtomicU64>>,
    gauges: HashMap<Key, Arc<AtomicU64>>,
    histograms: HashMap<Key, Arc<Samples>>,
    /// Described but not yet sent.
    descriptions: Vec<Description>,
}

/// The recorder installed in a plugin child process.
#[derive(Clone, Default)]
pub struct ForwardingRecorder {
    store: Arc<Mutex<Store>>,
}

fn metric_key(key: &Key) -> MetricKey {
    MetricKey {
        name: key.name().to_string(),
        labels: key
            .labels()
            .map(|l| (l.key().to_string(), l.value().to_string()))
            .collect(),
    }
}

impl ForwardingRecorder {
    /// Current counters and gauges, and the histogram samples since the last call.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let Ok(mut store) = self.store.lock() else {
            return MetricsSnapshot::default();
        };
        MetricsSnapshot {
            counters: store
                .counters
                .iter()
                .map(|(k, v)| (metric_key(k), v.load(Ordering::Relaxed)))
                .collect(),
            gauges: store
                .gauges
                .iter()
                .map(|(k, v)| (metric_key(k), f64::from_bits(v.load(Ordering::Relaxed))))
                .collect(),
            histograms: store
                .histograms
                .iter()
                .filter_map(|(k, v)| {
                    let samples = std::mem::take(&mut *v.0.lock().ok()?);
                    (!samples.is_empty()).then(|| (metric_key(k), samples))
                })
                .collect(),
            descriptions: std::mem::take(&mut store.descriptions),
        }
    }

    fn describe(&self, name: KeyName, kind: MetricKind, text: SharedString) {
        if let Ok(mut s) = self.store.lock() {
            s.descriptions.push(Description {
                name: name.as_str().to_string(),
                kind,
                text: text.to_string(),
            });
        }
    }
}

impl Recorder for ForwardingRecorder {
    fn describe_counter(&self, name: KeyName, _: Option<Unit>, text: SharedString) {
        self.describe(name, MetricKind::Counter, text);
    }
    fn describe_gauge(&self, name: KeyName, _: Option<Unit>, text: SharedString) {
        self.describe(name, MetricKind::Gauge, text);
    }
    fn describe_histogram(&self, name: KeyName, _: Option<Unit>, text: SharedString) {
        self.describe(name, MetricKind::Histogram, text);
    }

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        match self.store.lock() {
            Ok(mut s) => Counter::from_arc(s.counters.entry(key.clone()).or_default().clone()),
            Err(_) => Counter::noop(),
        }
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        match self.store.lock() {
            Ok(mut s) => Gauge::from_arc(s.gauges.entry(key.clone()).or_default().clone()),
            Err(_) => Gauge::noop(),
        }
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        match self.store.lock() {
            Ok(mut s) => Histogram::from_arc(s.histograms.entry(key.clone()).or_default().clone()),
            Err(_) => Histogram::noop(),
        }
    }
}

fn labels(k: &MetricKey) -> Vec<metrics::Label> {
    k.labels
        .iter()
        .map(|(a, b)| metrics::Label::new(a.clone(), b.clone()))
        .collect()
}

/// Replays a child's snapshot into the node's recorder. A restarted child's counters start
/// again from zero, which Prometheus treats as a counter reset.
pub fn apply(snapshot: &MetricsSnapshot) {
    for d in &snapshot.descriptions {
        let (name, text) = (d.name.clone(), d.text.clone());
        match d.kind {
            MetricKind::Counter => metrics::describe_counter!(name, text),
            MetricKind::Gauge => metrics::describe_gauge!(name, text),
            MetricKind::Histogram => metrics::describe_histogram!(name, text),
        }
    }
    for (k, v) in &snapshot.counters {
        metrics::counter!(k.name.clone(), labels(k)).absolute(*v);
    }
    for (k, v) in &snapshot.gauges {
        metrics::gauge!(k.name.clone(), labels(k)).set(*v);
    }
    for (k, samples) in &snapshot.histograms {
        let h = metrics::histogram!(k.name.clone(), labels(k));
        for s in samples {
            h.record(*s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_carries_values_and_drains_histograms() {
        let rec = ForwardingRecorder::default();
        metrics::with_local_recorder(&rec, || {
            metrics::counter!("c_total", "plugin" => "x").increment(3);
            metrics::gauge!("g").set(2.5);
            metrics::histogram!("h_seconds").record(0.25);
        });
        let s = rec.snapshot();
        assert_eq!(s.counters[0].1, 3);
        assert_eq!(
            s.counters[0].0.labels,
            vec![("plugin".to_string(), "x".to_string())]
        );
        assert_eq!(s.gauges[0].1, 2.5);
        assert_eq!(s.histograms[0].1, vec![0.25]);
        assert!(
            rec.snapshot().histograms.is_empty(),
            "samples are sent once"
        );
    }
}
