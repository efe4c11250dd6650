//! The sandbox's own pages and controls, under `/_sandbox/`.

use std::time::Duration;

use mail_dispatch_standins::StandIns;
use mail_dispatch_standins::{self as standins, Consent, Vendor};
use serde::Deserialize;
use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, Request, Respond, ResponseTemplate};

struct Messages(StandIns);
impl Respond for Messages {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        ResponseTemplate::new(200).set_body_json(json!({"messages": self.0.received()}))
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

struct Page(StandIns);
impl Respond for Page {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let mut rows = String::new();
        for m in self.0.received().iter().rev() {
            rows.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
                m.received_at.format("%H:%M:%S"),
                m.provider,
                escape(&m.shown()),
                escape(&m.to.join(", ")),
                escape(&m.subject)
            ));
        }
        let body = format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>mail-dispatch sandbox</title>\
             <style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:4px 10px;text-align:left;border-bottom:1px solid #ddd}}</style>\
             </head><body><h1>mail-dispatch sandbox</h1>\
             <p>Stand-in for Microsoft Graph and the Gmail API. Not a real mail provider: nothing leaves this machine.</p>\
             <table><tr><th>received</th><th>provider</th><th>from (as recipients see it)</th><th>to</th><th>subject</th></tr>\n{rows}</table>\
             <p>JSON: <a href=\"/_sandbox/messages\">/_sandbox/messages</a></p></body></html>"
        );
        ResponseTemplate::new(200).set_body_raw(body, "text/html; charset=utf-8")
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Faults {
    latency_ms: Option<u64>,
    fault_rate: Option<f64>,
    throttle_next: u32,
    retry_after_secs: Option<u64>,
    fail_next: u32,
    /// Mailbox → messages per second it may send (beyond: 429); `null` lifts it.
    mailbox_limits: std::collections::HashMap<String, Option<f64>>,
}

struct SetFaults(StandIns);
impl Respond for SetFaults {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let Ok(f) = serde_json::from_slice::<Faults>(&request.body) else {
            return ResponseTemplate::new(400)
                .set_body_json(json!({"error": "expected JSON faults"}));
        };
        apply_faults(
            &self.0,
            f.latency_ms,
            f.fault_rate,
            f.throttle_next,
            f.retry_after_secs.unwrap_or(5),
            f.fail_next,
        );
        for (account, per_second) in &f.mailbox_limits {
            self.0.set_mailbox_limit(account, *per_second);
        }
        ResponseTemplate::new(200).set_body_json(json!({"ok": true}))
    }
}

/// Applies fault settings to both providers.
pub fn apply_faults(
    s: &StandIns,
    latency_ms: Option<u64>,
    fault_rate: Option<f64>,
    throttle_next: u32,
    retry_after_secs: u64,
    fail_next: u32,
) {
    if let Some(ms) = latency_ms {
        s.set_send_delay(Duration::from_millis(ms));
    }
    if let Some(rate) = fault_rate {
        s.set_fault_rate(rate);
    }
    s.script(
        Vendor::Microsoft,
        (0..throttle_next).map(|_| standins::graph_throttled(retry_after_secs)),
    );
    s.script(
        Vendor::Google,
        (0..throttle_next)
            .map(|_| standins::gmail_rate_limited(Duration::from_secs(retry_after_secs))),
    );
    s.script(
        Vendor::Microsoft,
        (0..fail_next).map(|_| standins::graph_unavailable()),
    );
    s.script(
        Vendor::Google,
        (0..fail_next).map(|_| standins::gmail_unavailable()),
    );
}

fn vendor(v: &Value) -> Option<Vendor> {
    match v["provider"].as_str()? {
        "microsoft" => Some(Vendor::Microsoft),
        "google" => Some(Vendor::Google),
        _ => None,
    }
}

struct SetConsent(StandIns);
impl Respond for SetConsent {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let body: Value = serde_json::from_slice(&request.body).unwrap_or_default();
        let Some(v) = vendor(&body) else {
            return ResponseTemplate::new(400)
                .set_body_json(json!({"error": "provider must be microsoft or google"}));
        };
        let consent = match (body["deny"].as_bool(), body["account"].as_str()) {
            (Some(true), _) => Consent::Deny,
            (_, Some(account)) => Consent::Approve(account.to_owned()),
            _ => {
                return ResponseTemplate::new(400)
                    .set_body_json(json!({"error": "give account or deny"}));
            }
        };
        self.0.set_consent(v, consent);
        ResponseTemplate::new(200).set_body_json(json!({"ok": true}))
    }
}

struct Revoke(StandIns);
impl Respond for Revoke {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let body: Value = serde_json::from_slice(&request.body).unwrap_or_default();
        match body["account"].as_str() {
            Some(a) => {
                self.0.revoke_account(a);
                ResponseTemplate::new(200).set_body_json(json!({"ok": true}))
            }
            None => ResponseTemplate::new(400).set_body_json(json!({"error": "give account"})),
        }
    }
}

/// Mounts the pages and controls.
pub async fn mount(s: &StandIns) {
    let server = &s.graph;
    Mock::given(method("GET"))
        .and(path("/_sandbox/"))
        .respond_with(Page(s.clone()))
        .mount(server)
        .await;
    Mock::given(method("GET"))
        .and(path("/_sandbox/messages"))
        .respond_with(Messages(s.clone()))
        .mount(server)
        .await;
    Mock::given(method("POST"))
        .and(path("/_sandbox/faults"))
        .respond_with(SetFaults(s.clone()))
        .mount(server)
        .await;
    Mock::given(method("POST"))
        .and(path("/_sandbox/consent"))
        .respond_with(SetConsent(s.clone()))
        .mount(server)
        .await;
    Mock::given(method("POST"))
        .and(path("/_sandbox/revoke"))
        .respond_with(Revoke(s.clone()))
        .mount(server)
        .await;
}
