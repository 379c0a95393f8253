//! How `/metrics` is served: the metrics are encoded as OpenMetrics text (what
//! `prometheus-client` writes), and served either as that, to a scraper that asks for it
//! (Prometheus sends `Accept: application/openmetrics-text;…`), or as the Prometheus text
//! format 0.0.4 to everyone else (`curl`, `promtool check metrics`, older scrapers), with the
//! content type that says which. Serving OpenMetrics under the 0.0.4 content type, as this
//! mesh once did, makes Prometheus drop every family's help and type, and `promtool` refuse
//! the page.

/// A format `/metrics` can be served in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    /// The Prometheus text exposition format, version 0.0.4.
    Text,
}

impl Format {
    /// The format a scraper's `Accept` header asks for: OpenMetrics only when it names it.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let wants_openmetrics = accept.is_some_and(|a| {
            a.split(',').any(|part| {
                part.split(';').next().is_some_and(|t| {
                    t.trim()
                        .eq_ignore_ascii_case("application/openmetrics-text")
                })
            })
        });
        match wants_openmetrics {
            true => Format::OpenMetrics,
            false => Format::Text,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
        }
    }

    /// The page in this format, from the OpenMetrics text `prometheus-client` encoded.
    pub fn render(self, openmetrics: String) -> String {
        match self {
            Format::OpenMetrics => openmetrics,
            Format::Text => to_text(&openmetrics),
        }
    }
}

/// OpenMetrics text → Prometheus text 0.0.4. The samples are the same; what differs is how
/// families are named and typed: a counter family `x` has samples `x_total` (so its HELP and
/// TYPE name `x_total`), an info family `x` has samples `x_info` (a gauge in 0.0.4),
/// `unknown` is `untyped`, `stateset` and `gaugehistogram` have no 0.0.4 type (`gauge`,
/// `histogram`), and `_created` samples and `# UNIT` and `# EOF` lines have no place.
fn to_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // Counter families declared so far, whose `_created` samples are dropped.
    let mut counters: Vec<&str> = Vec::new();
    let mut pending_help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            // Written once the TYPE says what the family's 0.0.4 name is.
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            pending_help = Some((name, text));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (family, kind) = match kind {
                "counter" => {
                    counters.push(name);
                    (format!("{name}_total"), "counter")
                }
                "info" => (format!("{name}_info"), "gauge"),
                "unknown" => (name.to_string(), "untyped"),
                "stateset" => (name.to_string(), "gauge"),
                "gaugehistogram" => (name.to_string(), "histogram"),
                other => (name.to_string(), other),
            };
            if let Some((help_name, text)) = pending_help.take()
                && help_name == name
            {
                out.push_str(&format!("# HELP {family} {text}\n"));
            }
            out.push_str(&format!("# TYPE {family} {kind}\n"));
            continue;
        }
        if let Some((help_name, text)) = pending_help.take() {
            // A HELP without a TYPE: kept as it was.
            out.push_str(&format!("# HELP {help_name} {text}\n"));
        }
        if line.starts_with('#') {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let sample = line.split(['{', ' ']).next().unwrap_or_default();
        if counters
            .iter()
            .any(|c| sample.strip_prefix(c) == Some("_created"))
        {
            continue;
        }
        // (Exemplars, which 0.0.4 has no room for, are never recorded by this mesh.)
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_headers_as_scrapers_send_them() {
        // Prometheus 2.42's scrape Accept header.
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(Format::negotiate(Some("*/*")), Format::Text);
        assert_eq!(
            Format::negotiate(Some("text/plain;version=0.0.4")),
            Format::Text
        );
        assert_eq!(Format::negotiate(None), Format::Text);
    }

    #[test]
    fn openmetrics_families_become_text_families() {
        let om = "# HELP bulkhead_requests Requests.\n# TYPE bulkhead_requests counter\nbulkhead_requests_total{code=\"200\"} 3\nbulkhead_requests_created{code=\"200\"} 1.7e9\n# HELP bulkhead_build Build.\n# TYPE bulkhead_build info\nbulkhead_build_info{version=\"0.1.0\"} 1\n# HELP bulkhead_open Open.\n# TYPE bulkhead_open gauge\n# UNIT bulkhead_open connections\nbulkhead_open 2\n# HELP bulkhead_seconds Latency.\n# TYPE bulkhead_seconds histogram\nbulkhead_seconds_bucket{le=\"+Inf\"} 1\nbulkhead_seconds_sum 0.5\nbulkhead_seconds_count 1\n# EOF\n";
        assert_eq!(
            Format::Text.render(om.to_string()),
            "# HELP bulkhead_requests_total Requests.\n# TYPE bulkhead_requests_total counter\nbulkhead_requests_total{code=\"200\"} 3\n# HELP bulkhead_build_info Build.\n# TYPE bulkhead_build_info gauge\nbulkhead_build_info{version=\"0.1.0\"} 1\n# HELP bulkhead_open Open.\n# TYPE bulkhead_open gauge\nbulkhead_open 2\n# HELP bulkhead_seconds Latency.\n# TYPE bulkhead_seconds histogram\nbulkhead_seconds_bucket{le=\"+Inf\"} 1\nbulkhead_seconds_sum 0.5\nbulkhead_seconds_count 1\n"
        );
        assert_eq!(Format::OpenMetrics.render(om.to_string()), om);
    }
}
