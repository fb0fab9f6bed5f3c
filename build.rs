//! Names the commit ferrovm is built from, for `ferrovm --version`: `FERROVM_GIT_COMMIT` is
//! `git rev-parse --short=12 HEAD`, with `-dirty` when the sources that make up the binary
//! (src/, build.rs, Cargo.toml, Cargo.lock) differ from it, or `unknown` outside a git
//! checkout or without git.

use std::path::Path;
use std::process::Command;

/// What the binary is built from: a change here makes the build `-dirty`.
const SOURCES: &[&str] = &["src", "build.rs", "Cargo.toml", "Cargo.lock"];

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    Some(String::from_utf8(out.stdout).ok()?.trim().to_string())
}

fn main() {
    let commit = match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(hash) => {
            let mut status = vec!["status", "--porcelain", "--"];
            status.extend(SOURCES);
            let dirty = git(&status).is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{hash}-dirty")
            } else {
                hash
            }
        }
        None => "unknown".to_string(),
    };
    println!("cargo:rustc-env=FERROVM_GIT_COMMIT={commit}");

    // Run again when HEAD moves (checkout, commit: HEAD, the branch's ref, packed refs), the
    // index changes (add, commit) or a source changes (dirty or not). Paths that do not exist
    // are left out: cargo would run the script on every build.
    let mut watch: Vec<String> = SOURCES.iter().map(|s| s.to_string()).collect();
    let mut git_files = vec!["HEAD".to_string(), "index".into(), "packed-refs".into()];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        git_files.push(branch);
    }
    for f in git_files {
        if let Some(p) = git(&["rev-parse", "--git-path", &f]) {
            watch.push(p);
        }
    }
    for p in watch.into_iter().filter(|p| Path::new(p).exists()) {
        println!("cargo:rerun-if-changed={p}");
    }
}
