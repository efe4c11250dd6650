//! The version-1 job message (contract §3): decoded from the bytes of an AMQP
//! delivery and validated once, so that everything downstream works with values
//! that can no longer be wrong.

use std::collections::BTreeMap;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::address::{EmailAddress, Mailbox, display_name_problem};

/// Longest accepted job id, organization id and workspace id (contract §3).
pub const MAX_ID_LEN: usize = 128;
/// Microsoft Graph accepts at most five `internetMessageHeaders`.
pub const MAX_CUSTOM_HEADERS: usize = 5;
/// Upper bound on the decoded size of all attachments of a job: Gmail's 35 MB
/// message limit, the largest of the providers. The provider actually chosen may
/// refuse less (Graph: 4 MB per request), which is reported as `message_too_large`.
pub const MAX_ATTACHMENTS_BYTES: usize = 35 * 1024 * 1024;
/// Exchange Online's 500 recipients per message, the largest of the providers;
/// Gmail's lower limit (100 through the API) is checked by its sender.
pub const MAX_RECIPIENTS: usize = 500;
/// Attachments per job at most: far above what a notification carries, low
/// enough that one job cannot make the providers' MIME and JSON builders work
/// through thousands of parts.
pub const MAX_ATTACHMENTS: usize = 100;
/// Longest attachment file name, in characters (the usual file-system limit).
pub const MAX_FILENAME_CHARS: usize = 255;
/// Longest attachment `content_type`, parameters included, in bytes.
pub const MAX_CONTENT_TYPE_LEN: usize = 255;
/// Longest subject, in characters: RFC 5322's line length.
pub const MAX_SUBJECT_CHARS: usize = 998;
/// Largest `text` and largest `html` body, each in UTF-8 bytes.
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;
/// Longest custom header name, `X-` included.
pub const MAX_HEADER_NAME_LEN: usize = 64;
/// Longest custom header value, in characters: RFC 5322's line length.
pub const MAX_HEADER_VALUE_CHARS: usize = 998;
/// Longest [`InvalidJob::detail`], in bytes. The detail quotes what was wrong and
/// travels in the dead letter's `x-mail-dispatch-detail` header and in logs: an
/// unbounded quote of producer input could push that header past the broker's
/// frame size, and RabbitMQ closes the whole connection over it.
pub const MAX_DETAIL_BYTES: usize = 300;
/// Category used when a job names none.
pub const DEFAULT_CATEGORY: &str = "notification";

/// A job that breaks a rule of contract §3.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{rule}: {detail}")]
pub struct InvalidJob {
    /// The job id, when the body was readable enough to carry one.
    pub job_id: Option<String>,
    pub organization_id: Option<String>,
    /// The field or rule that was broken, e.g. `to`, `subject`, `json`.
    pub rule: &'static str,
    pub detail: String,
}

/// A decoded file attachment: the bytes are the exact bytes the recipient gets.
#[derive(Clone, PartialEq, Eq)]
pub struct Attachment {
    pub filename: String,
    pub content_type: String,
    /// Shared, not copied, by the message built from the job: it can be 35 MB.
    pub content: std::sync::Arc<[u8]>,
}

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachment")
            .field("content_type", &self.content_type)
            .field("bytes", &self.content.len())
            .finish_non_exhaustive()
    }
}

/// A valid job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub id: String,
    pub organization_id: String,
    pub workspace_id: Option<String>,
    pub category: String,
    pub to: Vec<Mailbox>,
    pub cc: Vec<Mailbox>,
    pub bcc: Vec<Mailbox>,
    pub reply_to: Option<Mailbox>,
    pub subject: String,
    pub text: Option<String>,
    pub html: Option<String>,
    pub attachments: Vec<Attachment>,
    /// Custom `X-` headers, in a stable order.
    pub headers: BTreeMap<String, String>,
    pub not_after: Option<DateTime<Utc>>,
}

