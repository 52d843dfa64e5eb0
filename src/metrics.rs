//! Prometheus metrics: counters and one latency histogram kept in memory and rendered in the
//! text exposition format. Small enough that a metrics library would cost more than it saves.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the request-duration buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Every counter amoauth keeps, with its help text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Counter {
    FlowsStarted,
    FlowsCompleted,
    FlowsFailed,
    Refreshes,
    TokenApiRequests,
    EventDeliveries,
}

impl Counter {
    fn name(self) -> &'static str {
        match self {
            Self::FlowsStarted => "amoauth_flows_started_total",
            Self::FlowsCompleted => "amoauth_flows_completed_total",
            Self::FlowsFailed => "amoauth_flows_failed_total",
            Self::Refreshes => "amoauth_refreshes_total",
            Self::TokenApiRequests => "amoauth_token_api_requests_total",
            Self::EventDeliveries => "amoauth_event_deliveries_total",
        }
    }

    fn help(self) -> &'static str {
        match self {
            Self::FlowsStarted => "Installs that redirected to amoCRM's consent page.",
            Self::FlowsCompleted => "Callbacks that connected an account.",
            Self::FlowsFailed => "Callbacks that failed, by reason.",
            Self::Refreshes => "Token refreshes attempted, by outcome.",
            Self::TokenApiRequests => "Token API requests, by outcome.",
            Self::EventDeliveries => "Event delivery attempts, by outcome.",
        }
    }
}

#[derive(Default, Debug)]
struct Histogram {
    /// Count per bucket (not cumulative), plus the overflow bucket.
    buckets: [u64; BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

/// The process's metrics; one per running server, so tests in one process do not mix.
#[derive(Default, Debug)]
pub struct Metrics {
    counters: Mutex<BTreeMap<(Counter, String), u64>>,
    durations: Mutex<BTreeMap<String, Histogram>>,
}

/// A gauge computed at scrape time (from the database).
pub struct Gauge<'a> {
    pub name: &'a str,
    pub help: &'a str,
    /// (labels in `key="value"` form, possibly empty; value)
    pub samples: Vec<(String, f64)>,
}

impl Metrics {
    /// Adds one to `counter`, labelled with `label` (`("reason", "used_state")`) if any.
    pub fn count(&self, counter: Counter, label: Option<(&str, &str)>) {
        let labels = label
            .map(|(key, value)| format!("{key}=\"{}\"", escape(value)))
            .unwrap_or_default();
        let mut counters = self
            .counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *counters.entry((counter, labels)).or_default() += 1;
    }

    /// Records how long a request to `route` took.
    pub fn observe_request(&self, route: &str, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let bucket = BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(BUCKETS.len());
        let mut durations = self
            .durations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let histogram = durations.entry(route.to_owned()).or_default();
        histogram.buckets[bucket] += 1;
        histogram.sum += seconds;
        histogram.count += 1;
    }

    /// The text exposition format, with `gauges` appended.
    pub fn render(&self, gauges: &[Gauge<'_>]) -> String {
        let mut out = String::new();
        let counters = self
            .counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let mut last = None;
        for ((counter, labels), value) in &counters {
            if last != Some(*counter) {
                let _ = writeln!(
                    out,
                    "# HELP {} {}\n# TYPE {} counter",
                    counter.name(),
                    counter.help(),
                    counter.name()
                );
                last = Some(*counter);
            }
            let _ = writeln!(out, "{}{} {value}", counter.name(), braces(labels));
        }
        let durations = self
            .durations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !durations.is_empty() {
            let name = "amoauth_http_request_duration_seconds";
            let _ = writeln!(
                out,
                "# HELP {name} Time to answer HTTP requests, by route.\n# TYPE {name} histogram"
            );
            for (route, histogram) in durations.iter() {
                let route = escape(route);
                let mut cumulative = 0;
                for (bound, count) in BUCKETS.iter().zip(histogram.buckets.iter()) {
                    cumulative += count;
                    let _ = writeln!(
                        out,
                        "{name}_bucket{{route=\"{route}\",le=\"{bound}\"}} {cumulative}"
                    );
                }
                let _ = writeln!(
                    out,
                    "{name}_bucket{{route=\"{route}\",le=\"+Inf\"}} {}",
                    histogram.count
                );
                let _ = writeln!(out, "{name}_sum{{route=\"{route}\"}} {}", histogram.sum);
                let _ = writeln!(out, "{name}_count{{route=\"{route}\"}} {}", histogram.count);
            }
        }
        for gauge in gauges {
            let _ = writeln!(
                out,
                "# HELP {} {}\n# TYPE {} gauge",
                gauge.name, gauge.help, gauge.name
            );
            for (labels, value) in &gauge.samples {
                let _ = writeln!(out, "{}{} {value}", gauge.name, braces(labels));
            }
        }
        out
    }
}

fn braces(labels: &str) -> String {
    if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    }
}

/// Label values escape backslash, quote and newline.
pub fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histograms_and_gauges() {
        let metrics = Metrics::default();
        metrics.count(Counter::FlowsFailed, Some(("reason", "used_state")));
        metrics.count(Counter::FlowsFailed, Some(("reason", "used_state")));
        metrics.count(Counter::FlowsStarted, None);
        metrics.observe_request("/amocrm/install", Duration::from_millis(3));
        let text = metrics.render(&[Gauge {
            name: "amoauth_connections",
            help: "Connections by status.",
            samples: vec![("status=\"active\"".into(), 2.0)],
        }]);
        assert!(
            text.contains("amoauth_flows_failed_total{reason=\"used_state\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("amoauth_flows_started_total 1\n"));
        assert!(text.contains("amoauth_http_request_duration_seconds_bucket{route=\"/amocrm/install\",le=\"0.0025\"} 0\n"));
        assert!(text.contains("amoauth_http_request_duration_seconds_bucket{route=\"/amocrm/install\",le=\"0.005\"} 1\n"));
        assert!(text.contains(
            "amoauth_http_request_duration_seconds_count{route=\"/amocrm/install\"} 1\n"
        ));
        assert!(text.contains(
            "# TYPE amoauth_connections gauge\namoauth_connections{status=\"active\"} 2\n"
        ));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
