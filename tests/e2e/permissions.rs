//! The RabbitMQ permissions of deploy/rabbitmq/permissions.sh, applied to a real
//! vhost: each role can do its job and nothing else a hostile client would want.

use std::process::Command;

use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use mail_dispatch_broker::{Broker, Outgoing, Topology, json_properties};
use mail_dispatch_test_support::unique;

fn rabbitmqctl(args: &[&str]) {
    let ok = Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .status()
        .expect("rabbitmqctl runs (RabbitMQ is installed locally, see README)")
        .success();
    assert!(ok, "rabbitmqctl {args:?}");
}

/// A vhost and the three users, removed when dropped.
struct Vhost {
    name: String,
    users: Vec<String>,
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "delete_vhost", &self.name])
            .status();
        for u in &self.users {
            let _ = Command::new("rabbitmqctl")
                .args(["-q", "delete_user", u])
                .status();
        }
    }
}

fn url(user: &str, vhost: &str) -> String {
    format!("amqp://{user}:pw-{user}@127.0.0.1:5672/{vhost}")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_producer_can_only_publish_jobs_and_a_results_reader_can_only_read_results() {
    let _services = mail_dispatch_test_support::services(false).await;
    let users_prefix = unique("t");
    let vhost = Vhost {
        name: unique("md-test-vhost-"),
        users: ["producer", "worker", "results"]
            .iter()
            .map(|r| format!("{users_prefix}mail-dispatch-{r}"))
            .collect(),
    };
    rabbitmqctl(&["add_vhost", &vhost.name]);
    let (producer, worker, results) = (&vhost.users[0], &vhost.users[1], &vhost.users[2]);
    let ok = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/rabbitmq/permissions.sh"
        ))
        .arg(&vhost.name)
        .env("MAIL_DISPATCH_RABBITMQ_USER_PREFIX", &users_prefix)
        .env("MAIL_DISPATCH_PRODUCER_PASSWORD", format!("pw-{producer}"))
        .env("MAIL_DISPATCH_WORKER_PASSWORD", format!("pw-{worker}"))
        .env("MAIL_DISPATCH_RESULTS_PASSWORD", format!("pw-{results}"))
        .status()
        .unwrap()
        .success();
    assert!(ok, "permissions.sh applies");

    // The worker declares its whole topology and publishes results.
    let topology = Topology::default();
    let w = Broker::connect(&url(worker, &vhost.name), "perm-worker")
        .await
        .unwrap();
    w.declare(&topology)
        .await
        .expect("the worker declares its topology");

    // The results reader binds its own queue to the results exchange.
    let r = Broker::connect(&url(results, &vhost.name), "perm-results")
        .await
        .unwrap();
    let ch = r.channel().await.unwrap();
    ch.queue_declare(
        "results.app".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("its own queue");
    ch.queue_bind(
        "results.app".into(),
        topology.results_exchange.as_str().into(),
        "result.*".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bound to the results exchange");
    w.publish(Outgoing {
        exchange: &topology.results_exchange,
        routing_key: "result.sent",
        body: b"{}",
        properties: json_properties(),
        mandatory: false,
    })
    .await
    .expect("the worker publishes results");
    let got = ch
        .basic_get("results.app".into(), BasicGetOptions::default())
        .await
        .unwrap();
    assert!(got.is_some(), "the reader reads them");
    let ch = r.channel().await.unwrap();
    assert!(
        ch.basic_get(
            topology.jobs_queue.as_str().into(),
            BasicGetOptions::default()
        )
        .await
        .is_err(),
        "the results reader cannot read jobs"
    );

    // The producer publishes jobs, and nothing else.
    let p = Broker::connect(&url(producer, &vhost.name), "perm-producer")
        .await
        .unwrap();
    p.publish(Outgoing {
        exchange: &topology.jobs_exchange,
        routing_key: "send",
        body: b"{}",
        properties: json_properties(),
        mandatory: true,
    })
    .await
    .expect("the producer publishes a job");
    let forged = p
        .publish(Outgoing {
            exchange: &topology.results_exchange,
            routing_key: "result.sent",
            body: b"{\"forged\": true}",
            properties: json_properties(),
            mandatory: false,
        })
        .await;
    assert!(forged.is_err(), "the producer cannot forge a result");
    let p = Broker::connect(&url(producer, &vhost.name), "perm-producer-2")
        .await
        .unwrap();
    let ch = p.channel().await.unwrap();
    assert!(
        ch.basic_get(
            topology.jobs_queue.as_str().into(),
            BasicGetOptions::default()
        )
        .await
        .is_err(),
        "the producer cannot read the jobs queue"
    );
    let ch = p.channel().await.unwrap();
    assert!(
        ch.queue_declare(
            "steal".into(),
            QueueDeclareOptions::default(),
            FieldTable::default()
        )
        .await
        .is_err(),
        "the producer cannot declare queues"
    );
    for b in [w, r, p] {
        b.close().await;
    }
}