impl Job {
    /// Decodes and validates a job from the body of a delivery.
    pub fn decode(body: &[u8]) -> Result<Job, InvalidJob> {
        let value: Value = serde_json::from_slice(body).map_err(|e| InvalidJob {
            job_id: None,
            organization_id: None,
            rule: "json",
            detail: bounded(format!("body is not valid JSON ({e})")),
        })?;
        let Value::Object(obj) = value else {
            return Err(InvalidJob {
                job_id: None,
                organization_id: None,
                rule: "json",
                detail: "body must be a JSON object".into(),
            });
        };
        let mut reader = Reader {
            obj: &obj,
            job_id: obj.get("id").and_then(Value::as_str).map(str::to_owned),
            organization_id: obj
                .get("organization_id")
                .and_then(Value::as_str)
                .map(str::to_owned),
        };
        reader.job()
    }

    /// Total number of recipients (to + cc + bcc).
    pub fn recipient_count(&self) -> usize {
        self.to.len() + self.cc.len() + self.bcc.len()
    }

    /// Whether the job may no longer be sent at `now`.
    pub fn is_expired(&self, now: DateTime<Utc>) -> bool {
        self.not_after.is_some_and(|limit| now > limit)
    }
}

struct Reader<'a> {
    obj: &'a Map<String, Value>,
    job_id: Option<String>,
    organization_id: Option<String>,
}

