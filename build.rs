//! Embeds the source commit in `--version`, so a released binary names the commit it
//! was built from. `SENSORHUB_COMMIT` wins (the Nix build sets it: its source has no
//! .git); else `git rev-parse HEAD`; else "unknown". Nothing time- or machine-dependent
//! is embedded, so builds stay bit-for-bit reproducible.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=SENSORHUB_COMMIT");
    let commit = std::env::var("SENSORHUB_COMMIT").ok().or_else(|| {
        // Rebuild when HEAD moves (a commit, a checkout).
        if let Ok(out) = Command::new("git")
            .args(["rev-parse", "--git-dir"])
            .output()
        {
            let git_dir = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if !git_dir.is_empty() {
                println!("cargo:rerun-if-changed={git_dir}/HEAD");
                println!("cargo:rerun-if-changed={git_dir}/refs");
            }
        }
        let out = Command::new("git")
            .args(["rev-parse", "HEAD"])
            .output()
            .ok()?;
        let head = String::from_utf8(out.stdout).ok()?.trim().to_owned();
        (out.status.success() && head.len() == 40).then_some(head)
    });
    println!(
        "cargo:rustc-env=SENSORHUB_VERSION={} (commit {})",
        env!("CARGO_PKG_VERSION"),
        commit.as_deref().unwrap_or("unknown")
    );
}
