//! `--help` of every command, shell completions and the man page, from the real binary.

use crate::support::*;

/// Every flag that has a variable, and the variable (README's configuration table).
const FLAG_VARIABLES: [(&str, &str); 32] = [
    ("--database-url", "DATABASE_URL"),
    ("--encryption-key", "AMOAUTH_ENCRYPTION_KEY"),
    ("--client-id", "AMOCRM_CLIENT_ID"),
    ("--client-secret", "AMOCRM_CLIENT_SECRET"),
    ("--redirect-uri", "AMOCRM_REDIRECT_URI"),
    ("--kommo-client-id", "KOMMO_CLIENT_ID"),
    ("--kommo-client-secret", "KOMMO_CLIENT_SECRET"),
    ("--kommo-redirect-uri", "KOMMO_REDIRECT_URI"),
    ("--domains", "AMOCRM_DOMAINS"),
    ("--amocrm-url", "AMOAUTH_AMOCRM_URL"),
    ("--amocrm-timeout", "AMOAUTH_AMOCRM_TIMEOUT"),
    ("--listen", "AMOAUTH_LISTEN"),
    ("--state-ttl", "AMOAUTH_STATE_TTL"),
    ("--admin-token", "AMOAUTH_ADMIN_TOKEN"),
    ("--widget-installs", "AMOAUTH_WIDGET_INSTALLS"),
    ("--rate-limit", "AMOAUTH_RATE_LIMIT"),
    ("--trusted-proxies", "AMOAUTH_TRUSTED_PROXIES"),
    ("--per-ip-concurrency", "AMOAUTH_PER_IP_CONCURRENCY"),
    ("--read-timeout", "AMOAUTH_READ_TIMEOUT"),
    ("--base-path", "AMOAUTH_BASE_PATH"),
    ("--return-origins", "AMOAUTH_RETURN_ORIGINS"),
    ("--refresh-interval", "AMOAUTH_REFRESH_INTERVAL"),
    ("--cleanup-interval", "AMOAUTH_CLEANUP_INTERVAL"),
    ("--proxy-rate", "AMOAUTH_PROXY_RATE"),
    ("--proxy-max-wait", "AMOAUTH_PROXY_MAX_WAIT"),
    ("--audit-retention", "AMOAUTH_AUDIT_RETENTION"),
    ("--refresh-margin", "AMOAUTH_REFRESH_MARGIN"),
    ("--keepalive-age", "AMOAUTH_KEEPALIVE_AGE"),
    ("--events-url", "AMOAUTH_EVENTS_URL"),
    ("--events-secret", "AMOAUTH_EVENTS_SECRET"),
    ("--events-refreshed", "AMOAUTH_EVENTS_REFRESHED"),
    ("--log-format", "AMOAUTH_LOG_FORMAT"),
];

/// What each command reads, decided from what it does (not from its help):
/// (command, flags it must offer, flags it must not offer because it ignores them).
const COMMANDS: [(&[&str], &[&str], &[&str]); 15] = [
    (
        &["serve"],
        &[
            "--database-url",
            "--encryption-key",
            "--client-id",
            "--client-secret",
            "--redirect-uri",
            "--kommo-client-id",
            "--kommo-client-secret",
            "--kommo-redirect-uri",
            "--domains",
            "--amocrm-url",
            "--listen",
            "--proxy-rate",
            "--proxy-max-wait",
            "--admin-token",
            "--refresh-margin",
            "--events-url",
            "--log-format",
        ],
        &["--grace", "--from"],
    ),
    // The demo is its own integration and its own amoCRM.
    (
        &["demo"],
        &[
            "--listen",
            "--proxy-rate",
            "--proxy-max-wait",
            "--database-url",
            "--admin-token",
            "--log-format",
        ],
        &[
            "--client-id",
            "--client-secret",
            "--redirect-uri",
            "--kommo-client-id",
            "--amocrm-url",
            "--domains",
        ],
    ),
    // Schema only: no tokens are opened, no amoCRM is called, nothing listens.
    (
        &["migrate"],
        &["--database-url"],
        &[
            "--encryption-key",
            "--client-id",
            "--listen",
            "--admin-token",
            "--events-url",
        ],
    ),
    (
        &["cleanup"],
        &[
            "--grace",
            "--dry-run",
            "--audit-retention",
            "--database-url",
        ],
        &["--listen", "--client-id", "--encryption-key", "--state-ttl"],
    ),
    // Opens tokens for their preview, so it needs the key; calls nobody.
    (
        &["tokens"],
        &["--database-url", "--encryption-key"],
        &["--client-id", "--listen", "--refresh-margin"],
    ),
    (
        &["states"],
        &["--database-url"],
        &["--encryption-key", "--client-id", "--listen", "--state-ttl"],
    ),
    // Lists the outbox; delivering is `serve`'s.
    (
        &["events"],
        &["--database-url"],
        &[
            "--events-url",
            "--events-secret",
            "--encryption-key",
            "--listen",
        ],
    ),
    // Calls amoCRM with the integration, decides what is due, queues events; serves nothing.
    (
        &["refresh"],
        &[
            "--database-url",
            "--encryption-key",
            "--client-id",
            "--amocrm-url",
            "--refresh-margin",
            "--keepalive-age",
            "--events-url",
        ],
        &[
            "--listen",
            "--admin-token",
            "--state-ttl",
            "--refresh-interval",
        ],
    ),
    (
        &["import"],
        &[
            "--from",
            "--dry-run",
            "--database-url",
            "--encryption-key",
            "--client-id",
            "--kommo-client-id",
            "--domains",
        ],
        &[
            "--listen",
            "--admin-token",
            "--events-url",
            "--refresh-margin",
        ],
    ),
    (
        &["rotate-key"],
        &["--database-url", "--encryption-key"],
        &["--client-id", "--listen"],
    ),
    (
        &["api-key", "create"],
        &["--database-url"],
        &["--encryption-key", "--client-id", "--listen"],
    ),
    (
        &["api-key", "list"],
        &["--database-url"],
        &["--encryption-key", "--client-id", "--listen"],
    ),
    (
        &["api-key", "revoke"],
        &["--database-url"],
        &["--encryption-key", "--client-id", "--listen"],
    ),
    // The sandbox has no database; its --listen is its own (no AMOAUTH_LISTEN).
    (
        &["sandbox"],
        &[
            "--listen",
            "--client-id",
            "--client-secret",
            "--redirect-uri",
        ],
        &[
            "--database-url",
            "--encryption-key",
            "--admin-token",
            "--amocrm-url",
        ],
    ),
    (&["completions"], &[], &["--database-url", "--log-format"]),
];

