//! RFC 5322 messages built with `lettre`'s builder: RFC 2047 encoded words for
//! non-ASCII names and subjects, RFC 2231 file names, multipart/alternative for
//! text + HTML, multipart/mixed for attachments, base64 or quoted-printable bodies
//! chosen by content.

use lettre::message::header::{ContentType, HeaderName, HeaderValue};
use lettre::message::{Attachment, Mailbox as LettreMailbox, Message, MultiPart, SinglePart};
use mail_dispatch_domain::{ErrorCode, Mailbox, OutgoingMessage};

use crate::SendError;

/// Whether the `Bcc` header stays in the built message. Gmail reads the
/// recipients from the headers and removes `Bcc` itself, so it must be kept
/// there; an SMTP relay gets the recipients from the envelope, so it is dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BccHeader {
    Keep,
    Drop,
}

fn mailbox(m: &Mailbox) -> Result<LettreMailbox, SendError> {
    let address = m.email.as_str().parse().map_err(|_| {
        SendError::permanent(
            ErrorCode::InvalidJob,
            format!("address {} cannot be used", m.email.redacted()),
        )
    })?;
    Ok(LettreMailbox::new(m.name.clone(), address))
}

/// Builds the message as a `lettre::Message` (which also carries the SMTP envelope).
pub fn build(msg: &OutgoingMessage, bcc: BccHeader) -> Result<Message, SendError> {
    let mut builder = Message::builder()
        .from(mailbox(&msg.from)?)
        .subject(msg.subject.clone());
    for m in &msg.to {
        builder = builder.to(mailbox(m)?);
    }
    for m in &msg.cc {
        builder = builder.cc(mailbox(m)?);
    }
    for m in &msg.bcc {
        builder = builder.bcc(mailbox(m)?);
    }
    if let Some(m) = &msg.reply_to {
        builder = builder.reply_to(mailbox(m)?);
    }
    if let Some(id) = &msg.message_id {
        builder = builder.message_id(Some(format!("<{id}>")));
    }
    if bcc == BccHeader::Keep {
        builder = builder.keep_bcc();
    }
    for (name, value) in &msg.headers {
        let name = HeaderName::new_from_ascii(name.clone()).map_err(|_| {
            SendError::permanent(
                ErrorCode::InvalidJob,
                format!("header name {name} is not valid"),
            )
        })?;
        builder = builder.raw_header(HeaderValue::new(name, value.clone()));
    }

    let body = match (&msg.text, &msg.html) {
        (Some(text), Some(html)) => Body::Multi(MultiPart::alternative_plain_html(
            text.clone(),
            html.clone(),
        )),
        (Some(text), None) => Body::Single(SinglePart::plain(text.clone())),
        (None, Some(html)) => Body::Single(SinglePart::html(html.clone())),
        (None, None) => Body::Single(SinglePart::plain(String::new())),
    };

    let built = if msg.attachments.is_empty() {
        match body {
            Body::Multi(m) => builder.multipart(m),
            Body::Single(s) => builder.singlepart(s),
        }
    } else {
        let mut mixed = match body {
            Body::Multi(m) => MultiPart::mixed().multipart(m),
            Body::Single(s) => MultiPart::mixed().singlepart(s),
        };
        for a in &msg.attachments {
            let content_type = ContentType::parse(&a.content_type).map_err(|_| {
                SendError::permanent(
                    ErrorCode::InvalidJob,
                    format!("attachment type {} is not valid", a.content_type),
                )
            })?;
            mixed = mixed.singlepart(
                Attachment::new(a.filename.clone()).body(a.content.to_vec(), content_type),
            );
        }
        builder.multipart(mixed)
    };
    built.map_err(|e| {
        SendError::permanent(
            ErrorCode::InvalidJob,
            format!("message could not be built: {e}"),
        )
    })
}

enum Body {
    Multi(MultiPart),
    Single(SinglePart),
}

/// The message as bytes, ready for Gmail's `raw` field or an `.eml` file.
pub fn render(msg: &OutgoingMessage, bcc: BccHeader) -> Result<Vec<u8>, SendError> {
    Ok(build(msg, bcc)?.formatted())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mail_dispatch_domain::{Attachment as DomainAttachment, EmailAddress};

    fn mb(email: &str, name: Option<&str>) -> Mailbox {
        Mailbox::new(EmailAddress::parse(email).unwrap(), name.map(str::to_owned))
    }

    fn message() -> OutgoingMessage {
        OutgoingMessage {
            from: mb("notifications@customer.com", Some("Équipe Conformité")),
            to: vec![mb("alice@example.com", Some("Alice Martin"))],
            cc: vec![],
            bcc: vec![mb("audit@example.com", None)],
            reply_to: Some(mb("dpo@customer.com", Some("DPO"))),
            subject: "Nouvelle tâche : revue du registre".into(),
            text: Some("Bonjour Alice".into()),
            html: Some("<p>Bonjour Alice</p>".into()),
            attachments: vec![DomainAttachment {
                filename: "rapport été.pdf".into(),
                content_type: "application/pdf".into(),
                content: vec![0, 159, 146, 150, 255].into(),
            }],
            headers: [("X-Entity-Ref-ID".to_owned(), "task-991".to_owned())].into(),
            message_id: Some("job-1.org@customer.com".into()),
            save_to_sent_items: false,
        }
    }

    #[test]
    fn non_ascii_is_encoded_and_structure_is_multipart() {
        let raw = String::from_utf8(render(&message(), BccHeader::Keep).unwrap()).unwrap();
        assert!(raw.is_ascii(), "headers and bodies are 7-bit encoded");
        assert!(
            raw.contains("Subject: Nouvelle =?utf-8?b?dMOiY2hl?= : revue du registre"),
            "{raw}"
        );
        assert!(raw.contains(
            "From: =?utf-8?b?w4lxdWlwZSBDb25mb3JtaXTDqQ==?= <notifications@customer.com>"
        ));
        assert!(raw.contains("Message-ID: <job-1.org@customer.com>"));
        assert!(raw.contains("multipart/mixed"));
        assert!(raw.contains("multipart/alternative"));
        assert!(raw.contains("X-Entity-Ref-ID: task-991"));
        assert!(raw.contains("Bcc: audit@example.com"));
        let dropped = String::from_utf8(render(&message(), BccHeader::Drop).unwrap()).unwrap();
        assert!(!dropped.contains("Bcc:"));
    }
}