impl Reader<'_> {
    fn fail(&self, rule: &'static str, detail: impl Into<String>) -> InvalidJob {
        InvalidJob {
            job_id: self.job_id.clone(),
            organization_id: self.organization_id.clone(),
            rule,
            detail: bounded(detail.into()),
        }
    }

    fn opt_str(&self, field: &'static str) -> Result<Option<&str>, InvalidJob> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.fail(field, "must be a string")),
        }
    }

    fn req_str(&self, field: &'static str) -> Result<&str, InvalidJob> {
        self.opt_str(field)?
            .ok_or_else(|| self.fail(field, "is required"))
    }

    fn job(&mut self) -> Result<Job, InvalidJob> {
        let id = self.req_str("id")?;
        if id.is_empty() || id.len() > MAX_ID_LEN || !id.bytes().all(|b| (0x21..=0x7e).contains(&b))
        {
            // An id that breaks the rule cannot be an idempotency key: do not echo it.
            self.job_id = None;
            return Err(self.fail("id", "must be 1 to 128 printable ASCII characters"));
        }
        let id = id.to_owned();

        let organization_id = self.req_str("organization_id")?;
        if organization_id.is_empty() || organization_id.chars().count() > MAX_ID_LEN {
            return Err(self.fail("organization_id", "must be 1 to 128 characters"));
        }
        if organization_id.chars().any(char::is_control) {
            return Err(self.fail("organization_id", "must not contain control characters"));
        }
        let organization_id = organization_id.to_owned();

        let workspace_id = self.opt_str("workspace_id")?;
        if let Some(ws) = workspace_id
            && (ws.chars().count() > MAX_ID_LEN || ws.chars().any(char::is_control))
        {
            return Err(self.fail(
                "workspace_id",
                "must be at most 128 characters, without control characters",
            ));
        }
        let workspace_id = workspace_id.map(str::to_owned);

        let category = match self.opt_str("category")? {
            None => DEFAULT_CATEGORY.to_owned(),
            Some(c) => {
                if c.is_empty()
                    || c.len() > 40
                    || !c
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                {
                    return Err(self.fail("category", "must match [a-z0-9_]{1,40}"));
                }
                c.to_owned()
            }
        };

        let to = self.mailboxes("to")?;
        if to.is_empty() {
            return Err(self.fail("to", "at least one recipient is required"));
        }
        let cc = self.mailboxes("cc")?;
        let bcc = self.mailboxes("bcc")?;
        let total = to.len() + cc.len() + bcc.len();
        if total > MAX_RECIPIENTS {
            return Err(self.fail(
                "to",
                format!("{total} recipients; at most {MAX_RECIPIENTS} per message"),
            ));
        }
        let reply_to = match self.obj.get("reply_to") {
            None | Some(Value::Null) => None,
            Some(v) => Some(self.mailbox("reply_to", v)?),
        };

        let subject = self.req_str("subject")?;
        if subject.trim().is_empty() {
            return Err(self.fail("subject", "must not be empty"));
        }
        if subject.contains(['\r', '\n']) {
            return Err(self.fail("subject", "must not contain CR or LF"));
        }
        if subject.chars().count() > MAX_SUBJECT_CHARS {
            return Err(self.fail(
                "subject",
                format!("must be at most {MAX_SUBJECT_CHARS} characters"),
            ));
        }
        let subject = subject.to_owned();

        let text = self.body("text")?;
        let html = self.body("html")?;
        if text.is_none() && html.is_none() {
            return Err(self.fail("body", "at least one of `text` and `html` is required"));
        }

        let attachments = self.attachments()?;
        let headers = self.headers()?;

        let not_after = match self.opt_str("not_after")? {
            None => None,
            Some(raw) => Some(
                DateTime::parse_from_rfc3339(raw)
                    .map_err(|_| self.fail("not_after", "must be an RFC 3339 instant"))?
                    .with_timezone(&Utc),
            ),
        };

        Ok(Job {
            id,
            organization_id,
            workspace_id,
            category,
            to,
            cc,
            bcc,
            reply_to,
            subject,
            text,
            html,
            attachments,
            headers,
            not_after,
        })
    }

    fn body(&self, field: &'static str) -> Result<Option<String>, InvalidJob> {
        let body = self.opt_str(field)?;
        if body.is_some_and(|b| b.len() > MAX_BODY_BYTES) {
            return Err(self.fail(
                field,
                format!("must be at most {MAX_BODY_BYTES} bytes (UTF-8)"),
            ));
        }
        Ok(body.map(str::to_owned))
    }

    fn mailboxes(&self, field: &'static str) -> Result<Vec<Mailbox>, InvalidJob> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => items.iter().map(|v| self.mailbox(field, v)).collect(),
            Some(_) => Err(self.fail(field, "must be an array of {email, name?}")),
        }
    }

    fn mailbox(&self, field: &'static str, value: &Value) -> Result<Mailbox, InvalidJob> {
        let Value::Object(m) = value else {
            return Err(self.fail(field, "each recipient must be an object {email, name?}"));
        };
        let email = m
            .get("email")
            .and_then(Value::as_str)
            .ok_or_else(|| self.fail(field, "each recipient needs an `email` string"))?;
        let email = EmailAddress::parse(email).map_err(|e| self.fail(field, e.to_string()))?;
        let name = match m.get("name") {
            None | Some(Value::Null) => None,
            Some(Value::String(n)) if n.is_empty() => None,
            Some(Value::String(n)) => {
                if let Some(problem) = display_name_problem(n) {
                    return Err(self.fail(field, format!("recipient name {problem}")));
                }
                Some(n.clone())
            }
            Some(_) => return Err(self.fail(field, "recipient `name` must be a string")),
        };
        Ok(Mailbox { email, name })
    }

    fn attachments(&self) -> Result<Vec<Attachment>, InvalidJob> {
        let items = match self.obj.get("attachments") {
            None | Some(Value::Null) => return Ok(Vec::new()),
            Some(Value::Array(items)) => items,
            Some(_) => return Err(self.fail("attachments", "must be an array")),
        };
        if items.len() > MAX_ATTACHMENTS {
            return Err(self.fail(
                "attachments",
                format!("at most {MAX_ATTACHMENTS} attachments"),
            ));
        }
        let mut total = 0usize;
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            let Value::Object(m) = item else {
                return Err(self.fail("attachments", "each attachment must be an object"));
            };
            let field = |name: &str| m.get(name).and_then(Value::as_str);
            let filename = field("filename")
                .filter(|f| !f.is_empty())
                .ok_or_else(|| self.fail("attachments", "each attachment needs a `filename`"))?;
            if filename.chars().any(char::is_control) {
                return Err(self.fail(
                    "attachments",
                    "filename must not contain control characters",
                ));
            }
            if filename.chars().count() > MAX_FILENAME_CHARS {
                return Err(self.fail(
                    "attachments",
                    format!("filename must be at most {MAX_FILENAME_CHARS} characters"),
                ));
            }
            let content_type = field("content_type").ok_or_else(|| {
                self.fail("attachments", "each attachment needs a `content_type`")
            })?;
            if !is_content_type(content_type) {
                return Err(self.fail(
                    "attachments",
                    format!(
                        "`{content_type}` is not a MIME type such as application/pdf, \
                         optionally with `; name=value` parameters (at most \
                         {MAX_CONTENT_TYPE_LEN} bytes, printable ASCII)"
                    ),
                ));
            }
            let encoded = field("content_base64").ok_or_else(|| {
                self.fail("attachments", "each attachment needs `content_base64`")
            })?;
            let content = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map_err(|_| self.fail("attachments", "`content_base64` is not valid base64"))?;
            total += content.len();
            if total > MAX_ATTACHMENTS_BYTES {
                return Err(self.fail(
                    "attachments",
                    format!("attachments exceed {MAX_ATTACHMENTS_BYTES} bytes in total"),
                ));
            }
            out.push(Attachment {
                filename: filename.to_owned(),
                content_type: content_type.to_ascii_lowercase(),
                content: content.into(),
            });
        }
        Ok(out)
    }

    fn headers(&self) -> Result<BTreeMap<String, String>, InvalidJob> {
        let map = match self.obj.get("headers") {
            None | Some(Value::Null) => return Ok(BTreeMap::new()),
            Some(Value::Object(m)) => m,
            Some(_) => return Err(self.fail("headers", "must be an object of name → value")),
        };
        if map.len() > MAX_CUSTOM_HEADERS {
            return Err(self.fail(
                "headers",
                format!("at most {MAX_CUSTOM_HEADERS} headers (Microsoft Graph's limit)"),
            ));
        }
        let mut out = BTreeMap::new();
        for (name, value) in map {
            let valid_name = name.len() > 2
                && name.len() <= MAX_HEADER_NAME_LEN
                && name[..2].eq_ignore_ascii_case("x-")
                && name[2..]
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-');
            if !valid_name {
                return Err(self.fail(
                    "headers",
                    format!(
                        "`{name}`: only names of the form X-Name, at most \
                         {MAX_HEADER_NAME_LEN} characters, are allowed"
                    ),
                ));
            }
            let Value::String(value) = value else {
                return Err(self.fail("headers", format!("`{name}`: value must be a string")));
            };
            if value.contains(['\r', '\n']) {
                return Err(self.fail("headers", format!("`{name}`: value contains CR or LF")));
            }
            if value.chars().count() > MAX_HEADER_VALUE_CHARS {
                return Err(self.fail(
                    "headers",
                    format!("`{name}`: value longer than {MAX_HEADER_VALUE_CHARS} characters"),
                ));
            }
            out.insert(name.clone(), value.clone());
        }
        Ok(out)
    }
}