fn help(command: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let output = amoauth_command(dir.path())
        .args(command)
        .arg("--help")
        .output()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(output.status.success(), "{command:?} --help: {stdout}");
    stdout
}

/// Whether the help offers `flag` (as `--flag <VALUE>`, `--flag` alone, not as a prefix).
fn offers(help: &str, flag: &str) -> bool {
    help.lines().any(|line| {
        line.split_whitespace()
            .any(|word| word.trim_end_matches(',') == flag)
    })
}

#[test]
fn each_command_offers_only_the_flags_it_reads() {
    for (command, offered, ignored) in COMMANDS {
        let help = help(command);
        for flag in offered {
            assert!(
                offers(&help, flag),
                "{command:?} should offer {flag}:\n{help}"
            );
        }
        for flag in ignored {
            assert!(!offers(&help, flag), "{command:?} ignores {flag}:\n{help}");
        }
        for (flag, variable) in FLAG_VARIABLES {
            // The sandbox's --listen has no variable: AMOAUTH_LISTEN is amoauth's own address.
            if offers(&help, flag) && !(command == ["sandbox"] && flag == "--listen") {
                let line = help
                    .lines()
                    .skip_while(|l| !offers(l, flag))
                    .take(2)
                    .collect::<String>();
                assert!(
                    line.contains(&format!("[env: {variable}]")),
                    "{command:?} {flag} names {variable}:\n{help}"
                );
            }
        }
    }
    let sandbox = help(&["sandbox"]);
    assert!(!sandbox.contains("AMOAUTH_LISTEN"), "{sandbox}");
    assert!(help(&["man"]).contains("Usage: amoauth man"));
}

#[test]
fn the_top_level_help_lists_every_command() {
    let top = help(&[]);
    for (command, _, _) in COMMANDS {
        assert!(
            top.contains(&format!("\n  {} ", command[0])),
            "{}:\n{top}",
            command[0]
        );
    }
    assert!(top.contains("\n  man "), "{top}");
    assert!(
        !offers(&top, "--database-url"),
        "no command's flag is global:\n{top}"
    );
}

fn run_ok(args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let output = amoauth_command(dir.path()).args(args).output().unwrap();
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn completions_cover_the_commands_and_their_flags() {
    let bash = run_ok(&["completions", "bash"]);
    assert!(bash.contains("complete -F _amoauth"), "{bash}");
    for command in [
        "serve",
        "demo",
        "api-key",
        "rotate-key",
        "sandbox",
        "import",
    ] {
        assert!(bash.contains(command), "{command} in:\n{bash}");
    }
    assert!(bash.contains("--dry-run") && bash.contains("--grace"));
    let zsh = run_ok(&["completions", "zsh"]);
    assert!(zsh.starts_with("#compdef amoauth"), "{zsh}");
    let fish = run_ok(&["completions", "fish"]);
    assert!(fish.contains("complete -c amoauth"), "{fish}");
    let dir = tempfile::tempdir().unwrap();
    let unknown = amoauth_command(dir.path())
        .args(["completions", "cmd.exe"])
        .output()
        .unwrap();
    assert!(!unknown.status.success());
}

#[test]
fn the_man_page_is_roff() {
    let page = run_ok(&["man"]);
    assert!(page.contains(".TH amoauth 1"), "{page}");
    assert!(
        page.contains(".SH NAME") && page.contains(".SH SUBCOMMANDS"),
        "{page}"
    );
    assert!(
        page.contains("rotate\\-key") || page.contains("rotate-key"),
        "{page}"
    );
}
