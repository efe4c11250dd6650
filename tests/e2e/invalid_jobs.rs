//! Every rule of contract §3 broken: an `invalid_job` result naming the rule, a
//! dead letter, and the worker goes on.

use lapin::types::ShortString;
use mail_dispatch_broker::{header_str, json_properties};
use mail_dispatch_test_support::TestApp;
use serde_json::{Value, json};

use crate::support::{WAIT, assert_valid_result};

fn base(id: &str) -> Value {
    json!({
        "id": id,
        "organization_id": "org_1",
        "to": [{"email": "alice@example.com"}],
        "subject": "Subject",
        "text": "Body",
    })
}

fn broken(id: &str, field: &str, value: Value) -> Value {
    let mut v = base(id);
    if value.is_null() {
        v.as_object_mut().unwrap().remove(field);
    } else {
        v[field] = value;
    }
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn every_invalid_job_gets_an_invalid_job_result_and_a_dead_letter_and_the_worker_goes_on() {
    let app = TestApp::spawn().await;
    let mut results = app.amqp.tap_results().await;
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "bad-org-missing",
            broken("bad-org-missing", "organization_id", Value::Null),
            "organization_id",
        ),
        (
            "bad-org-long",
            broken("bad-org-long", "organization_id", json!("o".repeat(129))),
            "organization_id",
        ),
        (
            "bad-category",
            broken("bad-category", "category", json!("Task Assigned")),
            "category",
        ),
        (
            "bad-to-missing",
            broken("bad-to-missing", "to", Value::Null),
            "to",
        ),
        (
            "bad-to-empty",
            broken("bad-to-empty", "to", json!([])),
            "to",
        ),
        (
            "bad-to-address",
            broken(
                "bad-to-address",
                "to",
                json!([{"email": "alice(at)example.com"}]),
            ),
            "to",
        ),
        (
            "bad-cc",
            broken("bad-cc", "cc", json!([{"email": "x"}])),
            "cc",
        ),
        (
            "bad-bcc",
            broken("bad-bcc", "bcc", json!([{"email": "@example.com"}])),
            "bcc",
        ),
        (
            "bad-reply-to",
            broken("bad-reply-to", "reply_to", json!({"email": "nope"})),
            "reply_to",
        ),
        (
            "bad-subject-empty",
            broken("bad-subject-empty", "subject", json!("")),
            "subject",
        ),
        (
            "bad-subject-crlf",
            broken(
                "bad-subject-crlf",
                "subject",
                json!("Hi\r\nBcc: x@evil.example"),
            ),
            "subject",
        ),
        (
            "bad-subject-missing",
            broken("bad-subject-missing", "subject", Value::Null),
            "subject",
        ),
        (
            "bad-no-body",
            {
                let mut v = base("bad-no-body");
                v.as_object_mut().unwrap().remove("text");
                v
            },
            "body",
        ),
        (
            "bad-attachment",
            broken(
                "bad-attachment",
                "attachments",
                json!([{"filename": "a.pdf", "content_type": "application/pdf", "content_base64": "%%%"}]),
            ),
            "attachments",
        ),
        (
            "bad-header-name",
            broken(
                "bad-header-name",
                "headers",
                json!({"List-Unsubscribe": "<mailto:x@y.z>"}),
            ),
            "headers",
        ),
        (
            "bad-header-count",
            broken(
                "bad-header-count",
                "headers",
                json!({"X-1": "a", "X-2": "b", "X-3": "c", "X-4": "d", "X-5": "e", "X-6": "f"}),
            ),
            "headers",
        ),
        (
            "bad-header-crlf",
            broken(
                "bad-header-crlf",
                "headers",
                json!({"X-Ref": "a\r\nBcc: x@evil.example"}),
            ),
            "headers",
        ),
        (
            "bad-not-after",
            broken("bad-not-after", "not_after", json!("next tuesday")),
            "not_after",
        ),
    ];
    for (_, job, _) in &cases {
        app.amqp.publish_job(job).await;
    }
    // Bodies with no readable id: the AMQP message_id stands in; without one, null.
    app.amqp
        .publish_raw(
            b"{not json",
            json_properties().with_message_id(ShortString::from("amqp-id-1")),
        )
        .await;
    app.amqp
        .publish_raw(
            &serde_json::to_vec(&broken("has space", "id", json!("has space"))).unwrap(),
            json_properties(),
        )
        .await;
    app.amqp.publish_raw(b"[1,2,3]", json_properties()).await;
    // And the worker goes on with the next, valid, job.
    let valid = base("valid-after-invalid");
    app.amqp.publish_job(&valid).await;

    for (id, _, rule) in &cases {
        let r = results.result(id, WAIT).await;
        assert_valid_result(&r);
        assert_eq!(r["status"], "failed");
        assert_eq!(r["error"]["code"], "invalid_job");
        assert_eq!(r["attempts"], 0);
        let message = r["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with(&format!("{rule}:")),
            "{id}: message should name the rule `{rule}`: {message}"
        );
    }
    let r = results.result("amqp-id-1", WAIT).await;
    assert!(r["error"]["message"].as_str().unwrap().starts_with("json:"));
    let ok = results.result("valid-after-invalid", WAIT).await;
    assert_eq!(ok["status"], "sent");

    let seen = results.settle(std::time::Duration::from_millis(500)).await;
    let null_ids = seen
        .iter()
        .filter(|s| s.routing_key == "result.failed" && s.body["job_id"].is_null())
        .count();
    assert_eq!(null_ids, 2, "unreadable ids give a null job_id");
    for s in seen.iter().filter(|s| s.routing_key == "result.failed") {
        assert_valid_result(&s.body);
    }

    let dead = app.amqp.drain(&app.amqp.topology.dead_queue).await;
    assert_eq!(
        dead.len(),
        cases.len() + 3,
        "every invalid job is dead-lettered"
    );
    for d in &dead {
        assert_eq!(
            header_str(&d.properties, "x-mail-dispatch-reason").as_deref(),
            Some("invalid_job")
        );
        assert!(header_str(&d.properties, "x-mail-dispatch-detail").is_some());
    }
    assert!(
        dead.iter().any(|d| d.data == b"{not json"),
        "the original bytes are kept for inspection"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redelivered_invalid_job_is_not_reported_twice() {
    let app = TestApp::spawn().await;
    let mut results = app.amqp.tap_results().await;
    let job = broken("dup-invalid", "subject", json!(""));
    app.amqp.publish_job(&job).await;
    app.amqp.publish_job(&job).await;
    results.result("dup-invalid", WAIT).await;
    let seen = results.settle(std::time::Duration::from_secs(1)).await;
    assert_eq!(
        seen.iter()
            .filter(|s| s.body["job_id"] == "dup-invalid")
            .count(),
        1
    );
}