/// `type/subtype *(";" name=value)`, as RFC 2045 §5.1 writes it (value: a token
/// or a quoted string), within [`MAX_CONTENT_TYPE_LEN`]. Providers put the value in
/// a MIME header or Graph's JSON as it is: a parameter is where CR/LF would get in.
fn is_content_type(raw: &str) -> bool {
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`{|}~".contains(&b))
    };
    let quoted = |s: &str| {
        s.len() >= 2
            && s.starts_with('"')
            && s.ends_with('"')
            && s[1..s.len() - 1]
                .bytes()
                .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
    };
    if raw.len() > MAX_CONTENT_TYPE_LEN {
        return false;
    }
    let mut parts = raw.split(';');
    let mime_type = parts.next().unwrap_or_default().trim_end_matches(' ');
    let type_ok = match mime_type.split_once('/') {
        Some((top, sub)) => token(top) && token(sub),
        None => false,
    };
    type_ok
        && parts.all(|param| match param.trim_matches(' ').split_once('=') {
            Some((name, value)) => token(name) && (token(value) || quoted(value)),
            None => false,
        })
}

/// `detail` cut to [`MAX_DETAIL_BYTES`] on a character boundary, marked with `…`.
fn bounded(mut detail: String) -> String {
    if detail.len() > MAX_DETAIL_BYTES {
        let mut cut = MAX_DETAIL_BYTES - '…'.len_utf8();
        while !detail.is_char_boundary(cut) {
            cut -= 1;
        }
        detail.truncate(cut);
        detail.push('…');
    }
    detail
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn valid() -> Value {
        json!({
            "id": "8d5e0f0a-2b0e-4c35-9d0c-3f5c4b6f6a11",
            "organization_id": "org_42",
            "workspace_id": "ws_7",
            "category": "task_assigned",
            "to": [{"email": "alice@example.com", "name": "Alice Martin"}],
            "cc": [],
            "bcc": [],
            "reply_to": {"email": "dpo@customer.com", "name": "DPO"},
            "subject": "Nouvelle tâche : revue du registre",
            "text": "plain-text body",
            "html": "<p>HTML body</p>",
            "attachments": [
                {"filename": "rapport.pdf", "content_type": "application/pdf", "content_base64": "JVBERi0x"}
            ],
            "headers": {"X-Entity-Ref-ID": "task-991"},
            "not_after": "2026-11-30T12:00:00Z",
            "unknown_field": {"ignored": true}
        })
    }

    fn decode(v: &Value) -> Result<Job, InvalidJob> {
        Job::decode(&serde_json::to_vec(v).unwrap())
    }

    #[test]
    fn the_contract_example_is_valid() {
        let job = decode(&valid()).unwrap();
        assert_eq!(job.id, "8d5e0f0a-2b0e-4c35-9d0c-3f5c4b6f6a11");
        assert_eq!(job.category, "task_assigned");
        assert_eq!(&job.attachments[0].content[..], b"%PDF-1");
        assert_eq!(job.headers["X-Entity-Ref-ID"], "task-991");
        assert_eq!(job.reply_to.unwrap().name.as_deref(), Some("DPO"));
    }

    #[test]
    fn category_defaults_to_notification() {
        let mut v = valid();
        v.as_object_mut().unwrap().remove("category");
        assert_eq!(decode(&v).unwrap().category, "notification");
    }

    /// Every rule of contract §3, one broken at a time, names the rule it broke.
    #[test]
    fn each_rule_is_enforced_and_named() {
        let cases: Vec<(&str, Value, &str)> = vec![
            ("id", json!(null), "id"),
            ("id", json!(""), "id"),
            ("id", json!("has space"), "id"),
            ("id", json!("x".repeat(129)), "id"),
            ("id", json!(42), "id"),
            ("organization_id", json!(null), "organization_id"),
            ("organization_id", json!(""), "organization_id"),
            ("organization_id", json!("o".repeat(129)), "organization_id"),
            ("workspace_id", json!("w".repeat(129)), "workspace_id"),
            ("category", json!("Task-Assigned"), "category"),
            ("category", json!("c".repeat(41)), "category"),
            ("to", json!([]), "to"),
            ("to", json!(null), "to"),
            ("to", json!([{"email": "not-an-address"}]), "to"),
            ("to", json!([{"name": "no email"}]), "to"),
            ("to", json!("alice@example.com"), "to"),
            ("cc", json!([{"email": "bad@"}]), "cc"),
            (
                "bcc",
                json!([{"email": "x@example.com", "name": "A\r\nB"}]),
                "bcc",
            ),
            ("reply_to", json!({"email": "nope"}), "reply_to"),
            ("subject", json!(""), "subject"),
            ("subject", json!("   "), "subject"),
            ("subject", json!("a\r\nBcc: evil@example.com"), "subject"),
            ("subject", json!(null), "subject"),
            (
                "attachments",
                json!([{"filename": "a.pdf", "content_type": "application/pdf", "content_base64": "***"}]),
                "attachments",
            ),
            (
                "attachments",
                json!([{"filename": "", "content_type": "application/pdf", "content_base64": ""}]),
                "attachments",
            ),
            (
                "attachments",
                json!([{"filename": "a", "content_type": "pdf", "content_base64": ""}]),
                "attachments",
            ),
            ("headers", json!({"Subject": "x"}), "headers"),
            (
                "headers",
                json!({"X-A": "1", "X-B": "2", "X-C": "3", "X-D": "4", "X-E": "5", "X-F": "6"}),
                "headers",
            ),
            ("headers", json!({"X-Bad": "a\r\nb"}), "headers"),
            ("headers", json!({"X-Bad": 5}), "headers"),
            ("not_after", json!("tomorrow"), "not_after"),
        ];
        for (field, value, rule) in cases {
            let mut v = valid();
            v[field] = value.clone();
            let err = decode(&v).expect_err(&format!("{field} = {value} should be refused"));
            assert_eq!(err.rule, rule, "{field} = {value}: {err}");
        }
    }

    #[test]
    fn a_job_needs_a_text_or_html_body() {
        let mut v = valid();
        let o = v.as_object_mut().unwrap();
        o.remove("text");
        o.remove("html");
        assert_eq!(decode(&v).unwrap_err().rule, "body");
        let mut v = valid();
        v.as_object_mut().unwrap().remove("text");
        assert!(decode(&v).is_ok());
    }

    #[test]
    fn too_many_recipients_are_refused() {
        let mut v = valid();
        v["bcc"] = Value::Array(
            (0..500)
                .map(|i| json!({"email": format!("u{i}@example.com")}))
                .collect(),
        );
        assert_eq!(decode(&v).unwrap_err().rule, "to");
    }

    #[test]
    fn unreadable_bodies_are_invalid_without_an_id() {
        for body in [&b"not json"[..], b"[1,2]", b"\"text\"", b"", b"\xff\xfe"] {
            let err = Job::decode(body).unwrap_err();
            assert_eq!(err.rule, "json");
            assert_eq!(err.job_id, None);
        }
    }

    #[test]
    fn the_id_is_kept_when_a_later_rule_fails() {
        let mut v = valid();
        v["subject"] = json!("");
        let err = decode(&v).unwrap_err();
        assert_eq!(
            err.job_id.as_deref(),
            Some("8d5e0f0a-2b0e-4c35-9d0c-3f5c4b6f6a11")
        );
        assert_eq!(err.organization_id.as_deref(), Some("org_42"));
    }

    /// An invalid job's detail goes into the `x-mail-dispatch-detail` header of its
    /// dead letter and into logs: whatever of the job it quotes, it stays short.
    #[test]
    fn an_invalid_jobs_detail_is_bounded_whatever_it_echoes() {
        let long_name = format!("X-{}", "a".repeat(130_000));
        let long_type = format!("application/{}", "b".repeat(130_000));
        let mut cases = Vec::new();
        let mut v = valid();
        v["headers"] = json!({ long_name.clone(): "v" });
        cases.push(v);
        let mut v = valid();
        v["headers"] = json!({ format!("Bad{long_name}"): "v" });
        cases.push(v);
        let mut v = valid();
        v["attachments"][0]["content_type"] = json!(long_type);
        cases.push(v);
        let mut v = valid();
        v["attachments"][0]["content_type"] = json!(format!("no-slash-{}", "c".repeat(130_000)));
        cases.push(v);
        for v in cases {
            let err = decode(&v).unwrap_err();
            assert!(
                err.detail.len() <= MAX_DETAIL_BYTES,
                "{}: detail of {} bytes",
                err.rule,
                err.detail.len()
            );
            assert!(err.to_string().len() <= MAX_DETAIL_BYTES + 20);
        }
        // Cut on a character boundary.
        let mut v = valid();
        v["headers"] = json!({ format!("Bad-{}", "é".repeat(1000)): "v" });
        let err = decode(&v).unwrap_err();
        assert!(err.detail.len() <= MAX_DETAIL_BYTES, "{}", err.detail.len());
        assert!(err.detail.ends_with('…'), "{}", err.detail);
    }

    #[test]
    fn attachment_content_type_parameters_are_checked() {
        let accepted = [
            "text/plain; charset=utf-8",
            "text/plain;charset=\"utf-8\"",
            "application/pdf; name=\"rapport 2026.pdf\"",
            "text/csv; charset=utf-8; header=present",
        ];
        for ct in accepted {
            let mut v = valid();
            v["attachments"][0]["content_type"] = json!(ct);
            assert!(decode(&v).is_ok(), "{ct:?} should be accepted");
        }
        let refused = [
            "text/plain;\r\nBcc: evil@example.com",
            "text/plain; charset=utf-8\r\nX-Injected: 1",
            "text/plain; charset=utf-8\n",
            "text/plain; charset=\"a\rb\"",
            "text/plain; charset=\u{0}",
            "text/plain; charset=\u{7f}",
            "text/plain; charset",
            "text/plain; =utf-8",
            "text/plain; charset=",
            "text/plain; charset=\"unterminated",
            "text/plain; charset=utf-8;",
            "text/plain; charset=ütf-8",
            "text/plain\t; charset=utf-8",
        ];
        for ct in refused {
            let mut v = valid();
            v["attachments"][0]["content_type"] = json!(ct);
            let err = decode(&v).expect_err(&format!("{ct:?} should be refused"));
            assert_eq!(err.rule, "attachments", "{ct:?}");
        }
        let mut v = valid();
        v["attachments"][0]["content_type"] = json!(format!(
            "text/plain; x={}",
            "a".repeat(MAX_CONTENT_TYPE_LEN)
        ));
        assert_eq!(decode(&v).unwrap_err().rule, "attachments");
    }

    #[test]
    fn field_lengths_and_attachment_count_are_bounded() {
        let attachment =
            json!({"filename": "a.txt", "content_type": "text/plain", "content_base64": "YQ=="});
        // (field, value at the bound: accepted, value past it: refused, rule)
        let cases: Vec<(&str, Value, Value, &str)> = vec![
            (
                "subject",
                json!("s".repeat(MAX_SUBJECT_CHARS)),
                json!("s".repeat(MAX_SUBJECT_CHARS + 1)),
                "subject",
            ),
            (
                "subject",
                json!("é".repeat(MAX_SUBJECT_CHARS)),
                json!("é".repeat(MAX_SUBJECT_CHARS + 1)),
                "subject",
            ),
            (
                "text",
                json!("t".repeat(MAX_BODY_BYTES)),
                json!("t".repeat(MAX_BODY_BYTES + 1)),
                "text",
            ),
            (
                "html",
                json!("h".repeat(MAX_BODY_BYTES)),
                json!("h".repeat(MAX_BODY_BYTES + 1)),
                "html",
            ),
            (
                "attachments",
                json!([{"filename": "f".repeat(MAX_FILENAME_CHARS), "content_type": "text/plain", "content_base64": ""}]),
                json!([{"filename": "f".repeat(MAX_FILENAME_CHARS + 1), "content_type": "text/plain", "content_base64": ""}]),
                "attachments",
            ),
            (
                "attachments",
                Value::Array(vec![attachment.clone(); MAX_ATTACHMENTS]),
                Value::Array(vec![attachment; MAX_ATTACHMENTS + 1]),
                "attachments",
            ),
            (
                "headers",
                json!({ format!("X-{}", "n".repeat(MAX_HEADER_NAME_LEN - 2)): "v" }),
                json!({ format!("X-{}", "n".repeat(MAX_HEADER_NAME_LEN - 1)): "v" }),
                "headers",
            ),
            (
                "headers",
                json!({"X-Ref": "v".repeat(MAX_HEADER_VALUE_CHARS)}),
                json!({"X-Ref": "v".repeat(MAX_HEADER_VALUE_CHARS + 1)}),
                "headers",
            ),
        ];
        for (field, at_bound, past_bound, rule) in cases {
            let mut v = valid();
            v[field] = at_bound;
            if let Err(e) = decode(&v) {
                panic!("{field} at its bound should be accepted: {e}");
            }
            let mut v = valid();
            v[field] = past_bound;
            let err = decode(&v).expect_err(&format!("{field} past its bound should be refused"));
            assert_eq!(err.rule, rule, "{field}: {err}");
        }
    }

    #[test]
    fn expiry_compares_with_not_after() {
        let job = decode(&valid()).unwrap();
        let limit = job.not_after.unwrap();
        assert!(!job.is_expired(limit));
        assert!(job.is_expired(limit + chrono::Duration::seconds(1)));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            /// Arbitrary bytes never make the decoder panic.
            #[test]
            fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                let _ = Job::decode(&bytes);
            }

            /// Arbitrary values in every field of a valid job never panic either,
            /// and whatever is accepted keeps the invariants of a valid job.
            #[test]
            fn mutated_jobs_never_panic(field in prop::sample::select(vec![
                "id", "organization_id", "workspace_id", "category", "to", "cc", "bcc", "reply_to",
                "subject", "text", "html", "attachments", "headers", "not_after"]),
                text in "\\PC{0,40}", n in any::<i64>()) {
                for value in [json!(text.clone()), json!(n), json!([text.clone()]), json!({"email": text.clone()}), json!([{"email": text.clone(), "name": text.clone()}]), Value::Null] {
                    let mut v = valid();
                    v[field] = value;
                    if let Ok(job) = decode(&v) {
                        prop_assert!(!job.to.is_empty());
                        prop_assert!(!job.subject.contains(['\r', '\n']));
                        prop_assert!(job.text.is_some() || job.html.is_some());
                    }
                }
            }
        }
    }
}
