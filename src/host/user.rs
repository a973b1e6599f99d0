//! Who plugin children run as. Unset `[plugins].user` means the unprivileged system user
//! `myelin`, created when absent; `user = "root"` must be asked for by name.

use super::worker::RunAs;
use rustix::fs::{chownat, fstat, openat, AtFlags, FileType, Mode, OFlags, Stat, CWD};
use rustix::process::{Gid, Uid};
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

/// The user plugin children run as when `[plugins].user` is unset.
pub const DEFAULT_USER: &str = "myelin";

/// Where ids come from when the default user cannot be created: systemd's range for dynamic
/// users, which distributions never hand out to regular or system accounts.
const DYNAMIC_IDS: std::ops::RangeInclusive<u32> = 61184..=65519;

/// Deeper trees in a plugin's directory are refused rather than walked with more descriptors.
const MAX_DEPTH: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("cannot create system user `{name}`: useradd is not installed (tried /usr/sbin/useradd, /sbin/useradd)\n  fix: create it with your system's tool, e.g. `{}`", useradd_command(name))]
    NoUseradd { name: String },
    #[error("cannot create system user `{name}`: `{}` failed: {reason}\n  fix: run it as root where /etc is writable, or set [plugins].user to an existing user", useradd_command(name))]
    Useradd { name: String, reason: String },
}

/// The command that creates `name`, as a person would type it.
pub fn useradd_command(name: &str) -> String {
    let mut words = vec!["useradd".to_string()];
    words.extend(useradd_args(name).into_iter().map(|w| {
        if w.contains(' ') {
            format!("\"{w}\"")
        } else {
            w
        }
    }));
    words.join(" ")
}

fn useradd_args(name: &str) -> Vec<String> {
    let mut args: Vec<String> = [
        "--system",
        "--no-create-home",
        "--home-dir",
        "/nonexistent",
        "--shell",
        "/usr/sbin/nologin",
        "--comment",
        "Myelin plugins",
    ]
    .map(String::from)
    .into();
    // --user-group refuses to run when the group is already there.
    if group_exists(name) {
        args.extend(["--gid".to_string(), name.to_string()]);
    } else {
        args.push("--user-group".to_string());
    }
    args.push(name.to_string());
    args
}

