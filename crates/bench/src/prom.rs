//! Reading the worker's `/metrics` (Prometheus text format).

use std::collections::BTreeMap;

use anyhow::Context as _;

/// One sample: metric name, label text (`kind="ledger",…`, may be empty) and value.
#[derive(Clone, Debug)]
pub struct Sample {
    pub name: String,
    pub labels: String,
    pub value: f64,
}

pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let value: f64 = value.trim().parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            Some(Sample {
                name: name.to_owned(),
                labels: labels.to_owned(),
                value,
            })
        })
        .collect()
}

/// The value of label `key` in a label text.
pub fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    labels.split(',').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"'))
    })
}

/// The worker's metrics at one instant.
#[derive(Clone, Debug, Default)]
pub struct Scrape(pub Vec<Sample>);

impl Scrape {
    pub async fn fetch(http: &reqwest::Client, url: &str) -> anyhow::Result<Self> {
        let text = http
            .get(url)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?
            .error_for_status()?
            .text()
            .await?;
        Ok(Scrape(parse(&text)))
    }

    /// Values of metric `name`, keyed by the value of label `by`, summed.
    pub fn by_label(&self, name: &str, by: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for s in self.0.iter().filter(|s| s.name == name) {
            let key = label(&s.labels, by).unwrap_or("").to_owned();
            *out.entry(key).or_insert(0.0) += s.value;
        }
        out
    }

    /// The sum of every series of metric `name`.
    pub fn total(&self, name: &str) -> f64 {
        self.0
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .sum()
    }
}

/// `after - before`, per key.
pub fn delta(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_labelled_counters() {
        let text = "# HELP x y\n# TYPE mail_dispatch_db_statements_total counter\n\
                    mail_dispatch_db_statements_total{kind=\"ledger\"} 60\n\
                    mail_dispatch_db_statements_total{kind=\"config\"} 2\n\
                    mail_dispatch_jobs_in_flight 7\n";
        let s = Scrape(parse(text));
        let by = s.by_label("mail_dispatch_db_statements_total", "kind");
        assert_eq!(by["ledger"], 60.0);
        assert_eq!(by["config"], 2.0);
        assert_eq!(s.total("mail_dispatch_jobs_in_flight"), 7.0);
        assert_eq!(
            label("provider=\"google\",status=\"sent\"", "status"),
            Some("sent")
        );
    }
}
