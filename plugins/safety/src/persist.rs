//! The interlock's saved state: one small JSON file in the plugin instance's state directory,
//! written atomically (temp file, fsync, rename, fsync of the directory) on every transition and
//! read on every start, so that a stop outlives a restart of the plugin, the process or the node.

use crate::interlock::State;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const FILE_NAME: &str = "interlock.json";
const VERSION: u32 = 1;

/// What is saved on every transition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Saved {
    pub version: u32,
    pub state: State,
    /// Why motion is stopped (`startup`, `latency`, `heartbeat`); none while armed.
    pub reason: Option<String>,
    pub peer: Option<String>,
    /// Whether the stop ends only with a re-arm.
    pub rearm_required: bool,
    /// The latest action generation: keeps growing across restarts.
    pub generation: u64,
    /// Unix milliseconds of the transition.
    pub since_unix_ms: u128,
    /// The trip that made a re-arm necessary, carried across restarts until the re-arm.
    #[serde(default)]
    pub cause: Option<Cause>,
}

/// A trip that stopped motion.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cause {
    pub reason: String,
    pub peer: Option<String>,
    pub since_unix_ms: u128,
}

impl Saved {
    pub fn new(
        state: State,
        reason: Option<String>,
        peer: Option<String>,
        rearm_required: bool,
        generation: u64,
        since_unix_ms: u128,
        cause: Option<Cause>,
    ) -> Saved {
        Saved {
            version: VERSION,
            state,
            reason,
            peer,
            rearm_required,
            generation,
            since_unix_ms,
            cause,
        }
    }
}

/// What a start found.
#[derive(Clone, Debug, PartialEq)]
pub enum Restored {
    /// No file: the first start in this state directory.
    Missing,
    Found(Saved),
    /// A file that cannot be read or understood; `why` says what is wrong with it.
    Corrupt {
        why: String,
    },
}

impl Restored {
    /// Whether the start must wait for a re-arm (with `latch`): a saved stop that needed one
    /// (latched, or tripped/clearing after a trip), and a state that cannot be known.
    pub fn rearm_required(&self) -> bool {
        match self {
            Restored::Missing => false,
            Restored::Found(s) => s.rearm_required || s.state == State::Latched,
            Restored::Corrupt { .. } => true,
        }
    }

    /// The trip behind a saved stop that needs a re-arm.
    pub fn cause(&self) -> Option<Cause> {
        match self {
            Restored::Found(s) if self.rearm_required() => s.cause.clone(),
            _ => None,
        }
    }

    /// The generation to continue from (0 without a usable file: the numbers then start over).
    pub fn generation(&self) -> u64 {
        match self {
            Restored::Found(s) => s.generation,
            _ => 0,
        }
    }

    /// The start-up log line: what was found and what it means.
    pub fn describe(&self, path: &Path, latch: bool) -> String {
        let needs = if latch && self.rearm_required() {
            "stopped until the link is good and a person re-arms"
        } else {
            "stopped until the link has been good for the clearing time"
        };
        match self {
            Restored::Missing => format!(
                "no saved interlock state at {} (first start): {needs}",
                path.display()
            ),
            Restored::Found(s) => format!(
                "saved interlock state at {}: {:?}{}{}{}: {needs}",
                path.display(),
                s.state,
                s.reason
                    .as_deref()
                    .map(|r| format!(", reason {r}"))
                    .unwrap_or_default(),
                s.cause
                    .as_ref()
                    .map(|c| format!(
                        ", stopped by {}{}",
                        c.reason,
                        c.peer
                            .as_deref()
                            .map(|p| format!(" on the link to {p}"))
                            .unwrap_or_default()
                    ))
                    .unwrap_or_default(),
                if s.rearm_required {
                    ", re-arm required"
                } else {
                    ""
                }
            ),
            Restored::Corrupt { why } => format!(
                "saved interlock state at {} is unusable ({why}); assuming the worst: {needs}",
                path.display()
            ),
        }
    }
}

