//! Prometheus metrics: counters and one latency histogram kept in memory and rendered in the
//! text exposition format. Small enough that a metrics library would cost more than it saves.
//!
//! Every counter exists from the first scrape, at 0 for each label value it can take: label
//! values are closed enums (`named_values!`), and a new process pre-registers all of them, so
//! `rate()` sees the first increment and absence alerts mean "not scraped", not "not yet used".

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use crate::amocrm::Platform;
use crate::flow::reason::CallbackReason;
use crate::named_values::named_values;
use crate::store::ConnectionStatus;

/// Upper bounds of the request-duration buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

const DURATION: &str = "amoauth_http_request_duration_seconds";
const CONNECTIONS: &str = "amoauth_connections";
const UNTIL_EXPIRY: &str = "amoauth_seconds_until_earliest_expiry";

named_values! {
    /// Every counter amoauth keeps.
    pub enum Counter {
        FlowsStarted => "amoauth_flows_started_total",
        FlowsCompleted => "amoauth_flows_completed_total",
        FlowsFailed => "amoauth_flows_failed_total",
        Refreshes => "amoauth_refreshes_total",
        TokenApiRequests => "amoauth_token_api_requests_total",
        EventDeliveries => "amoauth_event_deliveries_total",
        GatewayRequests => "amoauth_gateway_requests_total",
        GatewayRecoveries => "amoauth_gateway_recoveries_total",
    }
}

named_values! {
    /// How a gateway call ended (`amoauth_gateway_requests_total{outcome}`).
    pub enum GatewayOutcome {
        Answered => "answered",
        PacedOut => "paced_out",
        CircuitOpen => "circuit_open",
        Refused => "refused",
        Failed => "failed",
    }
}

named_values! {
    /// What the gateway did to recover (`amoauth_gateway_recoveries_total{action}`).
    pub enum GatewayRecovery {
        RefreshOn401 => "refresh_on_401",
        RetryAfter429 => "retry_after_429",
        RetryOn5xx => "retry_on_5xx",
        RetryOnTimeout => "retry_on_timeout",
        RediscoverHost => "rediscover_host",
        CircuitOpenAccount => "circuit_open_account",
        CircuitOpenAll => "circuit_open_all",
    }
}

named_values! {
    /// How a token refresh ended (`amoauth_refreshes_total{outcome}`).
    pub enum RefreshOutcome {
        Success => "success",
        NeedsReauth => "needs_reauth",
        Failure => "failure",
    }
}

named_values! {
    /// How a token API request ended (`amoauth_token_api_requests_total{outcome}`).
    pub enum TokenApiOutcome {
        Ok => "ok",
        NotFound => "not_found",
        NeedsReauth => "needs_reauth",
        Error => "error",
        Unauthorized => "unauthorized",
    }
}

named_values! {
    /// How one event delivery attempt ended (`amoauth_event_deliveries_total{outcome}`).
    pub enum DeliveryOutcome {
        Delivered => "delivered",
        FailedAttempt => "failed_attempt",
    }
}

