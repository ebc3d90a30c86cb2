//! Prometheus metrics, served as text on the admin port's `/metrics`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub status: u16,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub upload_bytes: Counter,
    pub download_bytes: Counter,
    pub events_appended: Counter,
    pub events_delivered: Counter,
    pub delivery_failures: Counter,
    pub events_refused: Counter,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub cache_stale_hits: Counter,
    pub cache_revalidations: Counter,
    pub store_downloads: Counter,
    journal_bytes: Gauge,
    journal_source: Arc<AtomicU64>,
}

impl Metrics {
    pub fn new(journal_bytes_source: Arc<AtomicU64>, journal_syncs: Counter) -> Metrics {
        let mut registry = Registry::with_prefix("emissary_agent");
        let m = Metrics {
            requests: Family::default(),
            upload_bytes: Counter::default(),
            download_bytes: Counter::default(),
            events_appended: Counter::default(),
            events_delivered: Counter::default(),
            delivery_failures: Counter::default(),
            events_refused: Counter::default(),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            cache_stale_hits: Counter::default(),
            cache_revalidations: Counter::default(),
            store_downloads: Counter::default(),
            journal_bytes: Gauge::default(),
            journal_source: journal_bytes_source,
            registry: Registry::default(),
        };
        registry.register(
            "http_requests",
            "Emissary API requests by route and status",
            m.requests.clone(),
        );
        registry.register(
            "upload_bytes",
            "Artifact bytes received from emissaries",
            m.upload_bytes.clone(),
        );
        registry.register(
            "download_bytes",
            "Input bytes sent to emissaries",
            m.download_bytes.clone(),
        );
        registry.register(
            "events_appended",
            "Events written to the journal",
            m.events_appended.clone(),
        );
        registry.register(
            "events_delivered",
            "Events acknowledged by the controller (or written to events.jsonl)",
            m.events_delivered.clone(),
        );
        registry.register(
            "delivery_failures",
            "Failed event batch deliveries",
            m.delivery_failures.clone(),
        );
        registry.register(
            "events_refused",
            "Events the controller refused alone, set aside in refused-events.jsonl",
            m.events_refused.clone(),
        );
        registry.register(
            "cache_hits",
            "Inputs served from the node cache",
            m.cache_hits.clone(),
        );
        registry.register(
            "cache_misses",
            "Inputs the node cache had to fetch",
            m.cache_misses.clone(),
        );
        registry.register(
            "cache_stale_hits",
            "Inputs served from the node cache unverified, while the store was unreachable",
            m.cache_stale_hits.clone(),
        );
        registry.register(
            "cache_revalidations",
            "Inputs whose version was asked of the store (HEAD) before they were served",
            m.cache_revalidations.clone(),
        );
        registry.register(
            "store_downloads",
            "Objects read from the store",
            m.store_downloads.clone(),
        );
        registry.register(
            "journal_syncs",
            "Group commits of the event journal, one fsync each",
            journal_syncs,
        );
        registry.register(
            "journal_bytes",
            "Bytes of undelivered events on disk",
            m.journal_bytes.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn encode(&self) -> String {
        self.journal_bytes
            .set(self.journal_source.load(Ordering::Relaxed) as i64);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String");
        text
    }
}
