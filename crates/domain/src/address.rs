//! E-mail addresses and mailboxes (an address with an optional display name).

use std::fmt;

use serde::{Deserialize, Serialize};

/// An e-mail address that passed RFC 5322 `addr-spec` validation and carries no
/// whitespace or control characters (so it can never inject a header).
#[derive(Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct EmailAddress(String);

/// Why a string is not an acceptable e-mail address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a valid e-mail address")]
pub struct InvalidEmailAddress(pub String);

impl EmailAddress {
    /// Parses an address as a mail provider would accept it in a recipient field.
    pub fn parse(raw: &str) -> Result<Self, InvalidEmailAddress> {
        let invalid = || InvalidEmailAddress(raw.chars().take(80).collect());
        if raw.is_empty()
            || raw.len() > 254
            || raw.chars().any(|c| c.is_whitespace() || c.is_control())
            || !email_address::EmailAddress::is_valid(raw)
        {
            return Err(invalid());
        }
        // `email_address` accepts `user@localhost`-style domains and IP literals;
        // both are fine for mail servers on a private network, but quoted local
        // parts and display-name forms are not addresses a job should carry.
        if raw.starts_with('"') || raw.contains('<') {
            return Err(invalid());
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part after the `@`.
    pub fn domain(&self) -> &str {
        self.0.rsplit_once('@').map(|(_, d)| d).unwrap_or_default()
    }

    /// A form safe for logs: the local part is reduced to its first character.
    pub fn redacted(&self) -> String {
        match self.0.rsplit_once('@') {
            Some((local, domain)) => {
                format!("{}***@{domain}", local.chars().next().unwrap_or('*'))
            }
            None => "***".to_owned(),
        }
    }
}

impl<'de> Deserialize<'de> for EmailAddress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        EmailAddress::parse(&raw).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for EmailAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for EmailAddress {
    // Full addresses are personal data: keep them out of debug output and logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EmailAddress({})", self.redacted())
    }
}

/// An address with an optional display name, e.g. `"Alice Martin" <alice@example.com>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mailbox {
    pub email: EmailAddress,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Mailbox {
    pub fn new(email: EmailAddress, name: Option<String>) -> Self {
        Self { email, name }
    }
}

/// A display name is refused when it could break the header it goes in or, with
/// `@`, when Microsoft answers `ErrorSendAsDenied` (contract §5).
pub fn display_name_problem(name: &str) -> Option<&'static str> {
    if name.contains(['\r', '\n']) {
        Some("must not contain CR or LF")
    } else if name.chars().any(char::is_control) {
        Some("must not contain control characters")
    } else if name.chars().count() > 256 {
        Some("must be at most 256 characters")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_addresses() {
        for ok in [
            "alice@example.com",
            "a.b+tag@sub.example.co.uk",
            "no-reply@localhost",
            "x_y@example.io",
        ] {
            assert!(EmailAddress::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_what_is_not_an_address() {
        for bad in [
            "",
            "alice",
            "alice@",
            "@example.com",
            "alice @example.com",
            "alice@example.com\r\nBcc: x@y.z",
            "Alice <alice@example.com>",
            "a@b@c",
        ] {
            assert!(EmailAddress::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn debug_output_redacts_the_local_part() {
        let a = EmailAddress::parse("alice@example.com").unwrap();
        assert_eq!(format!("{a:?}"), "EmailAddress(a***@example.com)");
        assert_eq!(a.domain(), "example.com");
    }
}
