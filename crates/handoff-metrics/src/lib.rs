//! `/metrics` in the format the scraper asks for. The metrics are rendered as OpenMetrics (what
//! prometheus_client writes); Prometheus asks for that. curl and `promtool check metrics` read
//! the Prometheus text format (0.0.4), which this derives from the same text.

pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether an `Accept` header asks for OpenMetrics.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| a.contains("application/openmetrics-text"))
}

/// `openmetrics` as a scraper that sent `accept` wants it, with its content type.
pub fn exposition(openmetrics: String, accept: Option<&str>) -> (&'static str, String) {
    if wants_openmetrics(accept) {
        (OPENMETRICS_CONTENT_TYPE, openmetrics)
    } else {
        (TEXT_CONTENT_TYPE, to_prometheus_text(&openmetrics))
    }
}

/// The Prometheus text format (0.0.4) of prometheus_client's OpenMetrics text. The samples are
/// the same; a counter's `# HELP` and `# TYPE` name its `_total` series, as that format names a
/// family by its samples (else `promtool check metrics` finds counters without help); there is
/// no `# UNIT` or `# EOF`. It covers counters, gauges and histograms without exemplars, which is
/// all these metrics use.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 256);
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let header = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| Some((p, line.strip_prefix(p)?)));
        match header {
            Some((prefix, rest)) => {
                let name = rest.split(' ').next().unwrap_or(rest);
                let total = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                out.push_str(&format!("{prefix}{name}{total}{}", &rest[name.len()..]));
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_names_counter_families_by_their_total() {
        let openmetrics = "# HELP a_rpcs Calls.\n# TYPE a_rpcs counter\na_rpcs_total{m=\"x\"} 1\n\
            # HELP a_used_bytes Bytes.\n# TYPE a_used_bytes gauge\na_used_bytes 2\n\
            # HELP a_seconds Time.\n# TYPE a_seconds histogram\n# UNIT a_seconds seconds\n\
            a_seconds_bucket{le=\"+Inf\"} 1\na_seconds_sum 0.5\na_seconds_count 1\n# EOF\n";
        let want = "# HELP a_rpcs_total Calls.\n# TYPE a_rpcs_total counter\na_rpcs_total{m=\"x\"} 1\n\
            # HELP a_used_bytes Bytes.\n# TYPE a_used_bytes gauge\na_used_bytes 2\n\
            # HELP a_seconds Time.\n# TYPE a_seconds histogram\n\
            a_seconds_bucket{le=\"+Inf\"} 1\na_seconds_sum 0.5\na_seconds_count 1\n";
        assert_eq!(to_prometheus_text(openmetrics), want);
    }
}
