//! HELP texts for every metric the core emits, so `/metrics` passes `promtool check metrics`.

pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(
        "myelin_build_info",
        "Build facts of this node, as labels; always 1."
    );
    describe_counter!(
        "myelin_peer_rx_bytes_total",
        Unit::Bytes,
        "Bytes received from the peer through the tunnel."
    );
    describe_counter!(
        "myelin_peer_tx_bytes_total",
        Unit::Bytes,
        "Bytes sent to the peer through the tunnel."
    );
    describe_counter!(
        "myelin_peer_rx_packets_total",
        "Packets received from the peer and written to the TUN device."
    );
    describe_counter!(
        "myelin_peer_tx_packets_total",
        "Packets read from the TUN device and sent to the peer."
    );
    describe_counter!(
        "myelin_tunnel_handshake_dh_total",
        "Handshake initiations that passed the mac1/cookie checks and cost a Diffie-Hellman step."
    );
    metrics::counter!("myelin_tunnel_handshake_dh_total").absolute(0);
    describe_counter!(
        "myelin_tunnel_bulk_dropped_total",
        "Bulk packets read from the TUN and dropped because the bulk queue (4 MiB) was full: the loss signal a bulk sender gets when it outruns the tunnel. Urgent packets never wait there."
    );
    metrics::counter!("myelin_tunnel_bulk_dropped_total", "direction" => "out").absolute(0);
    describe_counter!(
        "myelin_multicast_packets_total",
        "Multicast packets of a [multicast] group: direction out (read from the TUN, before replication) or in (from a member, written to the TUN)."
    );
    describe_counter!(
        "myelin_multicast_replicas_total",
        "Copies of outbound multicast packets sent, one per subscribed member in [multicast].to."
    );
    describe_counter!(
        "myelin_multicast_bytes_total",
        "Bytes of multicast packets: out counts every copy sent (the replication cost), in every packet accepted."
    );
    describe_counter!(
        "myelin_multicast_dropped_total",
        "Multicast packets not replicated (out) or not accepted (in): reason not_configured (a group outside [multicast].groups), scope (TTL 0 or interface-local), rate_limited (over the group's cap), membership (IGMP/MLD, never carried: membership travels in the roster), malformed."
    );
    for direction in ["out", "in"] {
        for reason in ["not_configured", "scope", "rate_limited"] {
            metrics::counter!("myelin_multicast_dropped_total", "direction" => direction, "reason" => reason)
                .absolute(0);
        }
    }
    describe_counter!(
        "myelin_tunnel_handshake_refused_total",
        "Handshake messages dropped before any Diffie-Hellman work: reason mac1 (bad MAC) or under_load (answered with a cookie reply)."
    );
    describe_counter!(
        "myelin_peer_endpoint_changes_total",
        "Times the peer's endpoint moved (roaming)."
    );
    describe_counter!(
        "myelin_path_changes_total",
        "Times a peer's path changed: to a relay (the direct path went silent or never answered), or to direct (a direct try was answered both ways)."
    );
    describe_counter!(
        "myelin_path_direct_tries_total",
        "Direct keepalives sent to relayed peers (every 5 s each): an answer ends the relaying."
    );
    describe_counter!(
        "myelin_relayed_bytes_total",
        Unit::Bytes,
        "WireGuard datagrams this node sent to peers (out) or received from them (in) through a relay."
    );
    describe_counter!(
        "myelin_relay_bytes_total",
        Unit::Bytes,
        "WireGuard datagrams this relay forwarded between members."
    );
    describe_counter!(
        "myelin_relay_refused_total",
        "Datagrams this relay did not forward, by reason: not_member, unknown_target (not a member with a session here), over_rate, loop, not_wireguard."
    );
    describe_counter!(
        "myelin_roams_total",
        "Times this node's own addresses or routes changed and every peer was told its new endpoint at once."
    );
    describe_gauge!(
        "myelin_peer_up",
        "1 while a WireGuard session with the peer is current."
    );
    describe_gauge!(
        "myelin_peer_last_handshake_timestamp_seconds",
        Unit::Seconds,
        "Unix time of the latest completed handshake with the peer."
    );
    describe_gauge!(
        "myelin_peer_loss_ratio",
        "Share of recent probes to the peer that went unanswered."
    );
    describe_histogram!(
        "myelin_peer_rtt_seconds",
        Unit::Seconds,
        "Round-trip time of probes to the peer."
    );
    describe_gauge!(
        "myelin_plugin_up",
        "1 while the plugin runs and answers health checks."
    );
    describe_gauge!(
        "myelin_plugin_state",
        "1 for the plugin's current state, 0 for the others."
    );
    describe_counter!(
        "myelin_plugin_restarts_total",
        "Restarts of the plugin after failures."
    );
    describe_counter!(
        "myelin_plugin_health_missed_total",
        "Health checks the plugin did not answer in time."
    );
    describe_counter!(
        "myelin_plugin_abandoned_threads_total",
        "Thread-isolated plugin runs that would not stop and were left running."
    );
}
