//! The key that encrypts stored tokens, its predecessors during a rotation, and
//! development mode, which keeps a generated key in a local file instead.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::Args;
use secrecy::SecretString;

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Token encryption")]
pub struct KeySettings {
    #[arg(long, env = "MAIL_DISPATCH_TOKEN_KEY", hide_env_values = true)]
    pub token_key: Option<SecretString>,
    #[arg(
        long,
        env = "MAIL_DISPATCH_TOKEN_KEY_PREVIOUS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub token_key_previous: Vec<SecretString>,
    /// Development mode: generate and keep a token key in a local file.
    #[arg(long, env = "MAIL_DISPATCH_DEV", default_value_t = false)]
    pub dev: bool,
    #[arg(
        long,
        env = "MAIL_DISPATCH_DEV_KEY_FILE",
        default_value = ".mail-dispatch-dev-key"
    )]
    pub dev_key_file: PathBuf,
}

impl KeySettings {
    /// The token key: configured, or in development mode kept in a local file.
    pub fn token_key(&self) -> anyhow::Result<SecretString> {
        if let Some(key) = &self.token_key {
            return Ok(key.clone());
        }
        if !self.dev {
            bail!(
                "MAIL_DISPATCH_TOKEN_KEY is not set (base64 of 32 random bytes: `openssl rand -base64 32`); set MAIL_DISPATCH_DEV=true for a local development key"
            );
        }
        let path = &self.dev_key_file;
        let key = match std::fs::read_to_string(path) {
            Ok(k) => {
                check_private(path)?;
                k.trim().to_owned()
            }
            Err(_) => {
                let k = mail_dispatch_store::TokenCipher::generate_key();
                write_private(path, &k)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                k
            }
        };
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            tracing::warn!(file = %path.display(), "development mode: token key kept in a local file; never use this in production");
        });
        Ok(SecretString::from(key))
    }

    pub fn cipher(&self) -> anyhow::Result<mail_dispatch_store::TokenCipher> {
        mail_dispatch_store::TokenCipher::new(&self.token_key()?, &self.token_key_previous)
            .context("MAIL_DISPATCH_TOKEN_KEY")
    }
}

/// Refuses a key file that others could read or that another user planted: the
/// key decrypts every stored token.
fn check_private(path: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt as _;
        let meta =
            std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
        if meta.mode() & 0o077 != 0 {
            bail!(
                "{} is readable by other users (mode {:o}): `chmod 600` it, or delete it to generate a new key",
                path.display(),
                meta.mode() & 0o777
            );
        }
        // On Linux, /proc/self belongs to the process's effective user.
        let uid = std::fs::metadata("/proc/self").map(|m| m.uid());
        if let Ok(uid) = uid
            && uid != meta.uid()
        {
            bail!(
                "{} belongs to another user (uid {}): delete it to generate a new key",
                path.display(),
                meta.uid()
            );
        }
    }
    Ok(())
}

/// Writes a file only its owner can read (the development token key).
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(contents.as_bytes())
}
