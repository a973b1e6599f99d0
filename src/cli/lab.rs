//! `myelin lab up|status|exec|down`.

use super::{LabArgs, LabCommand};
use crate::lab::{self, LabState};
use anyhow::bail;
use std::time::Duration;

pub async fn lab(args: &LabArgs) -> anyhow::Result<()> {
    match &args.command {
        LabCommand::Up(a) => {
            println!("starting a lab of {} nodes in {}", a.nodes, a.dir.display());
            let state = lab::create(&a.dir, a.nodes)?;
            println!("waiting for every node to reach every other:");
            if let Err(e) = lab::wait_up(&state, Duration::from_secs(60)).await {
                if !a.detach {
                    let _ = lab::destroy(&a.dir);
                }
                return Err(e);
            }
            print_nodes(&state);
            println!("lab is up. Dashboards (from this machine):");
            for node in &state.nodes {
                println!("  {:<10} {}", node.name, state.dashboard_url(node));
            }
            println!("try: myelin lab exec robot1 -- ping -c 3 10.77.0.1");
            if a.detach {
                println!("stop it with: myelin lab down --dir {}", a.dir.display());
                return Ok(());
            }
            println!("Ctrl-C stops the lab and removes it");
            wait_for_signal().await;
            println!("stopping the lab");
            lab::destroy(&a.dir)?;
            println!("lab removed");
            Ok(())
        }
        LabCommand::Status(a) => {
            let state = LabState::load(&a.dir)?;
            let (up, want) = lab::handshakes(&state).await;
            if a.json {
                let v = serde_json::json!({ "nodes": state.nodes, "sessions_up": up, "sessions_expected": want });
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            print_nodes(&state);
            println!("peer sessions up: {up}/{want}");
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
            match status.code() {
                Some(0) => Ok(()),
                Some(code) => std::process::exit(code),
                None => bail!("{program} was killed by a signal"),
            }
        }
        LabCommand::Down(a) => {
            lab::destroy(&a.dir)?;
            println!(
                "lab removed (namespaces, bridge {}, node processes)",
                lab::BRIDGE
            );
            Ok(())
        }
    }
}

fn print_nodes(state: &LabState) {
    println!(
        "  {:<10} {:<22} {:<14} {:<18} pid",
        "NODE", "OVERLAY", "UNDERLAY", "API"
    );
    for n in &state.nodes {
        println!(
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
