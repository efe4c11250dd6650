//! The platform's own sender, through `lettre`: an SMTP relay, or a directory
//! receiving one `.eml` file per message (the default, so the service runs on a
//! laptop with no mail server).

use lettre::transport::smtp::Error as SmtpError;
use lettre::{AsyncFileTransport, AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use mail_dispatch_domain::{ErrorCode, FailureClass, OutgoingMessage};

use crate::mime::{BccHeader, build};
use crate::{Accepted, SendError};

/// How the platform sender delivers.
#[derive(Clone)]
pub enum PlatformSender {
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    File(AsyncFileTransport<Tokio1Executor>, std::path::PathBuf),
}

impl std::fmt::Debug for PlatformSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlatformSender::Smtp(_) => f.write_str("PlatformSender::Smtp"),
            PlatformSender::File(_, dir) => write!(f, "PlatformSender::File({})", dir.display()),
        }
    }
}

/// Why a transport URL cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("MAIL_DISPATCH_DEFAULT_TRANSPORT: {0}")]
pub struct TransportUrlError(String);

impl PlatformSender {
    /// `smtp://host:port` (plain; add `?tls=required` for STARTTLS — lettre's URL
    /// form), `smtps://user:pass@host:port` (implicit TLS), or `file://DIR`.
    pub fn from_url(url: &str) -> Result<Self, TransportUrlError> {
        if let Some(dir) = url.strip_prefix("file://") {
            let dir = std::path::PathBuf::from(if dir.is_empty() { "." } else { dir });
            std::fs::create_dir_all(&dir)
                .map_err(|e| TransportUrlError(format!("cannot create {}: {e}", dir.display())))?;
            return Ok(PlatformSender::File(AsyncFileTransport::new(&dir), dir));
        }
        if url.starts_with("smtp://") || url.starts_with("smtps://") {
            let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
                .map_err(|e| TransportUrlError(e.to_string()))?
                .timeout(Some(std::time::Duration::from_secs(30)))
                .build();
            return Ok(PlatformSender::Smtp(transport));
        }
        Err(TransportUrlError(
            "expected smtp://host:port, smtps://user:pass@host:port or file://DIR".into(),
        ))
    }

    pub async fn send(&self, msg: &OutgoingMessage) -> Result<Accepted, SendError> {
        let message = build(msg, BccHeader::Drop)?;
        let message_id = message.headers().get_raw("Message-ID").map(str::to_owned);
        match self {
            PlatformSender::File(transport, _) => {
                transport.send(message).await.map_err(|e| {
                    SendError::new(
                        FailureClass::unavailable(None),
                        format!("could not write the message file: {e}"),
                    )
                })?;
            }
            PlatformSender::Smtp(transport) => {
                transport
                    .send(message)
                    .await
                    .map_err(|e| classify_smtp(&e))?;
            }
        }
        Ok(Accepted {
            provider_message_id: message_id,
        })
    }
}

fn classify_smtp(e: &SmtpError) -> SendError {
    let status = e.status().map(|c| c.to_string());
    let code: Option<u16> = status.as_deref().and_then(|s| s.parse().ok());
    let class = if e.is_permanent() {
        match code {
            Some(552) => FailureClass::Permanent(ErrorCode::MessageTooLarge),
            Some(550 | 551 | 553) => FailureClass::Permanent(ErrorCode::RecipientRejected),
            _ => FailureClass::Permanent(ErrorCode::ProviderUnavailable),
        }
    } else {
        FailureClass::unavailable(None)
    };
    SendError {
        provider_status: code,
        provider_code: status,
        ..SendError::new(class, format!("SMTP relay: {e}"))
    }
}
