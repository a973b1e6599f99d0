//! Reading secret files (private keys, API and WHEP tokens): the one place that decides what a
//! safe secret file is, so the node and every plugin refuse the same unsafe files.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read secret file {path}: {cause}\n  fix: create it (a key: `myelin keygen > {path}`; a token: `head -c 24 /dev/urandom | base64 > {path}`) and `chmod 600 {path}`")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("refusing secret file {path}: it is not a regular file\n  fix: point the setting at the file itself")]
    NotAFile { path: PathBuf },
    #[error("refusing secret file {path}: mode {mode:04o} lets group or others read it\n  fix: chmod 600 {path}")]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("refusing secret file {path}: it belongs to uid {owner}, not to this process (uid {me}) or root, so someone else can rewrite it\n  fix: chown {me} {path}")]
    WrongOwner { path: PathBuf, owner: u32, me: u32 },
}

/// Reads a secret file, refusing one that is not a regular file, that group or others can
/// read, or that belongs to anyone but this process's user or root.
pub fn read_secret(path: &Path) -> Result<String, SecretError> {
    let meta = std::fs::metadata(path).map_err(|cause| SecretError::Read {
        path: path.to_path_buf(),
        cause,
    })?;
    check(path, &meta, effective_uid())?;
    std::fs::read_to_string(path).map_err(|cause| SecretError::Read {
        path: path.to_path_buf(),
        cause,
    })
}

fn effective_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

fn check(path: &Path, meta: &std::fs::Metadata, me: u32) -> Result<(), SecretError> {
    let path = path.to_path_buf();
    if !meta.is_file() {
        return Err(SecretError::NotAFile { path });
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SecretError::TooOpen { path, mode });
    }
    let owner = meta.uid();
    if owner != me && owner != 0 {
        return Err(SecretError::WrongOwner { path, owner, me });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_modes_other_owners_and_directories_are_refused() {
        let dir = std::env::temp_dir().join(format!("myelin-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "0123456789abcdef\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = read_secret(&file).unwrap_err().to_string();
        assert!(e.contains("0640") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_secret(&file).unwrap(), "0123456789abcdef\n");
        let meta = std::fs::metadata(&file).unwrap();
        let e = check(&file, &meta, meta.uid() + 4242).err();
        if meta.uid() != 0 {
            assert!(matches!(e, Some(SecretError::WrongOwner { .. })), "{e:?}");
        }
        let e = read_secret(&dir).unwrap_err();
        assert!(matches!(e, SecretError::NotAFile { .. }), "{e}");
        let e = read_secret(&dir.join("missing")).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
