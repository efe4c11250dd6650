//! The README's "Configuration" table is the only written list of the settings;
//! these tests hold it and the flags to each other, variable by variable and
//! default by default.

use std::collections::BTreeMap;

use clap::{Args as _, Command};
use secrecy::ExposeSecret as _;

use super::Settings;

const README: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"));

/// What a README row gives as the default.
#[derive(Debug)]
enum Documented {
    /// A value in backticks, such as `64` or `file://./outbox`.
    Value(String),
    /// `none` or `empty`.
    Nothing,
    /// Prose, such as "the origin of `MAIL_DISPATCH_PUBLIC_URL`": computed by the
    /// code from other settings.
    Derived,
}

/// Variable → documented default, from the table under `## Configuration`.
fn readme_table() -> BTreeMap<String, Documented> {
    let section = README
        .split_once("\n## Configuration\n")
        .expect("the README has a `## Configuration` section")
        .1;
    let section = section.split("\n## ").next().unwrap_or(section);
    let mut table = BTreeMap::new();
    for line in section.lines() {
        let Some(row) = line.strip_prefix("| `MAIL_DISPATCH_") else {
            continue;
        };
        let mut cells = row.split('|');
        let variable = format!(
            "MAIL_DISPATCH_{}",
            cells
                .next()
                .unwrap_or_default()
                .trim()
                .trim_end_matches('`')
        );
        let default = cells.next().unwrap_or_default().trim();
        let documented = if let Some(code) = default.strip_prefix('`') {
            Documented::Value(code.split('`').next().unwrap_or_default().to_owned())
        } else if default.starts_with("none") || default.starts_with("empty") {
            Documented::Nothing
        } else {
            Documented::Derived
        };
        let again = table.insert(variable.clone(), documented);
        assert!(again.is_none(), "the README lists {variable} twice");
    }
    assert!(
        !table.is_empty(),
        "no `MAIL_DISPATCH_*` row found under `## Configuration`"
    );
    table
}

fn command() -> Command {
    Settings::augment_args(Command::new("mail-dispatch"))
}

/// Variable → clap's default values, for every setting.
fn clap_settings() -> BTreeMap<String, Vec<String>> {
    command()
        .get_arguments()
        .filter_map(|arg| {
            let env = arg.get_env()?.to_str()?.to_owned();
            let defaults = arg
                .get_default_values()
                .iter()
                .map(|v| v.to_string_lossy().into_owned())
                .collect();
            Some((env, defaults))
        })
        .collect()
}

#[test]
fn the_readme_configuration_table_matches_the_settings() {
    let documented = readme_table();
    let settings = clap_settings();
    let mut problems = Vec::new();
    for variable in settings.keys() {
        if !variable.starts_with("MAIL_DISPATCH_") {
            problems.push(format!("{variable} does not start with MAIL_DISPATCH_"));
        }
        if !documented.contains_key(variable) {
            problems.push(format!("{variable} is a setting the README does not list"));
        }
    }
    for (variable, doc) in &documented {
        let Some(defaults) = settings.get(variable) else {
            problems.push(format!("the README lists {variable}, which is no setting"));
            continue;
        };
        let actual = defaults.join(",");
        let agrees = match doc {
            Documented::Value(value) => *value == actual,
            Documented::Nothing => actual.is_empty(),
            Documented::Derived => defaults.is_empty(),
        };
        if !agrees {
            problems.push(format!(
                "{variable}: the README gives the default {doc:?}, the flag has `{actual}`"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_setting_is_listed_under_a_heading() {
    let loose: Vec<_> = command()
        .get_arguments()
        .filter(|arg| arg.get_help_heading().is_none())
        .map(|arg| arg.get_id().to_string())
        .collect();
    assert!(loose.is_empty(), "without a help heading: {loose:?}");
    command().debug_assert();
}

#[test]
fn secrets_are_never_shown_by_help() {
    let secrets = [
        "MAIL_DISPATCH_AMQP_URL",
        "MAIL_DISPATCH_DATABASE_URL",
        "MAIL_DISPATCH_TOKEN_KEY",
        "MAIL_DISPATCH_TOKEN_KEY_PREVIOUS",
        "MAIL_DISPATCH_ADMIN_TOKEN",
        "MAIL_DISPATCH_DEFAULT_TRANSPORT",
        "MAIL_DISPATCH_MICROSOFT_CLIENT_SECRET",
        "MAIL_DISPATCH_GOOGLE_CLIENT_SECRET",
    ];
    let command = command();
    for secret in secrets {
        let arg = command
            .get_arguments()
            .find(|arg| arg.get_env().is_some_and(|env| env == secret))
            .unwrap_or_else(|| panic!("{secret} is no setting"));
        assert!(arg.is_hide_env_values_set(), "{secret} would be shown");
    }
}

#[test]
fn flags_land_in_their_groups_and_secrets_stay_secret() {
    let settings = crate::settings_from_args(
        [
            "--admin-token",
            "0123456789abcdef",
            "--token-key-previous",
            "old-1,old-2",
            "--google-client-secret",
            "shh",
            "--queue-prefix",
            "demo.",
            "--concurrency",
            "3",
        ]
        .map(str::to_owned),
    )
    .expect("the flags parse");
    assert_eq!(settings.amqp.queue_prefix, "demo.");
    assert_eq!(settings.worker.concurrency, 3);
    let previous: Vec<&str> = settings
        .keys
        .token_key_previous
        .iter()
        .map(|k| k.expose_secret())
        .collect();
    assert_eq!(previous, ["old-1", "old-2"]);
    let printed = format!("{settings:?}");
    for secret in ["0123456789abcdef", "old-1", "shh"] {
        assert!(!printed.contains(secret), "Debug shows `{secret}`");
    }
    let admin = settings.admin_config().expect("valid").expect("configured");
    assert_eq!(admin.admin_token.expose_secret(), "0123456789abcdef");
}

#[test]
fn a_short_admin_token_is_refused() {
    let settings = crate::settings_from_args(["--admin-token".to_owned(), "short".to_owned()])
        .expect("the flags parse");
    let error = settings.admin_config().expect_err("too short").to_string();
    assert!(error.contains("at least 16 characters"), "{error}");
}

#[cfg(unix)]
#[test]
fn a_development_key_file_readable_by_others_is_refused() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = std::env::temp_dir().join(format!("md-key-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("key");
    let settings = |file: &std::path::Path| {
        crate::settings_from_args([
            "--dev".to_owned(),
            "--dev-key-file".to_owned(),
            file.display().to_string(),
        ])
        .unwrap()
    };
    // Created by development mode: owner-only, and used again as it is.
    let first = settings(&file).keys.token_key().unwrap();
    let again = settings(&file).keys.token_key().unwrap();
    assert_eq!(first.expose_secret(), again.expose_secret());
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let refused = settings(&file).keys.token_key().unwrap_err().to_string();
    assert!(refused.contains("readable by other users"), "{refused}");
    std::fs::remove_dir_all(&dir).unwrap();
}
