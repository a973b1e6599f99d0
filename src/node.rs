//! `myelin up`: loads the config and key, brings the tunnel up, starts the plugin host and the
//! control API, and stops everything in order (plugins, API, tunnel) on SIGINT/SIGTERM.

use crate::api::{self, ApiState};
use crate::config::Config;
use crate::host::PluginHost;
use crate::keys::PrivateKey;
use crate::tunnel::Tunnel;
use anyhow::Context;
use myelin_sdk::{MeshView, NodeIdentity, PeerView};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::watch;

/// The mesh as configured, before the data plane reports live state.
fn configured_mesh(config: &Config) -> MeshView {
    MeshView {
        peers: config
            .peers
            .iter()
            .map(|p| PeerView {
                name: p.name.to_string(),
                public_key: p.public_key.to_string(),
                overlay_ips: p.allowed_ips.clone(),
                endpoint: p.endpoint,
                ..PeerView::default()
            })
            .collect(),
    }
}

pub async fn up(config_path: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    let config = Config::load(config_path)?;
    let key = PrivateKey::load(&config.node.private_key_file)?;
    PluginHost::check(&config)?;
    let mut node = NodeIdentity {
        name: config.node.name.to_string(),
        public_key: key.public_key().to_string(),
        overlay_addresses: config.node.address.clone(),
        control_api: None,
    };
    // Probe RTTs from LAN (1 ms) to a bad cellular link (2 s).
    const RTT_BUCKETS: &[f64] = &[
        0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0,
    ];
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full("myelin_peer_rtt_seconds".into()),
            RTT_BUCKETS,
        )
        .and_then(|b| b.install_recorder())
        .map_err(|e| tracing::warn!("metrics recorder not installed: {e}"))
        .ok();
    crate::metrics_help::describe();
    let info = crate::build_info::build_info();
    metrics::gauge!(
        "myelin_build_info",
        "version" => info.version,
        "git" => info.git,
        "target" => info.target,
        "features" => info.features.join(",")
    )
    .set(1.0);

    let listener = tokio::net::TcpListener::bind(config.control.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} for the control API; fix: stop whatever uses it or set [control].listen in {}",
                config.control.listen,
                config_path.display()
            )
        })?;
    let api_addr = listener.local_addr()?;
    node.control_api = Some(api_addr);
    let token = match &config.control.token_file {
        Some(token_file) if !config.control.remote_listen.is_empty() => {
            Some(load_token(token_file)?)
        }
        _ => None,
    };
    let mesh_config = crate::mesh::shell::mesh_config(&config, key.public_key().0)?;
    let enroller = crate::mesh::shell::enroller(&config)?;
    let enroll_listener = match (config.lighthouse.enroll_listen, &enroller) {
        (Some(addr), Some(_)) => Some(tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!("cannot listen on {addr} for enrollments; fix: free the port or change [lighthouse].enroll_listen")
        })?),
        _ => None,
    };
    let (mesh_tx, mesh_rx) = watch::channel(configured_mesh(&config));
    let mut tunnel = Tunnel::start(&config, &key).await?;
    let view_stop = tokio_util::sync::CancellationToken::new();
    let view_task = {
        let view = crate::mesh::view::run(
            tunnel.peer_control(),
            tunnel.probe_socket.take(),
            std::time::Duration::from_millis(config.probe.interval_ms),
            mesh_tx,
        );
        let stop = view_stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = view => {}
            }
        })
    };
    let (members_tx, members_rx) = watch::channel(Vec::new());
    let (connectivity_tx, connectivity_rx) = watch::channel(None);
    let mesh_stop = tokio_util::sync::CancellationToken::new();
    let enroll_task = match (enroll_listener, enroller) {
        (Some(listener), Some(enroller)) => {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!("enrollment desk on {addr} (myelin join)");
            }
            Some(tokio::spawn(crate::mesh::enroll::serve(
                listener,
                enroller,
                config.lighthouse.state_file.clone(),
                members_rx.clone(),
                mesh_stop.clone(),
            )))
        }
        _ => None,
    };
    let mesh_task = match mesh_config {
        None => None,
        Some(mesh_config) => {
            let control = tunnel.peer_control();
            let rx = control
                .attach_mesh(true)
                .context("the mesh controller is attached once")?;
            tracing::info!(
                lighthouse = mesh_config.lighthouse,
                lighthouses = mesh_config.lighthouses.len(),
                "mesh member: {}",
                mesh_config
                    .chain
                    .first()
                    .map(|c| c.name().to_string())
                    .unwrap_or_default()
            );
            let files = crate::mesh::shell::MeshFiles {
                cert: config
                    .mesh
                    .as_ref()
                    .map(|m| m.cert.clone())
                    .unwrap_or_default(),
                revocations: config.mesh.as_ref().and_then(|m| m.revocations.clone()),
                overlay: config.node.address.iter().map(|a| a.addr()).collect(),
                many_ports: config.mesh.as_ref().is_none_or(|m| m.many_ports),
            };
            Some(tokio::spawn(crate::mesh::shell::run(
                files,
                mesh_config,
                control,
                rx,
                members_tx,
                connectivity_tx,
                mesh_stop.clone(),
            )))
        }
    };
    // After the tunnel, so remote_listen may be an overlay address.
    let mut remote_listeners = Vec::new();
    for addr in &config.control.remote_listen {
        remote_listeners.push(tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!("cannot listen on {addr} for remote control; fix: [control].remote_listen must be a free port on an address of this node (underlay or overlay)")
        })?);
    }
    // Names are a convenience: a node whose DNS cannot start (port 53 taken by a wildcard
    // server, say) still runs, and says why.
    let names = match (config.dns.enabled, config.node.overlay_guard) {
        (false, _) => None,
        (true, false) => {
            tracing::warn!("[dns] is not served: [node].overlay_guard = false would expose it to the physical network");
            None
        }
        (true, true) => match crate::dns::start(
            &config.dns.domain,
            config.dns.port,
            config.dns.register,
            &node,
            &tunnel.interface,
            tunnel.peer_control(),
        )
        .await
        {
            Ok(service) => Some(service),
            Err(e) => {
                tracing::warn!("the fleet's names are not served: {e}");
                None
            }
        },
    };
    let remote_auth = Arc::new(api::RemoteAuth {
        token,
        allow_groups: config.control.allow_groups.clone(),
        overlay: node.overlay_addresses.iter().map(|n| n.addr()).collect(),
        names: if config.dns.enabled {
            vec![format!(
                "{}.{}",
                node.name,
                config.dns.domain.trim_end_matches('.')
            )]
        } else {
            Vec::new()
        },
    });
    let host = Arc::new(PluginHost::start(&config, node.clone(), mesh_rx.clone())?);
    let state = Arc::new(ApiState {
        host: host.clone(),
        node: node.clone(),
        mesh: mesh_rx,
        started,
        metrics,
        tunnel: api::TunnelInfo {
            interface: tunnel.interface.clone(),
            listen_port: config.node.listen_port,
            mtu: config.node.mtu,
            offload: tunnel.offload,
        },
        peers: tunnel.peer_control(),
        members: members_rx,
        connectivity: connectivity_rx,
        event_streams: Default::default(),
        config_path: config_path.to_path_buf(),
        fleet: api::fleet::Fleet::new(config.control.fleet_port),
    });
    let shutdown = tokio_util::sync::CancellationToken::new();
    let api_stop = shutdown.clone();
    let app = api::router(state.clone(), api_addr);
    let limits = myelin_sdk::serve::Limits::default();
    let api = tokio::spawn(myelin_sdk::serve::serve(
        listener,
        app,
        limits,
        async move { api_stop.cancelled().await },
    ));
    let remote_tasks: Vec<_> = remote_listeners
        .into_iter()
        .map(|listener| {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(
                    "remote control listener on http://{addr} ({})",
                    remote_auth.describe()
                );
            }
            let stop = shutdown.clone();
            let app = api::remote_router(state.clone(), remote_auth.clone());
            tokio::spawn(myelin_sdk::serve::serve(
                listener,
                app,
                limits,
                async move { stop.cancelled().await },
            ))
        })
        .collect();
    tracing::info!(
        node = %node.name,
        public_key = %node.public_key,
        "control API listening on http://{api_addr}"
    );

    let reload_task = tokio::spawn(reload_on_sighup(
        config_path.to_path_buf(),
        tunnel.peer_control(),
        shutdown.clone(),
    ));
    wait_for_signal().await?;
    reload_task.abort();
    tracing::info!("stopping: plugins in reverse start order, then the control API and the tunnel");
    host.shutdown().await;
    shutdown.cancel();
    let _ = api.await;
    for t in remote_tasks {
        let _ = t.await;
    }
    mesh_stop.cancel();
    for t in [mesh_task, enroll_task].into_iter().flatten() {
        let _ = t.await;
    }
    view_stop.cancel();
    let _ = view_task.await;
    if let Some(names) = names {
        names.stop().await;
    }
    tunnel.stop().await;
    tracing::info!("stopped");
    Ok(())
}

