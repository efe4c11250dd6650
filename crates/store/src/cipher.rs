//! Encryption of stored tokens: AES-256-GCM (the `aes-gcm` crate, RustCrypto).
//!
//! Stored form: `key_id_len (u8) | key_id | nonce (12 bytes) | ciphertext+tag`.
//! The key id is the first 8 bytes of SHA-256 of the key, in hex: it tells which
//! key decrypts a value, so a new key can be introduced while values written
//! under the previous one stay readable (rotation without downtime).
//! The associated data binds each ciphertext to its organization and column.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use rand::RngCore as _;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

/// Why a key or a stored value could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CipherError {
    #[error("token key must be base64 of exactly 32 bytes")]
    BadKey,
    #[error("stored token was encrypted with key {0}, which is not configured")]
    UnknownKey(String),
    #[error("stored token could not be decrypted (corrupt, or bound to another row)")]
    Corrupt,
}

struct Key {
    id: String,
    aead: Aes256Gcm,
}

/// Encrypts and decrypts tokens. Holds the current key and any previous keys.
pub struct TokenCipher {
    current: Key,
    previous: Vec<Key>,
}

impl std::fmt::Debug for TokenCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCipher")
            .field("key_id", &self.current.id)
            .finish_non_exhaustive()
    }
}

fn key_from_base64(encoded: &str) -> Result<Key, CipherError> {
    // The raw key is wiped once the cipher holds its own (zeroized) key schedule.
    let bytes = zeroize::Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|_| CipherError::BadKey)?,
    );
    if bytes.len() != 32 {
        return Err(CipherError::BadKey);
    }
    let digest = Sha256::digest(bytes.as_slice());
    let id = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let aead = Aes256Gcm::new_from_slice(bytes.as_slice()).map_err(|_| CipherError::BadKey)?;
    Ok(Key { id, aead })
}

impl TokenCipher {
    /// `current` encrypts; `previous` keys only decrypt (base64 of 32 bytes each).
    pub fn new(current: &SecretString, previous: &[SecretString]) -> Result<Self, CipherError> {
        Ok(TokenCipher {
            current: key_from_base64(current.expose_secret())?,
            previous: previous
                .iter()
                .map(|k| key_from_base64(k.expose_secret()))
                .collect::<Result<_, _>>()?,
        })
    }

    /// A fresh random key, base64-encoded (for development mode and tests).
    pub fn generate_key() -> String {
        let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
        rand::rng().fill_bytes(bytes.as_mut_slice());
        base64::engine::general_purpose::STANDARD.encode(bytes.as_slice())
    }

    /// The id of the key new values are encrypted with.
    pub fn key_id(&self) -> &str {
        &self.current.id
    }

    pub fn encrypt(&self, context: &str, plaintext: &SecretString) -> Vec<u8> {
        let mut nonce = [0u8; 12];
        rand::rng().fill_bytes(&mut nonce);
        let ciphertext = self
            .current
            .aead
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext.expose_secret().as_bytes(),
                    aad: context.as_bytes(),
                },
            )
            .expect("AES-GCM encryption of an in-memory buffer cannot fail");
        let id = self.current.id.as_bytes();
        let mut out = Vec::with_capacity(1 + id.len() + 12 + ciphertext.len());
        out.push(id.len() as u8);
        out.extend_from_slice(id);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        out
    }

    pub fn decrypt(&self, context: &str, stored: &[u8]) -> Result<SecretString, CipherError> {
        let (&id_len, rest) = stored.split_first().ok_or(CipherError::Corrupt)?;
        let id_len = id_len as usize;
        if rest.len() < id_len + 12 + 16 {
            return Err(CipherError::Corrupt);
        }
        let (id, rest) = rest.split_at(id_len);
        let (nonce, ciphertext) = rest.split_at(12);
        let id = std::str::from_utf8(id).map_err(|_| CipherError::Corrupt)?;
        let key = std::iter::once(&self.current)
            .chain(&self.previous)
            .find(|k| k.id == id)
            .ok_or_else(|| CipherError::UnknownKey(id.to_owned()))?;
        let plain = key
            .aead
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| CipherError::Corrupt)?;
        String::from_utf8(plain)
            .map(SecretString::from)
            .map_err(|_| CipherError::Corrupt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SecretString {
        SecretString::from(TokenCipher::generate_key())
    }

    #[test]
    fn round_trip_and_no_plaintext_in_the_stored_form() {
        let c = TokenCipher::new(&key(), &[]).unwrap();
        let secret = SecretString::from("1.AQoAsecret-refresh-token");
        let stored = c.encrypt("org_1/refresh", &secret);
        assert!(!stored.windows(6).any(|w| w == b"secret"));
        assert_eq!(
            c.decrypt("org_1/refresh", &stored).unwrap().expose_secret(),
            "1.AQoAsecret-refresh-token"
        );
    }

    #[test]
    fn a_ciphertext_cannot_be_moved_to_another_organization() {
        let c = TokenCipher::new(&key(), &[]).unwrap();
        let stored = c.encrypt("org_1/refresh", &SecretString::from("t"));
        assert!(matches!(
            c.decrypt("org_2/refresh", &stored),
            Err(CipherError::Corrupt)
        ));
    }

    #[test]
    fn previous_keys_still_decrypt_after_rotation() {
        let (old, new) = (key(), key());
        let before = TokenCipher::new(&old, &[]).unwrap();
        let stored = before.encrypt("o/a", &SecretString::from("t"));
        let after = TokenCipher::new(&new, std::slice::from_ref(&old)).unwrap();
        assert_eq!(after.decrypt("o/a", &stored).unwrap().expose_secret(), "t");
        let without_old = TokenCipher::new(&new, &[]).unwrap();
        assert!(matches!(
            without_old.decrypt("o/a", &stored),
            Err(CipherError::UnknownKey(_))
        ));
    }

    #[test]
    fn bad_keys_are_refused() {
        for bad in ["", "not base64!", "AAAA"] {
            assert!(TokenCipher::new(&SecretString::from(bad), &[]).is_err());
        }
    }
}
