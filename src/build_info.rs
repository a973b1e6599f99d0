//! Facts about this binary, embedded by build.rs, plus the plugins read from inventory.

use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct BuildInfo {
    pub version: &'static str,
    pub git: &'static str,
    pub target: &'static str,
    pub profile: &'static str,
    pub rustc: &'static str,
    pub features: Vec<&'static str>,
    pub plugins: Vec<PluginInfo>,
}

#[derive(Debug, Serialize)]
pub struct PluginInfo {
    pub name: &'static str,
    pub about: &'static str,
}

pub fn build_info() -> BuildInfo {
    BuildInfo {
        version: env!("CARGO_PKG_VERSION"),
        git: env!("MYELIN_GIT"),
        target: env!("MYELIN_TARGET"),
        profile: env!("MYELIN_PROFILE"),
        rustc: env!("MYELIN_RUSTC"),
        features: env!("MYELIN_FEATURES")
            .split(',')
            .filter(|f| !f.is_empty())
            .collect(),
        plugins: myelin_sdk::registrations()
            .map(|r| PluginInfo {
                name: r.name,
                about: r.about,
            })
            .collect(),
    }
}
