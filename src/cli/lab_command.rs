//! `myelin lab up|status|exec|down`.

use super::{LabArgs, LabCommand};
use crate::lab::{self, LabState};
use anyhow::bail;
use std::time::Duration;

/// Prints a line; a closed stdout (the terminal went away) must not stop a teardown.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

pub async fn lab(args: &LabArgs) -> anyhow::Result<()> {
    match &args.command {
        LabCommand::Up(a) => {
            say!(
                "starting a lab of {} nodes and a lighthouse in {}: a CA, a token per node, `myelin join` on each",
                a.nodes,
                a.dir.display()
            );
            for change in lab::raise_neighbour_limits(a.nodes)? {
                say!("  raised the kernel's neighbour table for the lab: {change}");
            }
            let plugins = lab::LabPlugins::choose(a.no_plugins, a.plugins.as_deref())?;
            let state = lab::create(&a.dir, a.nodes, &plugins, a.cameras)?;
            say!("waiting for every node to reach every other:");
            // A large lab on a small machine takes longer: every node starts its plugins.
            let timeout = Duration::from_secs(60 + 3 * a.nodes as u64);
            match lab::wait_up(&state, timeout, |up, want| {
                say!("  handshakes: {up}/{want}")
            })
            .await
            {
                Ok(formed) => {
                    if let Some(t) = formed.operator {
                        say!(
                            "the operator had a session with every robot {:.1} s after the nodes started; full mesh after {:.1} s",
                            t.as_secs_f64(),
                            formed.full.as_secs_f64()
                        );
                    }
                }
                Err(e) => {
                    if !a.detach {
                        let _ = lab::destroy(&a.dir);
                    }
                    return Err(e);
                }
            }
            print_nodes(&state);
            say!("lab is up. Dashboards (from this machine):");
            for node in &state.nodes {
                say!("  {:<10} {}", node.name, state.dashboard_url(node));
            }
            if let Some(operator) = state.nodes.iter().find(|n| n.name == "operator") {
                say!(
                    "the fleet page (every robot, its interlock, health and camera): {}",
                    state.dashboard_url(operator)
                );
                say!("  this machine reaches the overlay through the operator node, so video plays here");
            }
            say!("try: myelin lab exec robot1 -- ping -c 3 10.77.0.1");
            if a.detach {
                say!("stop it with: myelin lab down --dir {}", a.dir.display());
                return Ok(());
            }
            say!("Ctrl-C stops the lab and removes it");
            wait_for_signal().await;
            say!("stopping the lab");
            lab::destroy(&a.dir)?;
            say!("lab removed");
            Ok(())
        }
        LabCommand::Status(a) => {
            let state = LabState::load(&a.dir)?;
            let (up, want) = lab::handshakes(&state).await;
            if a.json {
                let v = serde_json::json!({ "nodes": state.nodes, "sessions_up": up, "sessions_expected": want });
                say!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            print_nodes(&state);
            say!("peer sessions up: {up}/{want}");
            Ok(())
        }
        LabCommand::Exec(a) => {
            let state = LabState::load(&a.dir)?;
            let node = state.node(&a.node)?;
            let Some((program, rest)) = a.command.split_first() else {
                bail!(
                    "nothing to run; e.g. `myelin lab exec {} -- ip addr`",
                    a.node
                );
            };
            let status = std::process::Command::new("ip")
                .args(["netns", "exec", &node.namespace, program])
                .args(rest)
                .status()?;
            match (
                status.code(),
                std::os::unix::process::ExitStatusExt::signal(&status),
            ) {
                (Some(0), _) => Ok(()),
                (Some(code), _) => std::process::exit(code),
                // As a shell reports it; a reader that stopped early (SIGPIPE) is no error.
                (None, Some(libc::SIGPIPE)) => std::process::exit(128 + libc::SIGPIPE),
                (None, Some(signal)) => {
                    eprintln!("{program} was killed by signal {signal}");
                    std::process::exit(128 + signal)
                }
                (None, None) => bail!("{program} ended without an exit status"),
            }
        }
        LabCommand::Down(a) => {
            let fabric = lab::destroy(&a.dir)?;
            say!(
                "lab removed (namespaces, bridge {}, node processes)",
                fabric.bridge
            );
            Ok(())
        }
    }
}

fn print_nodes(state: &LabState) {
    say!(
        "  {:<10} {:<22} {:<14} {:<18} pid",
        "NODE",
        "OVERLAY",
        "UNDERLAY",
        "API"
    );
    for n in &state.nodes {
        say!(
            "  {:<10} {:<22} {:<14} {:<18} {}",
            n.name,
            n.overlay.join(", "),
            n.underlay,
            n.api,
            n.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into())
        );
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
