//! The plugin side of the host protocol, the same for both isolation modes: builds the plugin,
//! runs its lifecycle, serves its routes on a Unix socket and answers the host.

use crate::host::protocol::{HostMsg, Init, PluginMsg};
use myelin_sdk::{CancellationToken, PluginContext};
use tokio::sync::{mpsc, watch};

/// Runs one plugin until the host says stop or the channel closes. Returns the plugin once it
/// stopped, so the caller decides whether it is dropped (a thread) or never is (a process that
/// ends with `_exit`: some plugins' libraries abort when torn down).
pub async fn run_plugin(
    init: Init,
    mut from_host: mpsc::UnboundedReceiver<HostMsg>,
    to_host: mpsc::UnboundedSender<PluginMsg>,
    cancel: CancellationToken,
) -> Option<Box<dyn myelin_sdk::Plugin>> {
    let fail = |reason: String| {
        let _ = to_host.send(PluginMsg::Failed { reason });
        None
    };
    if let Some(reason) = unusable_dirs(&init) {
        return fail(reason);
    }
    let Some(registration) = myelin_sdk::registration(&init.kind) else {
        return fail(format!(
            "plugin `{}` is not compiled into this binary",
            init.kind
        ));
    };
    let section: toml::Table = match toml::from_str(&init.config_toml) {
        Ok(t) => t,
        Err(e) => return fail(format!("config section does not parse: {e}")),
    };
    let mut plugin = match (registration.build)(&section) {
        Ok(p) => p,
        Err(e) => return fail(e.to_string()),
    };
    let (mesh_tx, mesh_rx) = watch::channel(init.mesh.clone());
    let ctx = PluginContext::new(
        init.node.clone(),
        &init.instance,
        section,
        mesh_rx,
        cancel.clone(),
    )
    .with_state_dir(init.state_dir.clone());
    if let Err(e) = plugin.start(ctx).await {
        return fail(format!("start: {e}"));
    }
    let http = match plugin.routes() {
        None => false,
        Some(router) => {
            let _ = std::fs::remove_file(&init.http_socket);
            let listener = match tokio::net::UnixListener::bind(&init.http_socket) {
                Ok(l) => l,
                Err(e) => {
                    return fail(format!(
                        "cannot serve routes on {}: {e}",
                        init.http_socket.display()
                    ))
                }
            };
            let stop = cancel.clone();
            tokio::spawn(async move {
                let serve = axum::serve(listener, router)
                    .with_graceful_shutdown(async move { stop.cancelled().await });
                if let Err(e) = serve.await {
                    tracing::warn!("plugin HTTP server ended: {e}");
                }
            });
            true
        }
    };
    let _ = to_host.send(PluginMsg::Ready { http });
    while let Some(msg) = from_host.recv().await {
        match msg {
            HostMsg::Mesh(view) => {
                mesh_tx.send_replace(view);
            }
            HostMsg::Ping { seq } => {
                let health = plugin.health().await;
                let _ = to_host.send(PluginMsg::Pong { seq, health });
            }
            HostMsg::Stop => break,
            HostMsg::Init(_) => tracing::warn!("ignoring a second init"),
        }
    }
    cancel.cancel();
    if let Err(e) = plugin.stop().await {
        tracing::warn!("stop: {e}");
    }
    let _ = std::fs::remove_file(&init.http_socket);
    let _ = to_host.send(PluginMsg::Stopped);
    Some(plugin)
}

/// Why this process cannot use the directories the host prepared for it, naming the directory
/// in the way and the fix; `None` when it can. A plugin user that cannot enter a parent (a
/// runtime_dir under a 0700 home, say) would otherwise fail later with a bare "permission
/// denied".
fn unusable_dirs(init: &Init) -> Option<String> {
    use rustix::fs::Access;
    use std::os::unix::fs::MetadataExt;
    let socket_dir = init
        .http_socket
        .parent()
        .unwrap_or(std::path::Path::new("/"));
    let denied = |path: &std::path::Path, mode: Access| {
        rustix::fs::access(path, mode)
            .err()
            .map(std::io::Error::from)
    };
    for (what, key, default, dir) in [
        (
            "state directory",
            "state_dir",
            "/var/lib/myelin/plugins",
            init.state_dir.as_path(),
        ),
        (
            "runtime directory",
            "runtime_dir",
            "/run/myelin",
            socket_dir,
        ),
    ] {
        let mut steps: Vec<&std::path::Path> = dir
            .ancestors()
            .skip(1)
            .filter(|p| !p.as_os_str().is_empty())
            .collect();
        steps.reverse();
        let blocked = steps
            .into_iter()
            .find_map(|p| denied(p, Access::EXEC_OK).map(|e| (p, e, "enter")))
            .or_else(|| {
                denied(dir, Access::READ_OK | Access::WRITE_OK | Access::EXEC_OK)
                    .map(|e| (dir, e, "write to"))
            });
        if let Some((path, e, verb)) = blocked {
            let how = std::fs::metadata(path)
                .map(|m| format!(" (mode {:o}, owner uid {})", m.mode() & 0o7777, m.uid()))
                .unwrap_or_default();
            let uid = rustix::process::getuid().as_raw();
            return Some(format!(
                "cannot use its {what} {}: as uid {uid} it cannot {verb} {}{how}: {e}\n  fix: let the plugin user in (`chmod o+x` on the directories above it), or set [plugins].{key} under a directory it can enter (default {default})",
                dir.display(),
                path.display()
            ));
        }
    }
    None
}