/// The remote API token: first line of a 0600 file, at least 16 characters.
fn load_token(path: &Path) -> anyhow::Result<Arc<str>> {
    let text = crate::keys::read_secret(path)?;
    let token = text.lines().next().unwrap_or("").trim();
    if token.len() < 16 {
        anyhow::bail!(
            "token file {} holds a token of {} characters; fix: use at least 16 random characters, e.g. `head -c 24 /dev/urandom | base64 > {}`",
            path.display(),
            token.len(),
            path.display()
        );
    }
    Ok(Arc::from(token))
}

/// On SIGHUP, reads the config again and applies its `[firewall]` rules (established flows
/// stay); a broken config changes nothing and says why.
async fn reload_on_sighup(
    path: std::path::PathBuf,
    peers: crate::tunnel::PeerControl,
    stop: tokio_util::sync::CancellationToken,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot install the SIGHUP handler: firewall rules reload only on restart");
        return;
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            got = hup.recv() => if got.is_none() { return },
        }
        match reload_firewall(&path, &peers) {
            Ok((i, o)) => {
                tracing::info!(inbound = i, outbound = o, "SIGHUP: firewall rules reloaded")
            }
            Err(e) => tracing::warn!("SIGHUP: firewall rules not reloaded: {e}"),
        }
    }
}

/// Reads `[firewall]` from the config at `path` again and applies it (established flows stay).
/// Returns the inbound and outbound rule counts, or why nothing changed.
pub(crate) fn reload_firewall(
    path: &Path,
    peers: &crate::tunnel::PeerControl,
) -> Result<(usize, usize), String> {
    let config = Config::load(path).map_err(|e| e.to_string())?;
    let Some(section) = config.firewall else {
        return Err("[firewall] was removed from the config; a node started with a firewall keeps one until it restarts".into());
    };
    let rules = section.rule_set().map_err(|e| e.to_string())?;
    let counts = (rules.inbound.len(), rules.outbound.len());
    if !peers.set_firewall_rules(rules) {
        return Err(
            "this node started without [firewall]; restart it to turn the firewall on".into(),
        );
    }
    Ok(counts)
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    Ok(())
}