impl Counter {
    fn help(self) -> &'static str {
        match self {
            Self::FlowsStarted => "Installs that redirected to amoCRM's consent page.",
            Self::FlowsCompleted => "Callbacks that connected an account.",
            Self::FlowsFailed => "Callbacks that failed, by reason.",
            Self::Refreshes => "Token refreshes attempted, by outcome.",
            Self::TokenApiRequests => "Token API requests, by outcome.",
            Self::EventDeliveries => "Event delivery attempts, by outcome.",
            Self::GatewayRequests => "Calls through the amoCRM API gateway, by outcome.",
            Self::GatewayRecoveries => "Gateway recoveries from amoCRM failures, by action.",
        }
    }

    /// Whether the counter is per platform (`platform="amocrm"`, `"kommo"`): flows that started
    /// or connected and refreshes, whose integration is always known. Failed flows are by
    /// reason only, since many fail before their platform is known (no or an unknown state).
    fn per_platform(self) -> bool {
        matches!(
            self,
            Self::FlowsStarted | Self::FlowsCompleted | Self::Refreshes
        )
    }

    /// The counter's label name with every value it can take; None when it has no label.
    fn label(self) -> Option<(&'static str, Vec<&'static str>)> {
        fn names<T: Copy>(all: &[T], as_str: fn(T) -> &'static str) -> Vec<&'static str> {
            all.iter().map(|value| as_str(*value)).collect()
        }
        match self {
            Self::FlowsStarted | Self::FlowsCompleted => None,
            Self::FlowsFailed => {
                Some(("reason", names(CallbackReason::ALL, CallbackReason::as_str)))
            }
            Self::Refreshes => Some((
                "outcome",
                names(RefreshOutcome::ALL, RefreshOutcome::as_str),
            )),
            Self::TokenApiRequests => Some((
                "outcome",
                names(TokenApiOutcome::ALL, TokenApiOutcome::as_str),
            )),
            Self::EventDeliveries => Some((
                "outcome",
                names(DeliveryOutcome::ALL, DeliveryOutcome::as_str),
            )),
            Self::GatewayRequests => Some((
                "outcome",
                names(GatewayOutcome::ALL, GatewayOutcome::as_str),
            )),
            Self::GatewayRecoveries => Some((
                "action",
                names(GatewayRecovery::ALL, GatewayRecovery::as_str),
            )),
        }
    }
}

/// One thing to count. The labelled ones carry their label as an enum, so only values that
/// were pre-registered can be counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Count {
    FlowStarted(Platform),
    FlowCompleted(Platform),
    FlowFailed(CallbackReason),
    Refresh(Platform, RefreshOutcome),
    TokenApiRequest(TokenApiOutcome),
    EventDelivery(DeliveryOutcome),
    GatewayRequest(GatewayOutcome),
    GatewayRecovery(GatewayRecovery),
}

impl Count {
    /// The counter, platform and label value this adds to.
    fn series(self) -> Series {
        match self {
            Self::FlowStarted(platform) => (Counter::FlowsStarted, Some(platform), None),
            Self::FlowCompleted(platform) => (Counter::FlowsCompleted, Some(platform), None),
            Self::FlowFailed(reason) => (Counter::FlowsFailed, None, Some(reason.as_str())),
            Self::Refresh(platform, outcome) => {
                (Counter::Refreshes, Some(platform), Some(outcome.as_str()))
            }
            Self::TokenApiRequest(outcome) => {
                (Counter::TokenApiRequests, None, Some(outcome.as_str()))
            }
            Self::EventDelivery(outcome) => {
                (Counter::EventDeliveries, None, Some(outcome.as_str()))
            }
            Self::GatewayRequest(outcome) => {
                (Counter::GatewayRequests, None, Some(outcome.as_str()))
            }
            Self::GatewayRecovery(action) => {
                (Counter::GatewayRecoveries, None, Some(action.as_str()))
            }
        }
    }
}

