//! Rebuilds when a migration changes (`sqlx::migrate!` embeds them at compile time), and tells
//! the integration suite which of its outside needs this machine lacks, so the tests that need
//! them show as ignored in cargo's summary instead of passing without doing anything.
//!
//! Each need sets `cfg(amoauth_lacks_<name>)` when it is missing. In CI (`CI` set) nothing is
//! marked missing: there every test must run, and one whose need is absent fails.

use std::path::Path;

/// What a test needs from outside the project: database URLs, or programs by absolute path.
enum Need {
    Variable(&'static str),
    Programs(&'static [&'static str]),
}

const NEEDS: &[(&str, Need)] = &[
    ("postgres", Need::Variable("AMOAUTH_TEST_POSTGRES_URL")),
    ("mysql", Need::Variable("AMOAUTH_TEST_MYSQL_URL")),
    (
        "chromium",
        Need::Programs(&["/usr/bin/chromium", "/usr/bin/chromedriver"]),
    ),
    (
        "nginx",
        Need::Programs(&["/usr/sbin/nginx", "/usr/bin/openssl"]),
    ),
    ("php", Need::Programs(&["/usr/bin/php"])),
    (
        "schemathesis",
        Need::Programs(&["/opt/schemathesis/bin/st"]),
    ),
];

/// Folders whose changes (a program installed or removed) re-run this script.
const PROGRAM_FOLDERS: &[&str] = &["/usr/bin", "/usr/sbin", "/opt"];

fn main() {
    println!("cargo:rerun-if-changed=migrations");
    println!("cargo:rerun-if-env-changed=CI");
    for folder in PROGRAM_FOLDERS {
        if Path::new(folder).exists() {
            println!("cargo:rerun-if-changed={folder}");
        }
    }
    let in_ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
    for (name, need) in NEEDS {
        println!("cargo::rustc-check-cfg=cfg(amoauth_lacks_{name})");
        let present = match need {
            Need::Variable(variable) => {
                println!("cargo:rerun-if-env-changed={variable}");
                std::env::var_os(variable).is_some_and(|v| !v.is_empty())
            }
            Need::Programs(paths) => paths.iter().all(|path| Path::new(path).exists()),
        };
        if !present && !in_ci {
            println!("cargo:rustc-cfg=amoauth_lacks_{name}");
        }
    }
}