fn useradd(name: &str) -> Result<(), UserError> {
    for program in ["/usr/sbin/useradd", "/sbin/useradd"] {
        let out = match std::process::Command::new(program)
            .args(useradd_args(name))
            .stdin(std::process::Stdio::null())
            .output()
        {
            Ok(out) => out,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(UserError::Useradd {
                    name: name.to_string(),
                    reason: e.to_string(),
                })
            }
        };
        if out.status.success() {
            return Ok(());
        }
        return Err(UserError::Useradd {
            name: name.to_string(),
            reason: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Err(UserError::NoUseradd {
        name: name.to_string(),
    })
}

/// Finds system user `name`, creating it (and its group) when absent. Needs root to create.
/// Returns the user and whether this call created it.
pub fn ensure_system_user(name: &str) -> Result<(RunAs, bool), UserError> {
    if let Some(user) = lookup_user(name) {
        return Ok((user, false));
    }
    let mut last = None;
    for attempt in 1..=3 {
        match useradd(name) {
            Ok(()) => {}
            Err(e @ UserError::NoUseradd { .. }) => return Err(e),
            Err(e) => last = Some(e),
        }
        // Nodes starting together race for /etc/passwd's lock; the winner's user is ours too.
        if let Some(user) = lookup_user(name) {
            return Ok((user, last.is_none()));
        }
        std::thread::sleep(Duration::from_millis(50 * attempt));
    }
    Err(last.unwrap_or_else(|| UserError::Useradd {
        name: name.to_string(),
        reason: "it succeeded, but the user cannot be looked up afterwards".into(),
    }))
}

/// The highest uid in systemd's dynamic range that is free as both uid and gid, so a node
/// that cannot create the default user picks the same ids on every start.
pub fn dynamic_ids() -> Option<RunAs> {
    DYNAMIC_IDS
        .rev()
        .find(|id| !uid_known(*id) && !gid_known(*id))
        .map(|id| RunAs { uid: id, gid: id })
}

const LOOKUP_BUF: usize = 16 * 1024;

/// Looks up a user for `[plugins].user`.
pub fn lookup_user(name: &str) -> Option<RunAs> {
    let cname = CString::new(name).ok()?;
    // SAFETY: passwd is plain data; getpwnam_r fills it in.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; LOOKUP_BUF];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the call; only the numeric ids are read afterwards.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return None;
    }
    Some(RunAs {
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
    })
}

fn uid_known(uid: u32) -> bool {
    // SAFETY: as in lookup_user.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; LOOKUP_BUF];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the call.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
    // An error is counted as taken: an id is only picked when it is certainly free.
    rc != 0 || !result.is_null()
}

fn gid_known(gid: u32) -> bool {
    // SAFETY: group is plain data; getgrgid_r fills it in.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; LOOKUP_BUF];
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the call.
    let rc = unsafe { libc::getgrgid_r(gid, &mut grp, buf.as_mut_ptr(), buf.len(), &mut result) };
    rc != 0 || !result.is_null()
}

fn group_exists(name: &str) -> bool {
    let Ok(cname) = CString::new(name) else {
        return false;
    };
    // SAFETY: group is plain data; getgrnam_r fills it in.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; LOOKUP_BUF];
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the call.
    let rc = unsafe {
        libc::getgrnam_r(
            cname.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    rc == 0 && !result.is_null()
}

fn open_at(dir: impl AsFd, name: &Path, flags: OFlags) -> std::io::Result<OwnedFd> {
    Ok(openat(dir, name, flags | OFlags::CLOEXEC, Mode::empty())?)
}

/// Chowns the inode behind an `O_PATH` descriptor, so what was checked is what changes.
fn give(fd: &OwnedFd, st: &Stat, user: RunAs) -> std::io::Result<()> {
    if (st.st_uid, st.st_gid) == (user.uid, user.gid) {
        return Ok(());
    }
    // The empty path with AT_EMPTY_PATH names `fd` itself.
    chownat(
        fd,
        "",
        Some(Uid::from_raw(user.uid)),
        Some(Gid::from_raw(user.gid)),
        AtFlags::EMPTY_PATH,
    )?;
    Ok(())
}

fn at(path: &Path, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Gives `dir` and everything under it to `user`. Files left by an earlier run as someone else
/// (root, before plugins dropped privileges by default) would otherwise be unwritable. The
/// plugin user can write here, so nothing is followed: symlinks are skipped, every step is
/// taken from an open descriptor, and files with other hard links are left alone.
pub fn chown_tree(dir: &Path, user: RunAs) -> std::io::Result<()> {
    let fd = open_at(
        CWD,
        dir,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::DIRECTORY,
    )
    .map_err(|e| at(dir, e))?;
    give(&fd, &fstat(&fd)?, user).map_err(|e| at(dir, e))?;
    walk(&fd, dir, user, 0)
}

fn walk(dir: &OwnedFd, path: &Path, user: RunAs, depth: usize) -> std::io::Result<()> {
    if depth >= MAX_DEPTH {
        return Err(std::io::Error::other(format!(
            "{} is nested more than {MAX_DEPTH} directories deep",
            path.display()
        )));
    }
    // Reopening an O_PATH descriptor through /proc reads the very directory it holds.
    let entries =
        std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd())).map_err(|e| at(path, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| at(path, e))?;
        let child = path.join(entry.file_name());
        let name = Path::new(entry.file_name().as_os_str()).to_path_buf();
        let fd = match open_at(dir, &name, OFlags::PATH | OFlags::NOFOLLOW) {
            Ok(fd) => fd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(at(&child, e)),
        };
        let st = fstat(&fd).map_err(|e| at(&child, e.into()))?;
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Symlink => {}
            FileType::Directory => {
                give(&fd, &st, user).map_err(|e| at(&child, e))?;
                walk(&fd, &child, user, depth + 1)?;
            }
            _ if st.st_nlink == 1 => give(&fd, &st, user).map_err(|e| at(&child, e))?,
            _ => {
                if (st.st_uid, st.st_gid) != (user.uid, user.gid) {
                    tracing::warn!(
                        "leaving {} to uid {}: it has other hard links, so it may be a file outside the plugin's directory; fix: remove it or chown it yourself",
                        child.display(),
                        st.st_uid
                    );
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn useradd_command_names_a_system_user_without_login() {
        let cmd = useradd_command("myelin-test-nobody-has-this");
        assert!(
            cmd.starts_with("useradd --system --no-create-home")
                && cmd.contains("--shell /usr/sbin/nologin")
                && cmd.contains("--user-group")
                && cmd.ends_with(" myelin-test-nobody-has-this"),
            "{cmd}"
        );
        // An existing group is joined, not created again.
        assert!(useradd_command("root").contains("--gid root"));
    }

    #[test]
    fn dynamic_ids_are_free_and_in_range() {
        let ids = dynamic_ids().unwrap();
        assert!(DYNAMIC_IDS.contains(&ids.uid) && ids.uid == ids.gid);
        assert!(!uid_known(ids.uid) && !gid_known(ids.gid));
        assert!(uid_known(0) && gid_known(0));
        assert_eq!(lookup_user("root").map(|u| u.uid), Some(0));
        assert!(lookup_user("no-such-user-here").is_none());
    }

    #[test]
    fn chown_tree_changes_the_tree_but_follows_no_link() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: chown needs root");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::write(&outside, b"x").unwrap();
        let linked = tmp.path().join("linked");
        std::fs::write(&linked, b"x").unwrap();
        let dir = tmp.path().join("plugin");
        std::fs::create_dir_all(dir.join("a/b")).unwrap();
        std::fs::write(dir.join("a/b/state.json"), b"{}").unwrap();
        std::fs::write(dir.join("top"), b"").unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("a/link")).unwrap();
        std::os::unix::fs::symlink(tmp.path(), dir.join("dirlink")).unwrap();
        std::fs::hard_link(&linked, dir.join("hard")).unwrap();
        let user = RunAs {
            uid: 65533,
            gid: 65532,
        };
        chown_tree(&dir, user).unwrap();
        use std::os::unix::fs::MetadataExt;
        let owner = |p: &Path| {
            let m = std::fs::symlink_metadata(p).unwrap();
            (m.uid(), m.gid())
        };
        for p in ["", "a", "a/b", "a/b/state.json", "top"] {
            assert_eq!(owner(&dir.join(p)), (65533, 65532), "{p}");
        }
        for p in [&outside, &linked, &tmp.path().to_path_buf()] {
            assert_eq!(owner(p), (0, 0), "{} must not change", p.display());
        }
    }
}