/// The file of the instance whose state directory is `dir`.
pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

/// Reads the saved state. A damaged file is moved aside (`interlock.json.corrupt`) rather than
/// overwritten by the next save, so it can still be looked at.
pub fn load(path: &Path) -> Restored {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Restored::Missing,
        Err(e) => return Restored::Corrupt { why: e.to_string() },
    };
    match parse(&bytes) {
        Restored::Corrupt { why } => {
            let aside = path.with_extension("json.corrupt");
            let why = match std::fs::rename(path, &aside) {
                Ok(()) => format!("{why}; kept as {}", aside.display()),
                Err(e) => format!("{why}; cannot move it aside: {e}"),
            };
            Restored::Corrupt { why }
        }
        restored => restored,
    }
}

/// Parses a state file's bytes; never panics, whatever they are.
pub fn parse(bytes: &[u8]) -> Restored {
    match serde_json::from_slice::<Saved>(bytes) {
        Ok(s) if s.version == VERSION => Restored::Found(s),
        Ok(s) => Restored::Corrupt {
            why: format!(
                "version {} is not the {VERSION} this binary writes",
                s.version
            ),
        },
        Err(e) => Restored::Corrupt {
            why: format!("not a state file: {e}"),
        },
    }
}

/// Writes `saved` so that a crash or power loss leaves the old file or the new one, whole.
pub fn store(path: &Path, saved: &Saved) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(saved).map_err(std::io::Error::other)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{FILE_NAME}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    // The rename itself is durable only once the directory is.
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saved(state: State, rearm_required: bool) -> Saved {
        Saved::new(
            state,
            Some("latency".into()),
            Some("operator".into()),
            rearm_required,
            7,
            1,
            rearm_required.then(|| Cause {
                reason: "latency".into(),
                peer: Some("operator".into()),
                since_unix_ms: 1,
            }),
        )
    }

    #[test]
    fn a_stored_state_loads_back_and_replaces_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path());
        assert_eq!(load(&p), Restored::Missing);
        store(&p, &saved(State::Tripped, false)).unwrap();
        store(&p, &saved(State::Latched, true)).unwrap();
        assert_eq!(load(&p), Restored::Found(saved(State::Latched, true)));
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temp file left: {left:?}");
    }

    #[test]
    fn what_needs_a_rearm() {
        assert!(!Restored::Missing.rearm_required());
        assert!(!Restored::Found(saved(State::Armed, false)).rearm_required());
        assert!(Restored::Found(saved(State::Tripped, true)).rearm_required());
        assert!(Restored::Found(saved(State::Latched, false)).rearm_required());
        assert!(Restored::Corrupt { why: "x".into() }.rearm_required());
    }

    #[test]
    fn damaged_files_are_corrupt_and_say_why() {
        for bytes in [
            &b""[..],
            b"{",
            b"null",
            b"{\"version\":1}",
            b"\xff\xfe",
            br#"{"version":2,"state":"armed","reason":null,"peer":null,"rearm_required":false,"generation":1,"since_unix_ms":1}"#,
            br#"{"version":1,"state":"flying","reason":null,"peer":null,"rearm_required":false,"generation":1,"since_unix_ms":1}"#,
        ] {
            match parse(bytes) {
                Restored::Corrupt { why } => assert!(!why.is_empty()),
                other => panic!("{bytes:?} parsed as {other:?}"),
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path());
        std::fs::write(&p, b"garbage").unwrap();
        let r = load(&p);
        assert!(r.describe(&p, true).contains("assuming the worst"), "{r:?}");
        assert!(r.describe(&p, true).contains("re-arms"));
        // Moved aside, not overwritten by the next save.
        assert!(!p.exists());
        assert_eq!(
            std::fs::read(dir.path().join("interlock.json.corrupt")).unwrap(),
            b"garbage"
        );
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_parse_without_panicking(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = parse(&bytes);
        }
    }
}
