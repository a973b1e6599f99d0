//! The plugin host: builds the registry from inventory, validates each `[plugins.<name>]`
//! section, and supervises every plugin instance (start, health, kill, restart with backoff,
//! `failed` after too many failures, enable/disable/restart on command).

pub mod child;
pub mod mesh_feed;
pub mod metrics_bridge;
pub mod policy;
pub mod protocol;
pub mod runner;
mod supervisor;
pub mod user;
pub mod worker;

use crate::config::{Config, ConfigError, HostSettings, Isolation, PluginInstanceConfig};
use myelin_sdk::{Health, MeshView, NodeIdentity};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "no plugin instance `{0}`\n  fix: `myelin plugins list` shows the configured instances"
    )]
    UnknownPlugin(String),
    #[error("plugin `{0}` is shutting down")]
    ShuttingDown(String),
    #[error("plugin `{0}` is disabled, so there is nothing to restart\n  fix: enable it (`myelin plugins enable {0}`)")]
    Disabled(String),
    #[error("cannot create plugin runtime directory {path}: {cause}\n  fix: set [plugins].runtime_dir to a writable directory")]
    RuntimeDir {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("cannot create plugin state directory {path}: {cause}\n  fix: set [plugins].state_dir to a writable, persistent directory (default /var/lib/myelin/plugins)")]
    StateDir {
        path: PathBuf,
        cause: std::io::Error,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PluginState {
    Starting,
    Running,
    Restarting,
    Failed,
    Disabled,
    Stopped,
}

impl PluginState {
    pub const ALL: [PluginState; 6] = [
        PluginState::Starting,
        PluginState::Running,
        PluginState::Restarting,
        PluginState::Failed,
        PluginState::Disabled,
        PluginState::Stopped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PluginState::Starting => "starting",
            PluginState::Running => "running",
            PluginState::Restarting => "restarting",
            PluginState::Failed => "failed",
            PluginState::Disabled => "disabled",
            PluginState::Stopped => "stopped",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct FailureRecord {
    /// Milliseconds since the node started.
    pub at_ms: u64,
    pub reason: String,
    /// The backoff chosen after this failure; `None` when the plugin was marked failed.
    pub restart_after_ms: Option<u64>,
}

/// What the API, CLI and dashboard show for one plugin instance.
#[derive(Clone, Debug, Serialize)]
pub struct PluginStatus {
    pub name: String,
    pub plugin: String,
    pub about: String,
    pub isolation: Isolation,
    pub enabled: bool,
    pub state: PluginState,
    pub pid: Option<u32>,
    pub serves_http: bool,
    pub restarts: u64,
    pub health: Option<Health>,
    pub health_checks_ok: u64,
    pub health_checks_missed: u64,
    pub last_health_rtt_ms: Option<f64>,
    pub abandoned_threads: u64,
    pub next_restart_in_ms: Option<u64>,
    /// The latest failures, oldest first (at most 20).
    pub failures: Vec<FailureRecord>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Enable,
    Disable,
    Restart,
    Shutdown,
}

pub(crate) struct ActionRequest {
    pub action: Action,
    pub ack: oneshot::Sender<()>,
}

struct Instance {
    name: String,
    commands: mpsc::Sender<ActionRequest>,
    status: watch::Receiver<PluginStatus>,
}

/// Everything a supervisor needs that is the same for all instances.
pub(crate) struct SupervisorShared {
    pub settings: HostSettings,
    pub node: NodeIdentity,
    pub run_as: Option<worker::RunAs>,
    pub epoch: Instant,
    /// The tunnel's views for the plugins: every one, and a paced feed.
    pub mesh: mesh_feed::MeshFeeds,
    /// Bumped on every status change of any instance.
    pub changes: watch::Sender<u64>,
}

pub struct PluginHost {
    instances: Vec<Instance>,
    shared: Arc<SupervisorShared>,
    config_path: PathBuf,
}

impl PluginHost {
    /// Validates every plugin section (compiled in, config accepted by the plugin's `build`)
    /// and starts a supervisor per instance; enabled ones start at once.
    /// Checks every plugin section (compiled in, config accepted by the plugin's `build`) and
    /// `[plugins].user`, without starting anything.
    pub fn check(config: &Config) -> Result<(), HostError> {
        validate(config).map(|_| ())
    }

    /// Validates the plugin sections and starts a supervisor per instance; enabled ones start
    /// at once.
    pub fn start(
        config: &Config,
        node: NodeIdentity,
        mesh: watch::Receiver<MeshView>,
    ) -> Result<PluginHost, HostError> {
        let (settings, validated) = validate(config)?;
        let run_as = plugin_user(config)?;
        for (inst, _) in &validated {
            if inst.isolation == Isolation::Thread && run_as.is_some_and(|u| u.uid != 0) {
                tracing::warn!(plugin = %inst.name, "isolation = \"thread\": this plugin runs inside the node, with the node's user and capabilities ([plugins].user applies to process plugins only)");
            }
            let dir = settings.runtime_dir.join(&inst.name);
            prepare_dir(&dir, run_as).map_err(|cause| HostError::RuntimeDir {
                path: dir.clone(),
                cause,
            })?;
            let dir = settings.state_dir.join(&inst.name);
            prepare_dir(&dir, run_as).map_err(|cause| HostError::StateDir {
                path: dir.clone(),
                cause,
            })?;
        }
        let mesh = mesh_feed::spawn(mesh);
        let shared = Arc::new(SupervisorShared {
            settings,
            node,
            run_as,
            epoch: Instant::now(),
            mesh,
            changes: watch::Sender::new(0),
        });
        let instances = validated
            .into_iter()
            .map(|(inst, about)| spawn_supervisor(inst, about, shared.clone()))
            .collect();
        Ok(PluginHost {
            instances,
            shared,
            config_path: config.path.clone(),
        })
    }

    pub fn statuses(&self) -> Vec<PluginStatus> {
        self.instances
            .iter()
            .map(|i| i.status.borrow().clone())
            .collect()
    }

    pub fn status(&self, name: &str) -> Option<PluginStatus> {
        self.find(name).ok().map(|i| i.status.borrow().clone())
    }

    /// A receiver that sees every change of one instance's status.
    pub fn watch(&self, name: &str) -> Option<watch::Receiver<PluginStatus>> {
        self.find(name).ok().map(|i| i.status.clone())
    }

    /// Changes whenever any instance's status changes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }

    /// The Unix socket an instance serves its routes on.
    pub fn http_socket(&self, name: &str) -> PathBuf {
        http_socket(&self.shared.settings, name)
    }

    fn find(&self, name: &str) -> Result<&Instance, HostError> {
        self.instances
            .iter()
            .find(|i| i.name == name)
            .ok_or_else(|| HostError::UnknownPlugin(name.to_string()))
    }

    /// Enable, disable or restart an instance. Enable and disable are persisted to the config
    /// file first, so a failed write changes nothing.
    pub async fn act(&self, name: &str, action: Action) -> Result<PluginStatus, HostError> {
        let inst = self.find(name)?;
        if action == Action::Restart && !inst.status.borrow().enabled {
            return Err(HostError::Disabled(name.to_string()));
        }
        match action {
            Action::Enable | Action::Disable => {
                crate::config::persist_plugin_enabled(
                    &self.config_path,
                    name,
                    action == Action::Enable,
                )?;
            }
            Action::Restart | Action::Shutdown => {}
        }
        let (ack, done) = oneshot::channel();
        inst.commands
            .send(ActionRequest { action, ack })
            .await
            .map_err(|_| HostError::ShuttingDown(name.to_string()))?;
        done.await
            .map_err(|_| HostError::ShuttingDown(name.to_string()))?;
        Ok(inst.status.borrow().clone())
    }

    /// Stops every plugin, in reverse start order, each within its grace periods.
    pub async fn shutdown(&self) {
        let budget = Duration::from_millis(self.shared.settings.stop_grace_ms * 3 + 5000);
        for inst in self.instances.iter().rev() {
            let (ack, done) = oneshot::channel();
            if inst
                .commands
                .send(ActionRequest {
                    action: Action::Shutdown,
                    ack,
                })
                .await
                .is_ok()
                && tokio::time::timeout(budget, done).await.is_err()
            {
                tracing::error!(plugin = %inst.name, "did not stop within {budget:?}");
            }
        }
    }
}

type Validated = (HostSettings, Vec<(PluginInstanceConfig, &'static str)>);

fn validate(config: &Config) -> Result<Validated, HostError> {
    let settings = config.plugins.host.clone();
    if let Some(user) = &settings.user {
        if !rustix::process::geteuid().is_root() {
            return Err(config
                .error_at(
                    &["plugins", "user"],
                    format!("running plugins as user `{user}` needs the node to run as root"),
                    "run the node as root (it needs CAP_NET_ADMIN anyway) or remove [plugins].user",
                )
                .into());
        }
        if user::lookup_user(user).is_none() {
            return Err(config
                .error_at(
                    &["plugins", "user"],
                    format!("no such user `{user}`"),
                    &format!(
                        "create it (`{}`), name an existing user, or remove the key to use `{}`",
                        user::useradd_command(user),
                        user::DEFAULT_USER
                    ),
                )
                .into());
        }
    }
    let mut validated = Vec::new();
    for inst in &config.plugins.instances {
        let Some(registration) = myelin_sdk::registration(&inst.kind) else {
            let compiled: Vec<&str> = myelin_sdk::registrations().map(|r| r.name).collect();
            if !inst.enabled {
                tracing::warn!(plugin = %inst.name, "plugin `{}` is not compiled in; its disabled section is ignored", inst.kind);
                continue;
            }
            return Err(config
                .error_at(
                    &["plugins", &inst.name],
                    format!(
                        "plugin `{}` is not compiled into this binary (compiled in: {})",
                        inst.kind,
                        if compiled.is_empty() {
                            "none".to_string()
                        } else {
                            compiled.join(", ")
                        }
                    ),
                    &format!(
                        "build with `--features {}`, or set enabled = false in [plugins.{}]",
                        inst.kind, inst.name
                    ),
                )
                .into());
        };
        if registration.process_only && inst.isolation == Isolation::Thread {
            return Err(config
                .error_at(
                    &["plugins", &inst.name, "isolation"],
                    format!(
                        "plugin `{}` cannot run inside the node's process (its libraries cannot be stopped and restarted in one process)",
                        inst.kind
                    ),
                    "remove the isolation key or set isolation = \"process\"",
                )
                .into());
        }
        if let Err(e) = (registration.build)(&inst.section) {
            return Err(config
                .error_at(
                    &["plugins", &inst.name],
                    format!("[plugins.{}]: {e}", inst.name),
                    "see the plugin's documentation for its keys",
                )
                .into());
        }
        validated.push((inst.clone(), registration.about));
    }
    Ok((settings, validated))
}

/// Who process plugins run as; `None` keeps the node's user (one that is not root). Logs the
/// choice, and warns when it is root.
fn plugin_user(config: &Config) -> Result<Option<worker::RunAs>, HostError> {
    let euid = rustix::process::geteuid().as_raw();
    if euid != 0 {
        // validate() refused an explicit user already.
        tracing::info!("the node runs as uid {euid}, not root: process plugins keep that uid and drop its capabilities");
        return Ok(None);
    }
    let (name, run_as) = match &config.plugins.host.user {
        Some(name) => match user::lookup_user(name) {
            Some(run_as) => (name.as_str(), run_as),
            None => {
                return Err(config
                    .error_at(
                        &["plugins", "user"],
                        format!("no such user `{name}` (any more)"),
                        "name an existing user, or remove the key",
                    )
                    .into())
            }
        },
        None => match user::ensure_system_user(user::DEFAULT_USER) {
            Ok((run_as, created)) => {
                if created {
                    tracing::info!(
                        "created system user `{}` (uid {}) for the plugins",
                        user::DEFAULT_USER,
                        run_as.uid
                    );
                }
                (user::DEFAULT_USER, run_as)
            }
            Err(e) => {
                let ids = user::dynamic_ids().unwrap_or(worker::RunAs {
                    uid: 65534,
                    gid: 65534,
                });
                tracing::warn!(
                    "process plugins run as uid {} gid {}, which no user owns, without capabilities: {e}\n  once the user exists, restart the node: it hands the plugins' files over at start",
                    ids.uid,
                    ids.gid
                );
                return Ok(Some(ids));
            }
        },
    };
    if run_as.uid == 0 {
        tracing::warn!(
            "[plugins].user = \"{name}\": process plugins run as root with the node's capabilities, so a bug in any plugin is a root compromise\n  fix: remove [plugins].user to run them as the unprivileged `{}` user",
            user::DEFAULT_USER
        );
    } else {
        tracing::info!(
            "process plugins run as user `{name}` (uid {}, gid {}) without capabilities",
            run_as.uid,
            run_as.gid
        );
    }
    Ok(Some(run_as))
}

pub(crate) fn http_socket(settings: &HostSettings, name: &str) -> PathBuf {
    settings.runtime_dir.join(name).join("http.sock")
}

fn prepare_dir(dir: &std::path::Path, run_as: Option<worker::RunAs>) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    match run_as {
        Some(user) => user::chown_tree(dir, user),
        None => Ok(()),
    }
}

fn spawn_supervisor(
    inst: PluginInstanceConfig,
    about: &'static str,
    shared: Arc<SupervisorShared>,
) -> Instance {
    let status = PluginStatus {
        name: inst.name.clone(),
        plugin: inst.kind.clone(),
        about: about.to_string(),
        isolation: inst.isolation,
        enabled: inst.enabled,
        state: if inst.enabled {
            PluginState::Starting
        } else {
            PluginState::Disabled
        },
        pid: None,
        serves_http: false,
        restarts: 0,
        health: None,
        health_checks_ok: 0,
        health_checks_missed: 0,
        last_health_rtt_ms: None,
        abandoned_threads: 0,
        next_restart_in_ms: None,
        failures: Vec::new(),
    };
    let (status_tx, status_rx) = watch::channel(status);
    let (cmd_tx, cmd_rx) = mpsc::channel(16);
    let name = inst.name.clone();
    tokio::spawn(supervisor::Supervisor::new(inst, shared, status_tx, cmd_rx).run());
    Instance {
        name,
        commands: cmd_tx,
        status: status_rx,
    }
}
