//! The mesh views handed to plugins. A plugin that judges the link probe by probe (safety) gets
//! every view, up to one per probe answer; the others get a paced feed: a view that changes who
//! the peers are, whether they are up, or where they are goes at once, and one that only moves
//! probe figures waits until a second after the last one. Each view is encoded for plugin
//! processes at most once, and only when a process is sent it.

use super::protocol::{self, HostMsg};
use myelin_sdk::MeshView;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// How often the paced feed carries views that differ only in probe figures.
pub const QUIET_GAP: Duration = Duration::from_secs(1);

/// One view, and its frame for plugin processes once one is sent it.
pub struct MeshFrame {
    pub view: MeshView,
    frame: OnceLock<bytes::Bytes>,
}

impl MeshFrame {
    pub fn new(view: MeshView) -> Self {
        MeshFrame {
            view,
            frame: OnceLock::new(),
        }
    }

    /// The encoded `HostMsg::Mesh`, shared by every process sent this view.
    pub fn frame(&self) -> bytes::Bytes {
        self.frame
            .get_or_init(|| protocol::encode(&HostMsg::Mesh(self.view.clone())).unwrap_or_default())
            .clone()
    }
}

/// The two feeds.
pub struct MeshFeeds {
    pub every: watch::Receiver<Arc<MeshFrame>>,
    pub paced: watch::Receiver<Arc<MeshFrame>>,
}

/// Feeds both from the tunnel's views until the tunnel's sender is dropped.
pub fn spawn(mut mesh: watch::Receiver<MeshView>) -> MeshFeeds {
    let first = Arc::new(MeshFrame::new(mesh.borrow_and_update().clone()));
    let (every_tx, every) = watch::channel(first.clone());
    let (paced_tx, paced) = watch::channel(first.clone());
    tokio::spawn(async move {
        let mut pace = Pace::new(&first.view, Instant::now());
        loop {
            tokio::select! {
                changed = mesh.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let frame = Arc::new(MeshFrame::new(mesh.borrow_and_update().clone()));
                    every_tx.send_replace(frame.clone());
                    if let Some(frame) = pace.offer(frame, Instant::now()) {
                        paced_tx.send_replace(frame);
                    }
                }
                _ = tokio::time::sleep_until(pace.due()), if pace.held() => {
                    if let Some(frame) = pace.release(Instant::now()) {
                        paced_tx.send_replace(frame);
                    }
                }
            }
        }
    });
    MeshFeeds { every, paced }
}

type Shape = Vec<(String, bool, Option<SocketAddr>)>;

fn shape(view: &MeshView) -> Shape {
    view.peers
        .iter()
        .map(|p| (p.name.clone(), p.up, p.endpoint))
        .collect()
}

/// The paced feed's rule, without the clock: views in, the views to publish out.
struct Pace {
    last_sent: Instant,
    shape: Shape,
    held: Option<Arc<MeshFrame>>,
}

impl Pace {
    fn new(current: &MeshView, now: Instant) -> Self {
        Pace {
            last_sent: now,
            shape: shape(current),
            held: None,
        }
    }

    /// A new view: returns it when it is to be published now, or holds it.
    fn offer(&mut self, frame: Arc<MeshFrame>, now: Instant) -> Option<Arc<MeshFrame>> {
        let shape = shape(&frame.view);
        if shape != self.shape || now >= self.last_sent + QUIET_GAP {
            self.shape = shape;
            self.held = None;
            self.last_sent = now;
            return Some(frame);
        }
        self.held = Some(frame);
        None
    }

    fn held(&self) -> bool {
        self.held.is_some()
    }

    fn due(&self) -> Instant {
        self.last_sent + QUIET_GAP
    }

    /// The held view, once its time has come.
    fn release(&mut self, now: Instant) -> Option<Arc<MeshFrame>> {
        let frame = self.held.take()?;
        self.last_sent = now;
        Some(frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use myelin_sdk::PeerView;

    fn view(rtt: f64, up: bool) -> MeshView {
        MeshView {
            peers: vec![PeerView {
                name: "operator".into(),
                up,
                rtt_ms: Some(rtt),
                ..Default::default()
            }],
        }
    }

    fn frame(rtt: f64, up: bool) -> Arc<MeshFrame> {
        Arc::new(MeshFrame::new(view(rtt, up)))
    }

    #[test]
    fn probe_figures_wait_a_second_and_the_newest_is_published() {
        let t0 = Instant::now();
        let mut pace = Pace::new(&view(1.0, true), t0);
        assert!(pace.offer(frame(2.0, true), t0).is_none());
        assert!(pace
            .offer(frame(3.0, true), t0 + Duration::from_millis(100))
            .is_none());
        assert_eq!(pace.due(), t0 + QUIET_GAP);
        let sent = pace.release(pace.due()).unwrap();
        assert_eq!(sent.view.peers[0].rtt_ms, Some(3.0));
        assert!(!pace.held());
        assert!(
            pace.release(pace.due()).is_none(),
            "nothing held, nothing sent"
        );
    }

    #[test]
    fn a_peer_going_down_is_published_at_once() {
        let t0 = Instant::now();
        let mut pace = Pace::new(&view(1.0, true), t0);
        assert!(pace.offer(frame(2.0, true), t0).is_none());
        let sent = pace.offer(frame(2.0, false), t0 + Duration::from_millis(1));
        assert!(!sent.unwrap().view.peers[0].up);
        assert!(
            !pace.held(),
            "the held view is superseded by the one published"
        );
    }

    #[test]
    fn a_view_after_a_quiet_second_is_published_at_once() {
        let t0 = Instant::now();
        let mut pace = Pace::new(&view(1.0, true), t0);
        assert!(pace.offer(frame(2.0, true), t0 + QUIET_GAP).is_some());
    }

    #[test]
    fn the_frame_is_encoded_once_and_decodes_to_the_view() {
        let f = frame(4.0, true);
        let a = f.frame();
        let b = f.frame();
        assert_eq!(a.as_ptr(), b.as_ptr(), "one encoding shared");
        assert!(!a.is_empty());
    }
}