/// A counter, its platform if it is per platform, and its label value if it has a label.
type Series = (Counter, Option<Platform>, Option<&'static str>);

#[derive(Default, Debug)]
struct Histogram {
    /// Count per bucket (not cumulative), plus the overflow bucket.
    buckets: [u64; BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

/// The process's metrics; one per running server, so tests in one process do not mix.
#[derive(Debug)]
pub struct Metrics {
    counters: Mutex<BTreeMap<Series, u64>>,
    /// By route template; a route appears once it was first requested.
    durations: Mutex<BTreeMap<String, Histogram>>,
}

impl Default for Metrics {
    /// Every counter series at 0.
    fn default() -> Self {
        let mut counters = BTreeMap::new();
        for counter in Counter::ALL {
            let platforms: Vec<Option<Platform>> = match counter.per_platform() {
                true => Platform::ALL.iter().copied().map(Some).collect(),
                false => vec![None],
            };
            let values: Vec<Option<&'static str>> = match counter.label() {
                None => vec![None],
                Some((_, values)) => values.into_iter().map(Some).collect(),
            };
            for platform in &platforms {
                for value in &values {
                    counters.insert((*counter, *platform, *value), 0);
                }
            }
        }
        Self {
            counters: Mutex::new(counters),
            durations: Mutex::default(),
        }
    }
}

/// What the database says at scrape time.
pub struct StoredGauges {
    /// Connections per platform and `amocrm_tokens.status`, as counted (pairs without rows
    /// may be absent).
    pub connections: Vec<(String, String, i64)>,
    /// None when no connection is active.
    pub seconds_until_earliest_expiry: Option<f64>,
}

impl Metrics {
    /// Adds one to the series of `count`.
    pub fn count(&self, count: Count) {
        let series = count.series();
        let mut counters = self
            .counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        debug_assert!(
            counters.contains_key(&series),
            "{series:?} was not pre-registered: add it to its enum's list"
        );
        *counters.entry(series).or_default() += 1;
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
        // The route is known but for its first request: no key to build then.
        let histogram = match durations.get_mut(route) {
            Some(histogram) => histogram,
            None => durations.entry(route.to_owned()).or_default(),
        };
        histogram.buckets[bucket] += 1;
        histogram.sum += seconds;
        histogram.count += 1;
    }

    /// The text exposition format: counters, the duration histogram, then `gauges`.
    pub fn render(&self, gauges: &StoredGauges) -> String {
        let mut out = String::new();
        self.render_counters(&mut out);
        self.render_durations(&mut out);
        render_gauges(&mut out, gauges);
        out
    }

    fn render_counters(&self, out: &mut String) {
        let counters = self
            .counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        for counter in Counter::ALL {
            let name = counter.as_str();
            header(out, name, counter.help(), "counter");
            let label = counter.label().map(|(key, _)| key);
            for ((_, platform, value), n) in counters.iter().filter(|((of, ..), _)| of == counter) {
                let mut labels = Vec::new();
                if let Some(platform) = platform {
                    labels.push(format!("platform=\"{platform}\""));
                }
                if let (Some(key), Some(value)) = (label, value) {
                    labels.push(format!("{key}=\"{}\"", escape(value)));
                }
                match labels.is_empty() {
                    true => {
                        let _ = writeln!(out, "{name} {n}");
                    }
                    false => {
                        let _ = writeln!(out, "{name}{{{}}} {n}", labels.join(","));
                    }
                }
            }
        }
    }

    fn render_durations(&self, out: &mut String) {
        header(
            out,
            DURATION,
            "Time to answer HTTP requests, by route template.",
            "histogram",
        );
        let durations = self
            .durations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (route, histogram) in durations.iter() {
            let route = escape(route);
            let mut cumulative = 0;
            for (bound, count) in BUCKETS.iter().zip(histogram.buckets.iter()) {
                cumulative += count;
                let _ = writeln!(
                    out,
                    "{DURATION}_bucket{{route=\"{route}\",le=\"{bound}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "{DURATION}_bucket{{route=\"{route}\",le=\"+Inf\"}} {}",
                histogram.count
            );
            let _ = writeln!(
                out,
                "{DURATION}_sum{{route=\"{route}\"}} {}",
                sample_value(histogram.sum)
            );
            let _ = writeln!(
                out,
                "{DURATION}_count{{route=\"{route}\"}} {}",
                histogram.count
            );
        }
    }
}

fn render_gauges(out: &mut String, gauges: &StoredGauges) {
    header(
        out,
        CONNECTIONS,
        "Connections by platform and status.",
        "gauge",
    );
    let mut counts: BTreeMap<(&str, &str), i64> = Platform::ALL
        .iter()
        .flat_map(|platform| {
            ConnectionStatus::ALL
                .iter()
                .map(|status| ((platform.as_str(), status.as_str()), 0))
        })
        .collect();
    // A status the code does not know (written by hand) is still shown rather than hidden.
    for (platform, status, n) in &gauges.connections {
        *counts
            .entry((platform.as_str(), status.as_str()))
            .or_default() += n;
    }
    for ((platform, status), n) in counts {
        let _ = writeln!(
            out,
            "{CONNECTIONS}{{platform=\"{}\",status=\"{}\"}} {n}",
            escape(platform),
            escape(status)
        );
    }
    header(
        out,
        UNTIL_EXPIRY,
        "Seconds until the first active access token expires (negative: already expired; +Inf: no active connection).",
        "gauge",
    );
    // The minimum over no tokens is +Inf: "expires within an hour" alerts stay quiet, and
    // `min` across replicas still picks a real expiry.
    let seconds = gauges
        .seconds_until_earliest_expiry
        .unwrap_or(f64::INFINITY);
    let _ = writeln!(out, "{UNTIL_EXPIRY} {}", sample_value(seconds));
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A float as the exposition format spells it (`+Inf`, `-Inf`, `NaN`; Rust writes `inf`).
fn sample_value(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_owned()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        value.to_string()
    }
}

/// Label values escape backslash, quote and newline.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amocrm::AmoFailure;

    fn no_connections() -> StoredGauges {
        StoredGauges {
            connections: Vec::new(),
            seconds_until_earliest_expiry: None,
        }
    }

    /// The sample lines (`series value`) of a rendering.
    fn samples(text: &str) -> BTreeMap<String, String> {
        text.lines()
            .filter(|line| !line.starts_with('#'))
            .map(|line| {
                let (series, value) = line.rsplit_once(' ').unwrap();
                (series.to_owned(), value.to_owned())
            })
            .collect()
    }

    #[test]
    fn a_new_process_exports_every_counter_and_label_value_at_zero() {
        let text = Metrics::default().render(&no_connections());
        let samples = samples(&text);
        for series in [
            "amoauth_flows_started_total{platform=\"amocrm\"}".to_owned(),
            "amoauth_flows_started_total{platform=\"kommo\"}".to_owned(),
            "amoauth_flows_completed_total{platform=\"amocrm\"}".to_owned(),
            "amoauth_flows_completed_total{platform=\"kommo\"}".to_owned(),
            "amoauth_connections{platform=\"amocrm\",status=\"active\"}".to_owned(),
            "amoauth_connections{platform=\"amocrm\",status=\"needs_reauth\"}".to_owned(),
            "amoauth_connections{platform=\"kommo\",status=\"disconnected\"}".to_owned(),
        ]
        .into_iter()
        .chain(
            CallbackReason::ALL
                .iter()
                .map(|reason| format!("amoauth_flows_failed_total{{reason=\"{reason}\"}}")),
        )
        .chain(Platform::ALL.iter().flat_map(|platform| {
            RefreshOutcome::ALL.iter().map(move |outcome| {
                format!("amoauth_refreshes_total{{platform=\"{platform}\",outcome=\"{outcome}\"}}")
            })
        }))
        .chain(
            TokenApiOutcome::ALL.iter().map(|outcome| {
                format!("amoauth_token_api_requests_total{{outcome=\"{outcome}\"}}")
            }),
        )
        .chain(
            DeliveryOutcome::ALL
                .iter()
                .map(|outcome| format!("amoauth_event_deliveries_total{{outcome=\"{outcome}\"}}")),
        ) {
            assert_eq!(
                samples.get(&series).map(String::as_str),
                Some("0"),
                "{series} in {text}"
            );
        }
        assert_eq!(samples["amoauth_seconds_until_earliest_expiry"], "+Inf");
        for name in [DURATION, CONNECTIONS, UNTIL_EXPIRY]
            .into_iter()
            .chain(Counter::ALL.iter().map(|counter| counter.as_str()))
        {
            assert_eq!(
                text.matches(&format!("# TYPE {name} ")).count(),
                1,
                "{name}"
            );
            assert_eq!(
                text.matches(&format!("# HELP {name} ")).count(),
                1,
                "{name}"
            );
        }
    }

    /// Counting any value of any label adds to a pre-registered series, never a new one:
    /// `count` asserts it, and the set of series stays the same.
    #[test]
    fn every_countable_value_is_pre_registered() {
        let metrics = Metrics::default();
        let fresh: Vec<String> = samples(&metrics.render(&no_connections()))
            .into_keys()
            .collect();
        let every_count = Platform::ALL
            .iter()
            .flat_map(|platform| {
                [
                    Count::FlowStarted(*platform),
                    Count::FlowCompleted(*platform),
                ]
                .into_iter()
                .chain(
                    RefreshOutcome::ALL
                        .iter()
                        .map(|outcome| Count::Refresh(*platform, *outcome)),
                )
            })
            .chain(CallbackReason::ALL.iter().copied().map(Count::FlowFailed))
            .chain(
                TokenApiOutcome::ALL
                    .iter()
                    .copied()
                    .map(Count::TokenApiRequest),
            )
            .chain(
                DeliveryOutcome::ALL
                    .iter()
                    .copied()
                    .map(Count::EventDelivery),
            )
            .chain(
                GatewayOutcome::ALL
                    .iter()
                    .copied()
                    .map(Count::GatewayRequest),
            )
            .chain(
                GatewayRecovery::ALL
                    .iter()
                    .copied()
                    .map(Count::GatewayRecovery),
            );
        for count in every_count {
            metrics.count(count);
        }
        let after = samples(&metrics.render(&no_connections()));
        assert_eq!(after.keys().cloned().collect::<Vec<_>>(), fresh);
        assert!(
            after
                .iter()
                .filter(|(series, _)| series.contains("_total"))
                .all(|(_, value)| value == "1"),
            "{after:?}"
        );
    }

    #[test]
    fn counters_histograms_and_gauges_render_their_values() {
        let metrics = Metrics::default();
        metrics.count(Count::FlowFailed(CallbackReason::UsedState));
        metrics.count(Count::FlowFailed(CallbackReason::UsedState));
        metrics.count(Count::FlowStarted(Platform::Kommo));
        metrics.observe_request("/amocrm/install", Duration::from_millis(3));
        let text = metrics.render(&StoredGauges {
            connections: vec![("kommo".into(), "active".into(), 2)],
            seconds_until_earliest_expiry: Some(-1.5),
        });
        assert!(
            text.contains("amoauth_flows_failed_total{reason=\"used_state\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("amoauth_flows_failed_total{reason=\"unknown_state\"} 0\n"));
        assert!(text.contains("amoauth_flows_started_total{platform=\"kommo\"} 1\n"));
        assert!(text.contains("amoauth_flows_started_total{platform=\"amocrm\"} 0\n"));
        assert!(text.contains("amoauth_http_request_duration_seconds_bucket{route=\"/amocrm/install\",le=\"0.0025\"} 0\n"));
        assert!(text.contains("amoauth_http_request_duration_seconds_bucket{route=\"/amocrm/install\",le=\"0.005\"} 1\n"));
        assert!(text.contains("amoauth_http_request_duration_seconds_bucket{route=\"/amocrm/install\",le=\"+Inf\"} 1\n"));
        assert!(text.contains(
            "amoauth_http_request_duration_seconds_count{route=\"/amocrm/install\"} 1\n"
        ));
        assert!(text.contains(
            "# TYPE amoauth_connections gauge\namoauth_connections{platform=\"amocrm\",status=\"active\"} 0\n"
        ));
        assert!(text.contains("amoauth_connections{platform=\"kommo\",status=\"active\"} 2\n"));
        assert!(
            text.contains("amoauth_connections{platform=\"kommo\",status=\"needs_reauth\"} 0\n")
        );
        assert!(text.contains("amoauth_seconds_until_earliest_expiry -1.5\n"));
    }

    #[test]
    fn callback_reasons_name_amocrm_failures_as_amocrm_errors_do() {
        for failure in AmoFailure::ALL {
            assert_eq!(CallbackReason::from(*failure).as_str(), failure.as_str());
        }
    }

    #[test]
    fn label_values_and_special_floats_are_spelled_as_the_format_wants() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(sample_value(f64::INFINITY), "+Inf");
        assert_eq!(sample_value(f64::NEG_INFINITY), "-Inf");
        assert_eq!(sample_value(f64::NAN), "NaN");
        assert_eq!(sample_value(86_400.25), "86400.25");
    }
}
