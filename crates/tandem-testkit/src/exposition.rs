//! What a `/metrics` scrape says, read by an outside parser: the
//! `openmetrics-parser` crate's Prometheus text and OpenMetrics grammars
//! (a line they cannot read is an error, never skipped). Tests compare
//! names, types, labels and values from here, not from regexes of their
//! own.

use std::collections::BTreeMap;

use openmetrics_parser::{OpenMetricsValue, PrometheusType, PrometheusValue};

/// One series of a family: its labels (without a histogram's `le`) and,
/// for counters and gauges, its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// The family's name as exposed (`messaging_client_sent_messages_total`).
    pub family: String,
    /// `counter`, `gauge`, `histogram`, `summary` or `untyped`.
    pub kind: &'static str,
    pub labels: BTreeMap<String, String>,
    /// A counter's or gauge's value; `None` for histograms and summaries.
    pub value: Option<f64>,
}

impl Series {
    /// The value of label `name`, if the series has it.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.get(name).map(String::as_str)
    }
}

/// Every series of a Prometheus text exposition (0.0.4); panics naming the
/// parser's complaint when it is not one.
pub fn parse_prometheus(text: &str) -> Vec<Series> {
    let exposition = openmetrics_parser::prometheus::parse_prometheus(text)
        .unwrap_or_else(|error| panic!("not Prometheus text ({error:?}):\n{text}"));
    let mut series = Vec::new();
    for (name, family) in &exposition.families {
        let kind = match family.family_type {
            PrometheusType::Counter => "counter",
            PrometheusType::Gauge => "gauge",
            PrometheusType::Histogram => "histogram",
            PrometheusType::Summary => "summary",
            PrometheusType::Unknown => "untyped",
        };
        for sample in family.iter_samples() {
            let labels = sample
                .get_labelset()
                .expect("a label set")
                .iter()
                .filter(|(label, _)| label.as_str() != "le")
                .map(|(label, value)| (label.clone(), value.clone()))
                .collect();
            let value = match &sample.value {
                PrometheusValue::Gauge(number) | PrometheusValue::Unknown(number) => {
                    Some(number.as_f64())
                }
                PrometheusValue::Counter(counter) => Some(counter.value.as_f64()),
                PrometheusValue::Histogram(_) | PrometheusValue::Summary(_) => None,
            };
            series.push(Series {
                family: name.clone(),
                kind,
                labels,
                value,
            });
        }
    }
    series.sort_by(|a, b| (&a.family, &a.labels).cmp(&(&b.family, &b.labels)));
    series
}

/// The families of an OpenMetrics exposition with their type names;
/// panics naming the parser's complaint when it is not one (a missing
/// `# EOF`, say).
pub fn parse_openmetrics(text: &str) -> BTreeMap<String, String> {
    let exposition = openmetrics_parser::openmetrics::parse_openmetrics(text)
        .unwrap_or_else(|error| panic!("not OpenMetrics ({error:?}):\n{text}"));
    exposition
        .families
        .iter()
        .map(|(name, family)| {
            let kind = family
                .iter_samples()
                .next()
                .map(|sample| match &sample.value {
                    OpenMetricsValue::Counter(_) => "counter",
                    OpenMetricsValue::Gauge(_) => "gauge",
                    OpenMetricsValue::Histogram(_) => "histogram",
                    OpenMetricsValue::Summary(_) => "summary",
                    OpenMetricsValue::GaugeHistogram(_) => "gaugehistogram",
                    OpenMetricsValue::StateSet(_) => "stateset",
                    OpenMetricsValue::Info => "info",
                    OpenMetricsValue::Unknown(_) => "unknown",
                })
                .unwrap_or("empty");
            (name.clone(), kind.to_owned())
        })
        .collect()
}

/// The sum of the values of `family`'s series whose labels include every
/// one of `labels`; `None` when there is none.
pub fn sum(series: &[Series], family: &str, labels: &[(&str, &str)]) -> Option<f64> {
    series
        .iter()
        .filter(|series| {
            series.family == family
                && labels
                    .iter()
                    .all(|(name, value)| series.label(name) == Some(value))
        })
        .map(|series| {
            series
                .value
                .unwrap_or_else(|| panic!("{family} has values"))
        })
        .fold(None, |total, value| Some(total.unwrap_or(0.0) + value))
}
