//! `emissary version`.

/// `emissary 0.1.0 (commit 0123abcd, x86_64-unknown-linux-gnu, static)`.
pub fn describe() -> String {
    let linkage = if cfg!(target_feature = "crt-static") {
        "static"
    } else {
        "dynamic"
    };
    format!(
        "emissary {} (commit {}, {}, {linkage})",
        env!("CARGO_PKG_VERSION"),
        env!("EMISSARY_GIT_COMMIT"),
        env!("EMISSARY_TARGET"),
    )
}
